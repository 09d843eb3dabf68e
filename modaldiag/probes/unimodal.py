"""P5: unimodal scores (accuracy, true-class probability, CE) and discrepancy measures.

The unimodal logits of modality m are the head with every other modality absent
(``model.head(features, present=(m,))``), for any fusion head.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..utils.distributed import all_reduce_sum
from ..utils.validation import validate_params
from ._common import (
    BASELINE_CONSTRAINT,
    ITERABLE,
    baseline_context,
    contract_model,
    encode_checked,
    iterate_batches,
    probe_state,
)

__all__ = ["UnimodalScore", "EvalResult", "evaluate", "unimodal_scores", "ogm_ratio", "inforeg_gap"]


@dataclass
class UnimodalScore:
    """Scores of one modality's unimodal logits over a dataset.

    ``baseline`` is the kind of absence the other modalities were replaced by (``"zero"``,
    ``"mean"`` or ``"custom"``).
    """

    modality: str
    accuracy: float
    true_prob: float
    cross_entropy: float
    n: int
    baseline: str = "zero"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    """Fused and per-modality scores from one streaming pass (encoders run once per batch)."""

    loss: float
    accuracy: float
    n: int
    unimodal: dict[str, UnimodalScore]
    per_class: dict[int, dict] | None = None
    baseline: str = "zero"

    def to_dict(self) -> dict:
        return {"loss": self.loss, "acc": self.accuracy, "n": self.n, "baseline": self.baseline,
                "unimodal_acc": {m: s.accuracy for m, s in self.unimodal.items()},
                "unimodal_prob": {m: s.true_prob for m, s in self.unimodal.items()},
                "unimodal_ce": {m: s.cross_entropy for m, s in self.unimodal.items()}}


_EVAL_CONSTRAINTS = {"loader": [ITERABLE], "baseline": BASELINE_CONSTRAINT,
                     "baseline_loader": [None, ITERABLE]}


@torch.no_grad()
def evaluate(model, loader: Iterable, *, baseline: str | None = None,
             baseline_loader: Iterable | None = None, device=None) -> EvalResult:
    """Fused loss/accuracy and unimodal scores of every modality over ``loader``.

    Runs in eval mode; the model (every submodule's mode, ``requires_grad``, ``.grad``, buffers)
    and the global RNG states are left exactly as found. Encoders run once per batch.

    Parameters
    ----------
    model : MultimodalModel
    loader : iterable of ``(inputs, labels)``
    baseline : {None, "zero", "mean"}, default None
        Absence for the unimodal logits: None uses the model's stored baseline
        (``model.set_baseline``), ``"zero"`` / ``"mean"`` override it (see :func:`shapley`).
    baseline_loader : iterable, optional
        With ``baseline="mean"``: the loader whose mean features stand in for absent modalities.

    Returns
    -------
    EvalResult
        ``.loss``, ``.accuracy``, ``.n``, ``.unimodal`` ``{m: UnimodalScore}``, ``.per_class``,
        ``.baseline`` (the kind of absence used).
    """
    validate_params(_EVAL_CONSTRAINTS, {"loader": loader, "baseline": baseline,
                                        "baseline_loader": baseline_loader}, "evaluate")
    net = contract_model(model)
    if net.num_classes is None:
        raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
    mods = net.modalities
    totals = {"loss": 0.0, "correct": 0, "n": 0}
    uni = {m: {"correct": 0, "prob": 0.0, "ce": 0.0} for m in mods}
    n_classes = net.num_classes
    class_n = torch.zeros(n_classes, dtype=torch.long)
    class_correct = torch.zeros(len(mods) + 1, n_classes, dtype=torch.long)
    with probe_state(net), baseline_context(net, baseline, baseline_loader) as kind:
        for b, (inputs, labels) in enumerate(iterate_batches(net, loader, device)):
            size = labels.shape[0]
            feats = encode_checked(net, inputs, b)
            logits = net.head(feats)
            totals["loss"] += float(F.cross_entropy(logits, labels, reduction="sum"))
            hit = logits.argmax(1) == labels
            totals["correct"] += int(hit.sum())
            totals["n"] += size
            y_cpu = labels.cpu()
            class_n += torch.bincount(y_cpu, minlength=n_classes)
            class_correct[0] += torch.bincount(y_cpu[hit.cpu()], minlength=n_classes)
            uni_logits = net.unimodal_logits(feats)
            for i, m in enumerate(mods):
                lg = uni_logits[m]
                logp = F.log_softmax(lg.float(), dim=1)
                uhit = lg.argmax(1) == labels
                uni[m]["correct"] += int(uhit.sum())
                class_correct[i + 1] += torch.bincount(y_cpu[uhit.cpu()], minlength=n_classes)
                uni[m]["prob"] += float(logp.gather(1, labels[:, None]).exp().sum())
                uni[m]["ce"] += float(-logp.gather(1, labels[:, None]).sum())
        # sum every count over DDP ranks: scores of the union of every rank's data
        packed = torch.tensor([totals["loss"], totals["correct"], totals["n"]]
                              + [u[k] for u in uni.values() for k in ("correct", "prob", "ce")],
                              dtype=torch.float64)
        packed = all_reduce_sum(packed)
        class_n, class_correct = all_reduce_sum(class_n), all_reduce_sum(class_correct)
    totals = {"loss": float(packed[0]), "correct": int(packed[1]), "n": int(packed[2])}
    for i, m in enumerate(mods):
        uni[m] = {"correct": int(packed[3 + 3 * i]), "prob": float(packed[4 + 3 * i]),
                  "ce": float(packed[5 + 3 * i])}
    n = totals["n"]
    if n == 0:
        raise ValueError("the loader is empty: nothing to evaluate.")
    per_class = {}
    for c in range(n_classes):
        if class_n[c] == 0:
            continue
        cn = int(class_n[c])
        per_class[c] = {"n": cn, "acc": int(class_correct[0, c]) / cn,
                        "unimodal_acc": {m: int(class_correct[i + 1, c]) / cn
                                         for i, m in enumerate(mods)}}
    return EvalResult(
        loss=totals["loss"] / n, accuracy=totals["correct"] / n, n=n,
        unimodal={m: UnimodalScore(m, u["correct"] / n, u["prob"] / n, u["ce"] / n, n, kind)
                  for m, u in uni.items()},
        per_class=per_class, baseline=kind,
    )


def unimodal_scores(model, loader: Iterable, *, baseline: str | None = None,
                    baseline_loader: Iterable | None = None, device=None) -> dict[str, UnimodalScore]:
    """Per-modality unimodal accuracy, mean true-class probability and cross-entropy.

    The unimodal logits of m are the joint head with every other modality absent; ``baseline``
    (default None: the model's stored baseline) says what absence is, as in :func:`evaluate`.
    Returns ``{m: UnimodalScore}`` with ``.accuracy``, ``.true_prob``, ``.cross_entropy``,
    ``.baseline``.
    """
    validate_params(_EVAL_CONSTRAINTS, {"loader": loader, "baseline": baseline,
                                        "baseline_loader": baseline_loader}, "unimodal_scores")
    return evaluate(model, loader, baseline=baseline, baseline_loader=baseline_loader,
                    device=device).unimodal


def ogm_ratio(scores: Mapping[str, float]) -> dict[str, float]:
    """OGM-style ratio ``rho_m = s_m / mean_{k != m} s_k`` (two modalities: ``s_a / s_v``)."""
    names = list(scores)
    out = {}
    for m in names:
        others = [float(scores[k]) for k in names if k != m]
        denom = sum(others) / len(others)
        out[m] = float(scores[m]) / denom if denom > 0 else float("inf")
    return out


def inforeg_gap(scores: Mapping[str, float]) -> dict[str, float]:
    """InfoReg gap ``Delta_m = mean_{k: s_k < s_m} (s_m - s_k)``, 0 when no modality is worse."""
    out = {}
    for m, s in scores.items():
        worse = [float(s) - float(t) for k, t in scores.items() if k != m and t < s]
        out[m] = sum(worse) / len(worse) if worse else 0.0
    return out
