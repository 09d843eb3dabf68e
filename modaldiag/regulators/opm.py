"""R4: OPM (TPAMI 2024) — on-the-fly prediction modulation by dropping the dominant modality.

Per step (before the head runs): unimodal scores ``s_m`` of the batch (true-class softmax of the
unimodal logits, summed over DDP ranks) give ``rho_m`` (P5). The dominant modality (largest
``rho``, if above 1) gets a drop probability
``q = clip(q_base * (1 + lam * tanh(relu(rho - 1))), 0, 1)``, the others 0. With probability
``p_exe`` per batch, each sample's feature of that modality is dropped with probability q —
replaced by the baseline — and the kept ones are rescaled as in dropout:
``f' = b + (f - b) * keep / (1 - q)``, so the expected feature is unchanged.

M > 2: only the single most dominant modality is dropped per step (``rho`` against the mean of
the others).
"""

from __future__ import annotations

import math

import torch

from ..probes.unimodal import ogm_ratio
from ..utils.validation import NON_NEGATIVE, NON_NEGATIVE_INT, Interval, as_plain_int
from .base import (
    EPOCH_END,
    SEED,
    Regulator,
    all_reduce_sum,
    check_epoch_range,
    true_class_prob_sums,
)

__all__ = ["OPM", "opm_drop_probability"]


def opm_drop_probability(rho: float, q_base: float, lam: float) -> float:
    return min(1.0, max(0.0, q_base * (1.0 + lam * math.tanh(max(0.0, rho - 1.0)))))


class OPM(Regulator):
    """OPM regulator.

    Parameters
    ----------
    q_base : float in (0, 1], default 0.5
        Base drop probability of the dominant modality (0 would never drop: refused).
    lam : float >= 0, default 0.5
        Growth of the drop probability with the dominance ``rho - 1``.
    p_exe : float in (0, 1], default 0.7
        Probability that a batch is modulated at all (0 would never modulate: refused).
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch, optional
        Active during ``[start_epoch, end_epoch)`` (``None``: to the end).
    seed : int >= 0, default 0
        Seed of the drop decisions: step ``t`` draws from a generator seeded with ``(seed, t)``,
        so masks differ at every step, match on every DDP rank for the per-batch draw, and are the
        same in ``md.fit``, a plain loop and Lightning.
    """

    _parameter_constraints = {"q_base": [Interval(0, 1, closed="right")], "lam": [NON_NEGATIVE],
                              "p_exe": [Interval(0, 1, closed="right")],
                              "start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END,
                              "seed": [SEED]}

    def __init__(self, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, *,
                 start_epoch: int = 0, end_epoch: int | None = None, seed: int = 0):
        start_epoch, end_epoch, seed = (as_plain_int(v) for v in (start_epoch, end_epoch, seed))
        self._validate(q_base=q_base, lam=lam, p_exe=p_exe, start_epoch=start_epoch,
                       end_epoch=end_epoch, seed=seed)
        check_epoch_range("OPM", start_epoch, end_epoch)
        super().__init__()
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.start_epoch, self.end_epoch, self.seed = start_epoch, end_epoch, seed

    def reset(self) -> None:
        """Forget the last drop mask (a fresh run)."""
        super().reset()
        self.last_mask: torch.Tensor | None = None

    def config(self) -> dict:
        return {"q_base": self.q_base, "lam": self.lam, "p_exe": self.p_exe,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch}

    @torch.no_grad()
    def drop_plan(self, model, features, labels) -> tuple[str | None, float, dict[str, float]]:
        """The modality to drop, its drop probability q, and the ratios rho."""
        uni = model.unimodal_logits(features)
        s = true_class_prob_sums(uni, labels, model.modalities)
        s = all_reduce_sum(s)
        scores = {m: float(s[i]) for i, m in enumerate(model.modalities)}
        rho = ogm_ratio(scores)
        dominant = max(rho, key=rho.get)
        if rho[dominant] <= 1:
            return None, 0.0, rho
        return dominant, opm_drop_probability(rho[dominant], self.q_base, self.lam), rho

    def transform_features(self, features, ctx):
        epoch = ctx.epoch
        self.last_mask = None
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return features
        model = ctx.model
        dominant, q, rho = self.drop_plan(model, {m: f.detach() for m, f in features.items()},
                                          ctx.labels)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        execute = bool(torch.rand((), generator=gen) < self.p_exe)
        self.record("q", {m: (q if m == dominant and execute else 0.0) for m in model.modalities})
        self.record("rho", rho)
        if dominant is None or not execute or q <= 0:
            return features
        f = features[dominant]
        keep = (torch.rand(f.shape[0], generator=gen) >= q).to(f.device)
        self.last_mask = keep
        base = model.absent_feature(dominant, f)
        shape = (-1,) + (1,) * (f.dim() - 1)
        if q >= 1:
            dropped = base
        else:
            dropped = base + (f - base) * keep.view(shape).to(f.dtype) / (1 - q)
        return {**features, dominant: dropped}
