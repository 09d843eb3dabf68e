"""The base class of every intervention, and what all of them share.

A regulator is a :class:`~modaldiag.training.Callback` with a few helpers:

- ``record(key, {m: value})`` accumulates per-step coefficients; their epoch means land in the
  History record under ``regulator.<key>.<m>`` (so every applied coefficient is logged);
- ``all_reduce_sum(t)`` sums a statistic over DDP ranks (a no-op without a process group), so
  every rank derives the same coefficient from the same numbers;
- ``conflicts``: names of regulators it cannot be combined with (checked by ``fit``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from ..training.callbacks import Callback
from ..utils.distributed import all_reduce_sum

__all__ = ["Regulator", "all_reduce_sum", "check_composition", "encoder_parameters",
           "squared_norm", "true_class_prob_sums"]


@torch.no_grad()
def true_class_prob_sums(unimodal_logits, labels: torch.Tensor, modalities) -> torch.Tensor:
    """``(M,)``: per modality, the batch sum of the softmax probability of the true class."""
    return torch.stack([F.softmax(unimodal_logits[m].detach().float(), 1)
                        .gather(1, labels[:, None]).sum() for m in modalities])


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """``sum_i ||t_i||^2`` in one fused call (None for an empty list)."""
    if not tensors:
        return None
    return torch.stack(torch._foreach_norm(tensors)).float().pow(2).sum()


def encoder_parameters(model, modality: str) -> list[torch.nn.Parameter]:
    """Trainable parameters of ``model.encoders[modality]`` (module identity)."""
    return [p for p in model.encoders[modality].parameters() if p.requires_grad]


class Regulator(Callback):
    """Base class of InfoReg, Relearning, OGM, OPM, MMPareto and ValuationResampling."""

    #: class names this regulator cannot be combined with
    conflicts: tuple[str, ...] = ()

    def __init__(self):
        self._sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._counts: dict[str, int] = defaultdict(int)
        self._last: dict[str, object] = {}
        self._groups_key = None
        self._groups: dict[str, list[torch.nn.Parameter]] = {}

    def groups(self, model) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters per modality (module identity) plus ``"__head__"``; cached per
        model (rebuilt if the model or its parameter count changes)."""
        key = (id(model), sum(1 for _ in model.parameters()))
        if key != self._groups_key:
            groups = {m: encoder_parameters(model, m) for m in model.modalities}
            enc_ids = {id(p) for ps in groups.values() for p in ps}
            groups["__head__"] = [p for p in model.parameters()
                                  if p.requires_grad and id(p) not in enc_ids]
            self._groups, self._groups_key = groups, key
        return self._groups

    # ---------------------------------------------------------------- logging
    def record(self, key: str, values: dict[str, float]) -> None:
        """Accumulate per-step values; ``collect_logs`` returns their epoch means."""
        for m, v in values.items():
            self._sums[key][m] += float(v)
        self._counts[key] += 1

    def record_epoch(self, key: str, value) -> None:
        """Record one value for the whole epoch (e.g. the window state)."""
        self._last[key] = value

    def collect_logs(self) -> dict:
        """Epoch means of recorded values plus per-epoch values; resets the accumulators."""
        out: dict = {k: {m: s / self._counts[k] for m, s in sums.items()}
                     for k, sums in self._sums.items()}
        out.update(self._last)
        self._sums = defaultdict(lambda: defaultdict(float))
        self._counts = defaultdict(int)
        self._last = {}
        return out

    all_reduce_sum = staticmethod(all_reduce_sum)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({params})"

    def config(self) -> dict:
        """Constructor arguments (for the run's configuration record)."""
        return {}


def check_composition(callbacks) -> None:
    """Refuse combinations of regulators that cannot work together, with a clear message."""
    regs = [cb for cb in callbacks if isinstance(cb, Regulator)]
    names = [type(r).__name__ for r in regs]
    for name in set(names):
        if names.count(name) > 1:
            raise ValueError(f"two {name} regulators given; use one (each keeps run state).")
    for r in regs:
        clash = [n for n in names if n in r.conflicts]
        if clash:
            raise ValueError(
                f"{type(r).__name__} cannot be combined with {clash}: both rewrite the encoders' "
                "gradients by different rules. Use one of them."
            )
    loaders = [type(cb).__name__ for cb in callbacks if type(cb).train_loader is not Callback.train_loader]
    if len(loaders) > 1:
        raise ValueError(f"{loaders} each replace the training loader; use only one of them.")
