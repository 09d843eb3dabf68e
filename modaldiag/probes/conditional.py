r"""Greedy's diagnostic: the conditional utilisation rate of every modality.

Wu, Jastrzębski, Cho, Geras (ICML 2022). With :math:`A(S)` the accuracy of
:math:`z_S = h(f, \text{present}=S)` (every modality outside :math:`S` replaced by its baseline)
and :math:`N` the set of all modalities,

.. math:: u_m = \frac{A(N) - A(N \setminus \{m\})}{A(N)}

is the share of the fused accuracy that is lost without :math:`m`: how much the model uses
:math:`m` *given* the others. For two modalities :math:`(m_0, m_1)`,
:math:`u(m_1 | m_0) = (A(m_0, m_1) - A(m_0)) / A(m_0, m_1) = u_{m_1}` and

.. math:: d_{util} = u(m_1 | m_0) - u(m_0 | m_1) = u_{m_1} - u_{m_0};

for :math:`M > 2`, :math:`d_{util} = \max_m u_m - \min_m u_m`. A large :math:`|d_{util}|` is
greedy learning: the model relies on one modality and barely uses the other.

Absence: the paper replaces the missing input of the fusion layers by its **training-set
mean**, hence ``baseline="mean"`` with ``baseline_loader=train_loader``. Without a
``baseline_loader`` the model's stored baseline is used (its stored mean when it has one) and the
result says so in ``note``. Encoders run once per sample (:math:`M + 1` head calls per batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..utils.distributed import all_reduce_sum
from ..utils.validation import BOOL, Options, Satisfies, validate_params
from ._common import (
    BASELINES,
    ITERABLE,
    baseline_context,
    contract_model,
    probe_state,
    split_of,
)
from .robustness import FeatureCache, cache_features

__all__ = ["conditional_utilization", "ConditionalUtilization", "conditional_utilization_rates",
           "utilization_difference"]


def conditional_utilization_rates(acc_all: float, acc_without: Mapping[str, float]
                                  ) -> dict[str, float]:
    """``{m: (A(N) - A(N \\ {m})) / A(N)}``; NaN for every modality when ``A(N) = 0``.

    ``acc_without[m]`` is :math:`A(N \\setminus \\{m\\})` (for two modalities, the *other*
    modality's unimodal accuracy through the joint head).
    """
    acc_all = float(acc_all)
    if acc_all == 0:
        return {m: float("nan") for m in acc_without}
    return {m: (acc_all - float(a)) / acc_all for m, a in acc_without.items()}


def utilization_difference(rates: Mapping[str, float]) -> float:
    """:math:`d_{util}`: ``u[m1] - u[m0]`` (= u(m1|m0) - u(m0|m1)) for two modalities in the
    order of ``rates``; ``max - min`` for more."""
    values = list(rates.values())
    if len(values) == 2:
        return float(values[1] - values[0])
    return float(max(values) - min(values)) if values else float("nan")


class ConditionalUtilization(dict):
    """``{m: u_m}`` (a dict), with the numbers behind it as attributes.

    ``accuracy_all`` :math:`A(N)`; ``accuracy_without[m]`` :math:`A(N \\setminus \\{m\\})`;
    ``d_util``; ``split`` and ``n`` (the data); ``baseline`` (the kind of absence used) and
    ``note`` (how it was chosen, e.g. a fallback from the paper's training-set mean).
    """

    def __init__(self, rates: Mapping[str, float], *, accuracy_all: float,
                 accuracy_without: Mapping[str, float], split: str, n: int, baseline: str,
                 note: str = ""):
        super().__init__(rates)
        self.accuracy_all = float(accuracy_all)
        self.accuracy_without = {m: float(v) for m, v in accuracy_without.items()}
        self.d_util = utilization_difference(rates)
        self.split, self.n, self.baseline, self.note = split, int(n), baseline, note

    @property
    def rates(self) -> dict[str, float]:
        return dict(self)

    def to_dict(self) -> dict:
        return {"rates": self.rates, "d_util": self.d_util, "accuracy_all": self.accuracy_all,
                "accuracy_without": dict(self.accuracy_without), "split": self.split,
                "n": self.n, "baseline": self.baseline, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping) -> ConditionalUtilization:
        return cls(d["rates"], accuracy_all=d["accuracy_all"],
                   accuracy_without=d["accuracy_without"], split=d.get("split", "unnamed"),
                   n=d.get("n", 0), baseline=d.get("baseline", "zero"), note=d.get("note", ""))

    def summary(self) -> str:
        mods = list(self)
        what = (f"d_util = u({mods[1]}|{mods[0]}) - u({mods[0]}|{mods[1]})" if len(mods) == 2
                else "d_util = max - min")
        return (f"Conditional utilisation on the {self.split} split (n = {self.n}, absent = "
                f"'{self.baseline}' baseline): "
                + ", ".join(f"u({m}) {v:.3f}" for m, v in self.items())
                + f"; {what} = {self.d_util:+.3f} (fused accuracy {self.accuracy_all:.3f})."
                + (f" {self.note}" if self.note else ""))

    def __repr__(self) -> str:
        return f"ConditionalUtilization({dict.__repr__(self)}, d_util={self.d_util:.4f})"


@torch.no_grad()
def conditional_from_cache(net, cache: FeatureCache, *, split: str, baseline: str,
                           note: str = "") -> ConditionalUtilization:
    """:func:`conditional_utilization` on cached features (inside the baseline context)."""
    mods = net.modalities
    # coalition 0 = all present, coalition 1 + i = all but modality i
    masks = torch.ones(len(mods) + 1, len(mods), dtype=torch.bool)
    for i in range(len(mods)):
        masks[1 + i, i] = False
    hits = torch.zeros(len(mods) + 1, dtype=torch.float64)
    for a, b in cache.chunks():
        feats = {m: f[a:b] for m, f in cache.features.items()}
        logits = net.head_coalitions(feats, masks)  # (M + 1, B, C)
        hits += (logits.argmax(2) == cache.labels[a:b]).double().sum(1).cpu()
    packed = all_reduce_sum(torch.cat([hits, torch.tensor([float(cache.n)],
                                                          dtype=torch.float64)]))
    n = int(packed[-1])
    acc = (packed[:-1] / n).tolist()
    without = {m: acc[1 + i] for i, m in enumerate(mods)}
    return ConditionalUtilization(conditional_utilization_rates(acc[0], without),
                                  accuracy_all=acc[0], accuracy_without=without, split=split,
                                  n=n, baseline=baseline, note=note)


_CONSTRAINTS = {"loader": [ITERABLE], "baseline": [None, Options(*BASELINES)],
                "baseline_loader": [None, ITERABLE], "progress": [BOOL],
                "split": [None, Satisfies(lambda s: isinstance(s, str) and bool(s.strip()),
                                          "a non-empty split name such as 'test' or 'val'")]}


def conditional_utilization(model, loader: Iterable, *, baseline: str | None = "mean",
                            baseline_loader: Iterable | None = None, split: str | None = None,
                            device=None, progress: bool = False) -> ConditionalUtilization:
    """Conditional utilisation rates ``{m: u_m}`` (Greedy's diagnostic) on ``loader``.

    Parameters
    ----------
    model : MultimodalModel
    loader : iterable of ``(inputs, labels)``
        The data the rates are measured on (validation or test).
    baseline : {"mean", "zero", None}, default "mean"
        What an absent modality becomes. ``"mean"`` (the paper): the mean feature over
        ``baseline_loader`` (pass the training loader); without it, the model's stored mean, or
        (when it has none) the model's stored baseline, said in ``.note``. None: the stored
        baseline; ``"zero"``: zeros.
    baseline_loader : iterable, optional
        The training loader whose mean features stand in for absent modalities.
    split : str, optional
        Name of ``loader``'s data; None reads ``loader.dataset.split``.

    Returns
    -------
    ConditionalUtilization
        A dict ``{m: u_m}`` with ``.d_util``, ``.accuracy_all``, ``.accuracy_without``,
        ``.baseline``, ``.note``, ``.split``, ``.n``. The model and global RNG states are left as
        found.
    """
    validate_params(_CONSTRAINTS, {"loader": loader, "baseline": baseline,
                                   "baseline_loader": baseline_loader, "progress": progress,
                                   "split": split}, "conditional_utilization")
    net = contract_model(model)
    note = ""
    if baseline == "mean" and baseline_loader is None:
        if net.baseline_kind == "mean":
            note = ("Absent modalities use the model's stored mean baseline (pass "
                    "baseline_loader=train_loader to be sure it is the training-set mean).")
        else:
            note = (f"No baseline_loader given: absent modalities use the model's stored "
                    f"'{net.baseline_kind}' baseline instead of the training-set mean of the "
                    "paper; pass baseline_loader=train_loader.")
            baseline = None
    split = split or split_of(loader) or "unnamed"
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        cache = cache_features(net, loader, device, progress=progress,
                               desc="conditional_utilization: encode")
        return conditional_from_cache(net, cache, split=split, baseline=kind, note=note)
