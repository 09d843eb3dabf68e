"""Small torch helpers: seeding, devices, unwrapping DDP."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["all_finite", "seed_everything", "to_device", "module_device", "unwrap", "resolve_device",
           "rng_state", "set_rng_state", "preserved_state"]


def all_finite(tensors) -> bool:
    """True when every floating (or complex) tensor in ``tensors`` holds only finite values, in
    one host sync per device.

    A finite sum proves every summand finite (a NaN or inf entry makes the sum NaN or inf), so one
    reduction per tensor and one sync per device decide the common case; only when a sum is not
    finite (a bad value, or a float overflow of the sum itself) is each tensor checked
    element-wise. Integer and empty tensors are not checked."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            by_device.setdefault(t.device, []).append(t.detach())
    with torch.no_grad():
        for floats in by_device.values():
            common = torch.complex64 if any(t.is_complex() for t in floats) else torch.float32
            total = torch.stack([t.sum().to(common) for t in floats]).sum()
            if bool(torch.isfinite(total)):
                continue
            if not all(bool(torch.isfinite(t).all()) for t in floats):
                return False
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    if device is None:
        if model is not None:
            for p in model.parameters():
                if p.device.type != "cpu":
                    return p.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'.")
    return device


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {m: x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
            for m, x in inputs.items()}


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def unwrap(model: nn.Module) -> nn.Module:
    """The contract model inside a DDP / DataParallel wrapper (or the model itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def rng_state() -> dict:
    """Every RNG state a training run depends on, in a form ``torch.load(weights_only=True)`` reads."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class preserved_state:
    """Context manager: whatever happens inside, the model and the global RNGs end as found.

    Restores, on exit (also after an exception): every submodule's ``training`` flag, every
    parameter's ``requires_grad`` and ``.grad`` (the same tensor object), every buffer's values
    (e.g. BatchNorm running statistics, ``num_batches_tracked``), and the python / numpy / torch
    (and CUDA) global RNG states. Probes run inside it, so a probe never changes the user's model
    or the random stream their training continues with.

    ``restore_values=True`` also restores parameter *values* (for code that edits weights
    temporarily); by default parameters are only checked-free (probes never write them).
    """

    def __init__(self, model: nn.Module | None, *, restore_values: bool = False):
        self.model, self.restore_values = model, restore_values

    def __enter__(self):
        self._rng = rng_state()
        model = self.model
        if model is not None:
            self._modes = [(mod, mod.training) for mod in model.modules()]
            self._params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
            self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
            self._values = ([(p, p.detach().clone()) for p in model.parameters()]
                            if self.restore_values else [])
        return model

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.model is not None:
            with torch.no_grad():
                for mod, training in self._modes:
                    mod.training = training
                for p, requires_grad, grad in self._params:
                    p.requires_grad_(requires_grad)
                    p.grad = grad
                for b, saved in self._buffers:
                    if b.shape == saved.shape:
                        b.copy_(saved)
                for p, saved in self._values:
                    p.copy_(saved)
        set_rng_state(self._rng)
        return False
