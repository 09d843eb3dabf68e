"""R10: MBSD — unimodal self-distillation gated by the confidence gap (BalanceBenchmark's "MBSD").

Source: Liu, Li, Song, Yang, Zeng, "Multimodal Pre-Training with Self-Distillation for Product
Understanding in E-Commerce", WSDM 2023 (the model is named MBSD). The paper was not accessible;
every formula below is BalanceBenchmark's trainer (``balancemm/trainer/MBSD_trainer.py``, snapshot
4c1482f, read, not run) with its evident intent made exact **[unverified against the paper]**.

Per step, with unimodal logits ``z_m = h(f, present={m})`` and ``p_m = softmax(z_m)``:

    L = CE(z) + sum_m CE(z_m) + mean_{pairs a<b} mean_i g_i (RS_i + KD_i)

- gate ``g_i = |p_{a,i,y} - p_{b,i,y}|`` if ``argmax p_a = y`` or ``argmax p_b = y``, else 0 (a
  constant: no gradient);
- ``RS_i = (1/C) ||z_{a,i} - z_{b,i}||^2`` (gradient into both modalities);
- ``KD_i = KL(sg(p_s) || p_w)`` with ``s(i)`` the modality of the pair with the larger true-class
  probability (the strong one) and ``w(i)`` the other: the weak one is pulled towards the strong.

Any M: the mean runs over the ``M(M-1)/2`` pairs (BalanceBenchmark's three-modality branch does
this); M = 2 is the single pair. The loss is continuous in the logits except where the gate's
correctness condition flips (the released rule, kept). The terms are added in epochs
``[start_epoch, end_epoch)``; outside, the loss is ``CE(z)`` alone (as released).

``variant="released"`` is the released code as it reads:

- KD on the two true-class probabilities passed to ``kl_div`` with the strong one as "log-input":
  ``KD_i = p_w (log p_w - p_s)`` (not a divergence; can be negative);
- the gate and both probabilities carry gradient (the released code writes them into fresh
  tensors in place, which autograd records);
- for M > 2 the RS term uses probabilities instead of logits (the released three-modality branch);
- unimodal logits ``W_m f_m + b/M`` (concat head) / ``fc_m(f_m)`` (``late``); other heads refused;
- the window is inclusive, ``[start_epoch, end_epoch]``.

Logged per epoch (sample means over all DDP ranks): ``gate``, ``rs``, ``kd``, ``term`` per pair
(key ``"a|b"``), ``unimodal_ce`` per modality, and ``active``.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from ..utils.validation import NON_NEGATIVE_INT, Options, as_plain_int
from .base import (
    EPOCH_END,
    EpochMeans,
    Regulator,
    check_epoch_range,
    check_released_head,
    released_unimodal_logits,
    wide,
)

__all__ = ["MBSD", "mbsd_pair_terms", "EpochMeans"]


def mbsd_pair_terms(z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor,
                    variant: str = "paper", rs_on: str = "logits"):
    """Per-sample ``(gate, RS, KD)`` of one pair of unimodal logits ``(B, C)``.

    ``variant="paper"``: gate detached, ``KD = KL(sg(p_s) || p_w)`` over all classes.
    ``variant="released"``: gate with gradient, ``KD = p_w (log p_w - p_s)`` on the true-class
    probabilities. ``rs_on="probs"`` takes RS on probabilities (the released M > 2 branch).
    """
    num_classes = z_a.shape[1]
    z_a, z_b = wide(z_a), wide(z_b)
    logp_a, logp_b = F.log_softmax(z_a, 1), F.log_softmax(z_b, 1)
    p_a, p_b = logp_a.exp(), logp_b.exp()
    y = labels[:, None]
    pa_y, pb_y = p_a.gather(1, y).squeeze(1), p_b.gather(1, y).squeeze(1)
    correct = (p_a.argmax(1) == labels) | (p_b.argmax(1) == labels)
    a_strong = pa_y >= pb_y
    if rs_on == "probs":
        rs = (p_a - p_b).pow(2).sum(1) / num_classes
    else:
        rs = (z_a - z_b).pow(2).sum(1) / num_classes
    if variant == "released":
        gate = (pa_y - pb_y).abs() * correct.to(pa_y.dtype)
        ps, pw = torch.maximum(pa_y, pb_y), torch.minimum(pa_y, pb_y)
        kd = torch.xlogy(pw, pw) - pw * ps  # kl_div(input=ps, target=pw)
    else:
        gate = ((pa_y - pb_y).abs() * correct.to(pa_y.dtype)).detach()
        mask = a_strong[:, None]
        logp_s = torch.where(mask, logp_a, logp_b).detach()
        logp_w = torch.where(mask, logp_b, logp_a)
        kd = (logp_s.exp() * (logp_s - logp_w)).sum(1)
    return gate, rs, kd


class MBSD(Regulator):
    """MBSD regulator (loss terms).

    Parameters
    ----------
    start_epoch : int >= 0, default 0
    end_epoch : int > start_epoch, optional
        The terms are added in epochs ``[start_epoch, end_epoch)`` (``None``: to the end);
        ``variant="released"``: ``[start_epoch, end_epoch]``, end included (BalanceBenchmark's
        default window is 0..80). Outside the window the loss is ``CE(z)`` only.
    variant : {"paper", "released"}, default "paper"
        "paper" (the evident intent; the paper itself is unverified): detached gate, KD as the KL
        divergence from the strong modality's distribution to the weak one's, RS on logits,
        unimodal logits with the other modalities at their baseline (any head).
        "released": BalanceBenchmark's code as it reads (see the module docstring); needs a
        ``concat`` or ``late`` head.

    ``MBSD()`` works for any M >= 2 and any fusion head; it adds ``M`` unimodal cross-entropies
    and one distillation term (keys ``mbsd/unimodal/<m>``, ``mbsd/distill`` in ``ctx.losses``).
    """

    _parameter_constraints = {"start_epoch": [NON_NEGATIVE_INT], "end_epoch": EPOCH_END,
                              "variant": [Options("paper", "released")]}

    def __init__(self, *, start_epoch: int = 0, end_epoch: int | None = None,
                 variant: str = "paper"):
        start_epoch, end_epoch = as_plain_int(start_epoch), as_plain_int(end_epoch)
        self._validate(start_epoch=start_epoch, end_epoch=end_epoch, variant=variant)
        if variant == "released":
            if end_epoch is not None and end_epoch < start_epoch:
                raise ValueError(f"MBSD: end_epoch must be >= start_epoch for variant='released' "
                                 f"(the window is [start_epoch, end_epoch], end included); got "
                                 f"start_epoch={start_epoch}, end_epoch={end_epoch}.")
        else:
            check_epoch_range("MBSD", start_epoch, end_epoch)
        super().__init__()
        self.start_epoch, self.end_epoch, self.variant = start_epoch, end_epoch, variant
        # the released logits come from the head's linear layer, not from head(present=...)
        self.needs_unimodal_logits = variant == "paper"

    def reset(self) -> None:
        super().reset()
        self._means = EpochMeans()

    def config(self) -> dict:
        return {"start_epoch": self.start_epoch, "end_epoch": self.end_epoch,
                "variant": self.variant}

    def active(self, epoch: int) -> bool:
        if epoch < self.start_epoch:
            return False
        if self.end_epoch is None:
            return True
        return epoch <= self.end_epoch if self.variant == "released" else epoch < self.end_epoch

    def on_fit_start(self, ctx) -> None:
        if self.variant == "released":
            check_released_head(ctx.model, "MBSD")
        super().on_fit_start(ctx)

    def on_train_epoch_start(self, ctx) -> None:
        self._means = EpochMeans()

    def on_after_forward(self, ctx) -> None:
        if not self.active(ctx.epoch):
            return
        model, labels = ctx.model, ctx.labels
        if self.variant == "released":
            uni = released_unimodal_logits(model, ctx.features, grad=True)
        else:
            uni = ctx.compute_unimodal_logits()
        batch = labels.shape[0]
        means = self._means
        for m in model.modalities:
            ce = F.cross_entropy(uni[m], labels)
            ctx.losses[f"mbsd/unimodal/{m}"] = ce
            means.add("unimodal_ce", m, float(ce.detach()) * batch, batch)
        pairs = list(combinations(model.modalities, 2))
        rs_on = "probs" if self.variant == "released" and len(model.modalities) > 2 else "logits"
        total = None
        for a, b in pairs:
            gate, rs, kd = mbsd_pair_terms(uni[a], uni[b], labels, self.variant, rs_on)
            term = (gate * (rs + kd)).mean()
            total = term if total is None else total + term
            name = f"{a}|{b}"
            for key, v in (("gate", gate), ("rs", rs), ("kd", kd)):
                means.add(key, name, float(v.detach().sum()), batch)
            means.add("term", name, float(term.detach()) * batch, batch)
        ctx.losses["mbsd/distill"] = total / len(pairs)

    def on_train_epoch_end(self, ctx) -> None:
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values)
        self.record_epoch("active", bool(self.active(ctx.epoch)))
