"""P1: Fisher-information trace per modality (InfoReg, CVPR 2025, Sec. 3.2).

This module holds the online monitor used during training (the cheap "batch" form accumulated from
gradients the training step already computed).
"""

from __future__ import annotations

import torch

from ..training.callbacks import Callback, StepContext

__all__ = ["FisherMonitor", "grad_sq_norms"]


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

    It reads gradients right after backward (before any regulator modulates them) and logs
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
    def on_after_backward(self, ctx: StepContext) -> None:
        for m in ctx.model.modalities:
            grads = [p.grad for p in ctx.model.encoders[m].parameters() if p.grad is not None]
            if not grads:
                continue
            s = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
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
