"""Time to answer on a shared CPU: the same job with torch thread counts, alone and beside
competing CPU-bound processes.

Each measurement is a fresh process (``python -m benchmarks.bench_contention --job ...``) that
sets its thread count with ``md.set_threads`` (``auto``: ``md.set_threads()``, the default of
``modaldiag.utils.threads.default_threads``), loads hapt, and times ``md.fit`` (and, for the
``diagnose`` job, ``md.diagnose`` on the trained model) with the wall clock. The competitors are
one pure-Python busy loop per available core, started before the job and stopped after it; they
stand for the other jobs on a shared machine. A job still running after ``TIMEOUT_S`` is stopped
and reported as ``> TIMEOUT_S``. The 1-minute load average before each job is recorded: anything
else running on the machine (a benchmark, a test suite) counts as contention too.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from .common import Table

ROOT = Path(__file__).resolve().parent.parent
#: a job still running after this many seconds is stopped and reported as "> TIMEOUT_S"
TIMEOUT_S = {True: 60, False: 180}


# ---------------------------------------------------------------- the measured job (a subprocess)
def job(threads: str, kind: str, epochs: int) -> dict:
    """Train hapt's default model for ``epochs`` (seed 0), then diagnose it when ``kind`` is
    ``"diagnose"``; returns the seconds of each phase and the thread count used."""
    import torch

    import modaldiag as md

    used = md.set_threads(None if threads == "auto" else int(threads))
    print(json.dumps({"threads": used}), flush=True)  # read back even if the job is stopped
    data = md.datasets.load("hapt")
    torch.manual_seed(0)
    model = md.models.default_model(data)
    train, val, test = data.loaders(64)
    t0 = time.perf_counter()
    md.fit(model, train, val, epochs=epochs, progress=False, seed=0)
    out = {"threads": used, "fit_s": time.perf_counter() - t0}
    if kind == "diagnose":
        kwargs = {"progress": False}
        if "train_loader" in inspect.signature(md.diagnose).parameters:
            kwargs["train_loader"] = data.train.loader(512)
        t0 = time.perf_counter()
        md.diagnose(model, data.test.loader(512), data.val.loader(512), **kwargs)
        out["diagnose_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------- competitors
def _busy(stop) -> None:  # pragma: no cover - runs in a child process
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


class Competitors:
    """``n`` CPU-bound busy-loop processes for the duration of a ``with`` block."""

    def __init__(self, n: int):
        self.n = n
        self.stop = multiprocessing.Event()
        self.procs: list[multiprocessing.Process] = []

    def __enter__(self):
        for _ in range(self.n):
            p = multiprocessing.Process(target=_busy, args=(self.stop,), daemon=True)
            p.start()
            self.procs.append(p)
        time.sleep(0.5 if self.procs else 0)  # let them reach the run queue
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure(threads: str, kind: str, epochs: int, competitors: int, timeout: float) -> dict:
    """Run :func:`job` in a fresh process beside ``competitors`` busy loops."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "benchmarks.bench_contention", "--job", threads, kind,
           str(epochs)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "MODALDIAG_THREADS")}
    with Competitors(competitors):
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout, check=True)
        except subprocess.TimeoutExpired as exc:
            partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            started = [json.loads(line) for line in partial.splitlines() if line.startswith("{")]
            used = started[0]["threads"] if started else None
            return {"threads": used, "timeout": timeout, "load": load}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["load"] = load
    return out


def _seconds(result: dict, key: str) -> str | float:
    if "timeout" in result:
        return f"> {result['timeout']:.0f}"
    return result[key]


def run(quick: bool = False) -> list[Table]:
    cores = _cores()
    timeout = TIMEOUT_S[quick]
    epochs = 1 if quick else 2
    kinds = ["fit"] if quick else ["fit", "diagnose"]
    thread_options = ["1", "2", "auto"] if cores >= 2 else ["1", "auto"]
    table = Table(
        f"hapt on {cores} cores: md.fit ({epochs} epoch{'s' if epochs > 1 else ''}, seed 0)"
        + ("" if quick else " and md.diagnose (test split)")
        + ", alone and beside one busy process per core",
        ["job", "torch threads", "competing processes", "load before (1 min)", "fit s",
         "diagnose s"],
        note=("A fresh process per row. 'auto' is md.set_threads() (MODALDIAG_THREADS unset): "
              "modaldiag's default for this machine at that moment. Load is os.getloadavg()[0] "
              "just before the job: other work on the machine (a benchmark, a test run) is "
              "contention too. '> N': the process (start-up and data loading included) was stopped "
              "after N s."),
    )
    for kind in kinds:
        for competitors in (0, cores):
            for threads in thread_options:
                r = measure(threads, kind, epochs, competitors, timeout)
                label = (f"auto (= {r['threads']})" if threads == "auto" and r["threads"]
                         else threads)
                table.rows.append([kind, label, competitors, round(r["load"], 2),
                                   _seconds(r, "fit_s"),
                                   _seconds(r, "diagnose_s") if kind == "diagnose" else "—"])
    return [table]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--job", nargs=3, metavar=("THREADS", "KIND", "EPOCHS"),
                        help="(internal) run one measured job and print its JSON result")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.job:
        threads, kind, epochs = args.job
        print(json.dumps(job(threads, kind, int(epochs))))
        return 0
    for table in run(quick=args.quick):
        print(table.to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
