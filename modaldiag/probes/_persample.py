"""Per-sample squared gradient norms from activations and output gradients (one backward pass).

For the layers encoders are usually made of, the squared norm of a sample's parameter gradient
follows from that layer's input ``a`` and output gradient ``g`` without materialising per-sample
gradients:

- ``nn.Linear`` on (B, in): ``||dW_i||^2 = ||g_i||^2 ||a_i||^2``, ``||db_i||^2 = ||g_i||^2``;
  on (B, T, in): the per-sample gradient ``G_i^T A_i`` is formed per layer;
- ``nn.Conv1d``/``nn.Conv2d`` (groups = 1): ``G_i U_i^T`` with ``U`` the unfolded input windows;
- ``nn.BatchNorm1d``/``2d`` in eval mode: ``dgamma_i = sum g_i * x_hat_i``, ``dbeta_i = sum g_i``.

The loss is the *sum* of per-sample cross-entropies in eval mode, so each sample's output gradient
is its own. Any other parameter-owning module, a module called twice, or a training-mode BatchNorm
makes :func:`hook_sq_norms` return None and the caller falls back to ``torch.func`` (vmap).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def _owners(encoder: nn.Module):
    """Modules that directly own trainable parameters; None if any is unsupported."""
    owners = []
    for mod in encoder.modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(mod, _SUPPORTED):
            return None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and (mod.groups != 1 or mod.padding_mode != "zeros"
                                                        or isinstance(mod.padding, str)):
            return None
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and (mod.training or not mod.track_running_stats):
            return None
        owners.append(mod)
    return owners


def _layer_sq_norms(mod: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,) squared norm of the per-sample gradient of ``mod``'s trainable parameters."""
    a, g = a.float(), g.float()
    b = a.shape[0]
    total = torch.zeros(b, device=a.device)
    if isinstance(mod, nn.Linear):
        if a.dim() == 2:
            if mod.weight.requires_grad:
                total += g.pow(2).sum(1) * a.pow(2).sum(1)
        else:
            a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
            if mod.weight.requires_grad:
                total += torch.einsum("bto,bti->boi", g3, a3).pow(2).flatten(1).sum(1)
            g = g3.sum(1)
        if mod.bias is not None and mod.bias.requires_grad:
            total += (g if g.dim() == 2 else g.reshape(b, -1, g.shape[-1]).sum(1)).pow(2).sum(1)
        return total
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if isinstance(mod, nn.Conv1d):
            a4 = a.unsqueeze(2)
            kernel, stride = (1, mod.kernel_size[0]), (1, mod.stride[0])
            padding, dilation = (0, mod.padding[0]), (1, mod.dilation[0])
        else:
            a4, kernel, stride, padding, dilation = a, mod.kernel_size, mod.stride, mod.padding, mod.dilation
        cols = F.unfold(a4, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, Ck, L)
        g3 = g.reshape(b, g.shape[1], -1)  # (B, C_out, L)
        if mod.weight.requires_grad:
            total += torch.einsum("bol,bkl->bok", g3, cols).pow(2).flatten(1).sum(1)
        if mod.bias is not None and mod.bias.requires_grad:
            total += g3.sum(2).pow(2).sum(1)
        return total
    # BatchNorm in eval mode
    shape = (1, -1) + (1,) * (a.dim() - 2)
    x_hat = (a - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)
    reduce_dims = tuple(range(2, a.dim()))
    if mod.weight is not None and mod.weight.requires_grad:
        dw = (g * x_hat).sum(reduce_dims) if reduce_dims else g * x_hat
        total += dw.pow(2).sum(1)
    if mod.bias is not None and mod.bias.requires_grad:
        db = g.sum(reduce_dims) if reduce_dims else g
        total += db.pow(2).sum(1)
    return total


def hook_sq_norms(net, inputs, labels) -> dict[str, torch.Tensor] | None:
    """``{m: (B,)}`` per-sample squared gradient norms of each encoder, or None if unsupported."""
    owners = {}
    for m in net.modalities:
        mods = _owners(net.encoders[m])
        if mods is None:
            return None
        owners[m] = mods
    seen_ids = [id(mod) for mods in owners.values() for mod in mods]
    if len(set(seen_ids)) != len(seen_ids):  # a module shared between encoders
        return None
    records: dict[int, dict] = {}
    handles = []

    def forward_hook(mod, args, output):
        rec = records.setdefault(id(mod), {"calls": 0})
        rec["calls"] += 1
        rec["input"] = args[0].detach()

    def backward_hook(mod, grad_input, grad_output):
        records[id(mod)]["grad"] = grad_output[0].detach()

    try:
        for mods in owners.values():
            for mod in mods:
                handles.append(mod.register_forward_hook(forward_hook))
                handles.append(mod.register_full_backward_hook(backward_hook))
        with torch.enable_grad(), warnings.catch_warnings():
            # the first layer's inputs need no gradient; its output gradient is all we read
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss = F.cross_entropy(net(inputs), labels, reduction="sum")
            params = [p for m in net.modalities for p in net.encoders[m].parameters() if p.requires_grad]
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for m, mods in owners.items():
        total = torch.zeros(labels.shape[0], device=labels.device)
        for mod in mods:
            rec = records.get(id(mod))
            if rec is None:  # module not used in the forward: zero gradient
                continue
            if rec["calls"] != 1 or "grad" not in rec:
                return None
            total = total + _layer_sq_norms(mod, rec["input"], rec["grad"])
        out[m] = total
    return out
