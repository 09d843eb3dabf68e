"""P5: unimodal scores (accuracy, true-class probability, CE) and discrepancy measures.

The unimodal logits of modality m are the head with every other modality absent
(``model.head(features, present=(m,))``), for any fusion head.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..utils.distributed import all_gather_cat, all_reduce_sum
from ..utils.progress import progress_bar
from ..utils.validation import BOOL, Satisfies, validate_params
from ._common import (
    BASELINE_CONSTRAINT,
    ITERABLE,
    baseline_context,
    contract_model,
    encode_checked,
    iterate_batches,
    light_probe_state,
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
    """Fused and per-modality scores from one streaming pass (encoders run once per batch).

    Per sample (in loader order): ``correct`` (N,) bool, the fused prediction is right;
    ``unimodal_correct`` (N, M) bool, modality ``modalities[j]``'s unimodal prediction is right
    (the bootstrap of ``md.diagnose`` resamples these). ``copies``: pairs of modalities that are
    copies of one view: on every sample their inputs are identical, or their encoder outputs are.
    """

    loss: float
    accuracy: float
    n: int
    unimodal: dict[str, UnimodalScore]
    per_class: dict[int, dict] | None = None
    baseline: str = "zero"
    correct: torch.Tensor | None = None
    unimodal_correct: torch.Tensor | None = None
    copies: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {"loss": self.loss, "acc": self.accuracy, "n": self.n, "baseline": self.baseline,
                "unimodal_acc": {m: s.accuracy for m, s in self.unimodal.items()},
                "unimodal_prob": {m: s.true_prob for m, s in self.unimodal.items()},
                "unimodal_ce": {m: s.cross_entropy for m, s in self.unimodal.items()}}


_EVAL_CONSTRAINTS = {"loader": [ITERABLE], "baseline": BASELINE_CONSTRAINT,
                     "baseline_loader": [None, ITERABLE], "progress": [BOOL],
                     "predict": [None, Satisfies(callable, "a callable predict(features) -> logits")]}


def _same_features(feats, a: str, b: str) -> bool:
    fa, fb = feats[a], feats[b]
    return fa.shape == fb.shape and bool(torch.equal(fa, fb))


@torch.no_grad()
def evaluate(model, loader: Iterable, *, baseline: str | None = None,
             baseline_loader: Iterable | None = None, device=None,
             progress: bool = False, predict=None) -> EvalResult:
    """Fused loss/accuracy and unimodal scores of every modality over ``loader``.

    Runs in eval mode; the model (every submodule's mode, ``requires_grad``, ``.grad``, buffers)
    and the global RNG states are left exactly as found. Encoders run once per batch.

    Parameters
    ----------
    model : MultimodalModel
    loader : iterable of ``(inputs, labels)``
        or ``(inputs, labels, present)``: an absent entry's feature is the baseline (fused and
        unimodal logits alike).
    baseline : {None, "zero", "mean"}, default None
        Absence for the unimodal logits: None uses the model's stored baseline
        (``model.set_baseline``), ``"zero"`` / ``"mean"`` override it (see :func:`shapley`).
    baseline_loader : iterable, optional
        With ``baseline="mean"``: the loader whose mean features stand in for absent modalities.
    progress : bool, default False
        A progress bar over batches (nothing is printed when False).
    predict : callable, optional
        ``predict(features) -> logits (B, C)``: the fused prediction rule when it is not the
        model's head (a regulator's test-time rule, e.g. ``regulator.predict`` bound to the model
        via ``lambda f: mla.predict(model, f)``). The unimodal scores always use the head.

    Returns
    -------
    EvalResult
        ``.loss``, ``.accuracy``, ``.n``, ``.unimodal`` ``{m: UnimodalScore}``, ``.per_class``,
        ``.baseline`` (the kind of absence used), per-sample ``.correct`` (N,) and
        ``.unimodal_correct`` (N, M), ``.copies``.
    """
    validate_params(_EVAL_CONSTRAINTS, {"loader": loader, "baseline": baseline,
                                        "baseline_loader": baseline_loader, "progress": progress,
                                        "predict": predict},
                    "evaluate")
    return _evaluate(model, loader, baseline, baseline_loader, device, progress, "evaluate",
                     predict=predict)


@torch.no_grad()
def validate(model, loader: Iterable, *, device=None, predict=None) -> EvalResult:
    """:func:`evaluate` as ``md.fit`` calls it after every epoch: the same loss, accuracy and
    unimodal scores (the model's stored baseline), without what only a report needs (per-class
    scores, per-sample hits, the copied-modality check). Leaves the modes and the global RNG
    states as found (fit owns the gradients and parameters; eval mode writes no buffer).
    No batch is checked for NaN/inf on the way (a check per batch costs more than the small
    models' validation itself); a non-finite total re-runs the checked pass, which raises a
    ValueError naming the batch and modality, or the head when inputs and features are finite."""
    result = _evaluate(model, loader, None, None, device, False, "validate", predict=predict,
                       light=True)
    scores = [result.loss] + [v for u in result.unimodal.values()
                              for v in (u.true_prob, u.cross_entropy)]
    if all(math.isfinite(v) for v in scores):
        return result
    # the light pass checks no batch: the full pass names the batch and modality (and raises)
    _evaluate(model, loader, None, None, device, False, "validate", predict=predict)
    raise ValueError(
        "the validation loss or a unimodal score is NaN/inf although every input and every "
        "encoder's features are finite: the fusion head (or the regulator's prediction rule) "
        "produced non-finite logits. Check the head's parameters with torch.isfinite.")


@torch.no_grad()
def _evaluate(model, loader, baseline, baseline_loader, device, progress: bool,
              desc: str, predict=None, light: bool = False) -> EvalResult:
    net = contract_model(model)
    if net.num_classes is None:
        raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
    mods = net.modalities
    n_classes = net.num_classes
    # per-batch tensors only; one host sync at the end (evaluation runs every epoch of md.fit)
    loss_sums, uni_sums, hits, uhits, ys = [], [], [], [], []
    pairs = [] if light else [(a, b) for i, a in enumerate(mods) for b in mods[i + 1:]]
    same = dict.fromkeys(pairs, True)
    state = light_probe_state(net) if light else probe_state(net)
    with state, baseline_context(net, baseline, baseline_loader) as kind:
        batches = progress_bar(iterate_batches(net, loader, device, check_finite=not light),
                               enabled=progress, desc=desc, total=_length(loader))
        for b, (inputs, labels) in enumerate(batches):
            feats = encode_checked(net, inputs, b, check_finite=not light)
            for pair in pairs:
                same[pair] = same[pair] and (_same_features(inputs, *pair)
                                             or _same_features(feats, *pair))
            logits = net.head(feats) if predict is None else predict(feats)
            loss_sums.append(F.cross_entropy(logits, labels, reduction="sum"))
            hits.append(logits.argmax(1) == labels)
            ys.append(labels)
            uni_logits = net.unimodal_logits(feats)
            logp = torch.stack([F.log_softmax(uni_logits[m].float(), dim=1) for m in mods])
            true_logp = logp.gather(2, labels.expand(len(mods), -1)[..., None])[..., 0]  # (M, B)
            uhits.append((logp.argmax(2) == labels).T)  # (B, M)
            uni_sums.append(torch.stack([true_logp.exp().sum(1), -true_logp.sum(1)], 1))  # (M, 2)
        y_all = torch.cat(ys).cpu() if ys else torch.zeros(0, dtype=torch.long)
        hit_all = torch.cat(hits).cpu() if hits else torch.zeros(0, dtype=torch.bool)
        uhit_all = (torch.cat(uhits).cpu() if uhits
                    else torch.zeros(0, len(mods), dtype=torch.bool))
        # batch sums in float32 (as computed), accumulated over batches in float64
        loss_total = float(torch.stack(loss_sums).double().sum()) if loss_sums else 0.0
        uni_total = (torch.stack(uni_sums).double().sum(0).cpu() if uni_sums
                     else torch.zeros(len(mods), 2, dtype=torch.float64))
        class_n = torch.bincount(y_all, minlength=n_classes)
        class_correct = torch.zeros(len(mods) + 1, n_classes, dtype=torch.long) if light else (
            torch.stack([torch.bincount(y_all[hit_all], minlength=n_classes)]
                        + [torch.bincount(y_all[uhit_all[:, i]], minlength=n_classes)
                           for i in range(len(mods))]))
        # sum every count over DDP ranks: scores of the union of every rank's data
        packed = torch.tensor([loss_total, float(hit_all.sum()), float(y_all.numel())]
                              + [v for i in range(len(mods))
                                 for v in (float(uhit_all[:, i].sum()), float(uni_total[i, 0]),
                                           float(uni_total[i, 1]))],
                              dtype=torch.float64)
        packed = all_reduce_sum(packed)
        if light:  # fit's validation: no per-class scores, per-sample hits or copy check
            class_n, correct, unimodal_correct, flags = class_n * 0, None, None, torch.zeros(1)
        else:
            class_n, class_correct = all_reduce_sum(class_n), all_reduce_sum(class_correct)
            # per-sample hits of the union of every rank's data, in rank order (uint8 on the wire)
            correct = all_gather_cat(hit_all.to(torch.uint8)).bool() if hits else None
            unimodal_correct = all_gather_cat(uhit_all.to(torch.uint8)).bool() if uhits else None
            flags = all_reduce_sum(torch.tensor([float(not same[p]) for p in pairs] or [0.0],
                                                dtype=torch.float64))
    copies = tuple(p for p, f in zip(pairs, flags.tolist(), strict=False) if f == 0)
    totals = {"loss": float(packed[0]), "correct": int(packed[1]), "n": int(packed[2])}
    uni = {}
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
        per_class=None if light else per_class, baseline=kind,
        correct=None if correct is None else correct.cpu(),
        unimodal_correct=None if unimodal_correct is None else unimodal_correct.cpu(),
        copies=copies,
    )


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


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
