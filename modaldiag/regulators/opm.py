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

``variant="released"`` reproduces the authors' public code (GeWu-Lab/BML_TPAMI2024,
``models/Classifier.py`` and ``main.py``):

- scores from the released unimodal logits (concat head ``W_m f_m + b/M``, the released ``b/2``;
  ``late`` head ``fc_m(f_m)``; other heads refused with a ValueError, see :mod:`.ogm`);
- every modality with ``rho_m > 1`` gets its own ``q_m`` (``calcu_q``; at most one for M = 2);
- per sample and modality, keep with probability ``1 - q_m``; then *all* modalities' features are
  rescaled by ``1 / (1 - theta)``, ``theta = sum_m d_m q_m / sum_m d_m`` (``d_m`` the feature
  dimension): ``f'_m = b_m + (f_m - b_m) * keep_m / (1 - theta)`` (zero baseline: the released
  ``f_m * keep_m / (1 - theta)``). The expected dominant feature is ``(1 - q) / (1 - theta) * f``
  (0.47 f at rho = 2 with equal dimensions), the others ``f / (1 - theta)``;
- warm-up: no modulation for epochs 0..5 (0-based, ``warm_up = epoch <= 5``), i.e. the default
  ``start_epoch`` is 6.
"""

from __future__ import annotations

import math

import torch

from ..probes.unimodal import ogm_ratio
from ..utils.validation import NON_NEGATIVE, NON_NEGATIVE_INT, Interval, Options, as_plain_int
from .base import (
    EPOCH_END,
    SEED,
    Regulator,
    all_reduce_sum,
    check_epoch_range,
    check_released_head,
    released_score_sums,
    true_class_prob_sums,
)

__all__ = ["OPM", "opm_drop_probability", "opm_released_theta"]

#: the released code's warm-up: no modulation while ``epoch <= 5`` (0-based epochs)
RELEASED_START_EPOCH = 6


def opm_drop_probability(rho: float, q_base: float, lam: float) -> float:
    """``clip(q_base * (1 + lam * tanh(relu(rho - 1))), 0, 1)`` (callers use it for rho > 1)."""
    return min(1.0, max(0.0, q_base * (1.0 + lam * math.tanh(max(0.0, rho - 1.0)))))


def opm_released_theta(q: dict[str, float], dims: dict[str, int]) -> float:
    """The released rescaling rate ``theta = sum_m d_m q_m / sum_m d_m``."""
    return sum(dims[m] * q[m] for m in q) / sum(dims[m] for m in q)


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
    start_epoch : int >= 0, optional
        Default 0 (``variant="paper"``) or 6 (``variant="released"``: the released warm-up,
        epochs 0..5 unmodulated). An explicit value is used by both variants.
    end_epoch : int > start_epoch, optional
        Active during ``[start_epoch, end_epoch)`` (``None``: to the end).
    seed : int >= 0, default 0
        Seed of the drop decisions: step ``t`` draws from a generator seeded with ``(seed, t)``,
        so masks differ at every step, match on every DDP rank for the per-batch draw, and are the
        same in ``md.fit``, a plain loop and Lightning.
    variant : {"paper", "released"}, default "paper"
        "released": the authors' public code — released unimodal scores, a ``q_m`` for every
        modality with ``rho_m > 1``, all modalities rescaled by ``1 / (1 - theta)``, warm-up
        epochs 0..5. ``last_mask`` is then a ``(B, M)`` keep mask (modality order) and
        ``last_theta`` the rate used.
    """

    _parameter_constraints = {"q_base": [Interval(0, 1, closed="right")], "lam": [NON_NEGATIVE],
                              "p_exe": [Interval(0, 1, closed="right")],
                              "start_epoch": [NON_NEGATIVE_INT, None], "end_epoch": EPOCH_END,
                              "seed": [SEED], "variant": [Options("paper", "released")]}

    def __init__(self, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, *,
                 start_epoch: int | None = None, end_epoch: int | None = None, seed: int = 0,
                 variant: str = "paper"):
        start_epoch, end_epoch, seed = (as_plain_int(v) for v in (start_epoch, end_epoch, seed))
        self._validate(q_base=q_base, lam=lam, p_exe=p_exe, start_epoch=start_epoch,
                       end_epoch=end_epoch, seed=seed, variant=variant)
        if start_epoch is None:
            start_epoch = RELEASED_START_EPOCH if variant == "released" else 0
        check_epoch_range("OPM", start_epoch, end_epoch)
        self.variant = variant
        super().__init__()
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.start_epoch, self.end_epoch, self.seed = start_epoch, end_epoch, seed

    def reset(self) -> None:
        """Forget the last drop mask (a fresh run)."""
        super().reset()
        self.last_mask: torch.Tensor | None = None
        self.last_masks: dict[str, torch.Tensor] = {}
        self.last_theta: float | None = None

    def config(self) -> dict:
        return {"q_base": self.q_base, "lam": self.lam, "p_exe": self.p_exe,
                "start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                "variant": self.variant}

    def on_fit_start(self, ctx) -> None:
        if self.variant == "released":
            check_released_head(ctx.model, "OPM")
        super().on_fit_start(ctx)

    @torch.no_grad()
    def released_plan(self, model, features, labels) -> tuple[dict[str, float], dict[str, float]]:
        """``(q, rho)`` of the released code: ``q_m`` for every modality with ``rho_m > 1``."""
        s = all_reduce_sum(released_score_sums(model, features, labels))
        rho = ogm_ratio({m: float(s[i]) for i, m in enumerate(model.modalities)})
        q = {m: opm_drop_probability(r, self.q_base, self.lam) if r > 1 else 0.0
             for m, r in rho.items()}
        return q, rho

    def _released_transform(self, features, ctx):
        model = ctx.model
        q, rho = self.released_plan(model, {m: f.detach() for m, f in features.items()},
                                    ctx.labels)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        execute = bool(torch.rand((), generator=gen) < self.p_exe)
        self.record("q", {m: (q[m] if execute else 0.0) for m in model.modalities})
        self.record("rho", rho)
        if not execute or not any(v > 0 for v in q.values()):
            return features
        mods = model.modalities
        batch = features[mods[0]].shape[0]
        q_vec = torch.tensor([q[m] for m in mods])
        keep = torch.rand(batch, len(mods), generator=gen) >= q_vec  # (B, M), P(keep) = 1 - q_m
        dims = {m: features[m][0].numel() for m in mods}
        theta = opm_released_theta(q, dims)
        self.last_mask, self.last_theta = keep, theta
        out = {}
        for i, m in enumerate(mods):
            f = features[m]
            base = model.absent_feature(m, f)
            k = keep[:, i].to(f.device).view((-1,) + (1,) * (f.dim() - 1)).to(f.dtype)
            out[m] = base + (f - base) * k / (1 - theta)
        return out

    @torch.no_grad()
    def drop_probabilities(self, model, features, labels) -> tuple[dict[str, float], dict[str, float]]:
        """Per-modality drop probabilities ``q_m`` and the ratios ``rho_m`` (paper rule).

        ``q_m = clip(q_base * (1 + lam * tanh(relu(rho_m - 1))), 0, 1)`` for every modality with
        ``rho_m > 1``, else 0. At M = 2 only the dominant modality has ``rho > 1`` (the paper);
        for M > 2 every leading modality is dropped by its own q, so the plan is continuous in the
        scores apart from the paper's own step at ``rho = 1`` (no jump when two leaders swap).
        """
        uni = model.unimodal_logits(features)
        s = true_class_prob_sums(uni, labels, model.modalities)
        s = all_reduce_sum(s)
        scores = {m: float(s[i]) for i, m in enumerate(model.modalities)}
        rho = ogm_ratio(scores)
        q = {m: (opm_drop_probability(r, self.q_base, self.lam) if r > 1 else 0.0)
             for m, r in rho.items()}
        return q, rho

    def drop_plan(self, model, features, labels) -> tuple[str | None, float, dict[str, float]]:
        """The most dominant modality, its drop probability q, and the ratios rho."""
        q, rho = self.drop_probabilities(model, features, labels)
        dominant = max(rho, key=rho.get)
        if rho[dominant] <= 1:
            return None, 0.0, rho
        return dominant, q[dominant], rho

    def transform_features(self, features, ctx):
        epoch = ctx.epoch
        self.last_mask, self.last_theta, self.last_masks = None, None, {}
        if epoch < self.start_epoch or (self.end_epoch is not None and epoch >= self.end_epoch):
            return features
        if self.variant == "released":
            return self._released_transform(features, ctx)
        model = ctx.model
        q, rho = self.drop_probabilities(model, {m: f.detach() for m, f in features.items()},
                                         ctx.labels)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step)
        execute = bool(torch.rand((), generator=gen) < self.p_exe)
        self.record("q", {m: (q[m] if execute else 0.0) for m in model.modalities})
        self.record("rho", rho)
        if not execute:
            return features
        out = dict(features)
        for m in model.modalities:
            if q[m] <= 0:
                continue
            f = features[m]
            keep = (torch.rand(f.shape[0], generator=gen) >= q[m]).to(f.device)
            self.last_masks[m] = keep
            base = model.absent_feature(m, f)
            shape = (-1,) + (1,) * (f.dim() - 1)
            out[m] = base if q[m] >= 1 else base + (f - base) * keep.view(shape).to(f.dtype) / (1 - q[m])
        if self.last_masks:
            self.last_mask = self.last_masks[max(self.last_masks, key=rho.get)]
        return out
