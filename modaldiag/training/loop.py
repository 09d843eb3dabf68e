"""``Regulation``: the training step with regulator hooks, for ``md.fit`` and for plain loops.

A plain PyTorch loop needs four added lines::

    run = md.Regulation(model, optimizer, md.InfoReg())
    for epoch in range(epochs):
        loader = run.epoch_start(epoch, train_loader)   # the loader to use (re-sampling may change it)
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = run.backward(inputs, labels)          # forward, regulator terms, backward, modulation
            optimizer.step()
        run.epoch_end()                                  # epoch-level actions; returns the logs

``md.fit`` is this loop plus validation, checkpoints and a History.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..utils.torch_utils import resolve_device, to_device, unwrap
from ..utils.validation import (
    check_choice,
    check_finite,
    check_inputs,
    check_labels,
    check_positive_int,
)
from .callbacks import Callback, StepContext

__all__ = ["Regulation", "as_callbacks"]


def as_callbacks(regulator, callbacks=()) -> list[Callback]:
    """Flatten ``regulator`` (one, a list, or None) and ``callbacks``; check they can combine."""
    if regulator is None:
        items = []
    elif isinstance(regulator, (list, tuple)):
        items = list(regulator)
    else:
        items = [regulator]
    items.extend(callbacks or ())
    for cb in items:
        if not isinstance(cb, Callback):
            raise TypeError(f"regulators and callbacks must be modaldiag Callbacks; got {type(cb).__name__}.")
    owners = [cb.name for cb in items if type(cb).backward is not Callback.backward]
    if len(owners) > 1:
        raise ValueError(f"{owners} each run their own backward pass; they cannot be combined.")
    from ..regulators.base import check_composition

    check_composition(items)
    return items


def _diagnose_nonfinite(ctx: StepContext, where: str) -> str:
    for m, x in (ctx.inputs or {}).items():
        if x.is_floating_point() and not torch.isfinite(x).all():
            return f"{where}: input of modality {m!r} contains NaN/inf"
    for m, f in (ctx.features or {}).items():
        if not torch.isfinite(f).all():
            return f"{where}: features of modality {m!r} contain NaN/inf"
    bad = [k for k, v in ctx.losses.items() if not torch.isfinite(v).all()]
    return f"{where}: loss term(s) {bad or ['total']}"


class Regulation:
    """Drive regulators (and monitors) through a training step.

    Parameters
    ----------
    model : MultimodalModel (or DDP-wrapped)
    optimizer : torch.optim.Optimizer
    regulator : Callback or list of Callbacks, optional
    monitor : bool, default False
        Also record the online Fisher trace per modality (``FisherMonitor``).
    unimodal_loss_weight : float, default 0
        Adds ``w * CE(head(present=(m,)), y)`` per modality.
    accumulate_grad_batches : int, default 1
        Number of ``backward`` calls per optimizer step; gradient modulation
        (``on_before_optimizer_step``) runs once per step, on the accumulated gradients.
    on_nonfinite : {"raise", "skip"}, default "raise"
        A NaN/inf loss raises a ValueError naming the batch and modality, or (``skip``) the
        batch's backward is skipped and ``backward`` returns None.
    amp : bool, default False
        Run the forward under ``torch.autocast`` (float16 on CUDA, bfloat16 on CPU).
    scaler : torch.amp.GradScaler, optional
        With float16: ``backward`` scales the loss and the gradients are unscaled before any
        ``on_before_optimizer_step`` hook, so regulators always see real gradients. Then call
        ``scaler.step(optimizer); scaler.update()`` instead of ``optimizer.step()``.
    """

    def __init__(self, model, optimizer, regulator=None, *, monitor: bool = False,
                 unimodal_loss_weight: float = 0.0, accumulate_grad_batches: int = 1,
                 on_nonfinite: str = "raise", device=None, callbacks: Sequence[Callback] = (),
                 amp: bool = False, scaler=None):
        from ..models.contract import MultimodalModel
        from ..probes.fisher import FisherMonitor

        net = unwrap(model)
        if not isinstance(net, MultimodalModel):
            raise TypeError(
                f"expected a modaldiag model (md.MultimodalClassifier or md.wrap(...)); got "
                f"{type(net).__name__}. Wrap your model: md.wrap(model, encoders=..., head=...).")
        if net.num_classes is None:
            raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
        check_choice(on_nonfinite, ("raise", "skip"), "on_nonfinite")
        self.accumulate = check_positive_int(accumulate_grad_batches, "accumulate_grad_batches")
        self.callbacks: list[Callback] = ([FisherMonitor()] if monitor else []) + as_callbacks(regulator, callbacks)
        self.unimodal_loss_weight = float(unimodal_loss_weight)
        self.on_nonfinite = on_nonfinite
        self.ctx = StepContext(model=net, optimizer=optimizer, device=resolve_device(device, net),
                               ddp_model=model if model is not net else None)
        self._backward_owner = next((cb for cb in self.callbacks
                                     if type(cb).backward is not Callback.backward), None)
        self._need_uni = self.unimodal_loss_weight > 0 or any(cb.needs_unimodal_logits
                                                              for cb in self.callbacks)
        self._started = False
        self._micro = 0
        self.epoch_stats: dict = {}
        self.amp, self.scaler = bool(amp), scaler

    @property
    def model(self):
        return self.ctx.model

    def start(self, train_loader=None, val_loader=None, epochs: int | None = None) -> None:
        """Run ``on_fit_start`` (called automatically by the first ``epoch_start``)."""
        self.ctx.train_loader = train_loader if train_loader is not None else self.ctx.train_loader
        self.ctx.val_loader = val_loader if val_loader is not None else self.ctx.val_loader
        self.ctx.epochs = epochs if epochs is not None else self.ctx.epochs
        for cb in self.callbacks:
            cb.on_fit_start(self.ctx)
        self._started = True

    def epoch_start(self, epoch: int | None = None, train_loader: Iterable | None = None) -> Iterable:
        """Start an epoch; returns the loader to iterate (a regulator may replace it)."""
        ctx = self.ctx
        if train_loader is not None:
            ctx.train_loader = train_loader
        if not self._started:
            self.start()
        ctx.epoch = ctx.epoch + 1 if epoch is None and self._epoch_begun else (epoch or 0)
        self._epoch_begun = True
        ctx.logs = {}
        self.epoch_stats = {"loss": 0.0, "correct": 0, "n": 0, "skipped": 0, "classes": set()}
        for cb in self.callbacks:
            cb.on_train_epoch_start(ctx)
        replaced = next((ld for cb in self.callbacks if (ld := cb.train_loader(ctx)) is not None), None)
        return replaced if replaced is not None else ctx.train_loader

    _epoch_begun = False

    def forward_loss(self, inputs, labels) -> torch.Tensor | None:
        """Forward pass with every regulator term; returns the total loss (not yet backpropagated).

        Returns None when the loss is non-finite and ``on_nonfinite="skip"``. Frameworks that run
        the backward themselves (Lightning) use this; plain loops call :meth:`backward`.
        """
        ctx = self.ctx
        model = ctx.model
        size = check_inputs(inputs, model.modalities, batch_index=ctx.batch_index)
        labels = check_labels(labels, model.num_classes, batch_size=size, batch_index=ctx.batch_index)
        ctx.inputs, ctx.labels = to_device(inputs, ctx.device), labels.to(ctx.device)
        ctx.unimodal_logits, ctx.losses, ctx.loss = None, {}, None
        for cb in self.callbacks:
            cb.on_train_batch_start(ctx)
        dev_type = ctx.device.type if ctx.device is not None else "cpu"
        autocast = (torch.autocast(dev_type, dtype=torch.float16 if dev_type == "cuda" else torch.bfloat16)
                    if self.amp else contextlib.nullcontext())
        with autocast:
            self._run_forward(model)
        if self._need_uni:
            uni = ctx.unimodal_logits
            if self.unimodal_loss_weight > 0:
                for m, lg in uni.items():
                    ctx.losses[f"unimodal/{m}"] = self.unimodal_loss_weight * F.cross_entropy(lg, ctx.labels)
        for cb in self.callbacks:
            cb.on_after_forward(ctx)
        ctx.loss = sum(ctx.losses.values())
        stats = self.epoch_stats
        if not torch.isfinite(ctx.loss):
            where = _diagnose_nonfinite(ctx, f"epoch {ctx.epoch}, batch {ctx.batch_index}")
            if self.on_nonfinite == "raise":
                check_finite(ctx.loss, f"the training loss ({where})")
            warnings.warn(f"skipping a batch with a non-finite loss ({where}).", stacklevel=3)
            if ctx.optimizer is not None:
                ctx.optimizer.zero_grad(set_to_none=True)
            stats["skipped"] = stats.get("skipped", 0) + 1
            ctx.batch_index += 1
            return None
        if stats:
            stats["loss"] += float(ctx.losses["multimodal"].detach()) * size
            stats["correct"] += int((ctx.logits.detach().argmax(1) == ctx.labels).sum())
            stats["n"] += size
            if len(stats["classes"]) < 2:  # only the single-class check needs it
                stats["classes"].update(ctx.labels.unique().tolist())
        ctx.batch_index += 1
        return ctx.loss

    def _run_forward(self, model) -> None:
        ctx = self.ctx
        if ctx.ddp_model is not None:
            # through DDP.forward, so DDP arms its gradient all-reduce for this backward; a
            # callback that runs its own backward (MMPareto) averages its gradients itself
            sync = (contextlib.nullcontext() if self._backward_owner is None
                    else ctx.ddp_model.no_sync())
            with sync:
                ctx.ddp_model(ctx.inputs, step=self._forward)
        else:
            self._forward(model, ctx.inputs)

    def _forward(self, model, inputs) -> torch.Tensor:
        """Encode, transform features, head (+ unimodal logits); fills ``ctx``."""
        ctx = self.ctx
        features = model.encode(inputs)
        for cb in self.callbacks:
            features = cb.transform_features(features, ctx)
        ctx.features = features
        ctx.logits = model.head(features)
        ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, ctx.labels)
        if self._need_uni:
            ctx.compute_unimodal_logits()
        return ctx.logits

    def after_backward(self) -> None:
        """Hooks after the gradients exist; modulation runs once per optimizer step."""
        for cb in self.callbacks:
            cb.on_after_backward(self.ctx)
        self._micro += 1
        if self._micro % self.accumulate == 0:
            self.before_optimizer_step()

    def before_optimizer_step(self) -> None:
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.unscale_(self.ctx.optimizer)  # regulators act on real gradients
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self.ctx)

    def backward(self, inputs, labels) -> torch.Tensor | None:
        """Forward, regulator terms, backward and gradient modulation for one batch.

        Returns the detached total loss (None if the batch was skipped as non-finite). Call
        ``optimizer.step()`` afterwards.
        """
        loss = self.forward_loss(inputs, labels)
        if loss is None:
            return None
        if self._backward_owner is None or not self._backward_owner.backward(self.ctx):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.after_backward()
        return loss.detach()

    def batch_end(self) -> None:
        """After ``optimizer.step()`` (optional in plain loops; ``fit`` calls it)."""
        for cb in self.callbacks:
            cb.on_train_batch_end(self.ctx)
        self.ctx.step += 1

    def epoch_end(self) -> dict:
        """Epoch-level actions (re-initialisation, traces); returns this epoch's logs."""
        ctx = self.ctx
        for cb in self.callbacks:
            cb.on_train_epoch_end(ctx)
        per_regulator = {cb.name: cb.collect_logs() for cb in self.callbacks
                         if hasattr(cb, "collect_logs")}
        per_regulator = {name: logs for name, logs in per_regulator.items() if logs}
        if len(per_regulator) == 1:  # one regulator: regulator.<key>.<modality>
            ctx.log("regulator", next(iter(per_regulator.values())))
        elif per_regulator:  # several: regulator.<Name>.<key>.<modality>, no key collisions
            ctx.log("regulator", per_regulator)
        ctx.batch_index = 0
        return dict(ctx.logs)

    def end(self) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(self.ctx)

    def state_dict(self) -> dict:
        """State of every callback (keyed by position and class) and the step counters."""
        return {"callbacks": {f"{i}:{cb.name}": cb.state_dict() for i, cb in enumerate(self.callbacks)},
                "step": self.ctx.step, "epoch": self.ctx.epoch, "micro": self._micro}

    def load_state_dict(self, state: dict) -> None:
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{cb.name}"
            if key not in state["callbacks"]:
                raise ValueError(f"the saved state has no entry for {key}; saved: {sorted(state['callbacks'])}.")
            cb.load_state_dict(state["callbacks"][key])
        self.ctx.step, self.ctx.epoch, self._micro = state["step"], state["epoch"], state["micro"]
