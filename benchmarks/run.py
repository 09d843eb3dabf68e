"""Run every benchmark suite side by side and write results + docs/benchmarks.md.

    python -m benchmarks.run            # full run (make bench)
    python -m benchmarks.run --quick    # CI-sized
    python -m benchmarks.run --only training
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from modaldiag.utils.io import atomic_write_json, atomic_write_text

from .common import code_fingerprint, machine_info, short

ROOT = Path(__file__).resolve().parent.parent
SUITES = ["valuation", "fisher", "overhead", "scale", "diagnosis", "methods", "robustness", "training", "window",
          "relearning", "contention"]


READING = """## Reading the results

**Speed.** Exact valuation runs the encoders once and evaluates all 2^M coalitions through the
head in one stacked call. Only the additive heads (concat, late) have an exact coalition fast path
that keeps it within a small factor of one forward pass; sum, FiLM and gated heads run every
coalition through the head, so their cost grows with 2^M (tens of forward passes at M = 6; see the
per-head table). shap's exact explainer and Captum pay per sample and per evaluation; Captum's
`ShapleyValues` enumerates all M! permutations (M·M! evaluations per sample), and its sampling
variant `ShapleyValueSampling` is shown with a stated number of permutations. Per-sample Fisher
traces: the table times every engine (`hooks`: activations and output gradients of one backward
pass, what `engine="auto"` picks for Linear/Conv/BatchNorm encoders; `vmap`: torch.func; `loop`:
one backward per sample) and labels each row with the engine that ran. Regulator overheads are a
fixed per-step cost (a few small tensor operations per parameter group): negligible on a
realistic encoder (hapt's CNN) and visible only on the tiny mfeat MLPs, whose whole step takes
about a millisecond. The methods tables are built only from cached runs of the code whose
fingerprint they state.

**Robustness (issue 16's claim).** InfoReg's authors claim it makes the fused model more robust
to a corrupted or missing modality. Measured (5 seeds, 20 epochs, `robustness` table): on
mfeat-fou-pix it holds only for losing the *dominant* view: with pix missing the AUC rises
for every method (InfoReg +2.0, InfoReg* +24.8, OGM-GE +8.5, MMPareto +26.0, ModalityDropout
+22.2 points, all Holm-significant), because each makes the head rely more on fou; the price is
robustness to losing or scrambling the weak view (fou missing: InfoReg -3.7, OGM-GE -10.4; fou
shuffled: InfoReg -5.0, OGM-GE -14.6, significant). On hapt InfoReg changes no AUC significantly
(-2.0 to +0.3), while InfoReg*, MMPareto and ModalityDropout make the model markedly more robust to
losing gyro (+12.6, +12.2, +10.5) at a small cost when accel is scrambled (-2.4, -4.1, -4.0). On
the synthetic data no method changes the AUC significantly except OGM-GE, which lowers it (gaussian
noise on a: -6.7). So the claim is refuted for InfoReg as published (paper form): its effect is
small or absent (+2.0 on one corruption of one dataset, nothing on hapt and synthetic) next to
plain modality dropout, and where it helps it trades one modality's robustness for the other's;
the unimodal-loss variants (InfoReg*, MMPareto) and ModalityDropout do deliver robustness to the
loss of the dominant modality.

**Methods.** All 20 methods (joint training plus issue 13's six, issue 14's five and issue 15's
nine), 5 seeds each, equal budgets. On the embedded data fused accuracy barely moves: the mfeat
views are easy (joint training is near its ceiling) and no method reproduces the papers'
audio-visual gains in fused accuracy. The largest fused gains are Greedy's over joint training of
the same mid-fusion model (+1.1 on mfeat-fou-pix, p = 0.002; +3.6 on the synthetic data,
p = 0.004), ModalityDropout's on the synthetic data (+2.3, p = 0.013) and AMCo's and modality-level
valuation re-sampling's on mfeat-fou-pix (+0.6, p = 0.042; +0.4, p = 0.035). On hapt no method beats
joint training by more than 0.3 point, and several cost fused accuracy there (LFM -3.3, p = 0.002;
MBSD -3.0, p = 0.001; MLA -2.9 against joint training of its shared head, p = 0.038; UME -2.0,
p = 0.005; MMPareto -1.4, p = 0.042). What the methods do change, often strongly and
significantly, is how much the fused model can rely on the weak modality (its unimodal accuracy
through the joint head): methods that train the weak modality through the head directly raise it
most (fou +45 to +52 points: InfoReg*, MMPareto, OPM, valuation re-sampling, ModalityDropout, MBSD,
CML, LFM, AMCo and UME; Greedy +68.5 on its mid-fusion model, MLA +37.1 on the shared head);
ReconBoost +34.6 with a large spread between seeds; OGM-GE, UMT, AGM and G-Blending less (fou
+16.6, +12.1, +10.8, +10.7), PMR, MMCosine (its auxiliary form on the concat head) and InfoReg
little (+4.6, +4.9, +3.4). On hapt the weak gyro rises most with Greedy (+25.9), AMCo (+9.3),
InfoReg* (+8.8) and MMPareto (+8.6); sample-level valuation lowers it (-6.5, p = 0.036), and
Re-learning changes nothing anywhere: none of these datasets over-fits, so the purity gaps that
drive its re-initialisation are tiny. In a low-data regime where the strong mfeat views do
over-fit (`relearning` below: 5-10 % of the training split, wider encoders), it still does not
raise the weak view, whose own purity gap is as large. A method that does not help is reported as
such. Every methods cell runs with one torch thread, whatever the machine (the suite sets it; the
cache key records it): hapt's convolution reductions depend on the thread count, and a run at two
threads differed by up to 1.3 points there (mfeat identical). The 475 cells of this code were
computed in two processes into separate caches and merged (`bench_methods.cells()[k::2]`); a
re-run of one cell in a fresh process gives the cached number exactly.

**Learning windows.** With the paper's rule (K = 0.04) the prime learning window is short on every
embedded dataset: the Fisher trace of every modality peaks within the first epochs and the window
closes a few epochs in (figures below), so InfoReg regulates only early in training. Decided
epoch by epoch, the paper's rule then flickers (up to 13 state changes in 20 epochs on hapt and
nutrimouse); `rule="robust"` (smoothed log-trace growth with hysteresis, `window` below) closes
at about the same epoch and changes state far less (see docs/probes.md).

**Time to answer.** `training` sets `md.fit` beside a plain PyTorch loop on the same model, data
and seed (target <= 1.1x) and times `md.diagnose` on hapt (target <= 20 s). Beside a loop that
validates what md.fit records every epoch (the fused loss and accuracy, and every modality's
accuracy, true-class probability and cross-entropy through the head), md.fit is within the target
on both datasets: 1.01x on hapt's CNN encoders and 1.08x on mfeat-fou-pix's tiny MLPs, whose whole
step takes about 1.5 ms. Beside a loop that validates fused accuracy only, hapt is at 1.00x and
mfeat-fou-pix at 1.21x: the unimodal scores md.fit records for its learning curves cost about
3 ms of a 30 ms epoch there (the training steps alone: 1.05x). md.diagnose on hapt takes about
8 s (2 threads, all probes). `contention` runs the
same hapt job with 1, 2 and modaldiag's default number of torch threads, alone and beside one
busy process per core: torch's thread pool collapses when its threads share cores with other
work, which is why the default is load-aware (see docs/performance.md).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--only", nargs="*", choices=SUITES, help="run only these suites")
    args = parser.parse_args(argv)
    info = {**machine_info(), "code": code_fingerprint()}
    # quick runs (CI-sized) never overwrite the published full results or docs/benchmarks.md
    results_dir = ROOT / "benchmarks" / ("results-quick" if args.quick else "results")
    for suite in args.only or SUITES:
        module = importlib.import_module(f"benchmarks.bench_{suite}")
        print(f"== {suite}", flush=True)
        tables = module.run(quick=args.quick)
        for t in tables:
            print(t.to_markdown())
        atomic_write_json(results_dir / f"{suite}.json",
                          {"suite": suite, "quick": args.quick, "machine": info,
                           "tables": [t.to_dict() for t in tables]})
    if args.quick:
        print(f"quick mode: results in {results_dir}; docs/benchmarks.md left unchanged")
    else:
        render(results_dir, ROOT / "docs" / "benchmarks.md")
    return 0


def render(results_dir: Path, out: Path) -> None:
    """docs/benchmarks.md from every stored suite result (no hand-edited numbers)."""
    from .common import Table

    parts = ["# Benchmarks", "",
             "Produced by `make bench` (`python -m benchmarks.run`); do not edit by hand. "
             "Every number below comes from the committed scripts in `benchmarks/`; machine-readable "
             "results are in `benchmarks/results/`.", "", READING, ""]
    for suite in SUITES:
        path = results_dir / f"{suite}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        m = data["machine"]
        parts += [f"## {suite}", "",
                  f"{m['date']} · {m['machine']} · Python {m['python']} · torch {m['torch']} · "
                  f"modaldiag {m['modaldiag']}"
                  + (f" · code {short(m['code'])}" if m.get("code") else "")
                  + (" · **quick mode**" if data["quick"] else ""), ""]
        for t in data["tables"]:
            parts.append(Table(**t).to_markdown())
    atomic_write_text(out, "\n".join(parts))


if __name__ == "__main__":
    raise SystemExit(main())
