"""R3: OGM and OGM-GE (CVPR 2022) — on-the-fly gradient modulation.

Per step: ``s_m`` = sum over the batch of the true-class softmax of m's unimodal logits (summed over
DDP ranks before use); ``rho_m = s_m / mean_{k != m} s_k`` (P5; two modalities: ``s_a / s_v``).
A dominant modality (``rho_m > 1``) gets ``k_m = 1 - tanh(alpha * rho_m)``, the others ``k_m = 1``
(this is what all official code does; note the jump at ``rho = 1``: k falls from 1 to
``1 - tanh(alpha)``). Before the optimizer step, encoder m's gradient is multiplied by ``k_m``. With
``noise=True`` (OGM-GE) every encoder parameter's gradient also gets Gaussian noise with the
standard deviation of its *unmodulated* gradient. Modulation runs for epochs in
``[start_epoch, end_epoch)``.

Differences from the released code: all encoder parameters are modulated by default
(``conv_only=True`` restricts it to convolution weights, as released); parameters are found by
module identity, not by name (the released code silently does nothing outside DataParallel).
The noise comes from a generator seeded by (seed, optimizer step), identical on every rank; the
step advances by itself in plain loops too (``md.Regulation``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..probes.unimodal import ogm_ratio
from ..utils.validation import BOOL, NON_NEGATIVE, NON_NEGATIVE_INT, as_plain_int
from .base import (
    EPOCH_END,
    SEED,
    Regulator,
    all_reduce_sum,
    check_epoch_range,
    true_class_prob_sums,
)

__all__ = ["OGM", "ogm_coefficients"]


def ogm_coefficients(scores: dict[str, float], alpha: float) -> tuple[dict[str, float], dict[str, float]]:
    """``(k, rho)``: ``k_m = 1 - tanh(alpha * rho_m)`` where ``rho_m > 1``, else 1."""
    rho = ogm_ratio(scores)
    k = {m: (1.0 - math.tanh(alpha * r)) if r > 1 else 1.0 for m, r in rho.items()}
    return k, rho


def _conv_weights(encoder: nn.Module) -> list[nn.Parameter]:
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.weight.requires_grad]


class OGM(Regulator):
    """OGM / OGM-GE regulator.

    Parameters
    ----------
    alpha : float >= 0, default 0.8
        Modulation strength (paper 0.1..0.8; the journal version uses 2.6 on CREMA-D). With
        ``alpha=0`` and ``noise=True`` only the GE noise acts.
    noise : bool, default False
        True: OGM-GE (generalisation enhancement noise on all encoders).
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch, optional
        Modulate during epochs ``[start_epoch, end_epoch)`` (``end_epoch=None``: to the end).
    conv_only : bool, default False
        Modulate only convolution weights (the released code's 4-D-gradient rule).
    seed : int >= 0, default 0
        Seed of the GE noise. The noise of optimizer step ``t`` is drawn from a generator seeded
        with ``(seed, t)``: different at every step, identical on every DDP rank, and the same in
        ``md.fit``, a plain loop and Lightning.
    """

    needs_unimodal_logits = True
    conflicts = ("MMPareto",)
    _parameter_constraints = {"alpha": [NON_NEGATIVE], "noise": [BOOL],
                              "start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END,
                              "conv_only": [BOOL], "seed": [SEED]}

    def __init__(self, alpha: float = 0.8, noise: bool = False, *, start_epoch: int = 0,
                 end_epoch: int | None = None, conv_only: bool = False, seed: int = 0):
        start_epoch, end_epoch, seed = (as_plain_int(v) for v in (start_epoch, end_epoch, seed))
        self._validate(alpha=alpha, noise=noise, start_epoch=start_epoch, end_epoch=end_epoch,
                       conv_only=conv_only, seed=seed)
        check_epoch_range("OGM", start_epoch, end_epoch)
        super().__init__()
        self.alpha, self.noise = float(alpha), noise
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.conv_only, self.seed = conv_only, seed

    def reset(self) -> None:
        """Forget the accumulated scores and the last coefficients (a fresh run)."""
        super().reset()
        self._score_sums: torch.Tensor | None = None
        self.coefficients: dict[str, float] = {}

    def config(self) -> dict:
        return {"alpha": self.alpha, "noise": self.noise, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch, "conv_only": self.conv_only}

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    @torch.no_grad()
    def on_after_forward(self, ctx) -> None:
        labels = ctx.labels
        s = true_class_prob_sums(ctx.unimodal_logits, labels, ctx.model.modalities)
        # accumulated until the optimizer step (gradient accumulation sees all micro-batches)
        self._score_sums = s if self._score_sums is None else self._score_sums + s

    def _targets(self, model, m: str) -> list[nn.Parameter]:
        return _conv_weights(model.encoders[m]) if self.conv_only else self.groups(model)[m]

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx) -> None:
        if self._score_sums is None:
            return
        model = ctx.model
        sums = all_reduce_sum(self._score_sums.clone())
        self._score_sums = None
        scores = {m: float(sums[i]) for i, m in enumerate(model.modalities)}
        k, rho = ogm_coefficients(scores, self.alpha)
        if not self.active(ctx.epoch):
            k = {m: 1.0 for m in k}
        self.coefficients = k
        self.record("coefficient", k)
        self.record("rho", rho)
        noisy = self.noise and self.active(ctx.epoch)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.step) if noisy else None
        for m in model.modalities:
            grads = [p.grad for p in self._targets(model, m) if p.grad is not None]
            if not grads:
                continue
            if noisy:  # std of the unmodulated gradient, per tensor
                stds = [g.std() + 1e-8 if g.numel() > 1 else g.new_tensor(1e-8) for g in grads]
            if k[m] != 1.0:
                torch._foreach_mul_(grads, k[m])
            if noisy:
                total = sum(g.numel() for g in grads)
                flat = torch.randn(total, generator=gen, dtype=grads[0].dtype).to(grads[0].device)
                noise = [chunk.view_as(g) for chunk, g in
                         zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
                torch._foreach_add_(grads, torch._foreach_mul(noise, stds))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self._score_sums = None
        super().load_state_dict(state)
