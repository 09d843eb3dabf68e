"""``md.diagnose``: every probe on one model, an honest verdict, the evidence, what to do next.

Every number names its split. ``loader`` is the data the verdict is measured on (default name:
``loader.dataset.split``, e.g. ``"test"``); separability and the linear probe are fitted on
``train_loader`` (D, or ``loader`` when omitted) and scored on ``val_loader`` (V).

Verdict (see :mod:`modaldiag.probes.verdict` for the rule in full). A seeded paired bootstrap over
the samples of ``loader`` gives 95 % intervals of every modality's unimodal accuracy through the
joint head and mean Shapley contribution, and of their pairwise differences. ``verdict`` is
``"imbalanced"`` when the leader's lead over the weakest is significant on both probes and larger
than a practical margin (2 accuracy points; 5 % of the Shapley fair share, at least 2 % of the
total gain), ``"balanced"`` when
every pairwise difference lies inside the margin, else ``"inconclusive"`` with the reason (``"too
few samples"`` when an accuracy on ``n`` samples cannot resolve the margin). ``dominant`` /
``weakest`` are set only when imbalanced; ``ranking`` keeps the point-estimate order.

The point-estimate ranking: three probes vote on the first and last modality (unimodal accuracy,
mean Shapley contribution and, with a validation loader, linear-probe accuracy); the majority
wins, a tie goes to Shapley. ``agree``/``disagreements`` say which probes rank differently and why
they can (zero-ablation through the joint head measures what the *fused model* uses; a linear
probe measures what the *encoder* knows). The Fisher trace is reported but does not vote: its
scale depends on each encoder's size.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..utils.io import (
    atomic_write_json,
    atomic_write_text,
    read_marker,
    refuse_foreign_overwrite,
    write_marker,
)
from ..utils.progress import progress_bar
from ..utils.validation import (
    BOOL,
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    Satisfies,
    unpack_batch_present,
    validate_params,
)
from ._common import (
    BASELINE_CONSTRAINT,
    ITERABLE,
    SEED,
    baseline_context,
    contract_model,
    probe_state,
    split_of,
)
from .conditional import ConditionalUtilization, conditional_from_cache
from .fisher import FISHER_FORMS, fisher_trace
from .recommend import recommend
from .robustness import (
    CORRUPTIONS,
    DEFAULT_SEVERITIES,
    RobustnessResult,
    cache_features,
    robustness_from_cache,
)
from .separability import Separability, _separability, collect_features, linear_probe_accuracy
from .shapley import ShapleyValues, shapley
from .unimodal import EvalResult, UnimodalScore, _evaluate
from .verdict import (
    ACCURACY,
    ACCURACY_MARGIN,
    SHAPLEY,
    ProbeIntervals,
    Verdict,
    bootstrap_intervals,
    decide,
    seed_intervals,
    shapley_margin,
)
from .window import learning_window

__all__ = ["diagnose", "Diagnosis", "Evidence", "ShapleySummary", "under_optimisation", "combine",
           "split_of"]

#: HTML and figure writers for :class:`Diagnosis`, registered by :mod:`modaldiag.report` (the
#: layer above probes), which ``import modaldiag`` always loads.
_RENDERERS: dict = {}
#: the files Diagnosis.save writes (it refuses to overwrite them in a folder it did not create)
_REPORT_FILES = {"diagnosis.json", "diagnosis.csv", "per_class.csv", "report.html",
                 "robustness.csv",
                 *(f"{stem}.{ext}" for stem in ("unimodal", "shapley", "separability",
                                                 "robustness", "conditional_speed")
                   for ext in ("png", "svg"))}


def register_renderers(*, to_html, save) -> None:
    """Register ``to_html(rep, title, class_names) -> str`` and
    ``save(rep, directory, title, class_names)`` (figures + report.html) for :class:`Diagnosis`."""
    _RENDERERS.update(to_html=to_html, save=save)


def _renderer(kind: str):
    if kind not in _RENDERERS:
        raise RuntimeError("the diagnosis report writers are not registered; import modaldiag "
                           "(or modaldiag.report) before calling Diagnosis.to_html/save.")
    return _RENDERERS[kind]


@dataclass
class Evidence:
    """One probe's point estimates on ``split`` and its own first/last modality."""

    probe: str
    scores: dict[str, float]
    dominant: str
    weakest: str
    description: str
    split: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _evidence(probe: str, scores: dict[str, float], description: str, split: str) -> Evidence:
    return Evidence(probe, {m: float(v) for m, v in scores.items()}, max(scores, key=scores.get),
                    min(scores, key=scores.get), description, split)


@dataclass
class ShapleySummary:
    """What a saved diagnosis keeps of its :class:`ShapleyValues` (means, shares, per class; no
    per-sample values: ``values`` is None). Read back by :meth:`Diagnosis.from_dict`."""

    modalities: tuple[str, ...]
    means: dict[str, float]
    low_share: dict[str, float]
    degree: float
    mean_full_value: float
    class_means: dict[int, dict[str, float]]
    n: int
    value: str = "paper"
    baseline: str = "zero"
    method: str = "exact"
    values: None = None

    def __len__(self) -> int:
        return self.n

    def mean(self) -> dict[str, float]:
        return dict(self.means)

    def low_contribution_share(self) -> dict[str, float]:
        return dict(self.low_share)

    def imbalance_degree(self) -> float:
        return self.degree

    def per_class(self) -> dict[int, dict[str, float]]:
        return dict(self.class_means)

    @property
    def dominant(self) -> str:
        return max(self.means, key=self.means.get)

    @property
    def weakest(self) -> str:
        return min(self.means, key=self.means.get)

    def to_dict(self, per_sample: bool = False) -> dict:
        return {"modalities": list(self.modalities), "value": self.value, "baseline": self.baseline,
                "method": self.method, "n": self.n, "mean": self.mean(),
                "low_contribution_share": self.low_contribution_share(),
                "imbalance_degree": self.degree, "mean_full_value": self.mean_full_value}

    @classmethod
    def from_dict(cls, d: dict, class_means: dict[int, dict[str, float]]) -> ShapleySummary:
        return cls(tuple(d["modalities"]), dict(d["mean"]), dict(d["low_contribution_share"]),
                   float(d["imbalance_degree"]), float(d.get("mean_full_value", float("nan"))),
                   class_means, int(d["n"]), d.get("value", "paper"), d.get("baseline", "zero"),
                   d.get("method", "exact"))


@dataclass
class Diagnosis:
    """What :func:`diagnose` returns.

    ``verdict`` is ``"imbalanced"``, ``"balanced"`` or ``"inconclusive"`` (``reason`` says why);
    ``dominant`` / ``weakest`` are set only when imbalanced (else None); ``ranking`` is the
    point-estimate order (first = most used) whatever the verdict. ``intervals`` holds the
    bootstrap intervals per probe (``ProbeIntervals``), ``recommendations`` the methods worth
    trying (``[{"method", "why", "page"}]``, empty unless imbalanced). ``split`` names the data
    the verdict was measured on and ``n`` its size. ``agree`` says whether every voting probe
    ranked the same modalities first and last; ``disagreements`` explains where they did not.
    ``baseline`` is the kind of absence every absence-based probe used.
    """

    modalities: tuple[str, ...]
    dominant: str | None
    weakest: str | None
    agree: bool
    evidence: list[Evidence]
    fused_accuracy: float
    unimodal: EvalResult
    shapley: ShapleyValues | ShapleySummary
    fisher: dict[str, float] | None
    separability: dict[str, Separability] | None
    under_optimisation: dict[str, dict] | None
    disagreements: list[str]
    summary: str
    config: dict = field(default_factory=dict)
    baseline: str = "zero"
    verdict: str = "inconclusive"
    reason: str = ""
    ranking: list[str] = field(default_factory=list)
    intervals: dict[str, ProbeIntervals] = field(default_factory=dict)
    recommendations: list[dict] = field(default_factory=list)
    split: str = "unnamed"
    n: int = 0
    copies: tuple[tuple[str, str], ...] = ()
    robustness: RobustnessResult | None = None
    conditional_utilization: ConditionalUtilization | None = None

    @property
    def starved(self) -> str | None:
        """The modality whose encoder lost most to joint training (needs ``reference_epochs``)."""
        if not self.under_optimisation:
            return None
        return max(self.under_optimisation, key=lambda m: self.under_optimisation[m]["gap"])

    @property
    def per_class(self) -> dict[int, dict]:
        """Per class (on ``split``): n, fused and unimodal accuracy, mean Shapley per modality."""
        shap_pc = self.shapley.per_class()
        out = {}
        for c, rec in (self.unimodal.per_class or {}).items():
            out[c] = {**rec, "shapley": shap_pc.get(c)}
        return out

    def to_dict(self) -> dict:
        return {
            "modalities": list(self.modalities), "split": self.split, "n": self.n,
            "verdict": self.verdict, "reason": self.reason, "dominant": self.dominant,
            "weakest": self.weakest, "ranking": list(self.ranking),
            "intervals": {p: iv.to_dict() for p, iv in self.intervals.items()},
            "recommendations": [dict(r) for r in self.recommendations],
            "copies": [list(p) for p in self.copies],
            "agree": self.agree, "starved": self.starved, "baseline": self.baseline,
            "evidence": [e.to_dict() for e in self.evidence],
            "disagreements": self.disagreements, "fused_accuracy": self.fused_accuracy,
            "unimodal": self.unimodal.to_dict(), "shapley": self.shapley.to_dict(),
            "fisher": self.fisher,
            "separability": ({m: s.to_dict() for m, s in self.separability.items()}
                             if self.separability else None),
            "under_optimisation": self.under_optimisation,
            "per_class": {str(c): v for c, v in self.per_class.items()},
            "summary": self.summary, "config": self.config,
            "robustness": self.robustness.to_dict() if self.robustness is not None else None,
            "conditional_utilization": (self.conditional_utilization.to_dict()
                                        if self.conditional_utilization is not None else None),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Diagnosis:
        """Read back :meth:`to_dict` (a saved ``diagnosis.json``). Per-sample values are not
        saved: ``shapley`` becomes a :class:`ShapleySummary`, ``unimodal`` has no per-sample
        hits; everything else (verdict, intervals, tables, ``to_frame``) is as saved."""
        mods = tuple(d["modalities"])
        u = d["unimodal"]
        base = u.get("baseline", d.get("baseline", "zero"))
        per_class = {int(c): {"n": r["n"], "acc": r["acc"], "unimodal_acc": r["unimodal_acc"]}
                     for c, r in (d.get("per_class") or {}).items()}
        class_shap = {int(c): r["shapley"] for c, r in (d.get("per_class") or {}).items()
                      if r.get("shapley") is not None}
        unimodal = EvalResult(
            loss=u["loss"], accuracy=u["acc"], n=u["n"],
            unimodal={m: UnimodalScore(m, u["unimodal_acc"][m], u["unimodal_prob"][m],
                                       u["unimodal_ce"][m], u["n"], base) for m in mods},
            per_class=per_class, baseline=base)
        sep = d.get("separability")
        return cls(
            mods, d.get("dominant") if "verdict" in d else None,
            d.get("weakest") if "verdict" in d else None, d["agree"],
            [Evidence(**e) for e in d["evidence"]], d["fused_accuracy"], unimodal,
            ShapleySummary.from_dict(d["shapley"], class_shap), d.get("fisher"),
            {m: Separability(**s) for m, s in sep.items()} if sep else None,
            d.get("under_optimisation"), list(d.get("disagreements", [])), d["summary"],
            dict(d.get("config", {})), d.get("baseline", base),
            d.get("verdict", "inconclusive"),
            d.get("reason", "saved by an older modaldiag without intervals"),
            list(d.get("ranking", [])),
            {p: ProbeIntervals.from_dict(iv) for p, iv in (d.get("intervals") or {}).items()},
            [dict(r) for r in d.get("recommendations", [])], d.get("split", "unnamed"),
            int(d.get("n", u["n"])), tuple(tuple(p) for p in d.get("copies", [])),
            RobustnessResult.from_dict(d["robustness"]) if d.get("robustness") else None,
            (ConditionalUtilization.from_dict(d["conditional_utilization"])
             if d.get("conditional_utilization") else None))

    def to_frame(self) -> pd.DataFrame:
        """One row per (probe, modality): ``probe, modality, value, ci_low, ci_high, split, n``.

        Probes: fused accuracy (modality ``"fused"``), unimodal accuracy and mean Shapley (with
        their bootstrap interval), low-contribution share, Fisher trace, k-means purity (one row
        per split), linear probe (split = where it was scored), under-optimisation (joint, alone,
        gap), robustness AUC per corruption (``"robustness AUC (missing)"``, with its bootstrap
        interval), conditional utilisation. ``ci_low``/``ci_high`` are NaN where nothing was
        bootstrapped.
        """
        nan = float("nan")
        rows = [("fused accuracy", "fused", self.fused_accuracy, nan, nan, self.split, self.n)]
        for probe, scores in ((ACCURACY, {m: s.accuracy for m, s in self.unimodal.unimodal.items()}),
                              (SHAPLEY, self.shapley.mean())):
            iv = self.intervals.get(probe)
            for m in self.modalities:
                lo, hi = (iv.low[m], iv.high[m]) if iv else (nan, nan)
                rows.append((probe, m, scores[m], lo, hi, self.split, self.n))
        for m, v in self.shapley.low_contribution_share().items():
            rows.append(("low-contribution share", m, v, nan, nan, self.split, self.n))
        for m, v in (self.fisher or {}).items():
            rows.append(("fisher trace", m, v, nan, nan, self.split, self.n))
        for m, s in (self.separability or {}).items():
            rows.append(("purity", m, s.train_purity, nan, nan, s.train_split, s.n_train))
            rows.append(("purity", m, s.val_purity, nan, nan, s.val_split, s.n_val))
            if s.linear_probe is not None:
                rows.append(("linear probe", m, s.linear_probe, nan, nan, s.val_split, s.n_val))
        rob = self.robustness
        for c in (rob.corruptions if rob is not None else ()):
            for m in rob.modalities:
                rows.append((f"robustness AUC ({c})", m, rob.auc[c][m], rob.auc_low[c][m],
                             rob.auc_high[c][m], rob.split, rob.n))
        cu = self.conditional_utilization
        for m, v in (cu or {}).items():
            rows.append(("conditional utilisation", m, v, nan, nan, cu.split, cu.n))
        sep_any = next(iter((self.separability or {}).values()), None)
        for m, rec in (self.under_optimisation or {}).items():
            for key in ("joint", "alone", "gap"):
                rows.append((f"under-optimisation {key}", m, rec[key], nan, nan,
                             sep_any.val_split if sep_any else "val",
                             sep_any.n_val if sep_any else 0))
        frame = pd.DataFrame(rows, columns=["probe", "modality", "value", "ci_low", "ci_high",
                                            "split", "n"])
        return frame.astype({"value": float, "ci_low": float, "ci_high": float, "n": int})

    def per_class_frame(self) -> pd.DataFrame:
        """One row per class (on ``split``): n, fused accuracy, unimodal accuracy and mean
        Shapley per modality."""
        rows = []
        for c, rec in sorted(self.per_class.items()):
            row = {"class": c, "split": self.split, "n": rec["n"], "fused_acc": rec["acc"]}
            row.update({f"{m}_acc": rec["unimodal_acc"][m] for m in self.modalities})
            row.update({f"{m}_shapley": (rec["shapley"] or {}).get(m, float("nan"))
                        for m in self.modalities})
            rows.append(row)
        return pd.DataFrame(rows)

    def to_html(self, title: str = "modaldiag diagnosis", class_names=None) -> str:
        """A self-contained HTML page (figures embedded; every name escaped)."""
        return _renderer("to_html")(self, title, class_names)

    def save(self, directory, *, title: str = "modaldiag diagnosis", class_names=None) -> Path:
        """Write ``diagnosis.json``, ``diagnosis.csv`` (:meth:`to_frame`), ``per_class.csv``,
        ``report.html`` and figures (PNG + SVG) into ``directory``.

        Each file is written atomically (temp file + rename); each figure is drawn once.
        """
        directory = Path(directory)
        refuse_foreign_overwrite(directory, _REPORT_FILES)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "diagnosis.json", self.to_dict())
        atomic_write_text(directory / "diagnosis.csv", self.to_frame().to_csv(index=False))
        atomic_write_text(directory / "per_class.csv", self.per_class_frame().to_csv(index=False))
        if self.robustness is not None:
            atomic_write_text(directory / "robustness.csv",
                              self.robustness.to_dataframe().to_csv(index=False))
        _renderer("save")(self, directory, title, class_names)
        if read_marker(directory) is None:
            write_marker(directory, "diagnosis")
        return directory

    def __repr__(self) -> str:
        return (f"Diagnosis(verdict={self.verdict!r}, dominant={self.dominant!r}, "
                f"weakest={self.weakest!r}, split={self.split!r}, n={self.n})\n{self.summary}")


def _reset_parameters(module: nn.Module) -> nn.Module:
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return module


_UNDER_CONSTRAINTS = {"train_loader": [ITERABLE], "val_loader": [ITERABLE],
                      "epochs": [POSITIVE_INT], "lr": [POSITIVE], "seed": SEED}


def under_optimisation(model, train_loader: Iterable, val_loader: Iterable, *, epochs: int = 20,
                       lr: float = 0.01, seed: int = 0, device=None) -> dict[str, dict]:
    """Per modality: linear-probe accuracy of the jointly trained (frozen) encoder vs the same
    encoder architecture trained alone on that modality (fresh initialisation, linear head,
    cross-entropy, SGD momentum 0.9, ``epochs`` epochs). ``gap = alone - joint``: how much joint
    training starved the modality.

    The reference encoders are trained on copies; the model and the global RNG states are left
    exactly as found (the copies are seeded from ``seed``).

    Returns
    -------
    dict[str, dict]
        ``{m: {"joint": float, "alone": float, "gap": float}}``.
    """
    validate_params(_UNDER_CONSTRAINTS, {"train_loader": train_loader, "val_loader": val_loader,
                                         "epochs": epochs, "lr": lr, "seed": seed},
                    "under_optimisation")
    net = contract_model(model)
    with probe_state(net):
        return _under_optimisation(net, train_loader, val_loader, epochs, lr, seed, device)


def _inputs_of(loader: Iterable, modality: str, modalities):
    """``(x, labels)`` of one modality per batch, without the samples where it is absent."""
    for b, batch in enumerate(loader):
        inputs, labels, present = unpack_batch_present(batch, modalities, batch_index=b)
        keep = (present or {}).get(modality)
        if keep is None:
            yield inputs[modality], labels
        elif bool(keep.any()):
            yield inputs[modality][keep], torch.as_tensor(labels)[keep]


@torch.no_grad()
def _encode_all(encoder, loader, modality, modalities, dev) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, d)`` and labels ``(N,)`` of one modality, from one pass over ``loader``."""
    feats, labels = [], []
    for x, y in _inputs_of(loader, modality, modalities):
        feats.append(encoder(x.to(dev)).float().flatten(1).cpu().numpy())
        labels.append(torch.as_tensor(y).cpu().numpy())
    return np.concatenate(feats), np.concatenate(labels)


def _under_optimisation(net, train_loader, val_loader, epochs, lr, seed, device,
                        bar=None) -> dict[str, dict]:
    tx, ty, tp = collect_features(net, train_loader, device, present=True)
    vx, vy, vp = collect_features(net, val_loader, device, present=True)
    dev = next(net.parameters()).device
    out = {}
    for i, m in enumerate(net.modalities):  # each modality over the samples where it is present
        joint = linear_probe_accuracy(tx[m][tp[m]], ty[tp[m]], vx[m][vp[m]], vy[vp[m]], seed=seed)
        torch.manual_seed(seed + i)
        encoder = _reset_parameters(copy.deepcopy(net.encoders[m])).requires_grad_(True)
        dim = tx[m].shape[1]
        alone = nn.Sequential(encoder, nn.Flatten(), nn.Linear(dim, net.num_classes)).to(dev)
        opt = torch.optim.SGD(alone.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
        for _ in range(epochs):
            alone.train()
            for x, y in _inputs_of(train_loader, m, net.modalities):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(alone(x.to(dev)), y.to(dev)).backward()
                opt.step()
        alone.eval()
        fa, fy = _encode_all(encoder, train_loader, m, net.modalities, dev)
        fv, fvy = _encode_all(encoder, val_loader, m, net.modalities, dev)
        if not (np.isfinite(fa).all() and np.isfinite(fv).all()):
            raise ValueError(
                f"the reference encoder of modality {m!r} trained alone diverged (NaN/inf "
                f"features after {epochs} epochs at lr={lr}); lower lr.")
        alone_acc = linear_probe_accuracy(fa, fy, fv, fvy, seed=seed)
        out[m] = {"joint": joint, "alone": alone_acc, "gap": alone_acc - joint}
        if bar is not None:
            bar.update()
    return out


_SPLIT_NAME = Satisfies(lambda s: isinstance(s, str) and bool(s.strip()),
                        "a non-empty split name such as 'test', 'val' or 'train'")
_DIAGNOSE_CONSTRAINTS = {
    "loader": [ITERABLE], "val_loader": [None, ITERABLE], "baseline_loader": [None, ITERABLE],
    "train_loader": [None, ITERABLE], "split": [None, _SPLIT_NAME],
    "value": [Options("paper", "correct", "prob", "logit", "neg_loss"),
              Satisfies(callable, "a callable value function (see md.shapley)")],
    "baseline": BASELINE_CONSTRAINT, "fisher": [None, Options(*FISHER_FORMS)],
    "reference_epochs": [None, POSITIVE_INT], "seed": SEED, "progress": [BOOL],
    "n_resamples": [POSITIVE_INT], "level": [Interval(0, 1, closed="neither")],
    "robustness": [BOOL],
    "history": [None, Satisfies(lambda h: hasattr(h, "series") and hasattr(h, "epochs"),
                                "a modaldiag History (what md.fit returns)")],
}
_BASELINE_WORDS = {"zero": "zero features", "mean": "mean training features",
                   "custom": "custom per-modality baseline vectors"}


def _votes(evidence: list[Evidence], key: str, tiebreak: str) -> str:
    counts = Counter(getattr(e, key) for e in evidence)
    best = max(counts.values())
    winners = [m for m, c in counts.items() if c == best]
    if len(winners) == 1:
        return winners[0]
    return tiebreak if tiebreak in winners else winners[0]


def _fmt(scores: dict[str, float], digits: int = 2) -> str:
    return ", ".join(f"{m} {v:.{digits}f}" for m, v in sorted(scores.items(), key=lambda kv: -kv[1]))


def _fmt_ci(iv: ProbeIntervals, order, digits: int = 3) -> str:
    return ", ".join(f"{m} {iv.mean[m]:.{digits}f} [{iv.low[m]:.{digits}f}, {iv.high[m]:.{digits}f}]"
                     for m in order)


@contextmanager
def _phase(progress: bool, probe: str):
    """One progress step for a probe that draws no bar of its own under this name."""
    bar = progress_bar(None, enabled=progress, desc=f"diagnose: {probe}", total=1, unit="probe")
    with bar:
        yield
        bar.update()


def diagnose(
    model,
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    split: str | None = None,
    train_loader: Iterable | None = None,
    value: str = "paper",
    baseline: str | None = None,
    fisher: str | None = "per_sample",
    reference_epochs: int | None = None,
    seed: int = 0,
    baseline_loader: Iterable | None = None,
    device=None,
    progress: bool = False,
    n_resamples: int = 1000,
    level: float = 0.95,
    history=None,
    robustness: bool = True,
) -> Diagnosis:
    """Diagnose modality imbalance of a trained model, with intervals and an honest verdict.

    Parameters
    ----------
    model : MultimodalModel
    loader : iterable of ``(inputs, labels)``
        The data the verdict is measured on: held-out data (the test split for a final verdict,
        the validation split during development). Unimodal accuracy, Shapley and Fisher use it.
    val_loader : iterable, optional
        Held-out data V: enables separability (purity of D vs V, the learning-state gap) and the
        linear probe (fitted on D, scored on V).
    split : str, optional
        Name of ``loader``'s data (``"test"``, ``"val"``, ``"train"``); None reads
        ``loader.dataset.split`` (set by :class:`~modaldiag.datasets.DatasetSplits`), else
        ``"unnamed"``. Every number of the summary, tables and figures carries its split.
    train_loader : iterable, optional
        D, the training data for separability, the linear probe and ``reference_epochs``.
        Without it D is ``loader`` (and labelled with ``split``).
    value : str, default "paper"
        Shapley value function (see :func:`modaldiag.shapley`).
    baseline : {None, "zero", "mean"}, default None
        What an absent modality becomes, for unimodal accuracy and Shapley alike. None: the
        model's stored baseline (``model.set_baseline``; zeros unless set); ``"zero"`` /
        ``"mean"`` override it (``"mean"`` with ``baseline_loader`` or a stored mean baseline).
    fisher : {"per_sample", "batch", "code"} or None, default "per_sample"
        Form of the Fisher trace to report (None: skip).
    reference_epochs : int, optional
        Opt-in under-optimisation gap: trains a fresh copy of each encoder alone on D for this
        many epochs (needs ``val_loader``).
    seed : int, default 0
        Seed of the bootstrap, k-means, the linear probes, Shapley permutations and the reference
        encoders (the global RNG is left exactly as found).
    baseline_loader : iterable, optional
        With ``baseline="mean"``: the loader whose mean features stand in for absent modalities.
    progress : bool, default False
        One progress bar per probe (``"diagnose: evaluate"``, ``"diagnose: shapley"``, ...);
        nothing is printed when False.
    n_resamples : int, default 1000
        Bootstrap resamples of the verdict's intervals.
    level : float, default 0.95
        Coverage of the intervals.
    history : History, optional
        The model's training History (``md.fit``'s return value, with the monitored Fisher
        traces): its prime learning window (paper rule) becomes evidence for the recommendation
        (when the dominant modality's window closed, a remedy must act before it). When it holds
        Greedy's conditional learning speed (``speed.bdr.<m>``, ``speed.d_speed``), the report
        plots it next to the conditional utilisation.
    robustness : bool, default True
        Robustness curves (:func:`~modaldiag.probes.robustness.robustness`: each modality
        missing, gaussian-noisy in feature space, shuffled; severities 0-1, bootstrap intervals,
        AUC) and Greedy's conditional utilisation rates on ``loader``, from one extra encoder
        pass; absence is the diagnosis' ``baseline``.

    The model (every submodule's mode, ``requires_grad``, ``.grad``, buffers) and the global RNG
    states are left exactly as found.

    Returns
    -------
    Diagnosis
        ``.verdict``, ``.reason``, ``.dominant``/``.weakest`` (None unless imbalanced),
        ``.ranking``, ``.intervals``, ``.recommendations``, ``.split``, ``.n``, ``.evidence``,
        ``.robustness`` (a RobustnessResult), ``.conditional_utilization``, ``.summary``,
        ``.to_dict()``, ``.to_frame()``, ``.save(dir)``.
    """
    validate_params(_DIAGNOSE_CONSTRAINTS,
                    {"loader": loader, "val_loader": val_loader, "value": value,
                     "baseline": baseline, "fisher": fisher, "reference_epochs": reference_epochs,
                     "seed": seed, "baseline_loader": baseline_loader, "progress": progress,
                     "train_loader": train_loader, "split": split, "n_resamples": n_resamples,
                     "level": level, "history": history, "robustness": robustness},
                    "diagnose")
    net = contract_model(model)
    if reference_epochs is not None and val_loader is None:
        raise ValueError("reference_epochs needs val_loader (the linear probes are scored on it).")
    split = split or split_of(loader) or "unnamed"
    fit_loader = train_loader if train_loader is not None else loader
    fit_split = (split_of(train_loader) or "train") if train_loader is not None else split
    val_split = (split_of(val_loader) or "val") if val_loader is not None else None
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        # inside the context the model's stored baseline *is* the requested one: both
        # absence-based probes below use it (baseline=None)
        ev = _evaluate(net, loader, None, None, device, progress, "diagnose: evaluate")
        with _phase(progress, "shapley"):
            sv = shapley(net, loader, value=value, seed=seed, device=device, progress=progress)
        tr = None
        if fisher:
            with _phase(progress, "fisher"):
                tr = fisher_trace(net, loader, form=fisher, device=device, progress=progress)
        sep = None
        if val_loader is not None:
            sep = _separability(net, fit_loader, val_loader, seed, 10, True, True, 50000, 10000,
                                device, progress=progress, desc="diagnose: separability")
            sep = {m: replace(s, train_split=fit_split, val_split=val_split)
                   for m, s in sep.items()}
        under = None
        if reference_epochs:
            bar = progress_bar(None, enabled=progress, desc="diagnose: under_optimisation",
                               total=len(net.modalities), unit="encoder")
            with bar:
                under = _under_optimisation(net, fit_loader, val_loader, reference_epochs, 0.01,
                                            seed, device, bar)
        rob = cu = None
        if robustness:
            with _phase(progress, "robustness"):
                cache = cache_features(net, loader, device)
                rob = robustness_from_cache(
                    net, cache, {c: c for c in CORRUPTIONS}, DEFAULT_SEVERITIES, net.modalities,
                    n_resamples=n_resamples, level=level, seed=seed, baseline_kind=kind,
                    split=split)
                cu = conditional_from_cache(net, cache, split=split, baseline=kind)
    config = {"split": split, "n": ev.n, "value": sv.value, "baseline": kind, "fisher": fisher,
              "reference_epochs": reference_epochs, "seed": seed,
              "separability_splits": ({"fit": fit_split, "score": val_split}
                                      if sep is not None else None),
              "n_resamples": n_resamples, "level": level,
              "window": _window_evidence(history, net.modalities), "robustness": robustness,
              "speed": _speed_evidence(history, net.modalities)}
    return _diagnosis(net, ev, sv, tr, sep, under, kind, config, split=split,
                      n_resamples=n_resamples, level=level, seed=seed, rob=rob, cu=cu)


def _speed_evidence(history, modalities) -> dict | None:
    """Greedy's conditional learning speed per epoch from the History (keys ``speed.bdr.<m>``,
    ``speed.d_speed``), or None when it was not logged."""
    if history is None or len(history) == 0:
        return None
    out = {}
    for key in [f"bdr.{m}" for m in modalities] + ["d_speed"]:
        values = history.series(f"speed.{key}")
        if any(v == v for v in values):  # not all NaN
            out[key] = [float(v) for v in values]
    return out or None


def _window_evidence(history, modalities) -> dict | None:
    """``{m: {"open_epochs": [...], "closed_at": epoch or None, "epochs": N}}`` from the
    History's monitored traces (paper rule); None without a History or traces."""
    if history is None or len(history) == 0:
        return None
    try:
        win = learning_window(history)
    except ValueError:  # no monitored Fisher traces in this History
        return None
    out = {}
    for m in modalities:
        states = win.open.get(m)
        if not states:
            continue
        opened = [t for t, o in enumerate(states) if o]
        closed_at = next((t for t in range(opened[-1] + 1, len(states)) if not states[t]), None) \
            if opened else 0
        out[m] = {"open_epochs": opened, "closed_at": closed_at, "epochs": len(states)}
    return out or None


def _intervals(ev: EvalResult, sv: ShapleyValues, mods, split: str, n_resamples: int,
               level: float, seed: int) -> dict[str, ProbeIntervals]:
    hits = ev.unimodal_correct.double().numpy()
    phi = sv.values.double().numpy()
    margins = {ACCURACY: ACCURACY_MARGIN, SHAPLEY: shapley_margin(phi)}
    kw = {"modalities": mods, "split": split, "margins": margins, "n_resamples": n_resamples,
          "level": level, "seed": seed}
    if hits.shape == phi.shape:  # same samples: paired over probes too
        return bootstrap_intervals({ACCURACY: hits, SHAPLEY: phi}, **kw)
    return {**bootstrap_intervals({ACCURACY: hits}, **kw), **bootstrap_intervals({SHAPLEY: phi}, **kw)}


def _ranking(evidence: list[Evidence], sv) -> tuple[list[str], bool, list[str]]:
    """Point-estimate order (majority first and last, Shapley between) and the disagreements."""
    means = sv.mean()
    first = _votes(evidence, "dominant", sv.dominant)
    last = _votes(evidence, "weakest", sv.weakest)
    if last == first:
        last = min((m for m in means if m != first), key=means.get)
    middle = sorted((m for m in means if m not in (first, last)), key=lambda m: -means[m])
    disagreements = [
        f"{e.probe} ({e.split}) ranks {e.dominant!r} first and {e.weakest!r} last "
        f"({_fmt(e.scores)})." for e in evidence if e.dominant != first or e.weakest != last]
    return [first, *middle, last], not disagreements, disagreements


def _verdict_line(verdict, split: str) -> str:
    if verdict.verdict == "imbalanced":
        return (f"Verdict ({split}): imbalanced. {verdict.dominant!r} dominates and "
                f"{verdict.weakest!r} is the weakest: {verdict.reason}.")
    return f"Verdict ({split}): {verdict.verdict}: {verdict.reason}."


def _recommendation_line(verdict, recs: list[dict]) -> str:
    if recs:
        return ("Recommendation: try " + ", ".join(r["method"] for r in recs)
                + " (why: see the Recommendation section of the report).")
    if verdict.verdict == "balanced":
        return f"No recommendation: the modalities are balanced ({verdict.reason})."
    return f"No recommendation: the evidence is inconclusive ({verdict.reason})."


def _diagnosis(net, ev: EvalResult, sv: ShapleyValues, tr, sep, under, kind: str,
               config: dict, *, split: str, n_resamples: int = 1000, level: float = 0.95,
               seed: int = 0, rob: RobustnessResult | None = None,
               cu: ConditionalUtilization | None = None) -> Diagnosis:
    value, mods, n = sv.value, net.modalities, ev.n
    uni_acc = {m: s.accuracy for m, s in ev.unimodal.items()}
    evidence = [
        _evidence(ACCURACY, uni_acc,
                  f"accuracy of the joint head with every other modality at its {kind} baseline",
                  split),
        _evidence(SHAPLEY, sv.mean(),
                  f"mean sample-level Shapley contribution (value '{value}', baseline '{kind}')",
                  split),
    ]
    if sep is not None:
        s0 = next(iter(sep.values()))
        evidence.append(_evidence(
            "linear probe", {m: s.linear_probe for m, s in sep.items()},
            f"accuracy of a logistic regression on frozen features, fit on {s0.train_split}, "
            f"scored on {s0.val_split}", s0.val_split))
    ranking, agree, disagreements = _ranking(evidence, sv)
    if disagreements and sep is not None:
        disagreements.append(
            f"Ablation through the joint head ({kind} baseline) measures what the fused model "
            "uses; the linear probe measures what each encoder knows. An encoder can know much "
            "(high probe) while the head relies on it little (low Shapley): that is under-use, "
            "not a weak signal.")
    intervals = _intervals(ev, sv, mods, split, n_resamples, level, seed)
    verdict = decide(intervals, ranking, n=n, copies=ev.copies)
    recs = recommend(verdict.verdict, verdict.dominant, verdict.weakest,
                     unimodal_accuracy=uni_acc, split=split, separability=sep,
                     under_optimisation=under, window=config.get("window"))
    pct = f"{100 * level:g} % CI"
    fair = float(sv.full_value.mean()) / len(mods)
    lines = [
        f"Diagnosis on the {split} split (n = {n}), modalities {', '.join(mods)} "
        f"({getattr(net, 'fusion_type', 'custom')} head).",
        _verdict_line(verdict, split),
        f"Absent modalities are replaced by their {_BASELINE_WORDS.get(kind, kind)} "
        f"(baseline '{kind}', for unimodal accuracy and Shapley alike).",
        f"Fused accuracy ({split}) {ev.accuracy:.3f}. Unimodal accuracy through the joint head "
        f"({split}, mean [{pct}]): {_fmt_ci(intervals[ACCURACY], ranking)}.",
        f"Mean Shapley contribution ({split}, value '{value}', fair share {fair:.2f}; mean "
        f"[{pct}]): {_fmt_ci(intervals[SHAPLEY], ranking)}; {ranking[-1]!r} contributes less "
        f"than its fair share on {100 * sv.low_contribution_share()[ranking[-1]]:.0f}% of "
        f"samples (imbalance degree {sv.imbalance_degree():.2f}).",
    ]
    if sep is not None:
        s0 = next(iter(sep.values()))
        lines.append(
            f"Linear-probe accuracy of frozen features (fit on {s0.train_split}, scored on "
            f"{s0.val_split}): {_fmt({m: s.linear_probe for m, s in sep.items()}, 3)}; k-means "
            f"purity {s0.train_split}/{s0.val_split}: "
            + ", ".join(f"{m} {s.train_purity:.2f}/{s.val_purity:.2f}" for m, s in sep.items())
            + ".")
    if under:
        starved = max(under, key=lambda m: under[m]["gap"])
        u = under[starved]
        where = next(iter(sep.values())) if sep else None
        lines.append(f"Under-optimisation (linear probes fit on {where.train_split}, scored on "
                     f"{where.val_split}): the {starved!r} encoder supports {u['joint']:.3f} "
                     f"after joint training vs {u['alone']:.3f} when trained alone "
                     f"(gap {u['gap']:+.3f}).")
    if rob is not None:
        lines.append(
            f"Robustness ({split}, AUC of fused accuracy over severities 0-1, {pct}): "
            + "; ".join(f"{c} " + ", ".join(
                f"{m} {rob.auc[c][m]:.3f} [{rob.auc_low[c][m]:.3f}, {rob.auc_high[c][m]:.3f}]"
                for m in rob.modalities) for c in rob.corruptions)
            + f" (clean {rob.clean_accuracy:.3f}; missing = '{kind}' baseline, gaussian = "
            "feature noise in units of each modality's feature std).")
    if cu is not None:
        lines.append(f"Conditional utilisation ({split}, '{kind}' baseline): "
                     + ", ".join(f"{m} {v:.3f}" for m, v in cu.items())
                     + f"; d_util {cu.d_util:+.3f}.")
    lines.append("All voting probes rank the modalities alike." if agree else
                 "The probes disagree: " + " ".join(disagreements))
    lines.append(_recommendation_line(verdict, recs))
    return Diagnosis(
        mods, verdict.dominant, verdict.weakest, agree, evidence, ev.accuracy, ev, sv, tr, sep,
        under, disagreements, "\n".join(lines), config, kind, verdict=verdict.verdict,
        reason=verdict.reason, ranking=ranking, intervals=intervals, recommendations=recs,
        split=split, n=n, copies=tuple(ev.copies), robustness=rob, conditional_utilization=cu)


_COMBINE_CONSTRAINTS = {"n_resamples": [POSITIVE_INT], "level": [Interval(0, 1, closed="neither")],
                        "seed": SEED}


def combine(diagnoses, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Verdict:
    """One verdict over several training seeds of a model, each diagnosed on the same split.

    The intervals come from a two-level bootstrap (seeds with replacement, then samples within
    each seed; :func:`modaldiag.probes.verdict.seed_intervals`), so they cover training
    randomness as well as the sampling of the evaluation data; the rule is that of
    :func:`diagnose` (:func:`modaldiag.probes.decide`). The ranking orders the modalities by their
    mean Shapley contribution over seeds; a pair counts as copies of one view only when it is
    one in every run.

    Parameters
    ----------
    diagnoses : sequence of Diagnosis
        Live results of :func:`diagnose` (per-sample values are needed: a diagnosis read back
        with :meth:`Diagnosis.from_dict` has none), same modalities, split and ``n``.
    n_resamples : int, default 1000
    level : float, default 0.95
    seed : int, default 0

    Returns
    -------
    Verdict
        ``.verdict``, ``.dominant``, ``.weakest``, ``.reason``, ``.ranking``, ``.intervals``.
    """
    validate_params(_COMBINE_CONSTRAINTS, {"n_resamples": n_resamples, "level": level,
                                           "seed": seed}, "combine")
    reps = list(diagnoses)
    if not reps or not all(isinstance(r, Diagnosis) for r in reps):
        raise ValueError("combine needs a non-empty sequence of md.diagnose results.")
    keys = {(tuple(r.modalities), r.split, r.n) for r in reps}
    if len(keys) > 1:
        raise ValueError("combine: every diagnosis must share modalities, split and n (the same "
                         f"evaluation data); got {sorted(keys, key=str)}.")
    if any(r.unimodal.unimodal_correct is None or getattr(r.shapley, "values", None) is None
           for r in reps):
        raise ValueError("combine needs per-sample values: pass md.diagnose results, not "
                         "diagnoses read back with Diagnosis.from_dict.")
    mods, split, n = reps[0].modalities, reps[0].split, reps[0].n
    runs = [{ACCURACY: r.unimodal.unimodal_correct.double().numpy(),
             SHAPLEY: r.shapley.values.double().numpy()} for r in reps]
    margins = {ACCURACY: ACCURACY_MARGIN,
               SHAPLEY: float(np.mean([shapley_margin(run[SHAPLEY]) for run in runs]))}
    intervals = seed_intervals(runs, mods, split=split, margins=margins,
                               n_resamples=n_resamples, level=level, seed=seed)
    means = intervals[SHAPLEY].mean
    ranking = sorted(mods, key=lambda m: -means[m])
    copies = set.intersection(*({frozenset(p) for p in r.copies} for r in reps))
    return decide(intervals, ranking, n=n,
                  copies=tuple(tuple(sorted(p)) for p in sorted(copies, key=sorted)))
