"""Methods quality: joint training vs every regulator on real and synthetic data.

Same split, budget (epochs), optimiser, encoders and augmentation (none) for every method; model
selection on the validation split only; numbers on the test split. Each finished run is cached
atomically in benchmarks/results/method_runs.json (results-quick/ in quick mode), so an
interrupted benchmark resumes. Every cached cell is keyed by the code fingerprint (sha256 of the
modaldiag package's .py sources) and the full run configuration (dataset and split seed, model,
the regulator's class/config()/repr, optimiser and its hyper-parameters, epochs, batch size,
seed, torch version): cells of other code or configurations are moved to the cache's ``stale``
section and never enter a table, and every table states the fingerprint that produced it.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path

import numpy as np
import torch

import modaldiag as md
from modaldiag.benchmark.stats import holm
from modaldiag.training.callbacks import prediction_rule

from .common import RunCache, Table, optimizer_config, regulator_config, short

RESULTS = Path(__file__).resolve().parent


def _cache_path(quick: bool) -> Path:
    return RESULTS / ("results-quick" if quick else "results") / "method_runs.json"

DATASETS = {  # name: (epochs, batch size, weak modality shown)
    "synthetic": (30, 64, "b"),
    "mfeat-fou-pix": (30, 64, "fou"),
    "mfeat-zer-fac": (30, 64, "zer"),
    "mfeat": (30, 64, None),
    "hapt": (12, 64, "gyro"),
}


#: the field's other methods (issues 14 and 15) run on these datasets (5 seeds each)
LATER_DATASETS = ("synthetic", "mfeat-fou-pix", "hapt")

#: methods that need another architecture, compared with joint training of that architecture
#: (same encoders' input shapes, budget and selection): MLA's projection needs the shared linear
#: head, Greedy needs mid fusion (MMTM blocks between encoder stages)
ARCHITECTURE = {"joint (shared head)": "shared", "MLA": "shared",
                "joint (mid fusion)": "mid", "Greedy": "mid"}
BASELINE = {"MLA": "joint (shared head)", "Greedy": "joint (mid fusion)"}

#: the robustness claim (issue 16): joint training vs these, robustness AUC on the test split
ROBUSTNESS_METHODS = ("joint", "InfoReg", "InfoReg*", "OGM-GE", "MMPareto", "ModalityDropout")


def later_methods(epochs: int) -> dict:
    """Issues 14 and 15's methods, default arguments (MMCosine: its auxiliary form on the concat
    head; UMT's teachers train for half the run; ReconBoost's stages scaled to the run)."""
    stage = max(1, min(4, epochs // 8))
    return {
        "AGM": lambda: md.AGM(),
        "PMR": lambda: md.PMR(),
        "MMCosine": lambda: md.MMCosine(),
        "MBSD": lambda: md.MBSD(),
        "CML": lambda: md.CML(),
        "LFM": lambda: md.LFM(),
        "G-Blending": lambda: md.GBlending(),
        "AMCo": lambda: md.AMCo(),
        "joint (shared head)": lambda: None,
        "MLA": lambda: md.MLA(),
        "UMT": lambda: md.UMT(teacher_epochs=max(1, epochs // 2)),
        "UME": lambda: md.UME(),
        "ReconBoost": lambda: md.ReconBoost(stage, stage),
        "joint (mid fusion)": lambda: None,
        "Greedy": lambda: md.Greedy(warmup=min(2, epochs // 3)),
    }


def methods(epochs: int, dataset: str | None = None) -> dict:
    """The methods run on ``dataset`` (every method when None)."""
    every = max(1, epochs // 3)
    later = later_methods(epochs) if dataset is None or dataset in LATER_DATASETS else {}
    return {
        "joint": lambda: None,
        "InfoReg": lambda: md.InfoReg(),
        "InfoReg*": lambda: md.InfoReg(unimodal_loss=True),
        "Re-learning": lambda: md.Relearning(every=every, max_resets=2),
        "OGM-GE": lambda: md.OGM(alpha=0.8, noise=True),
        "OPM": lambda: md.OPM(),
        "MMPareto": lambda: md.MMPareto(),
        "Valuation (sample)": lambda: md.ValuationResampling("sample", warmup=min(5, epochs // 4)),
        "Valuation (modality)": lambda: md.ValuationResampling("modality", warmup=min(5, epochs // 4)),
        "ModalityDropout": lambda: md.ModalityDropout(p=0.3),
        **later,
    }


#: md.robustness on the test split of every run (feature space; severities and bootstrap stated)
ROBUSTNESS = {"corruptions": ("missing", "gaussian", "shuffle"),
              "severities": (0.0, 0.25, 0.5, 0.75, 1.0), "n_resamples": 200, "seed": 0}

SPLIT_SEED = 0  # train/val/test split of every dataset (and the synthetic generator's seed)
LR, WEIGHT_DECAY = 0.01, 1e-4  # md.fit's defaults, passed explicitly so the cache key records them
SYNTHETIC = {"n_samples": 2000, "num_classes": 6, "strength": {"a": 2.0, "b": 0.8},
             "dims": {"a": 32, "b": 32}}


def _data(name: str):
    if name == "synthetic":
        return md.datasets.synthetic(**SYNTHETIC, seed=SPLIT_SEED)
    return md.datasets.load(name, seed=SPLIT_SEED)


_config_data = functools.lru_cache(maxsize=2)(_data)  # run_config only; run_one loads afresh


def _model(data, method: str = "joint"):
    kind = ARCHITECTURE.get(method, "concat")
    if kind == "mid":
        return md.models.mid_fusion_model(data)
    return md.models.default_model(data, fusion=kind)


def _optimizer(model):
    return md.training.default_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)


def run_config(name: str, method: str, seed: int, epochs: int, batch_size: int) -> dict:
    """Everything that determines one run's numbers besides the library code (which the cache
    key adds as the code fingerprint): the cache key of the run is a hash of this dict."""
    data = _config_data(name)
    torch.manual_seed(seed)
    model = _model(data, method)
    return {
        "dataset": name, "split_seed": SPLIT_SEED,
        "dataset_args": SYNTHETIC if name == "synthetic" else {"seed": SPLIT_SEED},
        "model": repr(model), "method": method,
        "regulator": regulator_config(methods(epochs, name)[method]()),
        "optimizer": optimizer_config(_optimizer(model)),
        "epochs": epochs, "batch_size": batch_size, "eval_batch_size": 512, "seed": seed,
        "selection": "md.fit restore_best on the validation split", "torch": torch.__version__,
        # conv/BLAS reductions depend on the thread count: hapt's numbers move with it
        "torch_threads": torch.get_num_threads(),
        "robustness": ROBUSTNESS,
    }


def run_one(name: str, method: str, seed: int, epochs: int, batch_size: int) -> dict:
    data = _data(name)
    torch.manual_seed(seed)
    model = _model(data, method)
    regulator = methods(epochs, name)[method]()
    t0 = time.perf_counter()
    md.fit(model, data.train.loader(batch_size, shuffle=True), data.val.loader(512), epochs=epochs,
           optimizer=_optimizer(model), regulator=regulator, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    rule = prediction_rule(regulator, model)
    test = data.test.loader(512)
    ev = md.probes.evaluate(model, test, predict=rule)
    rob = md.robustness(model, test, **ROBUSTNESS)
    return {"test_acc": ev.accuracy, "unimodal": {m: s.accuracy for m, s in ev.unimodal.items()},
            "seconds": seconds, "prediction": "head" if rule is None else "method's predict",
            "robustness_auc": {f"{r.modality}|{r.corruption}": float(r.auc)
                               for r in rob.auc_frame().itertuples()}}


PAPER_GAINS = {  # fused accuracy gains reported by the papers (points), from METHODS.md
    "InfoReg": "+5.3 CREMA-D, +3.6 Kinetics-Sounds",
    "InfoReg*": "+9.1 CREMA-D, +6.4 Kinetics-Sounds",
    "Re-learning": "+7.7 CREMA-D, +4.1 Kinetics-Sounds, +1.7 UCF-101",
    "Valuation (sample)": "+4.6 Kinetics-Sounds",
    "Valuation (modality)": "+4.4 Kinetics-Sounds",
}


def _paired(diffs: list[float]) -> tuple[float, float]:
    """Mean paired difference and the two-sided p-value of a paired t-test."""
    from scipy import stats

    d = np.asarray(diffs)
    if len(d) < 2 or np.allclose(d, d[0]):
        return float(d.mean()), float("nan")
    return float(d.mean()), float(stats.ttest_1samp(d, 0.0).pvalue)


def _fmt(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1 if len(values) > 1 else 0):.1f}"


def _fmt_p(p: float, method: str) -> str:
    return "—" if method == "joint" or math.isnan(p) else f"{p:.3f}"


def _provenance(cache: RunCache) -> str:
    return (f"Code fingerprint {short(cache.code)} (sha256 of modaldiag/**/*.py: "
            f"{cache.code}). Cache keys: run label + code fingerprint + sha256 of the full run "
            f"configuration (dataset, split seed, model, regulator class/config()/repr, optimiser, "
            f"epochs, batch size, seed, torch version). This run: {cache.hits} cached cells of this "
            f"code reused, {cache.computed} computed; {cache.n_stale_loaded} cells of other code "
            f"versions or the old unversioned cache kept apart as stale and not used.")


#: every methods cell runs with one torch thread, whatever the machine (the cache key records it):
#: hapt's convolution reductions depend on the thread count (up to 1.3 points at two threads)
THREADS = 1


def run(quick: bool = False, seeds: int | None = None) -> list[Table]:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _run(quick, seeds)
    finally:
        torch.set_num_threads(threads)


def cells(quick: bool = False, seeds: int | None = None) -> list[tuple]:
    """Every cell of the suite as ``(dataset, method, label, config, run)``, in the order
    :func:`run` fills them: a driver can compute a share of them in another process
    (``cells()[k::n]``, ``RunCache.get_or_run(label, config, run)``) into a cache file of its own
    and merge. Call with :data:`THREADS` torch threads set (the configs record the count)."""
    n_seeds = seeds or (2 if quick else 5)
    out = []
    for name, (epochs, bs, _) in DATASETS.items():
        if quick and name not in ("synthetic", "mfeat-fou-pix"):
            continue
        epochs = 4 if quick else epochs
        for method in methods(epochs, name):
            for seed in range(n_seeds):
                out.append((name, method, f"{name}|{method}|{seed}|{epochs}",
                            run_config(name, method, seed, epochs, bs),
                            functools.partial(run_one, name, method, seed, epochs, bs)))
    return out


def _run(quick: bool, seeds: int | None) -> list[Table]:
    n_seeds = seeds or (2 if quick else 5)
    cache = RunCache(_cache_path(quick))
    fp = short(cache.code)
    by_dataset: dict[str, dict[str, list[dict]]] = {}
    for name, method, label, config, fn in cells(quick, n_seeds):
        by_dataset.setdefault(name, {}).setdefault(method, []).append(
            cache.get_or_run(label, config, fn))
    tables = []
    summary: dict[str, dict[str, float]] = {}
    robustness_runs: dict[str, dict[str, list[dict]]] = {}
    for name, runs in by_dataset.items():
        epochs, weak = 4 if quick else DATASETS[name][0], DATASETS[name][2]
        mods = list(runs["joint"][0]["unimodal"])
        shown = weak or min(mods, key=lambda m: np.mean([r["unimodal"][m] for r in runs["joint"]]))
        table = Table(
            f"{name}: {epochs} epochs, {n_seeds} seeds (test accuracy %, mean ± std; Δ = paired "
            f"difference to joint training, p = paired t-test; code {fp})",
            ["method", "fused", "Δ fused", "p", f"{shown} (weak) unimodal", f"Δ {shown}", "p ",
             "unimodal, all modalities (mean)", "s/run"],
            note="Unimodal = the joint head with the other modalities at the zero baseline. s/run is "
                 "wall time per run, cached from the run that produced it (some runs shared the "
                 "machine with other jobs): indicative only; the overhead suite has clean timings. "
                 f"Every cell was produced by modaldiag code {fp} (sha256 of the package's .py "
                 "sources) with the configuration recorded in its cache entry.",
        )
        for method, rs in runs.items():
            base = runs[BASELINE.get(method, "joint")]
            is_base = method.startswith("joint")
            fused = [r["test_acc"] for r in rs]
            weak_acc = [r["unimodal"][shown] for r in rs]
            d_f, p_f = _paired([a["test_acc"] - b["test_acc"] for a, b in zip(rs, base, strict=True)])
            d_w, p_w = _paired([a["unimodal"][shown] - b["unimodal"][shown]
                                for a, b in zip(rs, base, strict=True)])
            all_uni = ", ".join(f"{m} {100 * np.mean([r['unimodal'][m] for r in rs]):.0f}" for m in mods)
            label = f"{method} (vs {BASELINE[method]})" if method in BASELINE else method
            table.rows.append([label, _fmt(fused), "—" if is_base else f"{100 * d_f:+.1f}",
                               "—" if is_base else _fmt_p(p_f, method), _fmt(weak_acc),
                               "—" if is_base else f"{100 * d_w:+.1f}",
                               "—" if is_base else _fmt_p(p_w, method), all_uni,
                               float(np.mean([r["seconds"] for r in rs]))])
        tables.append(table)
        summary[name] = {method: float(np.mean([a["test_acc"] - b["test_acc"] for a, b in
                                               zip(rs, runs[BASELINE.get(method, "joint")],
                                                   strict=True)]))
                         for method, rs in runs.items()}
        robustness_runs[name] = {m: runs[m] for m in ROBUSTNESS_METHODS if m in runs}
    analysis = Table(
        "Reported vs measured: fused-accuracy gain over joint training (points; measured = mean "
        "paired difference over seeds on each dataset above; MLA and Greedy against joint "
        "training of their own architecture)",
        ["method", "papers (audio-visual benchmarks)", *summary],
        note=_provenance(cache),
    )
    for method in methods(10):
        if method.startswith("joint"):
            continue
        analysis.rows.append([method, PAPER_GAINS.get(method, "—"),
                              *[f"{100 * summary[d][method]:+.1f}" if method in summary[d] else
                                "not run" for d in summary]])
    return [analysis, robustness_table(robustness_runs, n_seeds, fp), *tables]


def _holm(pvalues: dict) -> dict:
    """Holm-adjusted p-values by name (NaN entries are not counted and stay NaN)."""
    return dict(zip(pvalues, holm(list(pvalues.values())), strict=True))


def robustness_table(runs_by_dataset: dict, n_seeds: int, fp: str) -> Table:
    """The robustness claim (issue 16): AUC of fused test accuracy over severity, per modality
    and corruption, joint training vs each method; paired over seeds, Holm across methods."""
    table = Table(
        f"Robustness to a missing or corrupted modality: joint training vs InfoReg, InfoReg*, "
        f"OGM-GE, MMPareto and ModalityDropout ({n_seeds} seeds, same budget as the tables below; "
        f"robustness AUC % on the test split = mean fused test accuracy over severities "
        f"0-1 of the corruption; Δ = paired difference to joint training, p Holm-corrected across "
        f"the five methods within each dataset, modality and corruption; code {fp})",
        ["dataset", "corruption of", "corruption", "joint AUC", *[f"Δ {m}" for m in
                                                                 ROBUSTNESS_METHODS[1:]]],
        note=("missing: a fraction s of test samples has the modality at the model's baseline "
              "(zero features); gaussian: feature-space noise of s times the modality's feature "
              "std; shuffle: a fraction s of samples take the modality from another sample. "
              "Severities " + ", ".join(f"{v:g}" for v in ROBUSTNESS["severities"]) + ". "
              "* marks a Holm-corrected p < 0.05 (positive: more robust than joint training)."),
    )
    for name, runs in runs_by_dataset.items():
        if "joint" not in runs:
            continue
        keys = list(runs["joint"][0]["robustness_auc"])
        for key in keys:
            modality, corruption = key.split("|")
            base = [r["robustness_auc"][key] for r in runs["joint"]]
            diffs, pvals = {}, {}
            for method in ROBUSTNESS_METHODS[1:]:
                if method not in runs:
                    continue
                d = [r["robustness_auc"][key] - b for r, b in zip(runs[method], base, strict=True)]
                diffs[method], pvals[method] = _paired(d)
            adjusted = _holm(pvals)
            cells = []
            for method in ROBUSTNESS_METHODS[1:]:
                if method not in diffs:
                    cells.append("not run")
                    continue
                star = "*" if adjusted[method] < 0.05 else ""
                cells.append(f"{100 * diffs[method]:+.1f}{star} (p {adjusted[method]:.3f})"
                             if not math.isnan(adjusted[method]) else f"{100 * diffs[method]:+.1f}")
            table.rows.append([name, modality, corruption, _fmt(base), *cells])
    return table
