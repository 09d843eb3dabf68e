"""The online Fisher-trace monitor: a training callback (P1, "batch" form, per epoch)."""

from __future__ import annotations

import torch

from ..probes.fisher import encoder_grad_sq_norms
from .callbacks import Callback, StepContext

__all__ = ["FisherMonitor"]


class FisherMonitor(Callback):
    """Online Fisher trace ("batch" form): per epoch, the sum over optimizer steps of the squared
    mini-batch gradient norm of each encoder, divided by the number of steps.

    It reads the gradients once per optimizer step, before any regulator modulates them (it runs
    first), after AMP unscaling and gradient accumulation, and logs ``fisher.<m>`` per epoch. A
    parameter shared by two encoders counts for both; head parameters never count. With a regulator
    that takes its own optimizer steps (MLA), it reads the norms that regulator published in
    ``ctx.encoder_grad_sq`` (each encoder's gradient of its own step). It
    underestimates the per-sample trace by about the gradient-noise term; use
    :func:`modaldiag.fisher_trace` with ``per_sample=True`` for the exact form.

    Attributes
    ----------
    traces : dict[str, list[float]]
        One value per finished epoch and modality.
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
        published = ctx.encoder_grad_sq  # a regulator that stepped itself (MLA) measured them
        norms = published if published is not None else encoder_grad_sq_norms(ctx.model)
        for m, s in norms.items():
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
