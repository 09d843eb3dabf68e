"""Scale: exact Shapley valuation of up to 1,000,000 streamed samples with bounded memory.

Each size runs in a fresh process; batches are generated on the fly (nothing is materialised),
so the only memory that grows with N is the per-sample result: values (N, M) plus full/empty
values, labels and predictions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from .common import Table

CHILD = r'''
import json, re, sys, time, torch
import modaldiag as md

n, m, batch = int(sys.argv[1]), int(sys.argv[2]), 4096
to_disk = len(sys.argv) > 3
torch.manual_seed(0)
names = [f"m{i}" for i in range(m)]
model = md.MultimodalClassifier({k: md.models.MLPEncoder(32, 32, hidden=(64,)) for k in names},
                                {k: 32 for k in names}, 10).eval()

class Stream:
    """Synthetic batches generated on demand: a loader of N samples that holds one batch."""
    def __iter__(self):
        g = torch.Generator().manual_seed(1)
        for start in range(0, n, batch):
            b = min(batch, n - start)
            yield {k: torch.randn(b, 32, generator=g) for k in names}, torch.randint(0, 10, (b,), generator=g)

def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

before = rss()
t0 = time.perf_counter()
if to_disk:
    summary = md.probes.shapley_to_disk(model, Stream(), sys.argv[3], value="paper")
    seconds = time.perf_counter() - t0
    hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
    print(json.dumps({"n": summary["n"], "seconds": seconds, "peak_mb": hwm, "start_mb": before,
                      "result_mb": 0.0, "efficiency_err": float("nan")}))
    sys.exit(0)
sv = md.shapley(model, Stream(), value="paper")
seconds = time.perf_counter() - t0
hwm = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
result_mb = sum(t.numel() * t.element_size() for t in (sv.values, sv.full_value, sv.empty_value,
                                                        sv.labels, sv.predictions)) / 2**20
print(json.dumps({"n": len(sv), "seconds": seconds, "peak_mb": hwm, "start_mb": before,
                  "result_mb": result_mb, "efficiency_err": float((sv.values.sum(1) -
                  (sv.full_value - sv.empty_value)).abs().max())}))
'''


def run(quick: bool = False) -> list[Table]:
    table = Table(
        "Exact valuation of streamed synthetic samples (M = 3, MLP encoders 32 -> 64 -> 32, "
        "batches of 4096, one fresh process per row)",
        ["N", "mode", "seconds", "samples / s", "peak RSS MB", "RSS before valuation MB",
         "per-sample results MB", "(peak - start) / results", "max efficiency error"],
        note="Peak RSS = VmHWM of the process. Memory grows only with the O(N * M) per-sample "
             "results: the peak above the starting RSS is a small constant (per-batch work, here "
             "~25 MB) plus a few transient copies of the results (per-batch chunks and their final "
             "concatenation coexist for a moment; freed memory stays in the high-water mark). "
             "md.probes.shapley_to_disk writes each batch's results as an atomic chunk and keeps "
             "only running sums: its peak does not grow with N.",
    )
    sizes = (10_000, 100_000) if quick else (10_000, 100_000, 1_000_000)
    runs = [(n, None) for n in sizes] + [(n, "disk") for n in sizes[-2:]]
    for n, mode in runs:
        with tempfile.TemporaryDirectory() as tmp:
            args = [sys.executable, "-c", CHILD, str(n), "3"] + ([tmp] if mode else [])
            out = subprocess.run(args, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = (f"{(r['peak_mb'] - r['start_mb']) / r['result_mb']:.1f}x" if r["result_mb"]
                 else "— (on disk)")
        table.rows.append([r["n"], "shapley_to_disk" if mode else "shapley (in memory)",
                           r["seconds"], r["n"] / r["seconds"], r["peak_mb"], r["start_mb"],
                           r["result_mb"], ratio, r["efficiency_err"]])
    return [table]
