"""R12: LFM (Yang, Wan, Jiang, Xu, NeurIPS 2024) — "Facilitating Multimodal Classification via
Dynamically Learning Modality Gap": cross-entropy plus a dynamically weighted alignment between the
unimodal outputs.

Per step, with unimodal logits ``z_m = h(f, present={m})`` and ``p_m = softmax(z_m)``:

    L = 2 [alpha_c CE(z) + alpha_a A],   alpha_a = 1 - alpha_c,   A = mean_{pairs m<k} J(p_m, p_k)

Alignment ``J`` (``alignment=``):

- ``"released"`` (default; both releases): ``J(p, q) = 1/2 [KL(r || p) + KL(r || q)]``,
  ``r = (p + q) / 2`` — ``F.kl_div(p.log(), r)`` puts ``r`` first;
- ``"js"``: the textbook Jensen-Shannon divergence ``1/2 [KL(p || r) + KL(q || r)]``.

Both are per-sample sums over classes, averaged over the batch. The paper describes an
unsupervised contrastive "modality matching" term; its exact form is **[unverified]** (no full
text reachable), so the released J is the default.

Schedules of ``alpha_c`` (``schedule=``), set at the start of every epoch e:

- ``"fitted"`` (default): the authors' main script (``Crema_epoch.py``, the README's command):
  ``alpha_c(e) = sum_{j=0..5} a_j e^j`` with the polynomial they fitted to a learnable run on
  CREMA-D over 200 epochs (0.205 at e = 0, 0.354 at 30, 0.539 at 100, 0.902 at 200). It peaks at
  1.011 (e = 183) and falls steeply after 200, so ``variant="paper"`` clips ``alpha_c`` to
  ``[0.05, 0.95]`` (the learnable rule's box); ``variant="released"`` does not.
- ``"learnable"`` (the authors' second script, ``Crema_epoch_learnable.py``, and
  BalanceBenchmark): on one FIXED held-out batch (the first ``held_out`` fraction of the first
  batch of the validation loader, read once), ``g = grad_theta(alpha_c CE + alpha_a A)`` with
  ``create_graph``, ``v = grad_theta <g, sg(grad_theta CE)>`` (the Hessian of the total loss
  times the CE gradient), ``h`` = mean of ``v``'s entries in the first parameter tensor
  (``h_over="first"``, as released) or over all parameters (``h_over="all"``);
  ``alpha_a <- clip(alpha_a - eta h, 0.05, 0.95)``; ``eta`` (``lr_alpha``, 1e-4) is halved at
  epochs 20, 40, ... (``halve_every``). Initial ``alpha_c``: ``alpha_init`` = 0.05 (authors;
  BalanceBenchmark starts reversed at 0.95).

Why "fitted" is the default: it is the authors' advertised entry point, it needs no validation
data (the learnable schedule needs a held-out batch: md.fit's ``val_loader``, or ``val_loader=``
here, e.g. under Lightning) and no double backward, and it is the same on every rank by
construction. Its drawback: it was fitted on one dataset's 200-epoch run, so short runs only see
its start (``alpha_c`` ~0.2-0.35 in 30 epochs: alignment-heavy). Choose ``"learnable"`` to adapt
``alpha`` to the data; the paper's own "heuristic" schedule is **[unverified]**.

Any M: A is the mean over the ``M(M-1)/2`` pairs (BalanceBenchmark's rule; M = 2 is the one pair,
as released). The authors' model fuses ``z = (z_a + z_v)/2`` from separate linear heads; here
``z = h(f)`` for any head. ``variant="released"`` takes the unimodal logits from the head's linear
layer as the releases do (``W_m f_m + b/M`` for ``concat``, ``fc_m(f_m)`` for ``late``; other heads
refused) and leaves the fitted ``alpha_c`` unclipped.

The learnable step runs in train mode inside :class:`~modaldiag.utils.torch_utils.preserved_state`:
it changes no BatchNorm statistics and no random stream (the releases let its forward update
BatchNorm statistics). Under DDP ``h`` is averaged over ranks before use, so every rank holds the
same ``alpha``.

Missing modalities (batches ``(inputs, labels, present)``): the features of an absent entry are the
baseline (as in every step), so ``CE(z)`` covers every sample; but the gap between the outputs of
m and k is only defined for a sample that has both, so the alignment of pair (m, k) is the mean of
``J`` over the samples where both are present (a pair with no such sample in the batch adds 0; ``A``
stays the mean over all pairs). Aligning a modality's outputs with the all-baseline head's would
train towards a constant, not close a modality gap. The learnable schedule's held-out batch keeps
its presence mask and is treated the same way.

Logged per epoch: ``alpha_c``, ``alpha_a``, ``h`` and ``lr_alpha`` (learnable), and per-epoch
sample means (over all ranks) of ``alignment`` (A) and ``ce``.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F

from ..utils.distributed import world_size
from ..utils.torch_utils import preserved_state, to_device
from ..utils.validation import (
    POSITIVE,
    POSITIVE_INT,
    Interval,
    Options,
    Satisfies,
    unpack_batch_present,
)
from .base import (
    EpochMeans,
    Regulator,
    all_reduce_sum,
    check_released_head,
    released_unimodal_logits,
    wide,
)

__all__ = ["LFM", "lfm_alignment", "lfm_fitted_alpha", "FITTED_COEFFICIENTS"]

#: the authors' polynomial alpha_c(e) = sum_j a_j e^j (``Crema_epoch.py``, CREMA-D, 200 epochs)
FITTED_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06,
                       2.23835486e-08, -5.39717505e-11)
#: the box of the learnable rule (alpha_a, hence alpha_c) and of the clipped fitted schedule
ALPHA_MIN, ALPHA_MAX = 0.05, 0.95


def lfm_fitted_alpha(epoch: int, clip: bool = True) -> float:
    """``alpha_c`` of the fitted schedule at ``epoch`` (clipped to [0.05, 0.95] if ``clip``)."""
    value = sum(c * float(epoch) ** j for j, c in enumerate(FITTED_COEFFICIENTS))
    return min(ALPHA_MAX, max(ALPHA_MIN, value)) if clip else value


def lfm_alignment(z_p: torch.Tensor, z_q: torch.Tensor, kind: str = "released",
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of ``J(softmax z_p, softmax z_q)`` (``kind="released"``) or of the textbook
    Jensen-Shannon divergence (``kind="js"``). ``mask`` (optional, BoolTensor (B,)): the mean
    runs over the rows where it is True (0, still in the graph, when none is)."""
    logp, logq = F.log_softmax(wide(z_p), -1), F.log_softmax(wide(z_q), -1)
    p, q = logp.exp(), logq.exp()
    r = 0.5 * (p + q)
    logr = r.clamp_min(torch.finfo(r.dtype).tiny).log()
    if kind == "js":
        per = 0.5 * ((p * (logp - logr)).sum(-1) + (q * (logq - logr)).sum(-1))
    else:
        per = 0.5 * ((r * (logr - logp)).sum(-1) + (r * (logr - logq)).sum(-1))
    if mask is None:
        return per.mean()
    mask = mask.to(per.device)
    return per[mask].mean() if bool(mask.any()) else per.sum() * 0.0


def _both_present(present, a: str, b: str) -> torch.Tensor | None:
    """Samples that have both modalities ``a`` and ``b`` (None: every sample)."""
    masks = [present[m] for m in (a, b) if present and m in present]
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else masks[0] & masks[1].to(masks[0].device)


class LFM(Regulator):
    """LFM regulator (loss terms; a learnable alpha at every epoch start).

    Parameters
    ----------
    schedule : {"fitted", "learnable"}, default "fitted"
        How ``alpha_c`` moves (see the module docstring for both and for the choice of default).
    alignment : {"released", "js"}, default "released"
        ``J`` as released (``1/2 [KL(r||p) + KL(r||q)]``) or the textbook JS divergence.
    alpha_init : float in [0.05, 0.95], default 0.05
        Initial ``alpha_c`` of the learnable schedule (authors 0.05; BalanceBenchmark 0.95).
    lr_alpha : float > 0, default 1e-4
        Step ``eta`` of the learnable schedule.
    halve_every : int >= 1, default 20
        ``eta`` is halved at the start of epochs ``halve_every``, ``2 halve_every``, ...
    held_out : float in (0, 1], default 0.5
        Fraction of the first validation batch used (authors 1/2; BalanceBenchmark 1/4).
    h_over : {"first", "all"}, default "first"
        Entries of the Hessian-vector product averaged into ``h``: the first trainable parameter
        tensor (as released) or all trainable parameters.
    val_loader : iterable of (inputs, labels), optional
        Held-out data for ``schedule="learnable"``; default: the run's validation loader
        (``md.fit(..., val_loader=...)``, ``md.Regulation.start(val_loader=...)``). Needed under
        Lightning, whose callback does not see your validation loader.
    variant : {"paper", "released"}, default "paper"
        "released": unimodal logits from the head's linear layer (``concat``: ``W_m f_m + b/M``;
        ``late``: ``fc_m(f_m)``; other heads refused) and the fitted ``alpha_c`` unclipped.

    The BalanceBenchmark configuration is ``LFM(schedule="learnable", alpha_init=0.95,
    held_out=0.25, variant="released")``.
    """

    _parameter_constraints = {
        "schedule": [Options("fitted", "learnable")],
        "alignment": [Options("released", "js")],
        "alpha_init": [Interval(ALPHA_MIN, ALPHA_MAX)],
        "lr_alpha": [POSITIVE],
        "halve_every": [POSITIVE_INT],
        "held_out": [Interval(0, 1, closed="right")],
        "h_over": [Options("first", "all")],
        "val_loader": [None, Satisfies(lambda v: hasattr(v, "__iter__"),
                                       "an iterable of (inputs, labels) batches")],
        "variant": [Options("paper", "released")],
    }

    def __init__(self, schedule: str = "fitted", *, alignment: str = "released",
                 alpha_init: float = 0.05, lr_alpha: float = 1e-4, halve_every: int = 20,
                 held_out: float = 0.5, h_over: str = "first", val_loader=None,
                 variant: str = "paper"):
        self._validate(schedule=schedule, alignment=alignment, alpha_init=alpha_init,
                       lr_alpha=lr_alpha, halve_every=halve_every, held_out=held_out,
                       h_over=h_over, val_loader=val_loader, variant=variant)
        self.schedule, self.alignment, self.variant = schedule, alignment, variant
        self.alpha_init, self.lr_alpha_init = float(alpha_init), float(lr_alpha)
        self.halve_every, self.held_out, self.h_over = int(halve_every), float(held_out), h_over
        self.val_loader = val_loader
        super().__init__()
        self.needs_unimodal_logits = variant == "paper"

    def reset(self) -> None:
        super().reset()
        self.alpha_c = self.alpha_init if self.schedule == "learnable" else lfm_fitted_alpha(
            0, clip=self.variant == "paper")
        self.lr_alpha = self.lr_alpha_init
        self.last_h: float | None = None
        self._batch = None
        self._means = EpochMeans()

    def config(self) -> dict:
        return {"schedule": self.schedule, "alignment": self.alignment,
                "alpha_init": self.alpha_init, "lr_alpha": self.lr_alpha_init,
                "halve_every": self.halve_every, "held_out": self.held_out,
                "h_over": self.h_over, "variant": self.variant}

    @property
    def alpha_a(self) -> float:
        return 1.0 - self.alpha_c

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"alpha_c": self.alpha_c, "lr_alpha": self.lr_alpha, "last_h": self.last_h}

    def load_state_dict(self, state: dict) -> None:
        self.alpha_c = float(state["alpha_c"])
        self.lr_alpha = float(state["lr_alpha"])
        self.last_h = state.get("last_h")
        self._batch = None
        super().load_state_dict(state)

    # ------------------------------------------------------------ hooks
    def on_fit_start(self, ctx) -> None:
        if self.variant == "released":
            check_released_head(ctx.model, "LFM")
        super().on_fit_start(ctx)
        if self.schedule == "learnable" and self.val_loader is None and ctx.val_loader is None:
            raise ValueError(self._no_val_message())

    @staticmethod
    def _no_val_message() -> str:
        return ("LFM(schedule='learnable') learns alpha on a fixed held-out batch and needs "
                "validation data: pass md.fit(..., val_loader=...) (a split carved from the "
                "training data, never the test set), md.Regulation(...).start(val_loader=...), or "
                "LFM(schedule='learnable', val_loader=...) (under Lightning). Without validation "
                "data use LFM(schedule='fitted').")

    def _unimodal(self, ctx_model, features):
        if self.variant == "released":
            return released_unimodal_logits(ctx_model, features, grad=True)
        return ctx_model.unimodal_logits(features)

    def _alignment(self, model, uni, present=None) -> torch.Tensor:
        """``A``: the mean over pairs of each pair's mean ``J`` over the samples that have both
        modalities (``present``: the batch's presence mask, None when nothing is absent)."""
        pairs = list(combinations(model.modalities, 2))
        total = sum(lfm_alignment(uni[a], uni[b], self.alignment,
                                  mask=_both_present(present, a, b)) for a, b in pairs)
        return total / len(pairs)

    def on_train_epoch_start(self, ctx) -> None:
        self._means = EpochMeans()
        epoch = ctx.epoch
        if self.schedule == "fitted":
            self.alpha_c = lfm_fitted_alpha(epoch, clip=self.variant == "paper")
        else:
            if epoch % self.halve_every == 0 and epoch != 0:
                self.lr_alpha /= 2
            h = self.hypergradient(ctx)
            self.last_h = h
            alpha_a = min(ALPHA_MAX, max(ALPHA_MIN, self.alpha_a - self.lr_alpha * h))
            self.alpha_c = 1.0 - alpha_a
            self.record_epoch("h", h)
            self.record_epoch("lr_alpha", self.lr_alpha)
        self.record_epoch("alpha_c", self.alpha_c)
        self.record_epoch("alpha_a", self.alpha_a)

    def _held_out_batch(self, ctx):
        if self._batch is None:
            loader = self.val_loader if self.val_loader is not None else ctx.val_loader
            if loader is None:
                raise ValueError(self._no_val_message())
            with preserved_state(None):  # iterating a DataLoader draws from the global RNG
                first = next(iter(loader), None)
            if first is None:
                raise ValueError("LFM(schedule='learnable'): the validation loader is empty.")
            inputs, labels, present = unpack_batch_present(first, ctx.model.modalities,
                                                           batch_index=0)
            n = max(1, int(labels.shape[0] * self.held_out))
            kept = {m: v[:n] for m, v in (present or {}).items() if not bool(v[:n].all())}
            self._batch = ({m: x[:n] for m, x in inputs.items()}, labels[:n], kept or None)
        return self._batch

    def hypergradient(self, ctx) -> float:
        """``h`` on the fixed held-out batch, averaged over DDP ranks (see the module docstring)."""
        model = ctx.model
        inputs, labels, present = self._held_out_batch(ctx)
        ref = next(iter(model.parameters()))
        device = ctx.device if ctx.device is not None else ref.device
        inputs, labels = to_device(inputs, device), labels.to(device)
        present = to_device(present, device) if present is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        with preserved_state(model), torch.enable_grad():
            model.train()
            features = model.mask_features(model.encode(inputs), present)
            ce = F.cross_entropy(model.head(features), labels)
            align = self._alignment(model, self._unimodal(model, features), present)
            total = self.alpha_c * ce + self.alpha_a * align
            g = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
            g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
            used = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
            outs = [g[i] for i in used]
            weights = [g_ce[i].detach() if g_ce[i] is not None else torch.zeros_like(params[i])
                       for i in used]
            v = torch.autograd.grad(outs, [params[i] for i in used], grad_outputs=weights,
                                    allow_unused=True) if outs else []
        hv = {i: vi for i, vi in zip(used, v, strict=True) if vi is not None}
        if self.h_over == "first":
            h = hv[0].double().mean() if 0 in hv else torch.zeros((), device=device)
        else:
            count = sum(p.numel() for p in params)
            h = sum((vi.double().sum() for vi in hv.values()), torch.zeros((), device=device)) / count
        h = h.detach().reshape(1).to(torch.float64)
        h = all_reduce_sum(h) / world_size()
        return float(h)

    def on_after_forward(self, ctx) -> None:
        model, labels = ctx.model, ctx.labels
        uni = (ctx.compute_unimodal_logits() if self.variant == "paper"
               else released_unimodal_logits(model, ctx.features, grad=True))
        ce = ctx.losses["multimodal"]
        align = self._alignment(model, uni, ctx.present)
        # L = 2 [alpha_c CE + alpha_a A]; the loop already holds CE(z) as "multimodal"
        ctx.losses["lfm/ce_weight"] = (2.0 * self.alpha_c - 1.0) * ce
        ctx.losses["lfm/alignment"] = 2.0 * self.alpha_a * align
        batch = labels.shape[0]
        self._means.add("alignment", "A", float(align.detach()) * batch, batch)
        self._means.add("ce", "fused", float(ce.detach()) * batch, batch)

    def on_train_epoch_end(self, ctx) -> None:
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values)
