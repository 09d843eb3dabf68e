"""PyTorch Lightning integration (``pip install modaldiag[lightning]``).

The callback drives the same regulator objects at the same moments as ``md.fit``. The module
computes its training loss through the callback, so regulators that change the forward pass
(OPM), add loss terms (InfoReg*, MMPareto) or need unimodal logits see the batch::

    import lightning.pytorch as pl
    from modaldiag.integrations.lightning import ModalDiagCallback, modaldiag_loss

    class Lit(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model                       # a modaldiag model (or md.wrap(...))
        def training_step(self, batch, batch_idx):
            return modaldiag_loss(self, batch)       # forward + regulator terms
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    trainer = pl.Trainer(callbacks=[ModalDiagCallback(md.OGM(noise=True))], max_epochs=30)

Gradient modulation runs in ``on_before_optimizer_step``: after AMP unscaling and once per
accumulated step, so it acts on the real (unscaled, accumulated) gradients. ValuationResampling
rebuilds the training loader every epoch and therefore needs ``md.fit`` or ``md.Regulation``.
"""

from __future__ import annotations

import torch

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("modaldiag.integrations.lightning needs Lightning: pip install "
                      "'modaldiag[lightning]'") from exc

from ..training.callbacks import Callback
from ..training.loop import Regulation
from ..utils.validation import BOOL, NON_NEGATIVE, InstanceOf, unpack_batch_present, validate_params

__all__ = ["ModalDiagCallback", "ModalDiagModule", "modaldiag_loss"]


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, bool):
        out[prefix] = float(value)


class ModalDiagCallback(pl.Callback):
    """Run modaldiag regulators (and the Fisher monitor) inside a Lightning ``Trainer``.

    Parameters
    ----------
    regulator : Regulator or list, optional
    monitor : bool, default True
        Record the online Fisher trace per modality (logged as ``modaldiag/fisher/<m>``).
    model_attr : str, default "model"
        Attribute of the LightningModule that holds the modaldiag model.
    unimodal_loss_weight : float >= 0, default 0

    Every ``trainer.fit`` starts the regulators afresh (a reused callback or regulator carries no
    state from an earlier fit); state restored from a Lightning checkpoint is kept.
    """

    _parameter_constraints = {"monitor": [BOOL], "model_attr": [InstanceOf(str)],
                              "unimodal_loss_weight": [NON_NEGATIVE]}

    def __init__(self, regulator=None, *, monitor: bool = True, model_attr: str = "model",
                 unimodal_loss_weight: float = 0.0):
        validate_params(self._parameter_constraints, {
            "monitor": monitor, "model_attr": model_attr,
            "unimodal_loss_weight": unimodal_loss_weight}, "ModalDiagCallback")
        regs = regulator if isinstance(regulator, (list, tuple)) else [regulator]
        replacing = [r.name for r in regs if isinstance(r, Callback)
                     and type(r).train_loader is not Callback.train_loader]
        if replacing:
            raise ValueError(f"{replacing[0]} rebuilds the training loader every epoch; use "
                             "md.fit or md.Regulation for it, not the Lightning callback.")
        owners = [r.name for r in regs if isinstance(r, Callback)
                  and type(r).backward is not Callback.backward
                  and not hasattr(r, "defer_gradients")]
        if owners:
            raise ValueError(f"{owners[0]} runs its own backward pass (and may step the optimizer "
                             "itself), which Lightning's automatic optimisation does not allow; "
                             "use md.fit or md.Regulation for it, not the Lightning callback.")
        separate = [r.name for r in regs if getattr(r, "unimodal_heads", None) == "separate"]
        if separate:
            raise ValueError(f"{separate[0]}(unimodal_heads='separate') owns one linear head per "
                             "modality that must join the optimizer and the checkpoint; the "
                             "Lightning callback steps your own optimizer. Use "
                             "unimodal_heads='shared' here, or md.fit / md.Regulation.")
        self.regulator, self.monitor, self.model_attr = regulator, monitor, model_attr
        self.unimodal_loss_weight = unimodal_loss_weight
        self.run: Regulation | None = None
        self.logs: list[dict] = []
        self._pending_state: dict | None = None

    # ------------------------------------------------------------------ set-up
    def _model(self, pl_module):
        model = getattr(pl_module, self.model_attr, None)
        if model is None:
            raise ValueError(f"the LightningModule has no attribute {self.model_attr!r} holding "
                             "the modaldiag model; set ModalDiagCallback(model_attr=...).")
        return model

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise ValueError("ModalDiagCallback needs an optimizer (configure_optimizers).")
        self.run = Regulation(self._model(pl_module), trainer.optimizers[0], self.regulator,
                              monitor=self.monitor, unimodal_loss_weight=self.unimodal_loss_weight,
                              accumulate_grad_batches=trainer.accumulate_grad_batches,
                              device=pl_module.device)
        if self._pending_state is not None:
            self.run.load_state_dict(self._pending_state)
            self._pending_state = None
        self.run.start(epochs=trainer.max_epochs)

    def training_loss(self, batch) -> torch.Tensor:
        """The loss of one training batch with every regulator term (called by the module).

        ``batch`` is ``(inputs: dict[str, Tensor], labels)`` or ``(inputs, labels, present)`` with
        a per-sample presence mask (absent entries become the baseline); anything else raises a ValueError
        that shows how to adapt the loader (``md.datasets.adapt_loader``)."""
        run = self.run
        inputs, labels, present = unpack_batch_present(batch, run.model.modalities,
                                                       batch_index=run.ctx.batch_index)
        loss = run.forward_loss(inputs, labels, present)
        if loss is None:  # non-finite and skipped: contribute nothing
            return torch.zeros((), device=labels.device, requires_grad=True)
        owner = run._backward_owner
        if owner is not None:
            defer = getattr(owner, "defer_gradients", None)
            if defer is None:
                raise ValueError(f"{owner.name} runs its own backward and has no Lightning mode.")
            defer(run.ctx, scale=1.0 / run.accumulate)
        return loss / run.accumulate if run.accumulate > 1 else loss

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.run.epoch_start(trainer.current_epoch, trainer.train_dataloader)

    def on_after_backward(self, trainer, pl_module) -> None:
        for cb in self.run.callbacks:
            cb.on_after_backward(self.run.ctx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.run.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.run.accumulate == 0:
            self.run.batch_end()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        logs = self.run.epoch_end()
        self.logs.append(logs)
        flat: dict[str, float] = {}
        _flatten("modaldiag", logs, flat)
        if flat:
            pl_module.log_dict(flat, on_step=False, on_epoch=True, sync_dist=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.run.end()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"regulation": self.run.state_dict()} if self.run is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if "regulation" in state_dict:
            if self.run is not None:
                self.run.load_state_dict(state_dict["regulation"])
            else:
                self._pending_state = state_dict["regulation"]


def modaldiag_loss(pl_module, batch) -> torch.Tensor:
    """Training loss through the trainer's :class:`ModalDiagCallback` (plain CE without one)."""
    trainer = getattr(pl_module, "_trainer", None)
    callbacks = trainer.callbacks if trainer is not None else []
    cb = next((c for c in callbacks if isinstance(c, ModalDiagCallback)), None)
    if cb is None or cb.run is None:
        model = pl_module.model
        inputs, labels, present = unpack_batch_present(batch, getattr(model, "modalities", None))
        logits = (model(inputs) if present is None
                  else model.head(model.mask_features(model.encode(inputs), present)))
        return torch.nn.functional.cross_entropy(logits, labels)
    return cb.training_loss(batch)


class ModalDiagModule(pl.LightningModule):
    """A ready LightningModule around a modaldiag model: ``training_step`` goes through
    :func:`modaldiag_loss` (so a :class:`ModalDiagCallback` sees every batch), SGD with momentum.

    Parameters
    ----------
    model : MultimodalModel
    lr, momentum, weight_decay : float
        Optimiser settings (defaults 0.01, 0.9, 1e-4, as ``md.fit``).
    """

    def __init__(self, model, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4):
        super().__init__()
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, inputs):
        return self.model(inputs)

    def training_step(self, batch, batch_idx):
        return modaldiag_loss(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)
