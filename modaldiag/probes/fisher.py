"""P1: Fisher-information trace per modality (InfoReg, CVPR 2025, Sec. 3.2).

Three forms:

- ``per_sample`` (default, the paper): ``Tr F_m = mean_i || grad_{theta_m} CE(x_i, y_i) ||^2``.
  For encoders built from Linear / Conv1d / Conv2d / BatchNorm layers the per-sample squared norms
  come from activations and output gradients of one backward pass (no per-sample gradient is
  materialised, see ``_persample``); any other encoder uses vectorised per-sample gradients
  (``torch.func.grad`` + ``vmap``) in chunks. ``engine`` forces one of the two;
- ``batch``: the mean over batches of the squared norm of the mini-batch gradient (what the online
  monitor accumulates during training at almost no cost); it underestimates the per-sample form
  by about the gradient-noise term;
- ``code``: the released code's form: per Conv/Linear *weight* the element-mean of the squared
  batch gradient, summed over layers (every layer weighs equally), averaged over batches.

Parameters whose gradient is None are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..training.callbacks import Callback, StepContext
from ..utils.distributed import all_reduce_sum
from ..utils.validation import check_choice, check_positive_int
from ._common import contract_model, eval_mode, iterate_batches
from ._persample import hook_sq_norms

__all__ = ["FisherMonitor", "grad_sq_norms", "fisher_trace", "FISHER_FORMS"]

FISHER_FORMS = ("per_sample", "batch", "code")


@torch.no_grad()
def grad_sq_norms(model) -> dict[str, float]:
    """``{m: sum over encoder m's parameters of ||grad||^2}``; parameters without grad are skipped."""
    out = {}
    for m in model.modalities:
        total = None
        for p in model.encoders[m].parameters():
            if p.grad is None:
                continue
            s = p.grad.detach().float().pow(2).sum()
            total = s if total is None else total + s
        out[m] = float(total) if total is not None else 0.0
    return out


class FisherMonitor(Callback):
    """Online Fisher trace ("batch" form): per epoch, the sum over batches of the squared
    mini-batch gradient norm of each encoder, divided by the number of batches.

    It reads the gradients once per optimizer step, before any regulator modulates them (it runs
    first), after AMP unscaling and gradient accumulation, and logs
    ``fisher.<m>`` per epoch. It underestimates the per-sample trace by about the gradient-noise
    term; use :func:`modaldiag.fisher_trace` with ``per_sample=True`` for the exact form.
    """

    def __init__(self):
        self.traces: dict[str, list[float]] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._batches = 0

    def on_train_epoch_start(self, ctx: StepContext) -> None:
        self._sums = {}
        self._batches = 0

    @torch.no_grad()
    def on_before_optimizer_step(self, ctx: StepContext) -> None:
        from ..regulators.base import squared_norm

        for m in ctx.model.modalities:
            s = squared_norm([p.grad for p in ctx.model.encoders[m].parameters() if p.grad is not None])
            if s is not None:
                self._sums[m] = s if m not in self._sums else self._sums[m] + s
        self._batches += 1

    def on_train_epoch_end(self, ctx: StepContext) -> None:
        n = max(self._batches, 1)
        epoch_traces = {m: float(self._sums[m]) / n if m in self._sums else 0.0
                        for m in ctx.model.modalities}
        for m, v in epoch_traces.items():
            self.traces.setdefault(m, []).append(v)
        ctx.log("fisher", epoch_traces)

    def state_dict(self) -> dict:
        return {"traces": {m: list(v) for m, v in self.traces.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.traces = {m: list(v) for m, v in state.get("traces", {}).items()}


def _code_compat_layers(encoder: nn.Module) -> list[nn.Parameter]:
    """Weights of the Conv/Linear layers of ``encoder`` (the released code's selection)."""
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and mod.weight.requires_grad]


def fisher_trace(
    model,
    loader: Iterable,
    per_sample: bool = True,
    *,
    form: str | None = None,
    chunk_size: int = 64,
    engine: str = "auto",
    device=None,
    progress: bool = False,
) -> dict[str, float]:
    """Fisher-information trace ``Tr F_m`` of every modality's encoder over ``loader``.

    Parameters
    ----------
    model : MultimodalModel
        Evaluated in eval mode (BatchNorm uses running statistics; dropout off).
    loader : iterable of ``(inputs, labels)``
    per_sample : bool, default True
        True: the paper's per-sample form; False: the mini-batch ("batch") form.
    form : {"per_sample", "batch", "code"}, optional
        Overrides ``per_sample``; ``"code"`` is the released code's per-layer-mean form.
    chunk_size : int, default 64
        Samples per vectorised per-sample gradient call (bounds memory).
    engine : {"auto", "hooks", "vmap"}, default "auto"
        How per-sample norms are computed: from layer activations and output gradients (exact for
        Linear/Conv/BatchNorm encoders, one backward per batch) or with ``torch.func`` vmap (any
        encoder). ``auto`` uses hooks where every encoder layer is supported.

    Returns
    -------
    dict[str, float]
        ``{m: Tr F_m}``, in the order of ``model.modalities``.
    """
    net = contract_model(model)
    form = form or ("per_sample" if per_sample else "batch")
    check_choice(form, FISHER_FORMS, "form")
    check_positive_int(chunk_size, "chunk_size")
    check_choice(engine, ("auto", "hooks", "vmap"), "engine")
    totals = {m: 0.0 for m in net.modalities}
    count = 0
    with eval_mode(net):
        for inputs, labels in tqdm(iterate_batches(net, loader, device), desc=f"fisher ({form})",
                                   unit="batch", disable=not progress, leave=False):
            if form == "per_sample":
                sq = hook_sq_norms(net, inputs, labels) if engine != "vmap" else None
                if sq is None:
                    if engine == "hooks":
                        raise ValueError("engine='hooks' supports encoders made of Linear, Conv1d, "
                                         "Conv2d and eval-mode BatchNorm layers only; use 'auto'.")
                    sq = _per_sample_sq_norms(net, inputs, labels, chunk_size)
                for m in net.modalities:
                    totals[m] += float(sq[m].sum())
                count += labels.shape[0]
            else:
                _batch_sq_norms(net, inputs, labels, form, totals)
                count += 1
    # sum over DDP ranks: the trace of the union of every rank's data
    reduced = all_reduce_sum(torch.tensor([totals[m] for m in net.modalities] + [float(count)],
                                          dtype=torch.float64))
    return {m: float(reduced[i] / reduced[-1]) for i, m in enumerate(net.modalities)}


def _batch_sq_norms(net, inputs, labels, form, totals) -> None:
    params = {m: (_code_compat_layers(net.encoders[m]) if form == "code"
                  else [p for p in net.encoders[m].parameters() if p.requires_grad])
              for m in net.modalities}
    flat = [p for m in net.modalities for p in params[m]]
    with torch.enable_grad():
        loss = F.cross_entropy(net(inputs), labels)
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    i = 0
    for m in net.modalities:
        for _ in params[m]:
            g = grads[i]
            i += 1
            if g is None:
                continue
            g = g.detach().float().pow(2)
            totals[m] += float(g.mean() if form == "code" else g.sum())


def _per_sample_sq_norms(net, inputs, labels, chunk_size) -> dict[str, torch.Tensor]:
    """``{m: (B,)}`` squared norms of per-sample gradients w.r.t. encoder m (vectorised)."""
    from torch.func import functional_call, grad, vmap

    # Names from the de-duplicated parameter list, matched to modalities by identity: a wrapped
    # model reaches the same parameter under two paths, and functional_call must see it once.
    owner = {id(p): m for m in net.modalities for p in net.encoders[m].parameters() if p.requires_grad}
    named = dict(net.named_parameters())
    enc_names = {m: [n for n, p in named.items() if owner.get(id(p)) == m] for m in net.modalities}
    buffers = dict(net.named_buffers())
    trainable = {n: named[n].detach() for m in net.modalities for n in enc_names[m]}
    frozen = {n: p.detach() for n, p in named.items() if n not in trainable}

    def loss_one(params, x, y):
        batch = {m: t.unsqueeze(0) for m, t in x.items()}
        out = functional_call(net, ({**frozen, **params}, buffers), (batch,), tie_weights=False,
                              strict=False)
        return F.cross_entropy(out, y.unsqueeze(0))

    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    out = {m: [] for m in net.modalities}
    n = labels.shape[0]
    for start in range(0, n, chunk_size):
        x = {m: t[start:start + chunk_size] for m, t in inputs.items()}
        grads = per_grad(trainable, x, labels[start:start + chunk_size])
        for m in net.modalities:
            sq = [torch.linalg.vector_norm(grads[name].flatten(1), dim=1, dtype=torch.float32).pow(2)
                  for name in enc_names[m]]
            out[m].append(torch.stack(sq).sum(0) if sq else
                          torch.zeros(labels[start:start + chunk_size].shape[0], device=labels.device))
    return {m: torch.cat(v) for m, v in out.items()}
