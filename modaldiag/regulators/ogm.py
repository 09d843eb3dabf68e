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

``variant="released"`` reproduces the authors' public code (GeWu-Lab/OGM-GE_CVPR2022, ``main.py``):

- unimodal logits from the head's own linear layer instead of "other modalities at baseline":
  ``concat`` head ``W_m f_m + b / M`` (the released code: ``b / 2``), a per-modality linear head
  ``fc_m(f_m)`` with its own full bias (the released ``SumFusion``, modaldiag's ``late`` head);
  any other head has no released definition and is refused (ValueError);
- the window is inclusive, ``[start_epoch, end_epoch]``;
- only 4-D (convolution) gradients are modulated and noised (``conv_only=True``);
- an exact tie between two modalities modulates the first one (the released ``else`` branch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..probes.unimodal import ogm_ratio
from ..utils.validation import BOOL, NON_NEGATIVE, NON_NEGATIVE_INT, Options, as_plain_int
from .base import (
    EPOCH_END,
    SEED,
    Regulator,
    all_reduce_sum,
    check_epoch_range,
    check_released_head,
    released_score_sums,
    released_unimodal_logits,
    true_class_prob_sums,
)

__all__ = ["OGM", "ogm_coefficients", "released_unimodal_logits", "check_released_head"]

VARIANT = Options("paper", "released")


def ogm_coefficients(scores: dict[str, float], alpha: float,
                     variant: str = "paper") -> tuple[dict[str, float], dict[str, float]]:
    """``(k, rho)``: ``k_m = 1 - tanh(alpha * rho_m)`` where ``rho_m > 1``, else 1.

    ``variant="released"`` differs only at an exact two-modality tie (``rho = 1``): the released
    code's ``if rho_2 > 1 ... else`` modulates the first modality there, with ``1 - tanh(alpha)``.
    """
    rho = ogm_ratio(scores)
    k = {m: (1.0 - math.tanh(alpha * r)) if r > 1 else 1.0 for m, r in rho.items()}
    if variant == "released" and len(rho) == 2:
        first, second = rho
        if not rho[second] > 1:
            k[first], k[second] = 1.0 - math.tanh(alpha * max(0.0, rho[first])), 1.0
    return k, rho


def _conv_weights(encoder: nn.Module) -> list[nn.Parameter]:
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, nn.modules.conv._ConvNd) and mod.weight.requires_grad]


def _four_d(encoder: nn.Module) -> list[nn.Parameter]:
    """The released rule: every encoder parameter whose gradient is 4-D."""
    return [p for p in encoder.parameters() if p.requires_grad and p.dim() == 4]


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
        Modulate during epochs ``[start_epoch, end_epoch)`` (``end_epoch=None``: to the end);
        ``variant="released"``: ``[start_epoch, end_epoch]``, end included, as released.
    conv_only : bool, optional
        Modulate only convolution weights (the released code's 4-D-gradient rule). Default: False
        for ``variant="paper"``, True (4-D gradients) for ``variant="released"`` (False refused).
    seed : int >= 0, default 0
        Seed of the GE noise. The noise of optimizer step ``t`` is drawn from a generator seeded
        with ``(seed, t)``: different at every step, identical on every DDP rank, and the same in
        ``md.fit``, a plain loop and Lightning.
    variant : {"paper", "released"}, default "paper"
        "released": the authors' public code — released unimodal logits (``concat``:
        ``W_m f_m + b/M``; ``late``: ``fc_m(f_m)``; other heads refused), inclusive window, 4-D
        gradients only, first modality modulated at an exact tie.
    """

    needs_unimodal_logits = True
    conflicts = ("MMPareto",)
    _parameter_constraints = {"alpha": [NON_NEGATIVE], "noise": [BOOL],
                              "start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END,
                              "conv_only": [BOOL, None], "seed": [SEED], "variant": [VARIANT]}

    def __init__(self, alpha: float = 0.8, noise: bool = False, *, start_epoch: int = 0,
                 end_epoch: int | None = None, conv_only: bool | None = None, seed: int = 0,
                 variant: str = "paper"):
        start_epoch, end_epoch, seed = (as_plain_int(v) for v in (start_epoch, end_epoch, seed))
        self._validate(alpha=alpha, noise=noise, start_epoch=start_epoch, end_epoch=end_epoch,
                       conv_only=conv_only, seed=seed, variant=variant)
        if variant == "released":
            if conv_only is False:
                raise ValueError("OGM(variant='released') modulates only 4-D (convolution) "
                                 "gradients, as the released code does; conv_only=False "
                                 "contradicts it. Use variant='paper' to modulate every encoder "
                                 "parameter.")
            if end_epoch is not None and end_epoch < start_epoch:
                raise ValueError(f"OGM: end_epoch must be >= start_epoch for variant='released' "
                                 f"(the window is [start_epoch, end_epoch], end included); got "
                                 f"start_epoch={start_epoch}, end_epoch={end_epoch}.")
            conv_only = True
        else:
            check_epoch_range("OGM", start_epoch, end_epoch)
            conv_only = bool(conv_only)
        self.variant = variant
        super().__init__()
        self.alpha, self.noise = float(alpha), noise
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.conv_only, self.seed = conv_only, seed
        if variant == "released":  # the released logits come from the features, not the head
            self.needs_unimodal_logits = False

    def reset(self) -> None:
        """Forget the accumulated scores and the last coefficients (a fresh run)."""
        super().reset()
        self._score_sums: torch.Tensor | None = None
        self.coefficients: dict[str, float] = {}

    def config(self) -> dict:
        return {"alpha": self.alpha, "noise": self.noise, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch, "conv_only": self.conv_only, "variant": self.variant}

    def active(self, epoch: int) -> bool:
        if self.variant == "released":  # `modulation_starts <= epoch <= modulation_ends`
            return epoch >= self.start_epoch and (self.end_epoch is None or epoch <= self.end_epoch)
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def on_fit_start(self, ctx) -> None:
        if self.variant == "released":
            check_released_head(ctx.model, "OGM")
        super().on_fit_start(ctx)

    @torch.no_grad()
    def on_after_forward(self, ctx) -> None:
        labels = ctx.labels
        if self.variant == "released":
            s = released_score_sums(ctx.model, ctx.features, labels)
        else:
            s = true_class_prob_sums(ctx.unimodal_logits, labels, ctx.model.modalities)
        # accumulated until the optimizer step (gradient accumulation sees all micro-batches)
        self._score_sums = s if self._score_sums is None else self._score_sums + s

    def _targets(self, model, m: str) -> list[nn.Parameter]:
        if self.variant == "released":
            return _four_d(model.encoders[m])
        return _conv_weights(model.encoders[m]) if self.conv_only else self.groups(model)[m]

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx) -> None:
        if self._score_sums is None:
            return
        model = ctx.model
        sums = all_reduce_sum(self._score_sums.clone())
        self._score_sums = None
        scores = {m: float(sums[i]) for i, m in enumerate(model.modalities)}
        k, rho = ogm_coefficients(scores, self.alpha, self.variant)
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
