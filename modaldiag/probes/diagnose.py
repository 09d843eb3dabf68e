"""``md.diagnose``: every probe on one model, a verdict, the evidence, and a plain summary.

Verdict rules. Three probes vote on which modality dominates and which is weakest:
unimodal accuracy through the joint head, mean Shapley contribution, and (with a validation
loader) linear-probe accuracy of the frozen features. The majority wins; a tie goes to Shapley.
The report says which probes disagree and why they can (zero-ablation through the joint head
measures what the *fused model* uses; a linear probe measures what the *encoder* knows).
The Fisher trace is reported but does not vote: its scale depends on each encoder's size.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..utils.io import atomic_write_json, read_marker, write_marker
from ..utils.validation import (
    BOOL,
    POSITIVE,
    POSITIVE_INT,
    Options,
    Satisfies,
    unpack_batch,
    validate_params,
)
from ._common import (
    BASELINE_CONSTRAINT,
    ITERABLE,
    SEED,
    baseline_context,
    contract_model,
    probe_state,
)
from .fisher import FISHER_FORMS, fisher_trace
from .separability import Separability, collect_features, linear_probe_accuracy, separability
from .shapley import ShapleyValues, shapley
from .unimodal import EvalResult, evaluate

__all__ = ["diagnose", "Diagnosis", "Evidence", "under_optimisation"]

#: HTML and figure writers for :class:`Diagnosis`, registered by :mod:`modaldiag.report` (the
#: layer above probes), which ``import modaldiag`` always loads.
_RENDERERS: dict = {}
#: the files Diagnosis.save writes (it refuses to overwrite them in a folder it did not create)
_REPORT_FILES = {"diagnosis.json", "report.html", *(f"{stem}.{ext}" for stem in
                 ("unimodal", "shapley", "separability") for ext in ("png", "svg"))}


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
    """One probe's scores and its verdict."""

    probe: str
    scores: dict[str, float]
    dominant: str
    weakest: str
    description: str

    def to_dict(self) -> dict:
        return asdict(self)


def _evidence(probe: str, scores: dict[str, float], description: str) -> Evidence:
    return Evidence(probe, {m: float(v) for m, v in scores.items()}, max(scores, key=scores.get),
                    min(scores, key=scores.get), description)


@dataclass
class Diagnosis:
    """What :func:`diagnose` returns.

    ``dominant`` / ``weakest`` are the majority verdicts over ``evidence``; ``agree`` says whether
    every voting probe named the same modalities; ``disagreements`` explains where they did not.
    ``baseline`` is the kind of absence every absence-based probe used (``"zero"``, ``"mean"`` or
    ``"custom"``): unimodal accuracy and Shapley always share it.
    """

    modalities: tuple[str, ...]
    dominant: str
    weakest: str
    agree: bool
    evidence: list[Evidence]
    fused_accuracy: float
    unimodal: EvalResult
    shapley: ShapleyValues
    fisher: dict[str, float] | None
    separability: dict[str, Separability] | None
    under_optimisation: dict[str, dict] | None
    disagreements: list[str]
    summary: str
    config: dict = field(default_factory=dict)
    baseline: str = "zero"

    @property
    def starved(self) -> str | None:
        """The modality whose encoder lost most to joint training (needs ``reference_epochs``)."""
        if not self.under_optimisation:
            return None
        return max(self.under_optimisation, key=lambda m: self.under_optimisation[m]["gap"])

    @property
    def per_class(self) -> dict[int, dict]:
        """Per class: fused and unimodal accuracy, mean Shapley contribution per modality."""
        shap_pc = self.shapley.per_class()
        out = {}
        for c, rec in (self.unimodal.per_class or {}).items():
            out[c] = {**rec, "shapley": shap_pc.get(c)}
        return out

    def to_dict(self) -> dict:
        return {
            "modalities": list(self.modalities), "dominant": self.dominant, "weakest": self.weakest,
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
        }

    def to_html(self, title: str = "modaldiag diagnosis", class_names=None) -> str:
        """A self-contained HTML page (figures embedded; every name escaped)."""
        return _renderer("to_html")(self, title, class_names)

    def save(self, directory, *, title: str = "modaldiag diagnosis", class_names=None) -> Path:
        """Write ``diagnosis.json``, ``report.html`` and figures (PNG + SVG) into ``directory``.

        Each file is written atomically (temp file + rename); each figure is drawn once.
        """
        directory = Path(directory)
        if read_marker(directory) is None:
            clash = sorted(p.name for p in directory.glob("*") if p.name in _REPORT_FILES)
            if clash:
                raise ValueError(
                    f"{str(directory)!r} already holds {clash} and modaldiag did not create that "
                    "folder (no .modaldiag marker); nothing was overwritten. Save into a new or "
                    "empty folder.")
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "diagnosis.json", self.to_dict())
        _renderer("save")(self, directory, title, class_names)
        if read_marker(directory) is None:
            write_marker(directory, "diagnosis")
        return directory

    def __repr__(self) -> str:
        return (f"Diagnosis(dominant={self.dominant!r}, weakest={self.weakest!r}, "
                f"agree={self.agree})\n{self.summary}")


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
    for b, batch in enumerate(loader):
        inputs, labels = unpack_batch(batch, modalities, batch_index=b)
        yield inputs[modality], labels


@torch.no_grad()
def _encode_all(encoder, loader, modality, modalities, dev) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, d)`` and labels ``(N,)`` of one modality, from one pass over ``loader``."""
    feats, labels = [], []
    for x, y in _inputs_of(loader, modality, modalities):
        feats.append(encoder(x.to(dev)).float().flatten(1).cpu().numpy())
        labels.append(torch.as_tensor(y).cpu().numpy())
    return np.concatenate(feats), np.concatenate(labels)


def _under_optimisation(net, train_loader, val_loader, epochs, lr, seed, device) -> dict[str, dict]:
    tx, ty = collect_features(net, train_loader, device)
    vx, vy = collect_features(net, val_loader, device)
    dev = next(net.parameters()).device
    out = {}
    for i, m in enumerate(net.modalities):
        joint = linear_probe_accuracy(tx[m], ty, vx[m], vy, seed=seed)
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
    return out


_DIAGNOSE_CONSTRAINTS = {
    "loader": [ITERABLE], "val_loader": [None, ITERABLE], "baseline_loader": [None, ITERABLE],
    "value": [Options("paper", "correct", "prob", "logit", "neg_loss"),
              Satisfies(callable, "a callable value function (see md.shapley)")],
    "baseline": BASELINE_CONSTRAINT, "fisher": [None, Options(*FISHER_FORMS)],
    "reference_epochs": [None, POSITIVE_INT], "seed": SEED, "progress": [BOOL],
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


def diagnose(
    model,
    loader: Iterable,
    val_loader: Iterable | None = None,
    *,
    value: str = "paper",
    baseline: str | None = None,
    fisher: str | None = "per_sample",
    reference_epochs: int | None = None,
    seed: int = 0,
    baseline_loader: Iterable | None = None,
    device=None,
    progress: bool = False,
) -> Diagnosis:
    """Diagnose modality imbalance of a trained model.

    Parameters
    ----------
    model : MultimodalModel
    loader : iterable of ``(inputs, labels)``
        The data to diagnose; pass the training data (D) to see what the model learnt from it.
    val_loader : iterable, optional
        Held-out data (V, never the test set during model development): enables separability
        (purity of D vs V, the learning-state gap) and the linear probe.
    value : str, default "paper"
        Shapley value function (see :func:`modaldiag.shapley`).
    baseline : {None, "zero", "mean"}, default None
        What an absent modality becomes, for unimodal accuracy and Shapley alike. None: the
        model's stored baseline (``model.set_baseline``; zeros unless set); ``"zero"`` /
        ``"mean"`` override it (``"mean"`` with ``baseline_loader`` or a stored mean baseline).
        The kind used is ``Diagnosis.baseline`` and is stated in the summary and the report.
    fisher : {"per_sample", "batch", "code"} or None, default "per_sample"
        Form of the Fisher trace to report (None: skip).
    reference_epochs : int, optional
        Opt-in under-optimisation gap: trains a fresh copy of each encoder alone on ``loader`` for
        this many epochs (needs ``val_loader``).
    seed : int, default 0
        Seed of k-means, the linear probes, Shapley permutations and the reference encoders
        (the global RNG is left exactly as found).
    baseline_loader : iterable, optional
        With ``baseline="mean"``: the loader whose mean features stand in for absent modalities.

    The model (every submodule's mode, ``requires_grad``, ``.grad``, buffers) and the global RNG
    states are left exactly as found.

    Returns
    -------
    Diagnosis
        ``.dominant``, ``.weakest``, ``.agree``, ``.evidence``, ``.summary``, ``.to_dict()``,
        ``.save(dir)``.
    """
    validate_params(_DIAGNOSE_CONSTRAINTS,
                    {"loader": loader, "val_loader": val_loader, "value": value,
                     "baseline": baseline, "fisher": fisher, "reference_epochs": reference_epochs,
                     "seed": seed, "baseline_loader": baseline_loader, "progress": progress},
                    "diagnose")
    net = contract_model(model)
    if reference_epochs is not None and val_loader is None:
        raise ValueError("reference_epochs needs val_loader (the linear probes are scored on it).")
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        # inside the context the model's stored baseline *is* the requested one: both
        # absence-based probes below use it (baseline=None)
        ev = evaluate(net, loader, device=device)
        sv = shapley(net, loader, value=value, seed=seed, device=device, progress=progress)
        tr = (fisher_trace(net, loader, form=fisher, device=device, progress=progress)
              if fisher else None)
        sep = (separability(net, loader, val_loader, seed=seed, device=device)
               if val_loader is not None else None)
        under = (under_optimisation(net, loader, val_loader, epochs=reference_epochs, seed=seed,
                                    device=device) if reference_epochs else None)
    return _diagnosis(net, ev, sv, tr, sep, under, kind,
                      {"value": sv.value, "baseline": kind, "fisher": fisher,
                       "reference_epochs": reference_epochs, "seed": seed, "n": ev.n})


def _diagnosis(net, ev: EvalResult, sv: ShapleyValues, tr, sep, under, kind: str,
               config: dict) -> Diagnosis:
    value = sv.value
    evidence = [
        _evidence("unimodal accuracy", {m: s.accuracy for m, s in ev.unimodal.items()},
                  f"accuracy of the joint head with every other modality at its {kind} baseline"),
        _evidence("shapley", sv.mean(),
                  f"mean sample-level Shapley contribution (value '{value}', baseline '{kind}')"),
    ]
    if sep is not None:
        evidence.append(_evidence("linear probe", {m: s.linear_probe for m, s in sep.items()},
                                  "held-out accuracy of a logistic regression on frozen features"))
    dominant = _votes(evidence, "dominant", sv.dominant)
    weakest = _votes(evidence, "weakest", sv.weakest)
    if weakest == dominant:
        weakest = min((m for m in net.modalities if m != dominant), key=sv.mean().get)
    disagreements = []
    for e in evidence:
        if e.dominant != dominant or e.weakest != weakest:
            disagreements.append(
                f"{e.probe} ranks {e.dominant!r} first and {e.weakest!r} last ({_fmt(e.scores)}).")
    if disagreements and sep is not None:
        disagreements.append(
            f"Ablation through the joint head ({kind} baseline) measures what the fused model "
            "uses; the linear "
            "probe measures what each encoder knows. An encoder can know much (high probe) while "
            "the head relies on it little (low Shapley): that is under-use, not a weak signal.")
    agree = not disagreements

    n = ev.n
    lines = [
        f"Diagnosis of {n} samples, modalities {', '.join(net.modalities)} "
        f"({getattr(net, 'fusion_type', 'custom')} head): {dominant!r} dominates and {weakest!r} "
        f"is the weakest.",
        f"Absent modalities are replaced by their {_BASELINE_WORDS.get(kind, kind)} "
        f"(baseline '{kind}', for unimodal accuracy and Shapley alike).",
        f"Fused accuracy {ev.accuracy:.3f}. Unimodal accuracy through the joint head: "
        f"{_fmt({m: s.accuracy for m, s in ev.unimodal.items()}, 3)}.",
        f"Mean Shapley contribution ({value}; fair share = {sv.full_value.mean() / len(net.modalities):.2f}): "
        f"{_fmt(sv.mean())}; {weakest!r} contributes less than its fair share on "
        f"{100 * sv.low_contribution_share()[weakest]:.0f}% of samples "
        f"(imbalance degree {sv.imbalance_degree():.2f}).",
    ]
    if sep is not None:
        lines.append("Linear-probe accuracy of frozen features: "
                     f"{_fmt({m: s.linear_probe for m, s in sep.items()}, 3)}; k-means purity "
                     "train/val: " + ", ".join(f"{m} {s.train_purity:.2f}/{s.val_purity:.2f}"
                                               for m, s in sep.items()) + ".")
    if under:
        starved = max(under, key=lambda m: under[m]["gap"])
        u = under[starved]
        lines.append(f"Under-optimisation: the {starved!r} encoder supports a linear probe of "
                     f"{u['joint']:.3f} after joint training vs {u['alone']:.3f} when trained alone "
                     f"(gap {u['gap']:+.3f}).")
    lines.append("All voting probes agree." if agree else
                 "The probes disagree: " + " ".join(disagreements))
    return Diagnosis(net.modalities, dominant, weakest, agree, evidence, ev.accuracy, ev, sv, tr,
                     sep, under, disagreements, "\n".join(lines), config, kind)
