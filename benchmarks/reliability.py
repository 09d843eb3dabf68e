"""Generate docs/reliability.md: every bad input tried and the error the user gets, faults injected
and what survived, and the soak run. Nothing in that page is written by hand:

    python -m benchmarks.reliability      (also run by `make bench`)
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import modaldiag as md
from modaldiag.cli import main as cli_main
from modaldiag.utils.io import atomic_directory, atomic_write_text, safe_torch_load

from .common import Table, machine_info
from .soak import soak

ROOT = Path(__file__).resolve().parent.parent


def _error(fn) -> tuple[str, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            fn()
    except SystemExit as exc:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return "SystemExit", f"exit code {exc.code}: {lines[-1] if lines else ''}"
    except Exception as exc:  # noqa: BLE001 - we report whatever the user would see
        return type(exc).__name__, str(exc).splitlines()[0][:300]
    return "(no error)", ""


def bad_inputs() -> Table:
    data = md.datasets.synthetic(n_samples=120, num_classes=3, strength={"a": 2.0, "b": 0.5},
                                 dims={"a": 4, "b": 4}, seed=0)
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=4)
    x, y = next(iter(data.train.loader(16)))
    nan = {k: v.clone() for k, v in x.items()}
    nan["b"][3, 1] = float("nan")

    class Leaky(md.MultimodalClassifier):
        def head(self, features, present=None):
            return self.fuse(features)

    leaky = Leaky(dict(model.encoders), model.feature_dims, 3)

    def fit(loader, **kw):
        return md.fit(model, loader, epochs=1, progress=False, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "audio").mkdir()
        (tmp / "visual").mkdir()
        (tmp / "latin1.csv").write_bytes("clip,étiquette\n".encode("latin-1"))
        (tmp / "escape.csv").write_text("../../etc/passwd,ANG\n")
        (tmp / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")

        class Evil:
            def __reduce__(self):
                return (os.system, ("true",))

        (tmp / "evil.pt").write_bytes(pickle.dumps(Evil()))
        cases = [
            ("wrong modality name in the batch", lambda: fit([({"a": x["a"], "video": x["b"]}, y)])),
            ("extra modality in the batch", lambda: fit([({**x, "c": x["a"]}, y)])),
            ("batch sizes differ between modalities", lambda: fit([({"a": x["a"], "b": x["b"][:5]}, y)])),
            ("float64 input for a float32 encoder", lambda: model({"a": x["a"].double(), "b": x["b"]})),
            ("input of the wrong width", lambda: model({"a": x["a"][:, :2], "b": x["b"]})),
            ("labels outside [0, C)", lambda: fit([(x, y + 5)])),
            ("float labels", lambda: fit([(x, y.float())])),
            ("empty loader", lambda: fit([])),
            ("a single class", lambda: fit(data.train.subset(
                torch.nonzero(data.train.labels == 0).flatten()).loader(16))),
            ("NaN in one modality's input", lambda: fit([(nan, y)])),
            ("M < 2 modalities", lambda: md.MultimodalClassifier({"a": nn.Linear(2, 2)}, {"a": 2}, 3)),
            ("a head that ignores present=", lambda: md.shapley(leaky, [(x, y)])),
            ("unknown fusion", lambda: md.MultimodalClassifier(dict(model.encoders), model.feature_dims, 3,
                                                              fusion="attention")),
            ("unknown Shapley value function", lambda: md.shapley(model, [(x, y)], value="accuracy")),
            ("unknown dataset name", lambda: md.datasets.load("cremad")),
            ("resume without a checkpoint folder", lambda: fit([(x, y)], resume=True)),
            ("Re-learning without held-out data", lambda: md.fit(model, [(x, y)], epochs=1,
                                                                 regulator=md.Relearning(every=1),
                                                                 progress=False)),
            ("OGM combined with MMPareto", lambda: fit([(x, y)], regulator=[md.OGM(), md.MMPareto()])),
            ("clip list that is not UTF-8", lambda: md.datasets.AVFolderDataset(tmp, "latin1.csv")),
            ("clip id escaping the dataset root", lambda: md.datasets.AVFolderDataset(tmp, "escape.csv")[0]),
            ("corrupt checkpoint", lambda: safe_torch_load(tmp / "corrupt.pt")),
            ("checkpoint holding a code-running pickle", lambda: safe_torch_load(tmp / "evil.pt")),
            ("CLI: --epochs 0", lambda: cli_main(["train", "--dataset", "hapt", "--epochs", "0",
                                                     "--out", str(tmp / "x")])),
            ("CLI: unknown dataset (exit code)", lambda: sys.exit(cli_main(
                ["train", "--dataset", "nope", "--out", str(tmp / "x"), "--quiet"]))),
            ("CLI: diagnose a folder that is not a run (exit code)", lambda: sys.exit(cli_main(
                ["diagnose", "--run", str(tmp)]))),
        ]
        table = Table("Bad input: what the user gets",
                      ["input", "exception", "message (first line)"],
                      note="Produced by calling modaldiag with each bad input (benchmarks/reliability.py).")
        for name, fn in cases:
            kind, message = _error(fn)
            table.rows.append([name, kind, message.replace("|", "\\|")])
    return table


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
                           f"killed (exit {proc.returncode}); resumed from last.pt",
                           "bit-identical final weights" if same else "DIFFERENT weights"])
        # a truncated checkpoint
        (tmp / "k" / "last.pt").write_bytes((tmp / "k" / "last.pt").read_bytes()[:100])
        out = subprocess.run([sys.executable, str(script), str(tmp / "k"), str(tmp / "k2.pt"), "6",
                              "--resume"], env=env, capture_output=True, text=True)
        last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1][:200] if out.stderr else ""
        table.rows.append(["last.pt truncated on disk, then resume", f"refused: {last}",
                           "nothing executed; best.pt and history.json untouched"])
        # crash while writing a report folder
        report = tmp / "report"
        report.mkdir()
        (report / "report.html").write_text("previous report")

        def crash():
            with atomic_directory(report) as work:
                (work / "report.html").write_text("half")
                raise RuntimeError("simulated crash while writing")

        _error(crash)
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".report")]
        table.rows.append(["exception while writing a report folder",
                           f"previous folder kept: {(report / 'report.html').read_text()!r}; "
                           f"partial folders left: {leftovers or 'none'}", "yes"])
        # hostile names in the HTML report
        data = md.datasets.synthetic(n_samples=120, num_classes=3,
                                     strength={"<script>alert(1)</script>": 2.0, "b": 0.5}, dims=4, seed=0)
        model = md.models.default_model(data, feature_dim=4)
        rep = md.diagnose(model, data.train.loader(64), data.val.loader(64), fisher=None)
        page = rep.to_html(title="<img src=x onerror=alert(1)>")
        table.rows.append(["hostile modality and run names in the HTML report",
                           "escaped (&lt;script&gt;...)" if "<script>" not in page and "<img src=x" not in page
                           else "NOT escaped", "yes"])
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
             "Tests covering the same ground: tests/test_crash.py (SIGKILL and resume, corrupt and "
             "malicious checkpoints), tests/test_fuzz.py (random shapes, garbage CLI values and CSVs), "
             "tests/test_report.py (hostile names), tests/test_soak.py (`make test-all`).", ""]
    for table in (bad_inputs(), faults(), soak_table()):
        parts.append(table.to_markdown())
    atomic_write_text(ROOT / "docs" / "reliability.md", "\n".join(parts))
    print("wrote docs/reliability.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
