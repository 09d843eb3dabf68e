"""``BenchmarkResult``: the cells of a benchmark, their paired comparison and its tables.

Every number is on the split it names: ``test_*`` on the test split (evaluated once, on the
model selected on validation), ``val_acc`` the validation accuracy of the selected epoch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..runs import METHOD_LABELS
from ..training import History
from ..utils.io import atomic_write_text, refuse_foreign_overwrite
from .leaderboard import render_leaderboard
from .stats import FUSED, fmt_number, holm, paired_test, unimodal_metric

__all__ = ["BenchmarkResult"]

def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _std(values) -> float:
    values = [v for v in values if v == v]
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


class BenchmarkResult:
    """What :func:`modaldiag.benchmark` returns.

    Attributes
    ----------
    records : list of dict
        One JSON record per cell (as cached in ``out/cells``): ``config`` (the full budget),
        ``test_acc``, ``test_unimodal_acc``, ``val_acc``, ``best_epoch``, ``train_time_s``,
        ``history``, optionally ``robustness_auc``.
    tunings : dict
        ``{(dataset, method): tuning record}`` when tuned (best parameters, every trial).
    config : dict
        The benchmark's configuration: datasets, methods, seeds, the budget per dataset, backend.
    out : Path or None
        The output folder.
    baseline : str
        The method every other one is compared with (``"joint"``).
    """

    def __init__(self, records: Sequence[dict], *, config: dict, tunings: dict | None = None,
                 out: str | os.PathLike | None = None, baseline: str = "joint"):
        self.records = list(records)
        self.config = dict(config)
        self.tunings = dict(tunings or {})
        self.out = Path(out) if out is not None else None
        self.baseline = baseline
        order = {m: i for i, m in enumerate(self.config.get("methods", []))}
        self.records.sort(key=lambda r: (self.datasets.index(r["dataset"])
                                         if r["dataset"] in self.datasets else 0,
                                         order.get(r["method"], len(order)), r["seed"]))

    # ------------------------------------------------------------ structure
    @property
    def datasets(self) -> list[str]:
        names = list(self.config.get("datasets", []))
        for r in self.records:
            if r["dataset"] not in names:
                names.append(r["dataset"])
        return names

    @property
    def methods(self) -> list[str]:
        names = list(self.config.get("methods", []))
        for r in self.records:
            if r["method"] not in names:
                names.append(r["method"])
        return names

    def modalities(self, dataset: str) -> list[str]:
        for r in self.records:
            if r["dataset"] == dataset:
                return list(r["test_unimodal_acc"])
        return []

    def budget(self, dataset: str) -> dict:
        return self.config.get("budgets", {}).get(dataset, {})

    def histories(self, dataset: str, seed: int | None = None) -> dict[str, History]:
        """``{method label: History}`` of one seed (default: the first) on ``dataset``."""
        seeds = sorted({r["seed"] for r in self.records if r["dataset"] == dataset})
        if not seeds:
            return {}
        seed = seeds[0] if seed is None else seed
        return {_label(r["method"]): History.from_dict(r["history"]) for r in self.records
                if r["dataset"] == dataset and r["seed"] == seed}

    # ------------------------------------------------------------ frames
    @property
    def cells(self) -> pd.DataFrame:
        """One row per cell: dataset, method, seed, test fused and unimodal accuracy, validation
        accuracy of the selected epoch, selected epoch, training time, learning rate, robustness
        AUCs (``robustness_auc.<modality>.<corruption>``), cache key."""
        rows = []
        for r in self.records:
            row = {"dataset": r["dataset"], "method": r["method"], "seed": r["seed"],
                   "test_acc": r["test_acc"], "test_n": r.get("test_n"), "val_acc": r["val_acc"],
                   "best_epoch": r["best_epoch"], "train_time_s": r["train_time_s"],
                   "lr": r["config"].get("params", {}).get("lr",
                                                           r["config"]["budget"]["optimizer"]["lr"])}
            for m, v in r["test_unimodal_acc"].items():
                row[unimodal_metric(m)] = v
            for a in r.get("robustness_auc") or []:
                row[f"robustness_auc.{a['modality']}.{a['corruption']}"] = a["auc"]
            row["key"] = r["key"]
            rows.append(row)
        return pd.DataFrame(rows)

    def _values(self, dataset: str, method: str, metric: str) -> dict[int, float]:
        out = {}
        for r in self.records:
            if r["dataset"] == dataset and r["method"] == method:
                if metric == FUSED:
                    out[r["seed"]] = r["test_acc"]
                else:
                    out[r["seed"]] = r["test_unimodal_acc"].get(metric.split(".", 1)[1], math.nan)
        return out

    def comparisons(self) -> pd.DataFrame:
        """The paired tests: one row per (dataset, method, metric) for every method other than the
        baseline; ``mean_diff`` = method - baseline on the test split over the seeds both have,
        its 95% CI, t, p and Holm-adjusted p (one family per dataset and metric)."""
        rows = []
        for dataset in self.datasets:
            metrics = [FUSED] + [unimodal_metric(m) for m in self.modalities(dataset)]
            for metric in metrics:
                base = self._values(dataset, self.baseline, metric)
                family = []
                for method in self.methods:
                    if method == self.baseline:
                        continue
                    vals = self._values(dataset, method, metric)
                    if not vals:
                        continue
                    seeds = sorted(set(vals) & set(base))
                    test = paired_test([vals[s] for s in seeds], [base[s] for s in seeds])
                    family.append({"dataset": dataset, "method": method, "metric": metric,
                                   "split": "test", **test.to_dict()})
                for row, adjusted in zip(family, holm([f["p"] for f in family]), strict=True):
                    row["p_holm"] = adjusted
                rows += family
        columns = ["dataset", "method", "metric", "split", "n", "mean_diff", "sd_diff", "ci_low",
                   "ci_high", "t", "p", "p_holm"]
        return pd.DataFrame(rows, columns=columns)

    def to_dataframe(self) -> pd.DataFrame:
        """The leaderboard: one row per (dataset, method).

        Columns: ``dataset, method, label, n_seeds``; for the test fused accuracy (``test_acc``)
        and each modality's test unimodal accuracy (``test_unimodal_acc.<m>``): ``<metric>_mean``,
        ``<metric>_std`` (over seeds) and, against the baseline, ``<metric>_diff`` (mean paired
        difference), ``<metric>_diff_ci_low/_high`` (95% CI), ``<metric>_p`` (paired t-test) and
        ``<metric>_p_holm`` (Holm-adjusted across methods); ``val_acc_mean/_std`` (validation
        accuracy of the selected epoch); ``train_time_s_mean``; robustness AUC means when
        measured; and the budget: ``epochs, batch_size, optimizer, lr, weight_decay,
        tune_trials, params`` (JSON of the method's tuned parameters, ``{}`` when untuned).
        """
        cells = self.cells
        comps = self.comparisons()
        rows = []
        for dataset in self.datasets:
            budget = self.budget(dataset)
            metrics = [FUSED] + [unimodal_metric(m) for m in self.modalities(dataset)]
            for method in self.methods:
                sub = cells[(cells.dataset == dataset) & (cells.method == method)] if len(cells) else cells
                if sub.empty:
                    continue
                row = {"dataset": dataset, "method": method, "label": _label(method),
                       "n_seeds": int(len(sub))}
                for metric in metrics:
                    row[f"{metric}_mean"] = float(sub[metric].mean())
                    row[f"{metric}_std"] = _std(sub[metric].tolist())
                    hit = comps[(comps.dataset == dataset) & (comps.method == method)
                                & (comps.metric == metric)]
                    found = not hit.empty
                    for name, col in (("diff", "mean_diff"), ("diff_ci_low", "ci_low"),
                                      ("diff_ci_high", "ci_high"), ("p", "p"),
                                      ("p_holm", "p_holm")):
                        row[f"{metric}_{name}"] = float(hit[col].iloc[0]) if found else math.nan
                row["val_acc_mean"] = float(sub["val_acc"].mean())
                row["val_acc_std"] = _std(sub["val_acc"].tolist())
                row["train_time_s_mean"] = float(sub["train_time_s"].mean())
                for col in [c for c in sub.columns if c.startswith("robustness_auc.")]:
                    row[f"{col}_mean"] = float(sub[col].mean())
                opt = budget.get("optimizer", {})
                params = self.tuned_params(dataset, method)
                row.update({"epochs": budget.get("epochs"), "batch_size": budget.get("batch_size"),
                            "optimizer": opt.get("class"),
                            "lr": float(params.get("lr", opt.get("lr", math.nan))),
                            "weight_decay": opt.get("weight_decay"),
                            "tune_trials": (budget.get("tuning") or {}).get("trials", 0),
                            "params": json.dumps(params, sort_keys=True)})
                rows.append(row)
        return pd.DataFrame(rows)

    def tuned_params(self, dataset: str, method: str) -> dict:
        record = self.tunings.get((dataset, method))
        return dict(record["best_params"]) if record else {}

    # ------------------------------------------------------------ text and files
    def budget_text(self, dataset: str) -> str:
        """The budget in words (stated on the leaderboard and by the CLI)."""
        b = self.budget(dataset)
        if not b:
            return ""
        opt = b["optimizer"]
        tuning = b.get("tuning")
        tuned = (f"tuned: {tuning['trials']} trials per method on validation (Optuna TPE, seed "
                 f"{tuning['sampler_seed']}; objective: validation accuracy of the selected epoch)"
                 if tuning else "untuned: every method with its default hyper-parameters and "
                                f"lr {opt['lr']:g}")
        return (f"equal budget for every method: {b['epochs']} epochs, {opt['class']} "
                f"(momentum {opt['momentum']:g}, weight decay {opt['weight_decay']:g}), batch size "
                f"{b['batch_size']}, the same encoders ({b['model']['builder']}, "
                f"{b['model']['parameters']} parameters) initialised by the same seed; selection "
                f"on the validation split (best validation-accuracy epoch); the test split "
                f"evaluated once on the selected model; {tuned}")

    def summary(self) -> str:
        """The leaderboard as labelled text (what ``modaldiag benchmark`` prints)."""
        frame = self.to_dataframe()
        lines = []
        for dataset in self.datasets:
            sub = frame[frame.dataset == dataset]
            mods = self.modalities(dataset)
            n = int(sub.n_seeds.max()) if len(sub) else 0
            lines.append(f"benchmark on {dataset}: test split, mean ± std over {n} seed(s); "
                         f"differences vs {self.baseline} paired by seed (95% CI), p: paired "
                         "t-test, Holm-adjusted across methods")
            lines.append(f"  {self.budget_text(dataset)}")
            head = (f"  {'method':24s} {'test fused acc':>16s} {'Δ vs ' + self.baseline:>26s} "
                    f"{'p (Holm)':>9s} " + " ".join(f"{'test ' + m + ' acc':>14s}" for m in mods)
                    + f" {'val acc (sel.)':>14s}")
            lines.append(head)
            for r in sub.to_dict("records"):
                fused = f"{r[f'{FUSED}_mean']:.3f} ± {fmt_number(r[f'{FUSED}_std'])}"
                if r['method'] == self.baseline:
                    diff, p = "(baseline)", ""
                else:
                    diff = (f"{r[f'{FUSED}_diff']:+.3f} [{r[f'{FUSED}_diff_ci_low']:+.3f}, "
                            f"{r[f'{FUSED}_diff_ci_high']:+.3f}]")
                    p = fmt_number(r[f"{FUSED}_p_holm"])
                uni = " ".join(f"{r[unimodal_metric(m) + '_mean']:>14.3f}" for m in mods)
                lines.append(f"  {r['label'][:24]:24s} {fused:>16s} {diff:>26s} {p:>9s} {uni} "
                             f"{r['val_acc_mean']:>14.3f}")
        return "\n".join(lines)

    def _target(self, path, name: str) -> Path:
        if path is None:
            if self.out is None:
                raise ValueError(f"give a path: this result has no output folder to write "
                                 f"{name} into.")
            return self.out / name
        return Path(path)

    def save_csv(self, path: str | os.PathLike | None = None) -> Path:
        """Write :meth:`to_dataframe` as CSV (default ``OUT/leaderboard.csv``) atomically; a file
        in a folder modaldiag did not create is never replaced."""
        target = self._target(path, "leaderboard.csv")
        refuse_foreign_overwrite(target.parent, [target.name])
        return atomic_write_text(target, self.to_dataframe().to_csv(index=False))

    def save_html(self, path: str | os.PathLike | None = None) -> Path:
        """Write the self-contained HTML leaderboard (default ``OUT/leaderboard.html``)."""
        target = self._target(path, "leaderboard.html")
        refuse_foreign_overwrite(target.parent, [target.name])
        return atomic_write_text(target, render_leaderboard(self))

    def __repr__(self) -> str:
        return (f"BenchmarkResult(datasets={self.datasets}, methods={self.methods}, "
                f"cells={len(self.records)}, out={str(self.out) if self.out else None!r})")
