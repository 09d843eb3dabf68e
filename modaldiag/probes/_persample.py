"""Per-sample squared gradient norms of every encoder: three engines, one answer.

``Tr F_m`` needs, for every sample ``i``, ``||grad_{theta_m} CE(x_i, y_i)||^2`` where ``theta_m`` are
the trainable parameters reachable from ``model.encoders[m]`` (a parameter shared by two encoders
belongs to both; a parameter reachable only from the head belongs to none). Three engines compute it:

``hooks`` (one forward and one backward per batch; no per-sample gradient of a Linear on
(B, in) is materialised). Each parameter-owning layer's input ``a`` and output gradient ``g``
(read with a tensor hook, so in-place ops after the layer are harmless) give:

- ``nn.Linear`` on (B, in): ``||dW_i||^2 = ||g_i||^2 ||a_i||^2``, ``||db_i||^2 = ||g_i||^2``;
  on (B, T, in): the per-sample gradient ``G_i^T A_i`` is formed per layer;
- ``nn.Conv1d``/``nn.Conv2d`` (groups = 1, zero padding): ``G_i U_i^T`` with ``U`` the unfolded input;
- ``nn.BatchNorm1d``/``2d`` in eval mode: ``dgamma_i = sum g_i * x_hat_i``, ``dbeta_i = sum g_i``.

This is exact only when row ``i`` of every such layer is sample ``i`` alone. :func:`hooks_blocker`
(before the pass) and :func:`hook_sq_norms` (during it) detect every way this fails and raise
:class:`UnsupportedByHooks` naming the cause: a parameter-owning module of another type, a
compiled or scripted module, a module or parameter shared between modules or modalities, a
module called more than once per forward, a batch dimension that is not the sample count (video
frames folded into the batch), an input modified in place after the layer read it, samples that
interact (BatchNorm in training mode, batch statistics), or a parameter whose gradient does not
come entirely from its module's one call (used elsewhere as well).

``vmap``: ``torch.func.grad`` + ``vmap`` over the samples, in chunks (any functional encoder).

``loop``: one forward and one backward per sample; exact for any model, slowest. Used when
``vmap`` cannot run the model (in-place writes into unbatched tensors, BatchNorm updating its
statistics in training mode, data-dependent control flow, ``.item()``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = ["UnsupportedByHooks", "encoder_parameters", "hooks_blocker", "hook_sq_norms",
           "masked_logits",
           "vmap_sq_norms", "loop_sq_norms"]

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED_NAMES = "Linear, Conv1d, Conv2d (groups=1, zero padding), eval-mode BatchNorm1d/2d"


class UnsupportedByHooks(ValueError):
    """The hook engine cannot give exact per-sample gradients for this model; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def encoder_parameters(net) -> list[tuple[str, nn.Parameter, tuple[str, ...]]]:
    """Every distinct trainable encoder parameter as ``(name, parameter, owning modalities)``.

    ``name`` is the parameter's first name in ``net.named_parameters()``; a parameter reachable
    from several encoders lists all of them, in the order of ``net.modalities``.
    """
    owners: dict[int, list[str]] = {}
    for m in net.modalities:
        for p in net.encoders[m].parameters():
            if p.requires_grad:
                mods = owners.setdefault(id(p), [])
                if m not in mods:
                    mods.append(m)
    return [(n, p, tuple(owners[id(p)])) for n, p in net.named_parameters() if id(p) in owners]


def _is_opaque(mod: nn.Module) -> bool:
    """A compiled (``torch.compile``) or scripted module, whose inside hooks cannot observe."""
    return (isinstance(mod, torch.jit.ScriptModule) or "_orig_mod" in mod._modules
            or getattr(mod, "_compiled_call_impl", None) is not None)


def _owning_layers(net) -> list[tuple[str, str, nn.Module]]:
    """``(modality, path, module)`` of every module owning trainable encoder parameters."""
    layers = []
    for m in net.modalities:
        for path, mod in net.encoders[m].named_modules():
            if any(p.requires_grad for p in mod.parameters(recurse=False)):
                layers.append((m, f"{m}.{path}" if path else m, mod))
    return layers


def hooks_blocker(net) -> str | None:
    """Why the hook engine cannot handle ``net`` (judged from its modules), or None if it may."""
    module_seen: dict[int, tuple[str, str]] = {}
    param_seen: dict[int, str] = {}
    for m in net.modalities:
        for path, mod in net.encoders[m].named_modules():
            where = f"{m}.{path}" if path else m
            if _is_opaque(mod):
                return (f"encoder {m!r}: module {where!r} ({type(mod).__name__}) is compiled or "
                        "scripted; per-layer hooks cannot see inside it")
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if id(mod) in module_seen:
                other_m, other = module_seen[id(mod)]
                return (f"module {where!r} is shared by the encoders of {other_m!r} and {m!r} "
                        f"(also reached as {other!r}); its per-sample gradient sums both uses")
            module_seen[id(mod)] = (m, where)
            for n, p in own:
                if id(p) in param_seen:
                    return (f"parameter {where}.{n} is shared with {param_seen[id(p)]} (tied "
                            "weights); its per-sample gradient sums the uses of both modules")
                param_seen[id(p)] = f"{where}.{n}"
            if not isinstance(mod, _SUPPORTED):
                return (f"encoder {m!r}: module {where!r} ({type(mod).__name__}) owns parameters "
                        f"and the hook engine knows only {_SUPPORTED_NAMES}")
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (
                    mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
                return (f"encoder {m!r}: {type(mod).__name__} {where!r} uses groups={mod.groups}, "
                        f"padding={mod.padding!r}, padding_mode={mod.padding_mode!r}; the hook "
                        "engine supports groups=1 with numeric zero padding only")
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and (
                    mod.training or not mod.track_running_stats):
                return (f"encoder {m!r}: BatchNorm {where!r} normalises with batch statistics "
                        "(training mode or track_running_stats=False), so samples interact")
    return None


def _layer_grads(mod: nn.Module, a: torch.Tensor, g: torch.Tensor
                 ) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
    """``(parameter, (B,) per-sample squared norm, batch-summed gradient)`` per trainable parameter."""
    a, g = a.float(), g.float()
    b = a.shape[0]
    out = []
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    train_w = weight is not None and weight.requires_grad
    train_b = bias is not None and bias.requires_grad
    if isinstance(mod, nn.Linear):
        if a.dim() == 2:
            if train_w:
                out.append((weight, g.pow(2).sum(1) * a.pow(2).sum(1), g.t() @ a))
            db = g
        else:
            a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
            if train_w:
                per = torch.einsum("bto,bti->boi", g3, a3)
                out.append((weight, per.pow(2).flatten(1).sum(1), per.sum(0)))
            db = g3.sum(1)
        if train_b:
            out.append((bias, db.pow(2).sum(1), db.sum(0)))
        return out
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if isinstance(mod, nn.Conv1d):
            a4 = a.unsqueeze(2)
            kernel, stride = (1, mod.kernel_size[0]), (1, mod.stride[0])
            padding, dilation = (0, mod.padding[0]), (1, mod.dilation[0])
        else:
            a4, kernel, stride, padding, dilation = a, mod.kernel_size, mod.stride, mod.padding, mod.dilation
        g3 = g.reshape(b, g.shape[1], -1)  # (B, C_out, L)
        if train_w:
            cols = F.unfold(a4, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, Ck, L)
            per = torch.einsum("bol,bkl->bok", g3, cols)
            out.append((weight, per.pow(2).flatten(1).sum(1), per.sum(0).reshape(weight.shape)))
        if train_b:
            db = g3.sum(2)
            out.append((bias, db.pow(2).sum(1), db.sum(0)))
        return out
    shape = (1, -1) + (1,) * (a.dim() - 2)
    x_hat = (a - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)
    reduce_dims = tuple(range(2, a.dim()))
    if train_w:
        dw = (g * x_hat).sum(reduce_dims) if reduce_dims else g * x_hat
        out.append((weight, dw.pow(2).sum(1), dw.sum(0)))
    if train_b:
        db = g.sum(reduce_dims) if reduce_dims else g
        out.append((bias, db.pow(2).sum(1), db.sum(0)))
    return out


def masked_logits(net, inputs: Mapping[str, torch.Tensor],
                  present: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``net(inputs)``, with the features of absent samples (presence mask ``{m: (B,)}``) replaced
    by the baseline: an absent modality's encoder then gets exactly zero gradient from them."""
    if present is None:
        return net(inputs)
    return net(inputs, step=lambda model, x: model.head(model.mask_features(model.encode(x),
                                                                            present)))


def _slice_present(present, start: int, stop: int):
    return None if present is None else {m: t[start:stop] for m, t in present.items()}


def _forward_loss(net, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  reduction: str = "sum", present=None) -> tuple[torch.Tensor, torch.Tensor]:
    logits = masked_logits(net, inputs, present)
    return logits, F.cross_entropy(logits, labels, reduction=reduction)


def hook_sq_norms(net, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  present: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{m: (B,)}`` per-sample squared gradient norms from one forward and one backward pass.

    Raises :class:`UnsupportedByHooks` (naming the module and the cause) whenever the result
    would not be exact; see the module docstring for the list.
    """
    reason = hooks_blocker(net)
    if reason is not None:
        raise UnsupportedByHooks(reason)
    n = labels.shape[0]
    layers = _owning_layers(net)
    entries = encoder_parameters(net)
    records: dict[int, dict] = {id(mod): {"calls": 0} for _, _, mod in layers}

    def forward_hook(mod, args, output):
        rec = records[id(mod)]
        rec["calls"] += 1
        if rec["calls"] > 1 or not args or not isinstance(args[0], torch.Tensor):
            return
        rec["input"] = args[0].detach()
        rec["version"] = args[0]._version
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda g: rec.__setitem__("grad", g.detach()))

    handles = [mod.register_forward_hook(forward_hook) for _, _, mod in layers]
    try:
        with torch.enable_grad():
            logits, loss = _forward_loss(net, inputs, labels, present=present)
            params = [p for _, p, _ in entries]
            true_grads = (torch.autograd.grad(loss, params, allow_unused=True)
                          if params and loss.requires_grad else [None] * len(params))
    finally:
        for h in handles:
            h.remove()

    for _, where, mod in layers:
        rec = records[id(mod)]
        if rec["calls"] > 1:
            raise UnsupportedByHooks(
                f"module {where!r} ({type(mod).__name__}) runs {rec['calls']} times in one forward; "
                "its per-sample gradient is the sum over the calls")
        if rec["calls"] == 1 and "input" not in rec:
            raise UnsupportedByHooks(f"module {where!r} ({type(mod).__name__}) was called without "
                                     "a positional tensor input")
        if "input" in rec and rec["input"].shape[0] != n:
            raise UnsupportedByHooks(
                f"module {where!r} ({type(mod).__name__}) receives {rec['input'].shape[0]} rows for "
                f"{n} samples: the encoder folds several rows per sample into the batch dimension "
                "(e.g. video frames (B, T, ...) -> (B*T, ...)), so a row is not a sample")
        if "input" in rec and rec["input"]._version != rec["version"]:
            raise UnsupportedByHooks(
                f"the input of module {where!r} ({type(mod).__name__}) was modified in place after "
                "the module read it")
    if n > 1:
        sub = 2 if n > 2 else 1
        with torch.no_grad():
            alone = masked_logits(net, {m: x[:sub] for m, x in inputs.items()},
                                  _slice_present(present, 0, sub))
        ref = logits.detach()[:sub]
        if not torch.allclose(alone.float(), ref.float(), rtol=1e-4,
                              atol=1e-5 * max(1.0, float(ref.abs().max()))):
            raise UnsupportedByHooks(
                f"samples interact in the forward pass (the first {sub} sample(s) get other logits "
                f"when they run apart from the other {n - sub}, e.g. batch statistics or a "
                "BatchNorm kept in training mode), so a row's gradient is not a sample's")

    per_param: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for _, _, mod in layers:
        rec = records[id(mod)]
        if "grad" not in rec:
            continue
        for p, sq, summed in _layer_grads(mod, rec["input"], rec["grad"]):
            per_param[id(p)] = (sq, summed)

    label = {id(p): f"{where}.{pn}" for _, where, mod in layers
             for pn, p in mod.named_parameters(recurse=False)}
    scale = max((float(torch.linalg.vector_norm(t.float())) for t in true_grads if t is not None),
                default=0.0)
    out = {m: torch.zeros(n, device=labels.device) for m in net.modalities}
    for (name, p, owners), t in zip(entries, true_grads, strict=True):
        sq, summed = per_param.get(id(p), (None, None))
        t = torch.zeros_like(p, dtype=torch.float32) if t is None else t.float()
        s = torch.zeros_like(t) if summed is None else summed.reshape(t.shape)
        diff = float(torch.linalg.vector_norm(s - t))
        size = max(float(torch.linalg.vector_norm(t)), float(torch.linalg.vector_norm(s)))
        if diff > 1e-3 * size + 1e-6 * scale:
            raise UnsupportedByHooks(
                f"parameter {label.get(id(p), name)} gets gradient from outside its module's single call (used "
                f"more than once, by other code, or inside a compiled region): the hooks account "
                f"for a gradient differing from autograd's by {diff / max(size, 1e-30):.1%}")
        if sq is not None:
            for m in owners:
                out[m] = out[m] + sq
    return out


def _parameter_slots(net, wanted: set[int]) -> dict[int, list[str]]:
    """``{id(p): [names]}``: one name per distinct module holding each wanted parameter.

    A module reached under two paths (``md.wrap`` keeps the user model and the encoders) gets one
    name, so ``functional_call`` swaps and restores it once; a parameter tied between two
    modules gets one name per module, so every use is differentiated.
    """
    slots: dict[int, list[str]] = {}
    for prefix, mod in net.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in wanted:
                slots.setdefault(id(p), []).append(f"{prefix}.{attr}" if prefix else attr)
    return slots


def vmap_sq_norms(net, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  chunk_size: int, present: Mapping[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """``{m: (B,)}`` per-sample squared gradient norms with ``torch.func`` (vmap over samples).

    ``chunk_size`` samples per vectorised call bound the memory. A parameter used by several
    modules (tied) is differentiated at each and its per-sample gradients are summed.
    """
    entries = encoder_parameters(net)
    trained = {id(p) for _, p, _ in entries}
    slots = _parameter_slots(net, {id(p) for p in net.parameters()})
    trainable = {name: p.detach() for _, p, _ in entries for name in slots.get(id(p), [])}
    frozen = {name: p.detach() for p in net.parameters() if id(p) not in trained
              for name in slots.get(id(p), [])}

    def loss_one(params, x, y, pres=None):
        batch = {m: t.unsqueeze(0) for m, t in x.items()}
        kwargs = {} if pres is None else {"step": lambda model, inp: model.head(
            model.mask_features(model.encode(inp), {m: t.unsqueeze(0) for m, t in pres.items()}))}
        logits = functional_call(net, {**frozen, **params}, (batch,), kwargs, tie_weights=False,
                                 strict=False)
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0) if present is None else (None, 0, 0, 0),
                    randomness="error")
    n = labels.shape[0]
    out = {m: torch.zeros(n, device=labels.device) for m in net.modalities}
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        x = {m: t[start:stop] for m, t in inputs.items()}
        extra = () if present is None else (_slice_present(present, start, stop),)
        grads = per_grad(trainable, x, labels[start:stop], *extra)
        for _, p, owners in entries:
            names = slots.get(id(p), [])
            if not names:
                continue
            g = sum(grads[name] for name in names)
            sq = torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float32).pow(2)
            for m in owners:
                out[m][start:stop] += sq
    return out


def loop_sq_norms(net, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  present: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{m: (B,)}`` per-sample squared gradient norms, one forward and backward per sample."""
    entries = encoder_parameters(net)
    params = [p for _, p, _ in entries]
    n = labels.shape[0]
    out = {m: torch.zeros(n, device=labels.device) for m in net.modalities}
    for i in range(n):
        with torch.enable_grad():
            _, loss = _forward_loss(net, {m: x[i:i + 1] for m, x in inputs.items()}, labels[i:i + 1],
                                    present=_slice_present(present, i, i + 1))
            if not params or not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for (_, _, owners), g in zip(entries, grads, strict=True):
            if g is None:
                continue
            sq = g.detach().float().pow(2).sum()
            for m in owners:
                out[m][i] += sq
    return out
