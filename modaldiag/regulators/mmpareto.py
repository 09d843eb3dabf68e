"""R5: MMPareto (ICML 2024) — Pareto-aware combination of multimodal and unimodal gradients.

Losses: the multimodal cross-entropy (plus any other terms in the step) and one unimodal
cross-entropy per modality (the head with the other modalities absent). Two gradient computations
per step with ``torch.autograd.grad`` — of the multimodal loss and of the sum of unimodal losses —
keep the two gradients separate (m's unimodal loss does not depend on the other encoders, so the
gradient of the sum w.r.t. encoder m is m's own unimodal gradient). For each encoder m:

- ``cos(g_mm, g_u) > 0``: weights 1/2, 1/2;
- otherwise the two-task min-norm weights ``w_mm = clip((|g_u|^2 - <g_mm, g_u>) / |g_mm - g_u|^2,
  0, 1)``, ``w_u = 1 - w_mm``;
- direction ``h = 2 (w_mm g_mm + w_u g_u)``, final gradient
  ``gamma * max(1, |g_mm + g_u| / |h|) * h``.

Head parameters get the plain summed gradient ``g_mm + g_u``. Gradients are added to ``.grad``
(so gradient accumulation works).

Magnitude rescaling (``rescale``): the weights ``w_mm`` always come from encoder m's whole gradient
(all its tensors concatenated, as in the paper and the released code). The factor
``max(1, |g_mm + g_u| / |h|)`` is taken over the whole encoder in the paper form
(``rescale="encoder"``) and separately for every parameter tensor in the authors' released code
(``rescale="tensor"``, set by ``variant="released"``): there, tensor t of encoder m gets
``gamma * max(1, |g_mm,t + g_u,t| / |h_t|) * h_t`` with ``h_t = 2 (w_mm g_mm,t + w_u g_u,t)``.

Unimodal logits (``unimodal_heads``): the paper form takes them from the shared fusion head with
the other modalities absent (``"shared"``); the released code has one separate linear classifier per
modality on its features (``"separate"``, set by ``variant="released"``), so its fusion head gets
no unimodal-CE gradient. The separate heads are owned by the regulator: ``nn.Linear(d_m, C)`` per
modality, created at the start of a fresh run (or at its first batch when the model does not
declare ``feature_dims``) on the model's device and dtype, initialised like ``nn.Linear`` from a
``torch.Generator`` seeded with ``seed`` (identical on every DDP rank), added to the run's optimizer
as one extra parameter group (the first group's hyperparameters), and saved in ``state_dict``. In the
gradient combination they are treated like head parameters (plain summed gradient, which is their
unimodal gradient), averaged over DDP ranks with the rest.

DDP: ``autograd.grad`` does not trigger DDP's gradient all-reduce, so the regulator averages both
gradient sets over ranks itself *before* computing the weights; every rank then computes the same
combination from the same numbers and the replicas stay identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.validation import POSITIVE, Options, as_plain_int
from .base import SEED, Regulator, average_over_ranks, seeded_unimodal_heads

__all__ = ["MMPareto", "pareto_combine"]


def pareto_weight(g_mm: torch.Tensor, g_u: torch.Tensor) -> tuple[float, float]:
    """``(w_mm, cos)`` of two flat gradients: 1/2 if ``cos > 0``, else the two-task min-norm
    weight ``clip((|g_u|^2 - <g_mm, g_u>) / |g_mm - g_u|^2, 0, 1)``."""
    dot = torch.dot(g_mm, g_u)
    n_mm, n_u = g_mm.norm(), g_u.norm()
    cos = float(dot / (n_mm * n_u)) if n_mm > 0 and n_u > 0 else 1.0
    if cos > 0:
        return 0.5, cos
    diff = (g_mm - g_u).pow(2).sum()
    return (float(((n_u ** 2 - dot) / diff).clamp(0, 1)) if diff > 0 else 0.5), cos


def _rescaled(g_mm: torch.Tensor, g_u: torch.Tensor, w_mm: float, gamma: float) -> torch.Tensor:
    """``gamma * max(1, |g_mm + g_u| / |h|) * h`` with ``h = 2 (w_mm g_mm + (1 - w_mm) g_u)``."""
    h = 2 * (w_mm * g_mm + (1 - w_mm) * g_u)
    h_norm = h.norm()
    scale = max(1.0, float((g_mm + g_u).norm() / h_norm)) if h_norm > 0 else 1.0
    return gamma * scale * h


def pareto_combine(g_mm: torch.Tensor, g_u: torch.Tensor, gamma: float = 1.5
                   ) -> tuple[torch.Tensor, float, float]:
    """Combine two flat gradients; returns ``(final, w_mm, cos)``."""
    dot = torch.dot(g_mm, g_u)
    n_mm, n_u = g_mm.norm(), g_u.norm()
    cos = float(dot / (n_mm * n_u)) if n_mm > 0 and n_u > 0 else 1.0
    if cos > 0:
        w_mm = 0.5
    else:
        diff = (g_mm - g_u).pow(2).sum()
        w_mm = float(((n_u ** 2 - dot) / diff).clamp(0, 1)) if diff > 0 else 0.5
    h = 2 * (w_mm * g_mm + (1 - w_mm) * g_u)
    h_norm = h.norm()
    scale = max(1.0, float((g_mm + g_u).norm() / h_norm)) if h_norm > 0 else 1.0
    return gamma * scale * h, w_mm, cos


#: marks the optimizer parameter group that holds MMPareto's separate unimodal heads
HEADS_GROUP_KEY = "modaldiag_mmpareto_unimodal_heads"


class MMPareto(Regulator):
    """MMPareto regulator (owns the backward pass).

    Parameters
    ----------
    gamma : float > 0, default 1.5
        Magnitude factor of the final encoder gradient (``gamma <= 0`` would stop or reverse
        training and is refused).
    variant : {"paper", "released"}, default "paper"
        ``"released"`` sets ``rescale="tensor"`` (the authors' public code) unless ``rescale`` is
        given explicitly.
    rescale : {None, "encoder", "tensor"}, default None
        Where the magnitude factor ``max(1, |g_mm + g_u| / |h|)`` is taken: over each encoder's
        whole gradient (paper) or per parameter tensor (released). None: from ``variant``.
    unimodal_heads : {None, "shared", "separate"}, default None
        Where the unimodal logits come from: the shared fusion head with the other modalities
        absent (paper) or one regulator-owned linear classifier per modality (released; the fusion
        head then gets no unimodal-CE gradient). None: from ``variant``. ``"separate"`` adds one
        parameter group to the optimizer (see :meth:`register_parameters`) and is refused by the
        Lightning callback, which steps the user's optimizer.
    seed : int >= 0, default 0
        Seed of the separate heads' initialisation (the same on every DDP rank).

    Not usable with ``nn.DataParallel`` (its replicas break the two separate gradient passes):
    use DistributedDataParallel or the unwrapped model.
    """

    needs_unimodal_logits = True
    conflicts = ("OGM",)
    owned_group_key = HEADS_GROUP_KEY
    _parameter_constraints = {"gamma": [POSITIVE], "variant": [Options("paper", "released")],
                              "rescale": [None, Options("encoder", "tensor")],
                              "unimodal_heads": [None, Options("shared", "separate")],
                              "seed": [SEED]}

    def __init__(self, gamma: float = 1.5, *, variant: str = "paper", rescale: str | None = None,
                 unimodal_heads: str | None = None, seed: int = 0):
        seed = as_plain_int(seed)
        self._validate(gamma=gamma, variant=variant, rescale=rescale,
                       unimodal_heads=unimodal_heads, seed=seed)
        super().__init__()
        self.gamma = float(gamma)
        self.variant = variant
        if rescale is None:
            rescale = "tensor" if variant == "released" else "encoder"
        self.rescale = rescale
        if unimodal_heads is None:
            unimodal_heads = "separate" if variant == "released" else "shared"
        self.unimodal_heads = unimodal_heads
        self.seed = seed
        # the shared head's unimodal logits are only needed in the paper form
        self.needs_unimodal_logits = unimodal_heads == "shared"

    def reset(self) -> None:
        """Forget gradients deferred for a framework's optimizer step and the separate unimodal
        heads (a fresh run creates new ones)."""
        super().reset()
        self._deferred: dict[torch.nn.Parameter, torch.Tensor] | None = None
        self.heads: dict[str, nn.Linear] | None = None

    def config(self) -> dict:
        return {"gamma": self.gamma, "variant": self.variant, "rescale": self.rescale,
                "unimodal_heads": self.unimodal_heads, "seed": self.seed}

    # ------------------------------------------------------------ separate unimodal heads
    def owned_parameters(self) -> list[nn.Parameter]:
        """The separate unimodal heads' parameters (empty with shared heads or before creation)."""
        if not self.heads:
            return []
        return [p for lin in self.heads.values() for p in (lin.weight, lin.bias)]

    def _create_heads(self, model, dims: dict[str, int]) -> None:
        self.heads = seeded_unimodal_heads(model, dims, self.seed)

    def on_fit_start(self, ctx) -> None:
        super().on_fit_start(ctx)
        if self.unimodal_heads != "separate":
            return
        dims = getattr(ctx.model, "feature_dims", None)
        if self.heads is None and isinstance(dims, dict):
            self._create_heads(ctx.model, dims)
        self.register_parameters(ctx.optimizer)

    def state_dict(self) -> dict:
        if not self.heads:
            return {}
        return {"unimodal_heads": {m: {"weight": lin.weight.detach().clone(),
                                       "bias": lin.bias.detach().clone()}
                                   for m, lin in self.heads.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the separate heads (created here, on the saved tensors' device and dtype);
        the next ``on_fit_start`` keeps them and registers them with the run's optimizer."""
        saved = (state or {}).get("unimodal_heads")
        if saved and self.unimodal_heads != "separate":
            raise ValueError("MMPareto: the state holds separate unimodal heads but this regulator "
                             f"uses unimodal_heads={self.unimodal_heads!r}.")
        heads = None
        if saved:
            heads = {}
            for m, t in saved.items():
                w, b = t["weight"], t["bias"]
                lin = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], device=w.device,
                                         dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    lin.bias.copy_(b)
                heads[m] = lin
        super().load_state_dict(state)
        self.heads = heads

    def on_after_forward(self, ctx) -> None:
        if self.unimodal_heads == "shared":
            for m, lg in ctx.unimodal_logits.items():
                ctx.losses[f"unimodal/{m}"] = F.cross_entropy(lg, ctx.labels)
            return
        if self.heads is None:  # the model declares no feature_dims: size them on this batch
            self._create_heads(ctx.model, {m: f.shape[1] for m, f in ctx.features.items()})
            self.register_parameters(ctx.optimizer)
        for m in ctx.model.modalities:
            lin = self.heads[m]
            ctx.losses[f"unimodal/{m}"] = F.cross_entropy(
                lin(ctx.features[m].to(lin.weight.dtype)), ctx.labels)

    def backward(self, ctx) -> bool:
        for p, g in self.combined_gradients(ctx).items():
            _accumulate(p, g)
        return True

    def defer_gradients(self, ctx, scale: float = 1.0) -> None:
        """For frameworks that run their own backward (Lightning): compute the combined encoder
        gradients now, and write them at ``on_before_optimizer_step`` over the encoders' plain
        summed gradients (head gradients stay the framework's plain sum)."""
        if self.unimodal_heads == "separate":
            raise ValueError(
                "MMPareto(unimodal_heads='separate') (the default of variant='released') owns one "
                "linear head per modality that must be registered with the optimizer and saved "
                "with the run; the Lightning callback steps your own optimizer and cannot. Use "
                "unimodal_heads='shared' here, or train with md.fit / md.Regulation.")
        enc_ids = {id(p) for ps in self.groups(ctx.model).values() for p in ps}
        combined = self.combined_gradients(ctx, retain_graph=True)
        if self._deferred is None:
            self._deferred = {}
        for p, g in combined.items():
            if id(p) in enc_ids:
                prev = self._deferred.get(p)
                self._deferred[p] = g * scale if prev is None else prev + g * scale

    def on_before_optimizer_step(self, ctx) -> None:
        if self._deferred:
            for p, g in self._deferred.items():
                p.grad = g.detach().clone()
        self._deferred = None

    def combined_gradients(self, ctx, retain_graph: bool = False) -> dict:
        """``{parameter: gradient}``: Pareto-combined for encoders, summed for the head (and the
        separate unimodal heads)."""
        model = ctx.model
        uni_keys = [k for k in ctx.losses if k.startswith("unimodal/")]
        loss_u = sum(ctx.losses[k] for k in uni_keys)
        loss_mm = sum(v for k, v in ctx.losses.items() if k not in uni_keys)
        groups = self.groups(model)
        enc = {m: groups[m] for m in model.modalities}
        head = self.head_parameters(model) + self.owned_parameters()  # both: plain summed grad
        params = [p for m in model.modalities for p in enc[m]] + head

        def grads(loss, retain):
            gs = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs, strict=True)]

        g_mm = grads(loss_mm, retain=True)
        g_u = grads(loss_u, retain=retain_graph)
        average_over_ranks(g_mm + g_u)
        i = 0
        out = {}
        weights, cosines = {}, {}
        for m in model.modalities:
            n = len(enc[m])
            if n == 0:
                continue
            flat_mm = torch.cat([g.flatten() for g in g_mm[i:i + n]])
            flat_u = torch.cat([g.flatten() for g in g_u[i:i + n]])
            if self.rescale == "tensor":  # released: the weights per encoder, the factor per tensor
                w_mm, cos = pareto_weight(flat_mm, flat_u)
                for p, a, b in zip(enc[m], g_mm[i:i + n], g_u[i:i + n], strict=True):
                    out[p] = _rescaled(a, b, w_mm, self.gamma)
            else:
                final, w_mm, cos = pareto_combine(flat_mm, flat_u, self.gamma)
                offset = 0
                for p in enc[m]:
                    out[p] = final[offset:offset + p.numel()].view_as(p)
                    offset += p.numel()
            weights[m], cosines[m] = w_mm, cos
            i += n
        for p, a, b in zip(head, g_mm[i:], g_u[i:], strict=True):
            out[p] = a + b
        self.record("w_multimodal", weights)
        self.record("cosine", cosines)
        return out


def _accumulate(p: torch.nn.Parameter, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g.detach().clone()
    else:
        p.grad.add_(g.detach())
