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

A loader with missing modalities yields ``(inputs, labels, present)``: pass the mask on,
``run.backward(inputs, labels, present)`` (absent entries become the model's baseline).

``run.batch_end()`` after ``optimizer.step()`` is optional: the step counter (which seeds
OGM-GE's noise and OPM's drop masks with ``(seed, step)``) advances by itself at the next
``backward`` after an optimizer step, so a loop written as above draws new noise at every step and
trains exactly as ``md.fit``. ``backward`` before the first ``epoch_start`` (or after
``epoch_end`` without a new ``epoch_start``) raises :class:`CallOrderError`.

``md.fit`` is this loop plus validation, checkpoints and a History.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.contract import MultimodalModel
from ..utils.torch_utils import resolve_device, to_device, unwrap
from ..utils.validation import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE_INT,
    InstanceOf,
    Options,
    Satisfies,
    check_finite,
    check_inputs,
    check_labels,
    check_presence,
    unpack_batch,
    validate_params,
)
from .callbacks import Callback, StepContext, check_composition, prediction_rule
from .monitor import FisherMonitor

__all__ = ["Regulation", "as_callbacks", "CallOrderError", "check_optimizer"]


class CallOrderError(RuntimeError, ValueError):
    """A :class:`Regulation` method was called out of order (e.g. ``backward`` before
    ``epoch_start``). The message says which call is missing."""


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
    check_composition(items)
    return items


def check_optimizer(model: MultimodalModel, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that would not train the model's encoders.

    Raises a ValueError when none of the model's trainable parameters is in the optimizer (an
    optimizer built over another model trains nothing), or when every trainable parameter of an
    encoder is missing from it; warns when only some are missing (the head included). Parameters
    with ``requires_grad=False`` (frozen) are never expected in the optimizer.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        return
    covered = sum(id(p) in held for p in trainable)
    if covered == 0:
        raise ValueError(
            f"the optimizer holds {len(held)} parameter tensors, none of which belong to the model: "
            f"it covers 0 of the model's {len(trainable)} trainable parameter tensors, so training "
            "would change nothing. Build it from this model, e.g. "
            "torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9).")
    partial = []
    for m in model.modalities:
        params = [p for p in model.encoders[m].parameters() if p.requires_grad]
        missing = sum(id(p) not in held for p in params)
        if params and missing == len(params):
            raise ValueError(
                f"the optimizer covers none of the {len(params)} trainable parameter tensors of "
                f"encoder {m!r} ({covered} of the model's {len(trainable)} covered): that encoder "
                "would not train while regulators act on it. Add its parameters to the optimizer, "
                f"or freeze it explicitly with model.encoders[{m!r}].requires_grad_(False).")
        if missing:
            partial.append(f"encoder {m!r}: {missing} of {len(params)}")
    enc_ids = {id(p) for m in model.modalities for p in model.encoders[m].parameters()}
    head = [p for p in trainable if id(p) not in enc_ids]
    head_missing = sum(id(p) not in held for p in head)
    if head_missing:
        partial.append(f"head: {head_missing} of {len(head)}")
    if partial:
        warnings.warn(
            f"the optimizer misses some trainable parameter tensors ({'; '.join(partial)}); they "
            "will not train. Add them to the optimizer, or set requires_grad=False on frozen ones.",
            UserWarning, stacklevel=3)


def _check_data_parallel(model, callbacks: Sequence[Callback]) -> None:
    if not isinstance(model, nn.DataParallel):
        return
    owners = [cb.name for cb in callbacks if type(cb).backward is not Callback.backward]
    if owners:
        raise ValueError(
            f"{owners[0]} cannot train a model wrapped in nn.DataParallel: it runs its own gradient "
            "passes, which DataParallel's per-step replicas do not support. Use "
            "DistributedDataParallel (launch with torchrun; md.fit wraps the model itself), or pass "
            "the unwrapped model (model.module) to train on one device.")
    if len(model.device_ids or []) > 1:
        raise ValueError(
            f"nn.DataParallel over {len(model.device_ids)} devices is not supported: its replicas "
            "would each see only part of the batch while regulators read the whole step. Use "
            "DistributedDataParallel (launch with torchrun; md.fit wraps the model itself), or pass "
            "the unwrapped model (model.module).")


def _diagnose_nonfinite(ctx: StepContext, where: str) -> str:
    """Name what made the loss non-finite: an input, an encoder (with its parameters' state),
    the head, or a loss term."""
    for m, x in (ctx.inputs or {}).items():
        if x.is_floating_point() and not torch.isfinite(x).all():
            return f"{where}: the input of modality {m!r} contains NaN/inf"
    for m, f in (ctx.features or {}).items():
        if not torch.isfinite(f).all():
            encoder = ctx.model.encoders[m]
            bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in encoder.parameters())
            cause = (f"{bad} of its parameter values are NaN/inf (the weights diverged)" if bad else
                     "its parameters are finite, so its computation overflows (check its "
                     "normalisation and activations)")
            return (f"{where}: encoder {m!r} ({type(encoder).__name__}) produced NaN/inf features "
                    f"from finite inputs; {cause}")
    if ctx.logits is not None and not torch.isfinite(ctx.logits).all():
        return f"{where}: the head produced NaN/inf logits from finite features"
    bad = [k for k, v in ctx.losses.items() if not torch.isfinite(v).all()]
    return f"{where}: loss term(s) {bad or ['total']}"


class Regulation:
    """Drive regulators (and monitors) through a training step.

    Parameters
    ----------
    model : MultimodalModel (or DDP-wrapped)
        ``nn.DataParallel`` is refused with a regulator that runs its own backward (MMPareto) and
        over several devices: use DistributedDataParallel or the unwrapped model.
    optimizer : torch.optim.Optimizer
        Must hold the model's trainable parameters (see :func:`check_optimizer`): an optimizer
        over another model's parameters, or one missing a whole encoder, is refused.
    regulator : Callback or list of Callbacks, optional
        A regulator object may be reused: each new ``Regulation`` starts it afresh (its run state
        is reset at the first ``epoch_start``), unless :meth:`load_state_dict` restored it.
    monitor : bool, default False
        Also record the online Fisher trace per modality (``FisherMonitor``).
    unimodal_loss_weight : float >= 0, default 0
        Adds ``w * CE(head(present=(m,)), y)`` per modality.
    accumulate_grad_batches : int >= 1, default 1
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

    _parameter_constraints = {
        "optimizer": [InstanceOf(torch.optim.Optimizer,
                                 what="a torch.optim.Optimizer over the model's parameters")],
        "monitor": [BOOL],
        "unimodal_loss_weight": [NON_NEGATIVE],
        "accumulate_grad_batches": [POSITIVE_INT],
        "on_nonfinite": [Options("raise", "skip")],
        "amp": [BOOL],
        "scaler": [None, Satisfies(lambda s: hasattr(s, "scale") and hasattr(s, "unscale_"),
                                   "a torch.amp.GradScaler")],
    }

    def __init__(self, model, optimizer, regulator=None, *, monitor: bool = False,
                 unimodal_loss_weight: float = 0.0, accumulate_grad_batches: int = 1,
                 on_nonfinite: str = "raise", device=None, callbacks: Sequence[Callback] = (),
                 amp: bool = False, scaler=None):
        net = unwrap(model)
        if not isinstance(net, MultimodalModel):
            raise TypeError(
                f"expected a modaldiag model (md.MultimodalClassifier or md.wrap(...)); got "
                f"{type(net).__name__}. Wrap your model: md.wrap(model, encoders=..., head=...).")
        if net.num_classes is None:
            raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
        validate_params(self._parameter_constraints, {
            "optimizer": optimizer, "monitor": monitor, "unimodal_loss_weight": unimodal_loss_weight,
            "accumulate_grad_batches": accumulate_grad_batches, "on_nonfinite": on_nonfinite,
            "amp": amp, "scaler": scaler}, "Regulation")
        self.accumulate = accumulate_grad_batches
        self.callbacks: list[Callback] = ([FisherMonitor()] if monitor else []) + as_callbacks(regulator, callbacks)
        _check_data_parallel(model, self.callbacks)
        check_optimizer(net, optimizer)
        self.unimodal_loss_weight = float(unimodal_loss_weight)
        self.on_nonfinite = on_nonfinite
        self.ctx = StepContext(model=net, optimizer=optimizer, device=resolve_device(device, net),
                               ddp_model=model if model is not net else None)
        self._backward_owner = next((cb for cb in self.callbacks
                                     if type(cb).backward is not Callback.backward), None)
        self._need_uni = self.unimodal_loss_weight > 0 or any(cb.needs_unimodal_logits
                                                              for cb in self.callbacks)
        if scaler is not None and self._backward_owner is not None:
            raise ValueError(
                f"{self._backward_owner.name} runs its own backward pass, which a float16 "
                "GradScaler cannot scale (its gradients would be unscaled twice). Train it in "
                "float32, or with bfloat16 autocast (amp=True on the CPU), which needs no scaler.")
        stepper = next((cb for cb in self.callbacks if cb.owns_optimizer_step), None)
        if stepper is not None and (amp or scaler is not None or accumulate_grad_batches > 1):
            raise ValueError(
                f"{stepper.name} takes its own optimizer steps inside backward (one per modality or "
                "phase), which gradient accumulation and mixed precision (amp/scaler) would have to "
                "wrap; train it with accumulate_grad_batches=1 and amp=False.")
        self._started = False
        self._in_epoch = False
        self._step_pending = False
        self._micro = 0
        self.epoch_stats: dict = {}
        self.amp, self.scaler = bool(amp), scaler

    @property
    def model(self):
        return self.ctx.model

    @property
    def owns_optimizer_step(self) -> bool:
        """True when a callback takes the optimizer steps inside :meth:`backward` (the caller's
        ``optimizer.step()`` is then a no-op: every ``.grad`` is left None)."""
        return any(cb.owns_optimizer_step for cb in self.callbacks)

    @property
    def predictor(self):
        """``predict(features) -> logits`` for evaluation when a regulator defines its own test-time
        rule, else None (the model's head)."""
        return prediction_rule(self.callbacks, self.ctx.model)

    def start(self, train_loader=None, val_loader=None, epochs: int | None = None) -> None:
        """Run ``on_fit_start`` (called automatically by the first ``epoch_start``): every
        regulator starts a fresh run here, unless :meth:`load_state_dict` restored its state."""
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
        self._in_epoch = True
        ctx.logs = {}
        self.epoch_stats = {"loss": 0.0, "correct": 0, "n": 0, "skipped": 0, "classes": set(),
                            "batch_losses": [], "batch_sizes": [], "batch_correct": []}
        for cb in self.callbacks:
            cb.on_train_epoch_start(ctx)
        replaced = next((ld for cb in self.callbacks if (ld := cb.train_loader(ctx)) is not None), None)
        return replaced if replaced is not None else ctx.train_loader

    _epoch_begun = False

    def forward_loss(self, inputs, labels, present=None) -> torch.Tensor | None:
        """Forward pass with every regulator term; returns the total loss (not yet backpropagated).

        ``present`` (optional): the batch's per-sample presence mask ``{m: BoolTensor (B,)}``
        (True = present; see :func:`~modaldiag.utils.validation.unpack_batch_present`). The
        features of absent samples are replaced by the model's baseline right after encoding
        (:meth:`~modaldiag.models.contract.MultimodalModel.mask_features`), before any
        ``transform_features`` hook: the head, the unimodal logits and every regulator see the
        baseline, and the encoder of an absent modality gets no gradient from that sample. The
        encoder still runs on the placeholder input the dataset holds (its output is discarded,
        but a BatchNorm in training mode counts it in its batch statistics). ``ctx.present``
        holds the mask (None when every sample has every modality).

        Returns None when the loss is non-finite and ``on_nonfinite="skip"``. Frameworks that run
        the backward themselves (Lightning) use this; plain loops call :meth:`backward`.
        """
        ctx = self.ctx
        model = ctx.model
        self._require_epoch("forward_loss")
        if self._step_pending:  # the previous optimizer step's batch_end was not called: do it now
            self.batch_end()
        if not isinstance(inputs, Mapping):
            unpack_batch((inputs, labels), model.modalities, batch_index=ctx.batch_index)
        size = check_inputs(inputs, model.modalities, batch_index=ctx.batch_index)
        labels = check_labels(labels, model.num_classes, batch_size=size, batch_index=ctx.batch_index)
        present = check_presence(present, model.modalities, size, batch_index=ctx.batch_index)
        ctx.inputs, ctx.labels = to_device(inputs, ctx.device), labels.to(ctx.device)
        ctx.present = to_device(present, ctx.device) if present is not None else None
        ctx.unimodal_logits, ctx.losses, ctx.loss, ctx.encoder_grad_sq = None, {}, None, None
        for cb in self.callbacks:
            cb.on_train_batch_start(ctx)
        dev_type = ctx.device.type if ctx.device is not None else "cpu"
        autocast = (torch.autocast(dev_type, dtype=torch.float16 if dev_type == "cuda" else torch.bfloat16)
                    if self.amp else contextlib.nullcontext())
        with autocast:
            self._run_forward(model)
        checked = ctx.losses["multimodal"]
        if not math.isfinite(checked.item()):  # before any hook reads NaN statistics
            return self._nonfinite()
        if self._need_uni:
            uni = ctx.unimodal_logits
            if self.unimodal_loss_weight > 0:
                for m, lg in uni.items():
                    ctx.losses[f"unimodal/{m}"] = self.unimodal_loss_weight * F.cross_entropy(lg, ctx.labels)
        for cb in self.callbacks:
            cb.on_after_forward(ctx)
        terms = list(ctx.losses.values())
        ctx.loss = terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])  # no 0 + ... node
        stats = self.epoch_stats
        # the multimodal term alone was checked above; only added or replaced terms (UME trains
        # its unimodal terms instead) can make the total non-finite
        if (len(ctx.losses) > 1 or ctx.losses.get("multimodal") is not checked) and not \
                torch.isfinite(ctx.loss):
            return self._nonfinite()
        if stats:
            # device scalars kept per batch and summed once at epoch end (no host sync per step)
            stats["batch_losses"].append(ctx.losses["multimodal"].detach())
            stats["batch_sizes"].append(size)
            stats["batch_correct"].append((ctx.logits.detach().argmax(1) == ctx.labels).sum())
            stats["n"] += size
            if len(stats["classes"]) < 2:  # only the single-class check needs it
                stats["classes"].update(ctx.labels.unique().tolist())
        ctx.batch_index += 1
        return ctx.loss

    def _require_epoch(self, call: str) -> None:
        if not self._started or not self._epoch_begun:
            raise CallOrderError(
                f"Regulation.{call} was called before epoch_start. Start every epoch with "
                "`loader = run.epoch_start(epoch, train_loader)` (it starts the regulators and may "
                "replace the loader), iterate that loader, and end it with run.epoch_end().")
        if not self._in_epoch:
            raise CallOrderError(
                f"Regulation.{call} was called after epoch_end without a new epoch_start. Call "
                f"`loader = run.epoch_start(epoch, train_loader)` before the batches of epoch "
                f"{self.ctx.epoch + 1}.")

    def _nonfinite(self) -> None:
        """Raise (or, with ``on_nonfinite="skip"``, warn and skip) for a non-finite loss."""
        ctx = self.ctx
        where = _diagnose_nonfinite(ctx, f"epoch {ctx.epoch}, batch {ctx.batch_index}")
        if self.on_nonfinite == "raise":
            check_finite(ctx.loss if ctx.loss is not None else ctx.losses["multimodal"],
                         f"the training loss ({where})")
        warnings.warn(f"skipping a batch with a non-finite loss ({where}).", stacklevel=4)
        if ctx.optimizer is not None:
            ctx.optimizer.zero_grad(set_to_none=True)
        self.epoch_stats["skipped"] = self.epoch_stats.get("skipped", 0) + 1
        ctx.batch_index += 1
        return None

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
        features = model.mask_features(model.encode(inputs), ctx.present)
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
        """Hooks on the accumulated, unscaled gradients; marks the step as taken (the step
        counter advances at :meth:`batch_end`, or by itself at the next forward)."""
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.unscale_(self.ctx.optimizer)  # regulators act on real gradients
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self.ctx)
        self._step_pending = True

    def backward(self, inputs, labels, present=None) -> torch.Tensor | None:
        """Forward, regulator terms, backward and gradient modulation for one batch.

        ``present``: the batch's per-sample presence mask, as in :meth:`forward_loss`. Returns the
        detached total loss (None if the batch was skipped as non-finite). Call
        ``optimizer.step()`` afterwards.
        """
        self._require_epoch("backward")
        loss = self.forward_loss(inputs, labels, present)
        if loss is None:
            return None
        if self._backward_owner is None or not self._backward_owner.backward(self.ctx):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.after_backward()
        return loss.detach()

    def batch_end(self) -> None:
        """After ``optimizer.step()``: ``on_train_batch_end`` hooks, then the step counter
        advances. Optional in plain loops: when it was not called, the next ``backward`` (or
        ``epoch_end``) calls it first, so the counter still advances once per optimizer step."""
        for cb in self.callbacks:
            cb.on_train_batch_end(self.ctx)
        self.ctx.step += 1
        self._step_pending = False

    def epoch_end(self) -> dict:
        """Epoch-level actions (re-initialisation, traces); returns this epoch's logs."""
        ctx = self.ctx
        self._require_epoch("epoch_end")
        stats = self.epoch_stats
        if stats["batch_losses"]:
            sizes = torch.tensor(stats["batch_sizes"], dtype=torch.float64)
            losses = torch.stack(stats["batch_losses"]).double().cpu()
            stats["loss"] = float(losses @ sizes)  # the sum of per-sample losses
            stats["correct"] = int(torch.stack(stats["batch_correct"]).sum())
        for key in ("batch_losses", "batch_sizes", "batch_correct"):
            del stats[key]
        if self._step_pending:
            self.batch_end()
        self._in_epoch = False
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
                "step": self.ctx.step + int(self._step_pending),  # a taken step counts
                "epoch": self.ctx.epoch, "micro": self._micro}

    def load_state_dict(self, state: dict) -> None:
        """Restore the callbacks' run state (a resumed run keeps it at :meth:`start`).

        Refuses a state saved with callbacks this run lacks (e.g. resuming a regulated run
        without its regulator would continue unregulated under the old run's name)."""
        saved = {key.split(":", 1)[-1] for key in state["callbacks"]}
        lacking = sorted(saved - {cb.name for cb in self.callbacks})
        if lacking:
            raise ValueError(
                f"the saved state was trained with {lacking}, which this run lacks "
                f"(it has {[cb.name for cb in self.callbacks]}). Resume with the same regulator "
                "and monitor settings, or start a new run.")
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{cb.name}"
            if key not in state["callbacks"]:
                raise ValueError(f"the saved state has no entry for {key}; saved: {sorted(state['callbacks'])}.")
            cb.load_state_dict(state["callbacks"][key])
        self.ctx.step, self.ctx.epoch, self._micro = state["step"], state["epoch"], state["micro"]
