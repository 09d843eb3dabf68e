"""Small torch helpers: seeding, devices, unwrapping DDP."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["seed_everything", "to_device", "module_device", "unwrap", "resolve_device",
           "rng_state", "set_rng_state"]


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
