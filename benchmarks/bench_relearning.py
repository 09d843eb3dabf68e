"""Re-learning where its premise should hold: a low-data regime in which the strong view over-fits.

Diagnosing & Re-learning (ECCV 2024, METHODS.md R2) softly re-initialises each encoder in
proportion to its learning-state gap g_m = |purity(train) - purity(val)| (P3). On the full
embedded data nothing over-fits (gaps 0.02-0.03, docs/methods/relearning.md), so the method has
nothing to act on. This suite tests it where it should: a small fixed, stratified subset of the
training split (10 % and 5 % of mfeat's 1,200 training samples, 5 % of hapt's 6,699), wider
encoders and enough epochs for the strong view to fit its training set.

Protocol (identical for both arms): the same subset (fixed generator, seed 0), the full
validation split (model selection: ``md.fit(restore_best=True)``), the test split for every
reported number, the default optimizer (SGD lr 0.01, momentum 0.9, weight decay 1e-4), the same
encoders, batch size and epochs; per seed the two arms start from identical initial weights and
see the same batch order. Re-learning uses the paper defaults with H scaled to the budget:
lam = 3, H = epochs // 4, R = 3 (re-initialisations after H, 2H, 3H completed epochs).

Tables: (1) the premise: each view's train/val k-means purity and gap during joint training at
init and at the epochs where Re-learning would re-initialise, plus the alpha Re-learning actually
applied; (2) the outcome: fused and weak-view unimodal test accuracy (through the joint head,
other modalities at the zero baseline), mean ± std over seeds, the mean paired difference and a
two-sided paired t-test (scipy.stats.ttest_rel).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_relearning     # full study, writes results
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

import modaldiag as md
from modaldiag.models.encoders import Conv1dEncoder, MLPEncoder

from .common import Table, machine_info

ROOT = Path(__file__).resolve().parent.parent

FEATURE_DIM = 128
#: (dataset, fraction of the training split, epochs, batch size, weak view, strong view); the
#: weak/strong labels are the full-data ones (bench_methods), shown for both views anyway.
SETTINGS = [
    ("mfeat-fou-pix", 0.10, 80, 32, "fou", "pix"),
    ("mfeat-fou-pix", 0.05, 80, 32, "fou", "pix"),
    ("mfeat-zer-fac", 0.10, 80, 32, "zer", "fac"),
    ("mfeat-zer-fac", 0.05, 80, 32, "zer", "fac"),
    ("hapt", 0.05, 40, 32, "gyro", "accel"),
]
LAM, RESETS = 3.0, 3


def _encoders(data) -> dict[str, torch.nn.Module]:
    """Wider encoders than the default model: MLP 2 x 512 for feature views, CNN (64, 128) for series."""
    out = {}
    for m, shape in data.input_shapes.items():
        if len(shape) == 1:
            out[m] = MLPEncoder(shape[0], FEATURE_DIM, hidden=(512, 512))
        else:
            out[m] = Conv1dEncoder(shape[0], FEATURE_DIM, channels=(64, 128))
    return out


def low_data(name: str, fraction: float):
    """The dataset with its training split reduced to a stratified ``fraction`` (fixed generator)."""
    data = md.datasets.load(name)
    labels = data.train.labels.numpy()
    rng = np.random.default_rng(0)
    idx = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(2, int(round(fraction * len(members))))
        idx.append(rng.choice(members, size=k, replace=False))
    data.train = data.train.subset(np.sort(np.concatenate(idx)))
    return data


class GapProbe(md.Callback):
    """Measures P3 (train vs val purity) at given 0-based epochs' ends; changes nothing.

    It reads ``ctx.train_loader`` at the same epochs as Re-learning does, so the seeded shuffle
    generator advances identically and both arms see the same batch order.
    """

    def __init__(self, epochs: set[int]):
        super().__init__()
        self.at = set(epochs)
        self.records: dict[int, dict] = {}

    def on_train_epoch_end(self, ctx) -> None:
        if ctx.epoch in self.at:
            sep = md.separability(ctx.model, ctx.train_loader, ctx.val_loader, linear_probe=False,
                                  silhouette=False)
            self.records[ctx.epoch] = {m: (s.train_purity, s.val_purity, s.gap) for m, s in sep.items()}


def run_one(name: str, fraction: float, epochs: int, bs: int, method: str, seed: int,
            quick: bool) -> dict:
    if quick:
        epochs = max(8, epochs // 4)
    every = max(1, epochs // 4)
    data = low_data(name, fraction)
    torch.manual_seed(seed)
    model = md.MultimodalClassifier(_encoders(data), {m: FEATURE_DIM for m in data.modalities},
                                    data.num_classes)
    train = data.train.loader(bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = data.val.loader(512)
    out: dict = {"n_train": len(data.train)}
    reset_epochs = [k * every - 1 for k in range(1, RESETS + 1) if k * every - 1 < epochs]
    callbacks = []
    if method == "joint":
        init = md.separability(model, data.train.loader(512), val, linear_probe=False, silhouette=False)
        out["gap_init"] = {m: (s.train_purity, s.val_purity, s.gap) for m, s in init.items()}
        probe = GapProbe(set(reset_epochs))
        callbacks.append(probe)
        regulator = None
    else:
        regulator = md.Relearning(lam=LAM, every=every, max_resets=RESETS, seed=0)
    t0 = time.perf_counter()
    hist = md.fit(model, train, val, epochs=epochs, regulator=regulator, callbacks=callbacks,
                  seed=seed, monitor=False, progress=False)
    out["seconds"] = time.perf_counter() - t0
    if method == "joint":
        out["gaps"] = {str(e): r for e, r in probe.records.items()}
    else:
        out["gaps"] = {str(h["epoch"]): {m: (None, None, g) for m, g in h["gap"].items()}
                       for h in regulator.history}
        out["alpha"] = {str(h["epoch"]): h["alpha"] for h in regulator.history}
    out["best_epoch"] = int(hist.meta.get("best_epoch", -1))
    ev = md.probes.evaluate(model, data.test.loader(512))
    out["test_acc"] = ev.accuracy
    out["unimodal"] = {m: s.accuracy for m, s in ev.unimodal.items()}
    out["reset_epochs"] = reset_epochs
    out["epochs"] = epochs
    return out


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float(d.mean()), float("nan")
    return float(d.mean()), float(stats.ttest_rel(a, b).pvalue)


def _fmt(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1 if len(v) > 1 else 0):.1f}"


def _p(p: float) -> str:
    return "—" if math.isnan(p) else f"{p:.3f}"


def run(quick: bool = False, seeds: int | None = None) -> list[Table]:
    n_seeds = seeds or (2 if quick else 5)
    settings = [s for s in SETTINGS if not quick or (s[0], s[1]) == ("mfeat-fou-pix", 0.10)]
    runs: dict[tuple, dict[str, list[dict]]] = {}
    for name, fraction, epochs, bs, _, _ in settings:
        t0 = time.perf_counter()
        runs[name, fraction] = {meth: [run_one(name, fraction, epochs, bs, meth, s, quick)
                                       for s in range(n_seeds)]
                                for meth in ("joint", "Re-learning")}
        print(f"  {name} {fraction:.0%}: {time.perf_counter() - t0:.0f} s", flush=True)

    premise = Table(
        f"Premise: learning-state gap |purity(train) - purity(val)| of each view during JOINT "
        f"training (mean over {n_seeds} seeds; train / val purity in brackets) and the alpha = "
        f"tanh({LAM:g} g) Re-learning applied at its re-initialisations (its own runs)",
        ["dataset", "view", "n train / val", "gap at init", "gap after H", "gap after 2H",
         "gap after 3H", "alpha applied (H, 2H, 3H)"],
        note="k-means purity (P3, k = classes, n_init = 10) on the training subset and the full "
             "validation split, as Re-learning computes it. 'Gap at init' (random encoders, before "
             "any training) is the probe's floor for sets of these sizes: a gap is a sign of "
             "over-fitting only where it clearly exceeds it. Weak/strong: the full-data roles.")
    outcome = Table(
        f"Outcome: joint training vs Re-learning, {n_seeds} seeds (test accuracy %, mean ± std; "
        f"Δ = mean paired difference Re-learning - joint, points; p = two-sided paired t-test)",
        ["dataset", "epochs, H", "method", "fused", "Δ fused", "p", "weak view", "weak unimodal",
         "Δ weak", "p ", "strong unimodal", "Δ strong", "p  ", "best val epoch (mean)", "s/run"],
        note="Unimodal = the joint head with the other modality at the zero baseline. Model "
             "selection on the validation split (best epoch restored); test split reported. "
             "s/run: wall time on a shared, contended 2-core machine (indicative only).")
    for name, fraction, _, _, weak, strong in settings:
        rj, rr = runs[name, fraction]["joint"], runs[name, fraction]["Re-learning"]
        label = f"{name} ({fraction:.0%} of train)"
        epochs = rj[0]["epochs"]
        resets = rj[0]["reset_epochs"]
        n_val = len(md.datasets.load(name).val)
        for m in (strong, weak):
            cells = []
            gi = [r["gap_init"][m] for r in rj]
            cells.append(f"{np.mean([g[2] for g in gi]):.3f} ({np.mean([g[0] for g in gi]):.2f} / "
                         f"{np.mean([g[1] for g in gi]):.2f})")
            for e in resets:
                gs = [r["gaps"][str(e)][m] for r in rj]
                cells.append(f"{np.mean([g[2] for g in gs]):.3f} ({np.mean([g[0] for g in gs]):.2f} / "
                             f"{np.mean([g[1] for g in gs]):.2f})")
            cells += ["—"] * (3 - len(resets))
            alphas = ", ".join(f"{np.mean([r['alpha'][str(e)][m] for r in rr if str(e) in r['alpha']]):.2f}"
                               for e in resets)
            premise.rows.append([label, f"{m} ({'strong' if m == strong else 'weak'})",
                                 f"{rj[0]['n_train']} / {n_val}", *cells, alphas])
        for meth, rs in (("joint", rj), ("Re-learning", rr)):
            fused = [r["test_acc"] for r in rs]
            wk = [r["unimodal"][weak] for r in rs]
            st = [r["unimodal"][strong] for r in rs]
            if meth == "joint":
                df = pf = dw = pw = ds = ps = None
            else:
                df, pf = _paired(fused, [r["test_acc"] for r in rj])
                dw, pw = _paired(wk, [r["unimodal"][weak] for r in rj])
                ds, ps = _paired(st, [r["unimodal"][strong] for r in rj])
            outcome.rows.append([
                label, f"{epochs}, {max(1, epochs // 4)}", meth, _fmt(fused),
                "—" if df is None else f"{100 * df:+.1f}", "—" if pf is None else _p(pf),
                weak, _fmt(wk), "—" if dw is None else f"{100 * dw:+.1f}",
                "—" if pw is None else _p(pw), _fmt(st),
                "—" if ds is None else f"{100 * ds:+.1f}", "—" if ps is None else _p(ps),
                f"{np.mean([r['best_epoch'] for r in rs]):.1f}",
                float(np.mean([r["seconds"] for r in rs]))])
    return [premise, outcome]


def main(argv=None) -> int:
    import argparse

    from modaldiag.utils.io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    args = parser.parse_args(argv)
    info = machine_info()
    t0 = time.perf_counter()
    tables = run(quick=args.quick)
    for t in tables:
        print(t.to_markdown())
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    results = ROOT / "benchmarks" / ("results-quick" if args.quick else "results") / "relearning.json"
    atomic_write_json(results, {"suite": "relearning", "quick": args.quick, "machine": info,
                                "tables": [t.to_dict() for t in tables]})
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
