"""Generate docs/reliability.md: every bad input tried and the error the user gets, faults injected
and what survived, and the soak run. Nothing in that page is written by hand:

    python -m benchmarks.reliability      (also run by `make bench`)
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import modaldiag as md
from modaldiag.utils.io import atomic_directory, atomic_write_text, write_marker

from .cases import all_cases, run_case
from .common import Table, machine_info
from .soak import soak

ROOT = Path(__file__).resolve().parent.parent


def _error(fn) -> tuple[str, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            fn()
    except Exception as exc:  # noqa: BLE001 - we report whatever the user would see
        return type(exc).__name__, str(exc).splitlines()[0][:300]
    return "(no error)", ""


AREA_TITLES = {
    "inputs": "Bad input at the public boundary",
    "files": "The user's files and folders",
    "training": "Training that fails loudly",
    "probes": "Probes: no side effects, one baseline rule",
    "fisher": "Per-sample Fisher on every kind of encoder",
    "regulators": "Regulators: fresh state, advancing randomness, validated arguments",
    "models": "Models, modality names and datasets",
}


def case_tables(tmp: Path) -> tuple[list[Table], int]:
    """One table per area; returns the tables and the number of cases whose check failed."""
    by_area: dict[str, list] = {}
    for case in all_cases(tmp):
        by_area.setdefault(case.area, []).append(run_case(case))
    tables, failed = [], 0
    for area, outcomes in by_area.items():
        table = Table(AREA_TITLES.get(area, area), ["case", "what happened", "checked"],
                      note=f"benchmarks/cases/{area}.py; the same cases run in "
                           "tests/test_reliability_cases.py.")
        for o in outcomes:
            failed += not o.ok
            happened = o.happened.replace(str(Path(tmp).resolve()), "<tmp>").replace(str(tmp), "<tmp>")
            table.rows.append([o.case.name, happened.replace("|", "\\|"),
                               "passed" if o.ok else "**FAILED**"])
        tables.append(table)
    return tables, failed


def _verdict(ok: bool) -> str:
    return "passed" if ok else "**FAILED**"


def faults() -> Table:
    table = Table("Faults injected and what survived", ["fault", "what happened", "survived"])
    script = ROOT / "tests" / "crash" / "train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, str(script), str(tmp / "ref"), str(tmp / "ref.pt"), "6"],
                       check=True, env=env, capture_output=True)
        proc = subprocess.Popen([sys.executable, str(script), str(tmp / "k"), str(tmp / "x.pt"), "6",
                                 "--slow"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (tmp / "k" / "history.json").exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(0.15)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run([sys.executable, str(script), str(tmp / "k"), str(tmp / "k.pt"), "6", "--resume",
                        "--slow"], check=True, env=env, capture_output=True)
        a, b = torch.load(tmp / "ref.pt", weights_only=True), torch.load(tmp / "k.pt", weights_only=True)
        same = all(torch.equal(a[k], b[k]) for k in a)
        table.rows.append(["SIGKILL of a training run mid-epoch (3 regulators, scheduler, shuffling)",
                           f"killed (exit {proc.returncode}); resumed from last.pt; final weights "
                           + ("bit-identical" if same else "DIFFERENT"), _verdict(same)])
        # a truncated checkpoint
        (tmp / "k" / "last.pt").write_bytes((tmp / "k" / "last.pt").read_bytes()[:100])
        out = subprocess.run([sys.executable, str(script), str(tmp / "k"), str(tmp / "k2.pt"), "6",
                              "--resume"], env=env, capture_output=True, text=True)
        last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1][:200] if out.stderr else ""
        refused = out.returncode != 0 and "cannot load checkpoint" in last
        table.rows.append(["last.pt truncated on disk, then resume", f"exit {out.returncode}: {last}",
                           _verdict(refused)])
        # crash while writing a report folder
        report = tmp / "report"
        report.mkdir()
        (report / "report.html").write_text("previous report")
        write_marker(report, "diagnosis")

        def crash():
            with atomic_directory(report) as work:
                (work / "report.html").write_text("half")
                raise RuntimeError("simulated crash while writing")

        _error(crash)
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".report")
                     and not p.name.endswith(".lock")]
        kept = (report / "report.html").read_text()
        table.rows.append(["exception while writing a report folder",
                           f"previous folder kept: {kept!r}; partial folders left: {leftovers or 'none'}",
                           _verdict(kept == "previous report" and not leftovers)])
        # hostile names in the HTML report
        data = md.datasets.synthetic(n_samples=120, num_classes=3,
                                     strength={"<script>alert(1)</script>": 2.0, "b": 0.5}, dims=4, seed=0)
        model = md.models.default_model(data, feature_dim=4)
        rep = md.diagnose(model, data.train.loader(64), data.val.loader(64), fisher=None)
        page = rep.to_html(title="<img src=x onerror=alert(1)>")
        escaped = "<script>" not in page and "<img src=x" not in page and "&lt;script&gt;" in page
        table.rows.append(["hostile modality and run names in the HTML report",
                           "escaped (&lt;script&gt;...)" if escaped else "NOT escaped", _verdict(escaped)])
    return table


def soak_table(epochs_each: int = 15) -> Table:
    records = soak(epochs_each)
    table = Table(f"Soak: every regulator in turn, {epochs_each} epochs each with checkpoints "
                  f"every epoch ({len(records)} epochs)",
                  ["regulator", "RSS first epoch MB", "RSS last epoch MB", "open file handles"])
    for name in dict.fromkeys(r["regulator"] for r in records):
        rs = [r for r in records if r["regulator"] == name]
        table.rows.append([name, rs[0]["rss_mb"], rs[-1]["rss_mb"], sorted({r["fds"] for r in rs})])
    return table


def main() -> int:
    info = machine_info()
    parts = ["# Reliability", "", "Produced by `python -m benchmarks.reliability` (run by `make bench`); "
             "do not edit by hand.", "",
             f"{info['date']} · Python {info['python']} · torch {info['torch']} · modaldiag {info['modaldiag']}", "",
             "Tests covering the same ground: tests/test_reliability_cases.py (every case below), tests/test_crash.py (SIGKILL and resume, corrupt and "
             "malicious checkpoints), tests/test_fuzz.py (random shapes, garbage CLI values and CSVs), "
             "tests/test_report.py (hostile names), tests/test_soak.py (`make test-all`).", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tables, failed = case_tables(Path(tmp))
    fault_table = faults()
    failed += sum(row[-1] != "passed" for row in fault_table.rows)
    parts += [f"{sum(len(t.rows) for t in tables) + len(fault_table.rows)} checks, "
              f"{failed} failed. Every \"checked\" cell is the result of an assertion that ran.", ""]
    for table in (*tables, fault_table, soak_table()):
        parts.append(table.to_markdown())
    atomic_write_text(ROOT / "docs" / "reliability.md", "\n".join(parts))
    print(f"wrote docs/reliability.md ({failed} failed checks)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
