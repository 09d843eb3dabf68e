"""Hook points of a training step, shared by ``md.fit``, plain loops and the Lightning callback.

A step, in order::

    on_train_epoch_start(ctx)                    # once per epoch, before the first batch
      on_train_batch_start(ctx)
      features = model.mask_features(model.encode(inputs), ctx.present)  # absent -> baseline
      features = transform_features(features, ctx)   # e.g. OPM drops features
      logits = model.head(features)                  # + unimodal logits when asked for
      on_after_forward(ctx)                          # add terms to ctx.losses
      backward(ctx) -> bool                          # True: this callback did the backward
                                                     # (and, if owns_optimizer_step, the steps)
      on_after_backward(ctx)                         # e.g. OGM scales encoder gradients
      on_before_optimizer_step(ctx)
      optimizer.step()
      on_train_batch_end(ctx)
    on_train_epoch_end(ctx)                      # e.g. Re-learning re-initialises encoders
    predict(model, features) -> logits | None    # test-time output when not the head (MLA)

A run begins with ``on_fit_start``: a callback that keeps run state (a regulator) forgets the
previous run's state there unless that state was just restored with ``load_state_dict`` (resume).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Callback", "StepContext", "check_composition", "prediction_rule"]


@dataclass
class StepContext:
    """Everything a callback may read (and the few things it may change) at a hook.

    ``model`` is the contract model (unwrapped from DDP); ``losses`` maps names to scalar tensors
    that are summed into ``loss``; ``logs`` collects scalars for the epoch's History record.
    """

    model: Any
    optimizer: Any = None
    epoch: int = 0
    step: int = 0
    batch_index: int = 0
    inputs: dict[str, torch.Tensor] | None = None
    labels: torch.Tensor | None = None
    features: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    unimodal_logits: dict[str, torch.Tensor] | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    loss: torch.Tensor | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    train_loader: Any = None
    val_loader: Any = None
    device: torch.device | None = None
    history: Any = None
    epochs: int | None = None
    ddp_model: Any = None
    #: per-step squared gradient norm of each encoder, ``{m: float}``, published by a callback
    #: that takes its own optimizer steps (the gradients are gone when the monitor reads them)
    encoder_grad_sq: dict[str, float] | None = None
    #: per-sample presence of the batch, ``{m: BoolTensor (B,)}`` (True = present), or None
    present: dict[str, torch.Tensor] | None = None
    #: whether long work inside a hook (UMT's teacher training) may draw a progress bar
    progress: bool = False

    def compute_unimodal_logits(self) -> dict[str, torch.Tensor]:
        """Unimodal logits ``{m: head(features, present=(m,))}`` (computed once per step)."""
        if self.unimodal_logits is None:
            self.unimodal_logits = self.model.unimodal_logits(self.features)
        return self.unimodal_logits

    def log(self, key: str, value: Any) -> None:
        """Record a value in this epoch's History record (last write per epoch wins)."""
        self.logs[key] = value


class Callback:
    """Base class of everything that plugs into a training step (regulators, monitors).

    Override only the hooks you need. Keep all run state in :meth:`state_dict` so that a resumed
    run continues exactly.
    """

    #: set True when the callback needs unimodal logits at every step
    needs_unimodal_logits: bool = False
    #: class names of callbacks this one cannot be combined with (checked by ``check_composition``)
    conflicts: tuple[str, ...] = ()
    #: True when two instances of the class in one run would fight over the same state
    single_instance: bool = False
    #: True when :meth:`backward` also takes the optimizer step(s) itself (MLA: one step per
    #: modality; ReconBoost: phase-dependent parameter sets). Such a callback must leave every
    #: ``.grad`` as None (``optimizer.zero_grad(set_to_none=True)``) so that the caller's
    #: ``optimizer.step()`` (``md.fit``, a plain loop) changes nothing. It publishes each
    #: encoder's squared gradient norm of the step in ``ctx.encoder_grad_sq`` for the Fisher monitor.
    owns_optimizer_step: bool = False

    def on_fit_start(self, ctx: StepContext) -> None: ...

    def on_train_epoch_start(self, ctx: StepContext) -> None: ...

    def on_train_batch_start(self, ctx: StepContext) -> None: ...

    def transform_features(self, features: dict[str, torch.Tensor], ctx: StepContext):
        return features

    def on_after_forward(self, ctx: StepContext) -> None: ...

    def backward(self, ctx: StepContext) -> bool:
        """Run the backward pass yourself and return True, or return False (default)."""
        return False

    def on_after_backward(self, ctx: StepContext) -> None: ...

    def on_before_optimizer_step(self, ctx: StepContext) -> None: ...

    def on_train_batch_end(self, ctx: StepContext) -> None: ...

    def on_train_epoch_end(self, ctx: StepContext) -> None: ...

    def on_validation_end(self, ctx: StepContext, metrics: dict) -> None: ...

    def on_fit_end(self, ctx: StepContext) -> None: ...

    def predict(self, model, features: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Test-time logits ``(B, C)`` from the encoders' features ``{m: (B, d_m)}``, or None
        (default) for the model's head ``model.head(features)``.

        Methods whose prediction is not the fused head (MLA's uncertainty-weighted fusion,
        ReconBoost's ensemble, UME's unimodal ensemble) override it; ``md.fit`` validates with
        it and ``md.probes.evaluate(..., predict=regulator.predict)`` reports with it."""
        return None

    def train_loader(self, ctx: StepContext):
        """Return a loader to use for this epoch instead of the given one, or None."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}.")

    @property
    def name(self) -> str:
        return type(self).__name__


def check_composition(callbacks: Sequence[Callback]) -> None:
    """Refuse combinations of callbacks that cannot work together, with a clear message.

    Refused: two instances of a ``single_instance`` class (every regulator), a callback together
    with one named in its ``conflicts``, more than one callback that runs its own backward pass,
    a callback that takes its own optimizer steps together with one that reads or edits gradients
    after backward, more than one test-time ``predict``, and more than one callback that replaces
    the training loader.
    """
    names = [cb.name for cb in callbacks]
    for cb in callbacks:
        if cb.single_instance and names.count(cb.name) > 1:
            raise ValueError(f"two {cb.name} regulators given; use one (each keeps run state).")
    for cb in callbacks:
        clash = [n for n in names if n in cb.conflicts]
        if clash:
            raise ValueError(
                f"{cb.name} cannot be combined with {clash}: both rewrite the encoders' "
                "gradients by different rules. Use one of them.")
    owners = [cb.name for cb in callbacks if type(cb).backward is not Callback.backward]
    if len(owners) > 1:
        raise ValueError(f"{owners} each run their own backward pass; they cannot be combined.")
    steppers = [cb for cb in callbacks if cb.owns_optimizer_step]
    for cb in steppers:
        editors = [o.name for o in callbacks if o is not cb and (
            type(o).on_after_backward is not Callback.on_after_backward
            or type(o).on_before_optimizer_step is not Callback.on_before_optimizer_step)]
        if editors:
            raise ValueError(
                f"{cb.name} takes its own optimizer steps inside backward, so the gradients that "
                f"{editors} read or edit after backward no longer exist; use {cb.name} alone.")
    predictors = [cb.name for cb in callbacks if type(cb).predict is not Callback.predict]
    if len(predictors) > 1:
        raise ValueError(f"{predictors} each define their own test-time prediction; use only one.")
    loaders = [cb.name for cb in callbacks if type(cb).train_loader is not Callback.train_loader]
    if len(loaders) > 1:
        raise ValueError(f"{loaders} each replace the training loader; use only one of them.")


def prediction_rule(callbacks, model):
    """``predict(features) -> logits (B, C)`` of the callback (one, a list, or None) that defines
    its own test-time rule (MLA, ReconBoost, UME), bound to ``model`` and falling back to the
    model's head where the rule returns None; None when no callback defines one."""
    items = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    owner = next((cb for cb in items if cb is not None
                  and type(cb).predict is not Callback.predict), None)
    if owner is None:
        return None

    def predict(features):
        out = owner.predict(model, features)
        return model.head(features) if out is None else out

    return predict
