"""torch.distributed helpers: every one is a no-op without an initialised process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "is_main_process", "all_reduce_sum",
           "all_gather_cat", "barrier", "broadcast_object"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op in a single process); returns it."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (N_r, ...) from every rank along dim 0, in rank order (sizes may differ)."""
    if not is_distributed():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:s] for c, s in zip(chunks, sizes, strict=True)])


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
