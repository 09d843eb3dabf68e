"""Conditional learning speed (Wu, Jastrzębski, Cho, Geras, ICML 2022): a training callback.

For a model with mid fusion (the X6 protocol of
:class:`~modaldiag.models.midfusion.MidFusionClassifier`: ``main_params(m)`` = ``phi_m``, the
parameters of branch m; ``bypass_params(m)`` = ``psi_m``, the fusion parameters that inject the
other modalities into branch m), at every regular optimizer step::

    mu(theta)   = sum_t ||grad theta_t||^2 / sum_t ||theta_t||^2      (sums over the tensors)
    A^byp_m    += mu(psi_m)          A^main_m += mu(phi_m)             (since training start)
    BDR_m       = log10(A^byp_m / A^main_m)
    d_speed     = BDR_0 - BDR_1  (M = 2);   max_m BDR_m - min_m BDR_m  (M > 2)

``BDR_m`` large: branch m learns faster through the connections from the other modalities than
from its own input (it leans on them). A step is *regular* unless the model is inside a
re-balancing step (``model.rebalancing`` set; Greedy's re-balancing steps are not accumulated, as
in the authors' ``Bias_Mitigation_Strong``). Only trainable tensors count; a parameter without a
gradient this step adds 0 to the numerator (the authors' code would fail on it).

The gradients are read at ``on_before_optimizer_step``: after gradient accumulation and AMP
unscaling, before the optimizer changes the weights. Under DDP they are the already-averaged
gradients, identical on every rank; the two sums of every ``mu`` are averaged over ranks anyway
(one small all-reduce per step), so every rank holds the same ``A`` and takes the same decisions
even when a loop does not synchronise gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..models.midfusion import missing_protocol
from ..utils.distributed import all_reduce_sum, world_size
from .callbacks import Callback, StepContext

__all__ = ["ConditionalSpeedMonitor", "bdr", "speed_gap", "conditional_speeds", "check_mid_fusion"]

_SPEED_PROTOCOL = ("main_params", "bypass_params")


def check_mid_fusion(model, needed: Sequence[str], owner: str) -> None:
    """Raise a ValueError naming what ``model`` lacks of the mid-fusion protocol (X6)."""
    missing = missing_protocol(model, needed)
    if missing:
        raise ValueError(
            f"{owner} needs a model with mid fusion (cross-modal connections between the encoder "
            f"stages) that exposes the mid-fusion protocol; {type(model).__name__} lacks "
            f"{missing}. A late-fusion head (concat, sum, late, ...) has no cross-modal "
            "connections inside the network, so there is no bypass to measure or re-balance. Use "
            "md.MidFusionClassifier (e.g. md.models.mid_fusion_model(data)), or give your model "
            "main_params(m), bypass_params(m), rebalance(m) and branch_logits(features) (see "
            "docs/methods/greedy.md). The conditional utilisation rate works for any model: "
            "md.probes.conditional_utilization.")


def bdr(a_byp, a_main):
    """``log10(A^byp_m / A^main_m)`` per modality: a dict for dicts, else a list.

    NaN where either accumulator is not positive (nothing accumulated yet)."""
    def one(b: float, a: float) -> float:
        b, a = float(b), float(a)
        return math.log10(b / a) if b > 0 and a > 0 else math.nan
    if isinstance(a_byp, Mapping):
        return {m: one(a_byp[m], a_main[m]) for m in a_byp}
    return [one(b, a) for b, a in zip(a_byp, a_main, strict=True)]


def speed_gap(values) -> float:
    """``d_speed``: ``BDR_0 - BDR_1`` for two modalities, ``max - min`` for more (NaN if any is)."""
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    if any(math.isnan(v) for v in vals):
        return math.nan
    return vals[0] - vals[1] if len(vals) == 2 else max(vals) - min(vals)


@torch.no_grad()
def conditional_speeds(model) -> tuple[dict[str, float], dict[str, float]]:
    """``({m: mu(psi_m)}, {m: mu(phi_m)})`` from the current gradients, averaged over DDP ranks.

    Each tensor's squared weight and gradient norms are computed once (float64), then summed per
    group; a shared fusion parameter counts in the bypass of every branch it feeds."""
    mods = tuple(model.modalities)
    groups = [[p for p in model.bypass_params(m) if p.requires_grad] for m in mods]
    groups += [[p for p in model.main_params(m) if p.requires_grad] for m in mods]
    unique: dict[int, torch.Tensor] = {}
    for group in groups:
        for p in group:
            unique.setdefault(id(p), p)
    params = list(unique.values())
    where = {pid: i for i, pid in enumerate(unique)}
    if not params:
        raise ValueError("conditional_speeds: the model's main_params/bypass_params hold no "
                         "trainable parameter.")
    device = params[0].device
    w2 = torch.stack(torch._foreach_norm([p.detach() for p in params])).double().pow(2)
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    g2 = torch.zeros(len(params), dtype=torch.float64, device=device)
    if with_grad:
        norms = torch._foreach_norm([params[i].grad.detach() for i in with_grad])
        g2[with_grad] = torch.stack(norms).double().pow(2).to(device)
    rows = torch.zeros(len(groups), len(params), dtype=torch.float64, device=device)
    for k, group in enumerate(groups):
        rows[k, [where[id(p)] for p in group]] = 1.0
    sums = torch.cat([rows @ g2, rows @ w2])
    world = world_size()
    if world > 1:
        sums = all_reduce_sum(sums) / world
    sums = sums.cpu().tolist()
    k = len(groups)
    mu = [g / w if w > 0 else 0.0 for g, w in zip(sums[:k], sums[k:], strict=True)]
    m_count = len(mods)
    return dict(zip(mods, mu[:m_count], strict=True)), dict(zip(mods, mu[m_count:], strict=True))


class ConditionalSpeedMonitor(Callback):
    """Conditional learning speed per branch (see the module docstring); logs per epoch
    ``speed.bdr.<m>``, ``speed.d_speed``, ``speed.a_byp.<m>``, ``speed.a_main.<m>`` and
    ``speed.steps`` (regular steps accumulated so far).

    Needs ``main_params``/``bypass_params`` (:class:`~modaldiag.models.midfusion.MidFusionClassifier`
    has them); any other model is refused with a ValueError at the start of the run.

    Attributes
    ----------
    a_byp, a_main : dict[str, float]
        The accumulators ``A^byp_m``, ``A^main_m``.
    """

    single_instance = True

    def __init__(self):
        self._restored = False
        self.reset()

    def reset(self) -> None:
        """Forget the accumulators (a fresh run)."""
        self.a_byp: dict[str, float] = {}
        self.a_main: dict[str, float] = {}
        self.steps = 0

    def on_fit_start(self, ctx: StepContext) -> None:
        check_mid_fusion(ctx.model, _SPEED_PROTOCOL, type(self).__name__)
        if self._restored:
            self._restored = False
        else:
            self.reset()

    def accumulate(self, model) -> dict[str, float]:
        """Add this step's ``mu`` values to the accumulators; return the new ``BDR_m``."""
        byp, main = conditional_speeds(model)
        for m in model.modalities:
            self.a_byp[m] = self.a_byp.get(m, 0.0) + byp[m]
            self.a_main[m] = self.a_main.get(m, 0.0) + main[m]
        self.steps += 1
        return self.bdr()

    def bdr(self) -> dict[str, float]:
        """Current ``{m: BDR_m}`` (NaN before the first accumulated step)."""
        return bdr(self.a_byp, self.a_main)

    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        if getattr(ctx.model, "rebalancing", None) is None:
            self.accumulate(ctx.model)

    def logs(self) -> dict:
        values = self.bdr()
        return {"bdr": values, "d_speed": speed_gap(values) if values else math.nan,
                "a_byp": dict(self.a_byp), "a_main": dict(self.a_main), "steps": self.steps}

    def on_train_epoch_end(self, ctx: StepContext) -> None:
        ctx.log("speed", self.logs())

    def state_dict(self) -> dict:
        return {"a_byp": dict(self.a_byp), "a_main": dict(self.a_main), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore the accumulators (the next ``on_fit_start`` keeps them)."""
        state = state or {}
        self.a_byp = {m: float(v) for m, v in state.get("a_byp", {}).items()}
        self.a_main = {m: float(v) for m, v in state.get("a_main", {}).items()}
        self.steps = int(state.get("steps", 0))
        self._restored = True

    def on_fit_end(self, ctx: StepContext) -> None:
        self._restored = False
