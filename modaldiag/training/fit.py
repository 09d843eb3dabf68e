"""``md.fit``: the reference training loop (joint training, optionally regulated)."""

from __future__ import annotations

import copy
import gc
import math
import numbers
import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..datasets.base import MultimodalDataset, batch_loader, loader_dataset
from ..models.contract import MultimodalModel
from ..probes.unimodal import validate
from ..utils.distributed import barrier, is_distributed, is_main_process
from ..utils.distributed import rank as dist_rank
from ..utils.io import atomic_torch_save, safe_torch_load
from ..utils.progress import progress_bar
from ..utils.torch_utils import (
    all_finite,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    unwrap,
)
from ..utils.validation import (
    BOOL,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    InstanceOf,
    Options,
    Satisfies,
    unpack_batch_present,
    validate_params,
)
from .callbacks import Callback
from .history import History
from .loop import Regulation, check_optimizer

__all__ = ["fit", "default_optimizer"]

#: the version of the ``"fit"`` record inside ``last.pt`` (what the run was configured with)
CHECKPOINT_VERSION = 2
#: torch's message when a BatchNorm layer in training mode sees one value per channel
_BATCHNORM_ONE_VALUE = "Expected more than 1 value per channel when training"


class _Iterable(InstanceOf):
    """An iterable of batches or a Dataset; a string, bytes or a dict is refused."""

    def accepts(self, value) -> bool:
        return isinstance(value, (Iterable, Dataset)) and not isinstance(value, (str, bytes, Mapping))


def _is_seed(value) -> bool:
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and 0 <= int(value) < 2**63)


def _is_device(value) -> bool:
    return not isinstance(value, bool) and torch.device(value) is not None


_LOADER = _Iterable(what="a DataLoader (any iterable of (inputs, labels) batches) or a Dataset")

_parameter_constraints = {
    "train_loader": [_LOADER],
    "val_loader": [_LOADER, None],
    "epochs": [POSITIVE_INT],
    "optimizer": [InstanceOf(torch.optim.Optimizer, what="a torch.optim.Optimizer"), None],
    "regulator": [InstanceOf(Callback, what="a modaldiag regulator (md.InfoReg(), md.OGM(), ...)"),
                  InstanceOf(list, tuple, what="a list of regulators"), None],
    "monitor": [BOOL],
    "seed": [Satisfies(_is_seed, "an integer in [0, 2**63 - 1]"), None],
    "lr": [POSITIVE],
    "weight_decay": [NON_NEGATIVE],
    "scheduler": [Satisfies(lambda s: hasattr(s, "step") or callable(s),
                            "an LR scheduler or a callable(optimizer) -> scheduler"), None],
    "unimodal_loss_weight": [NON_NEGATIVE],
    "callbacks": [InstanceOf(list, tuple, what="a list of md.Callback objects")],
    "device": [Satisfies(_is_device, "a device such as 'cpu', 'cuda' or 'cuda:1'"), None],
    "checkpoint_dir": [InstanceOf(str, os.PathLike, what="a folder path (str or pathlib.Path)"), None],
    "resume": [BOOL],
    "restore_best": [BOOL],
    "on_nonfinite": [Options("raise", "skip")],
    "max_grad_norm": [POSITIVE, None],
    "progress": [BOOL],
    "batch_size": [POSITIVE_INT],
    "amp": [BOOL],
}


def default_optimizer(model: torch.nn.Module, lr: float = 0.01, momentum: float = 0.9,
                      weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, the optimiser of the published audio-visual baselines."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _as_loader(data, batch_size: int, *, shuffle: bool, seed: int):
    """``(loader, sampler)``: a Dataset becomes a loader (sharded under DDP); loaders pass through."""
    if not isinstance(data, Dataset) or isinstance(data, DataLoader):
        return data, None
    sampler = None
    if is_distributed():
        sampler = DistributedSampler(data, shuffle=shuffle, seed=seed)
    if isinstance(data, MultimodalDataset):
        return batch_loader(data, batch_size, shuffle=shuffle, sampler=sampler), sampler
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler), sampler


def _label_classes(loader) -> set[int] | None:
    labels = getattr(loader_dataset(loader), "labels", None)
    if isinstance(labels, torch.Tensor):
        return set(torch.unique(labels).tolist())
    return None


def _checkpoint_folder(checkpoint_dir) -> Path | None:
    """The checkpoint folder as a Path; refuse a path that exists and is not a folder."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"fit: checkpoint_dir {str(path)!r} exists and is not a folder; pass a "
                         "folder path (it is created when missing).")
    return path


def _check_optimizer_covers(net: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Refuse a model with nothing to train, or an optimizer that holds none of its trainable
    parameters (``None``: the default optimizer, built over the model)."""
    trainable = [p for p in net.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("fit: the model has no trainable parameters (requires_grad is False "
                         "everywhere), so training would change nothing; unfreeze what should learn.")
    if optimizer is not None:
        check_optimizer(net, optimizer)


# ---------------------------------------------------------------- non-finite weights
def _watched(net: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, str, torch.Tensor]]:
    """``(kind, name, tensor)`` of every floating tensor training changes: the model's
    parameters and buffers (BatchNorm running statistics) and parameters only the optimizer holds."""
    out, seen = [], set()
    for name, p in net.named_parameters():
        seen.add(id(p))
        out.append(("parameter", name, p))
    for name, b in net.named_buffers():
        if b.is_floating_point() or b.is_complex():
            seen.add(id(b))
            out.append(("buffer", name, b))
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(("parameter", f"optimizer.param_groups[{g}]['params'][{i}]", p))
    return out


def _owner(net: nn.Module, tensor: torch.Tensor) -> str:
    for m in net.modalities:
        enc = net.encoders[m]
        if any(t is tensor for t in enc.parameters()) or any(t is tensor for t in enc.buffers()):
            return f"the encoder of modality {m!r}"
    if any(t is tensor for t in net.parameters()) or any(t is tensor for t in net.buffers()):
        return "the fusion head (outside every encoder)"
    return "no module of the model (it is only in the optimizer)"


def _nonfinite_weights(net: nn.Module,
                       optimizer: torch.optim.Optimizer) -> tuple[str, str] | None:
    """None when every watched tensor is finite, else ``(kind, description)`` of the first bad
    one (kind: ``"parameter"`` or ``"buffer"``)."""
    watched = _watched(net, optimizer)
    if all_finite([t for _, _, t in watched]):
        return None
    bad = [(kind, name, t) for kind, name, t in watched
           if t.numel() and not bool(torch.isfinite(t.detach()).all())]
    kind, name, t = bad[0]
    n_nan = int(torch.isnan(t.detach()).sum())
    n_inf = int(torch.isinf(t.detach()).sum())
    more = f" ({len(bad) - 1} more tensors are non-finite too)" if len(bad) > 1 else ""
    return kind, (f"{kind} {name!r} of {_owner(net, t)} holds {n_nan} NaN and {n_inf} inf of "
                  f"its {t.numel()} values{more}")


def _nonfinite_error(kind: str, what: str, *, when: str, optimizer: torch.optim.Optimizer,
                     ckpt: Path | None, last_good: int | None) -> ValueError:
    lr = float(optimizer.param_groups[0].get("lr", math.nan))
    if kind == "buffer":
        advice = ("Running statistics become non-finite when inputs hold NaN/inf or inputs or "
                  "activations are huge: clean and normalise the inputs, lower the learning rate "
                  "or clip gradients (max_grad_norm=1.0).")
    else:
        lower = f"e.g. lr={lr / 10:g}" if math.isfinite(lr) and lr > 0 else "e.g. lr=0.01"
        advice = (f"The learning rate (lr={lr:g}) is too large or the gradients exploded: retry "
                  f"with a lower learning rate ({lower}) and/or clip gradients with "
                  "max_grad_norm=1.0.")
    if ckpt is None:
        saved = "Nothing was saved."
    elif last_good is None:
        saved = f"Nothing was saved in {str(ckpt)!r}."
    else:
        saved = (f"Nothing was saved for this epoch: {str(ckpt / 'last.pt')!r} still holds the "
                 f"last good epoch ({last_good}); resume from it with resume=True and a lower lr.")
    verb = "are" if when.startswith("before") else "became"
    return ValueError(f"fit: the model's weights {verb} non-finite (NaN or inf) {when}: {what}. "
                      f"{advice} {saved}")


def _finite_inputs(inputs: Mapping) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in inputs.values()
               if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()))


def _at_batch(epoch: int, index: int, inputs: Mapping) -> str:
    """Where non-finite weights were found after batch ``index``'s loss was non-finite."""
    bad = [m for m, x in inputs.items() if isinstance(x, torch.Tensor)
           and (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all())]
    if not bad:
        return f"during epoch {epoch} (found at batch {index}, whose loss was non-finite)"
    return (f"during epoch {epoch} at batch {index}, whose input of modality "
            f"{', '.join(map(repr, bad))} contains NaN/inf: its forward pass wrote them into the "
            "running statistics (on_nonfinite='skip' cannot undo that); clean or drop such samples")


def _overflow_error(epoch: int, batches: list[int], *, optimizer, ckpt: Path | None,
                    last_good: int | None) -> ValueError:
    lr = float(optimizer.param_groups[0].get("lr", math.nan))
    saved = ("" if ckpt is None or last_good is None else
             f" Nothing was saved for this epoch: {str(ckpt / 'last.pt')!r} still holds the last "
             f"good epoch ({last_good}).")
    return ValueError(
        f"fit: the model diverged in epoch {epoch}: after its last optimizer step, the loss of "
        f"every remaining batch ({len(batches)}: {batches[:5]}{'...' if len(batches) > 5 else ''}) "
        "was non-finite although their inputs are finite, so its weights overflow on real data "
        f"(on_nonfinite='skip' only skips bad batches). Lower the learning rate (lr={lr:g}) and/or "
        f"clip gradients with max_grad_norm=1.0.{saved}")


def _raise_if_nonfinite(net, optimizer, *, when, ckpt, last_good) -> None:
    bad = _nonfinite_weights(net, optimizer)
    if bad is not None:
        raise _nonfinite_error(*bad, when=when, optimizer=optimizer, ckpt=ckpt,
                               last_good=last_good)


# ---------------------------------------------------------------- a last batch of one sample
def _batchnorms_at_risk(net: nn.Module, inputs) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers in training mode when the batch holds one sample, else []."""
    size = next((x.shape[0] for x in inputs.values() if isinstance(x, torch.Tensor) and x.dim()),
                None) if isinstance(inputs, Mapping) else None
    if size != 1:
        return []
    return [(name, mod) for name, mod in net.named_modules()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training]


class _BatchOfOne:
    """Around one batch of one sample: remember which BatchNorm ran last and its buffers, so a
    batch torch refuses ("more than 1 value per channel") is skipped without a trace."""

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        self.layers = layers
        self.entered: list[str] = []
        self.saved = [{k: b.clone() for k, b in mod._buffers.items() if b is not None}
                      for _, mod in layers]
        self.hooks = [mod.register_forward_pre_hook(
            lambda _mod, _args, name=name: self.entered.append(name)) for name, mod in layers]

    def refused(self, exc: Exception) -> bool:
        return _BATCHNORM_ONE_VALUE in str(exc)

    def restore(self) -> None:
        with torch.no_grad():
            for (_, mod), saved in zip(self.layers, self.saved, strict=True):
                for k, b in saved.items():
                    mod._buffers[k].copy_(b)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


# ---------------------------------------------------------------- resuming
def _callback_keys(run: Regulation) -> list[str]:
    return [f"{i}:{cb.name}" for i, cb in enumerate(run.callbacks)]


def _regulator_configs(run: Regulation) -> list[str]:
    return [repr(cb) for cb in run.callbacks if hasattr(cb, "config")]


def _fit_record(run: Regulation, optimizer, scheduler, requested_lrs: list[float]) -> dict:
    """What the run was configured with (before any training), stored in ``last.pt`` and
    checked on resume."""
    return {"version": CHECKPOINT_VERSION, "optimizer": type(optimizer).__name__,
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "regulators": _regulator_configs(run), "callbacks": _callback_keys(run),
            "lrs": requested_lrs}


def _shape(x) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def _check_model_matches(saved: Mapping, net: nn.Module, where: str) -> None:
    current = net.state_dict()
    extra = [k for k in saved if k not in current]
    missing = [k for k in current if k not in saved]
    shapes = [k for k in saved if k in current and _shape(saved[k]) != _shape(current[k])]
    problem = None
    if missing:
        problem = f"this model's {missing[0]!r} is not in it ({len(missing)} keys missing)"
    elif extra:
        problem = f"it holds {extra[0]!r}, which this model does not have ({len(extra)} such keys)"
    elif shapes:
        key = shapes[0]
        problem = (f"{key!r} has shape {_shape(saved[key])} in the checkpoint but "
                   f"{_shape(current[key])} in this model")
    if problem:
        raise ValueError(
            f"fit: the checkpoint in {where} was written for another model: {problem}. Resume "
            "with the model it was trained with, or start over: resume=False (it overwrites the "
            "checkpoint) or another checkpoint_dir.")


def _check_optimizer_matches(saved: Mapping, recorded: str | None, optimizer, names: dict,
                             where: str) -> None:
    start_over = ("Resume with the optimizer it was trained with, or start over: resume=False (it "
                  "overwrites the checkpoint) or another checkpoint_dir.")
    kind = type(optimizer).__name__
    if recorded is not None and recorded != kind:
        raise ValueError(f"fit: the checkpoint in {where} was written for another optimizer: "
                         f"{recorded}, but this call uses {kind}. {start_over}")
    groups = saved.get("param_groups", [])
    sizes = [len(g["params"]) for g in groups]
    mine = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != mine:
        raise ValueError(
            f"fit: the checkpoint in {where} was written for another optimizer: its parameter "
            f"groups hold {sizes} tensors, this optimizer's hold {mine}. {start_over}")
    state = saved.get("state", {})
    for group, mine_group in zip(groups, optimizer.param_groups, strict=True):
        for index, p in zip(group["params"], mine_group["params"], strict=True):
            for key, value in state.get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != p.shape:
                    raise ValueError(
                        f"fit: the checkpoint in {where} was written for another optimizer (or "
                        f"parameter order): its {key!r} for parameter "
                        f"{names.get(id(p), f'#{index}')!r} has shape {tuple(value.shape)}, the "
                        f"parameter has {tuple(p.shape)}. {start_over}")


def _check_run_matches(fit_record: Mapping | None, saved_keys: list[str], run: Regulation,
                       scheduler, where: str) -> None:
    start_over = ("or start over: resume=False (it overwrites the checkpoint) or another "
                  "checkpoint_dir.")
    if fit_record is not None:
        saved_regs, mine = list(fit_record.get("regulators", [])), _regulator_configs(run)
        if saved_regs != mine:
            raise ValueError(
                f"fit: the checkpoint in {where} was written by a run regulated by "
                f"{saved_regs or 'no regulator'}, but this call passes {mine or 'no regulator'}; "
                "resuming would continue under another regulation while the History names the "
                f"first. Pass the same regulator (same configuration) to resume, {start_over}")
    if saved_keys != _callback_keys(run):
        raise ValueError(
            f"fit: the checkpoint in {where} was written with the callbacks {saved_keys}, but this "
            f"call has {_callback_keys(run)} (regulator=, monitor= and callbacks= decide them). "
            f"Pass the same ones to resume, {start_over}")
    if fit_record is not None:
        saved_sched = fit_record.get("scheduler")
        mine_sched = type(scheduler).__name__ if scheduler is not None else None
        if saved_sched != mine_sched:
            raise ValueError(
                f"fit: the checkpoint in {where} was written with scheduler {saved_sched}, but "
                f"this call has {mine_sched}. Pass the same scheduler to resume, {start_over}")


def _rescale_lrs(optimizer, scheduler, requested: list[float], saved: list[float] | None) -> None:
    """Resuming with another learning rate: the loaded schedule continues, scaled to it."""
    if not saved or len(saved) != len(requested) or saved == requested:
        return
    def scaled(value, new, ratio):
        return value * ratio if ratio is not None and math.isfinite(value) else new

    # groups added after the lrs were recorded (a regulator's own parameters) keep their lr
    triples = zip(optimizer.param_groups[:len(requested)], requested, saved, strict=True)
    for i, (group, new, old) in enumerate(triples):
        if new == old:
            continue
        ratio = new / old if math.isfinite(old) and old > 0 else None
        group["lr"] = scaled(group["lr"], new, ratio)
        if "initial_lr" in group:
            group["initial_lr"] = scaled(group["initial_lr"], new, ratio)
        for attr in ("base_lrs", "_last_lr"):
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and i < len(values):
                values[i] = scaled(values[i], new, ratio)
    warnings.warn(f"fit: resuming with lr={requested} where the checkpoint was trained with "
                  f"lr={saved}; the learning-rate schedule continues at the new scale.", stacklevel=3)


# ---------------------------------------------------------------- fit
def _frozen_submodules(net: nn.Module) -> list[nn.Module]:
    """Submodules the user put in eval mode inside a train-mode model (e.g. a frozen BatchNorm).

    ``fit`` keeps them in eval mode at every epoch instead of flipping the whole model to train
    mode. A model handed over entirely in eval mode is trained as a whole (nothing is frozen).
    """
    if not net.training:
        return []
    return [module for module in net.modules() if not module.training]


def fit(
    model: MultimodalModel,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    epochs: int = 30,
    optimizer: torch.optim.Optimizer | None = None,
    regulator: Callback | Sequence[Callback] | None = None,
    monitor: bool = True,
    seed: int | None = 0,
    *,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    scheduler=None,
    unimodal_loss_weight: float = 0.0,
    callbacks: Sequence[Callback] = (),
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    restore_best: bool = True,
    on_nonfinite: str = "raise",
    max_grad_norm: float | None = None,
    progress: bool = True,
    batch_size: int = 64,
    amp: bool = False,
) -> History:
    """Train a multimodal model with cross-entropy, optionally regulated.

    Parameters
    ----------
    model : MultimodalModel
        A :class:`~modaldiag.MultimodalClassifier` or a :func:`~modaldiag.wrap`-ped model.
        Submodules you put in eval mode inside a train-mode model (a frozen BatchNorm, a frozen
        pretrained encoder) stay in eval mode for the whole run; probes and regulators never
        change any submodule's mode.
    train_loader, val_loader : iterables of ``(inputs: dict[str, Tensor], labels: LongTensor)``
        ``inputs[m]`` has shape ``(B, ...)`` for every modality ``m``; ``labels`` has shape
        ``(B,)``. A Dataset is batched with ``batch_size``. A loader yielding tuples such as
        ``(audio, video, label)`` is refused with the one-line adapter to use
        (``md.datasets.adapt_loader``). ``val_loader`` (optional) is used for per-epoch records
        and model selection. Never pass the test set here. Batches may carry a third item, a
        per-sample presence mask ``{m: BoolTensor (B,)}`` (True = present): absent entries are
        replaced by the model's baseline right after encoding, in training and validation
        (docs/training.md, "Missing modalities").
    epochs : int >= 1, default 30
    optimizer : torch.optim.Optimizer, optional
        Default: SGD(lr=``lr``, momentum=0.9, weight_decay=``weight_decay``). It must hold the
        model's parameters (an optimizer over another model's parameters is refused).
    regulator : Callback or list of Callbacks, optional
        An intervention (``md.InfoReg()``, ``md.OGM()``...). ``None``: plain joint training.
    monitor : bool, default True
        Record the online Fisher trace per modality and epoch (``record["fisher"]``).
    seed : int in [0, 2**63 - 1] or None, default 0
        Seeds python, numpy and torch before the model is touched (``None``: leave RNGs alone).
    lr : float > 0 (finite), default 0.01
        Learning rate of the default optimizer (ignored, with a warning, when ``optimizer`` is
        given).
    weight_decay : float >= 0, default 1e-4
        Weight decay of the default optimizer.
    scheduler : LR scheduler or callable(optimizer) -> scheduler, optional
        Stepped once per epoch.
    unimodal_loss_weight : float >= 0 (finite), default 0
        Adds ``w * CE(head(present=(m,)), y)`` per modality (auxiliary unimodal losses).
    callbacks : list of Callback, default ()
        Extra callbacks (loggers, monitors) run after the regulators.
    device : str or torch.device, optional
        Default: the model's device (CUDA when available for a CPU model).
    checkpoint_dir : path, optional
        Writes ``last.pt`` (model, optimizer, scheduler, callbacks, RNG, history and the run's
        configuration: optimizer and scheduler classes, regulators, learning rates) and
        ``best.pt`` atomically after every epoch, and ``history.json``.
    resume : bool, default False
        Continue from ``checkpoint_dir/last.pt`` when it exists. A checkpoint written for another
        model, optimizer, scheduler or regulator (or callbacks) is refused with a ValueError
        naming the first difference. A different ``lr`` is allowed: the saved schedule continues,
        scaled to the new learning rate (with a warning).
    restore_best : bool, default True
        With a ``val_loader``, load the weights of the best validation epoch at the end.
    on_nonfinite : {"raise", "skip"}, default "raise"
        What to do with a batch whose loss is NaN/inf. Non-finite *weights* (parameters or
        BatchNorm running statistics) always raise, whatever this says.
    max_grad_norm : float > 0 or None, default None
        Clip the total gradient norm of every parameter the optimizer steps (the model's, and
        regulator-owned ones such as MMPareto's separate unimodal heads) before each step.
    progress : bool, default True
        Show progress: a bar over the epochs and, within each epoch, a bar over its batches
        (``"fit epoch k/N"``; total from ``len(train_loader)`` when it has one). When stderr is
        not a terminal, one plain line per epoch instead (``"modaldiag: fit epoch 1/2: 109
        batches in 2.3 s"``). False: nothing is printed. Under DDP only rank 0 shows it.
    batch_size : int >= 1, default 64
        Used when a Dataset (not a loader) is given.
    amp : bool, default False
        Mixed precision: autocast float16 with a GradScaler on CUDA (regulators see unscaled
        gradients), autocast bfloat16 on CPU.

    Failing loudly
    --------------
    The weights (every parameter, every floating buffer such as BatchNorm running statistics,
    and parameters only the optimizer holds) are checked for NaN/inf with one fused reduction
    before training, at every epoch's end (before validation and checkpointing) and whenever a
    batch's loss is non-finite. Non-finite weights raise a ValueError naming the epoch, the
    first bad tensor and whether it belongs to a modality's encoder or to the head; nothing is
    checkpointed for that epoch (``last.pt`` keeps the last good epoch, ``best.pt`` never holds
    non-finite weights).

    A training batch of ONE sample that a BatchNorm layer in training mode cannot normalise
    (torch: "Expected more than 1 value per channel when training"; typically a loader's last
    batch) is skipped with a warning, its BatchNorm statistics untouched, and counted in the
    epoch's ``record["train"]["skipped_batch_of_one"]``. When every batch of an epoch is such a
    batch, a ValueError asks for a batch size of at least 2. Use ``drop_last=True`` to avoid it.

    Distributed training: when a ``torch.distributed`` process group is initialised (e.g. under
    ``torchrun``), the model is wrapped in ``DistributedDataParallel`` (or used as given if it
    already is), RNGs are seeded with ``seed + rank``, a Dataset is sharded with a
    ``DistributedSampler``, every regulator reduces its statistics over ranks, and only rank 0
    writes checkpoints and the History file (every rank returns the History).

    Returns
    -------
    History
        Per-epoch records: ``train`` (loss, acc, n, skipped, skipped_batch_of_one), ``val`` (loss,
        acc, unimodal_acc/prob/ce per modality), ``fisher`` (when monitored), regulator logs,
        ``lr`` and ``time_s``.

    Raises
    ------
    TypeError
        ``model`` is not a modaldiag model, or an argument has the wrong type.
    ValueError
        An argument outside its range (the message names it), bad batches, non-finite weights,
        an optimizer over another model, or a checkpoint that does not match this run.
    """
    net = unwrap(model)
    if not isinstance(net, MultimodalModel):
        raise TypeError(
            f"fit() needs a modaldiag model (md.MultimodalClassifier or md.wrap(...)); got "
            f"{type(net).__name__}. Wrap your model: md.wrap(model, encoders=..., head=...)."
        )
    validate_params(_parameter_constraints, {
        "train_loader": train_loader, "val_loader": val_loader, "epochs": epochs,
        "optimizer": optimizer, "regulator": regulator, "monitor": monitor, "seed": seed,
        "lr": lr, "weight_decay": weight_decay, "scheduler": scheduler,
        "unimodal_loss_weight": unimodal_loss_weight, "callbacks": callbacks, "device": device,
        "checkpoint_dir": checkpoint_dir, "resume": resume, "restore_best": restore_best,
        "on_nonfinite": on_nonfinite, "max_grad_norm": max_grad_norm, "progress": progress,
        "batch_size": batch_size, "amp": amp,
    }, "fit")
    if net.num_classes is None:
        raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir (the folder holding last.pt).")
    ckpt = _checkpoint_folder(checkpoint_dir)
    _check_optimizer_covers(net, optimizer)
    if optimizer is not None and (lr != 0.01 or weight_decay != 1e-4):
        warnings.warn("fit: lr and weight_decay configure the default optimizer only; they are "
                      "ignored because an optimizer was given.", stacklevel=2)
    if seed is not None:
        seed_everything(seed + dist_rank())  # per rank: dropout etc. differ, DDP syncs weights
    dev = resolve_device(device, net)
    model.to(dev)
    if is_distributed() and not isinstance(model, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None)
    train_loader, train_sampler = _as_loader(train_loader, batch_size, shuffle=True, seed=seed or 0)
    if val_loader is not None:
        val_loader, _ = _as_loader(val_loader, batch_size, shuffle=False, seed=0)
    if optimizer is None:
        optimizer = default_optimizer(net, lr=lr, weight_decay=weight_decay)
    if callable(scheduler) and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
        if not hasattr(scheduler, "step"):
            raise TypeError(f"fit: scheduler(optimizer) must return an LR scheduler (with .step()); "
                            f"it returned {type(scheduler).__name__}.")
    requested_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    classes = _label_classes(train_loader)
    if classes is not None and len(classes) < 2:
        raise ValueError(f"the training data hold a single class {sorted(classes)}; a classifier "
                         "needs at least two.")

    scaler = torch.amp.GradScaler("cuda") if amp and dev.type == "cuda" else None
    run = Regulation(model, optimizer, regulator, monitor=monitor, callbacks=callbacks,
                     unimodal_loss_weight=unimodal_loss_weight, on_nonfinite=on_nonfinite,
                     device=dev, amp=amp, scaler=scaler)
    if max_grad_norm is not None and run.owns_optimizer_step:
        stepper = next(cb.name for cb in run.callbacks if cb.owns_optimizer_step)
        raise ValueError(f"max_grad_norm cannot be applied with {stepper}: it takes its own "
                         "optimizer steps inside backward, where fit cannot clip. Leave "
                         "max_grad_norm=None.")
    history = History(net.modalities, config={
        "epochs": epochs, "seed": seed, "optimizer": type(optimizer).__name__,
        "lr": optimizer.param_groups[0].get("lr"),
        "regulators": [repr(cb) if hasattr(cb, "config") else cb.name for cb in run.callbacks],
        "unimodal_loss_weight": unimodal_loss_weight, "fusion": getattr(net, "fusion_type", None),
        "modalities": list(net.modalities), "num_classes": net.num_classes,
        "baseline": net.baseline_kind, "device": str(dev),
    })
    configured = _fit_record(run, optimizer, scheduler, requested_lrs)
    ctx = run.ctx
    ctx.history = history
    start_epoch, best_score, best_state = 0, -float("inf"), None
    barrier()
    if resume and ckpt is not None and (ckpt / "last.pt").exists():
        where = repr(str(ckpt))
        state = safe_torch_load(ckpt / "last.pt", map_location=dev)
        if not isinstance(state, dict) or not {"model", "optimizer", "regulation"} <= set(state):
            raise ValueError(f"fit: {str(ckpt / 'last.pt')!r} is not a checkpoint written by "
                             "md.fit; start over with resume=False or another checkpoint_dir.")
        saved_fit = state.get("fit")
        _check_model_matches(state["model"], net, where)
        _check_run_matches(saved_fit, list(state["regulation"].get("callbacks", {})), run,
                           scheduler, where)
        # regulators first: those that own parameters (MMPareto's separate unimodal heads)
        # re-create them from their state and join the optimizer before its state is loaded
        run.load_state_dict(state["regulation"])
        try:
            for cb in run.callbacks:
                if hasattr(cb, "register_parameters"):
                    cb.register_parameters(optimizer)
            _check_optimizer_matches(state["optimizer"], saved_fit.get("optimizer") if saved_fit
                                     else None, optimizer,
                                     {id(p): n for n, p in net.named_parameters()}, where)
        except ValueError:
            run.end()  # forget the state just restored: a retry with resume=False starts afresh
            raise
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        _rescale_lrs(optimizer, scheduler, requested_lrs, saved_fit.get("lrs") if saved_fit else None)
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        history = History.from_dict(state["history"])
        ctx.history = history
        start_epoch = int(state["epoch"])
        best_score = float(state.get("best_score", -float("inf")))
        if (ckpt / "best.pt").exists():
            best_state = safe_torch_load(ckpt / "best.pt", map_location=dev)
        set_rng_state(state["rng"])
    last_good = start_epoch - 1 if start_epoch > 0 else None
    _raise_if_nonfinite(net, optimizer, when=f"before training (epoch {start_epoch})", ckpt=None,
                        last_good=None)

    frozen = _frozen_submodules(net)
    show = progress and is_main_process()  # under DDP only rank 0 draws
    run.ctx.progress = show
    run.start(train_loader, val_loader, epochs)
    bar = progress_bar(total=epochs, initial=start_epoch, desc="fit", unit="epoch", enabled=show)
    seen_classes: set[int] = set()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        loader = run.epoch_start(epoch, train_loader)
        model.train()
        for module in frozen:
            module.eval()
        batches_of_one, refused_layer = 0, None
        overflowed: list[int] = []  # skipped batches with finite inputs since the last step
        batches = progress_bar(loader, enabled=show, desc=f"fit epoch {epoch + 1}/{epochs}")
        for index, batch in enumerate(batches):
            inputs, labels, present = unpack_batch_present(batch, net.modalities, batch_index=index)
            optimizer.zero_grad(set_to_none=True)
            at_risk = _batchnorms_at_risk(net, inputs)
            guard = _BatchOfOne(at_risk) if at_risk else None
            try:
                loss = run.backward(inputs, labels, present)
            except ValueError as exc:
                if guard is not None and guard.refused(exc):
                    guard.restore()
                    optimizer.zero_grad(set_to_none=True)
                    batches_of_one += 1
                    refused_layer = guard.entered[-1] if guard.entered else at_risk[0][0]
                    warnings.warn(
                        f"fit: epoch {epoch}, batch {index} holds ONE sample and BatchNorm layer "
                        f"{refused_layer!r} cannot normalise one value per channel in training; "
                        "the batch was skipped (counted in record['train']"
                        "['skipped_batch_of_one']). Use DataLoader(..., drop_last=True) or a "
                        "batch size that does not leave a last batch of one.", stacklevel=2)
                    continue
                _raise_if_nonfinite(net, optimizer, when=_at_batch(epoch, index, inputs),
                                    ckpt=ckpt, last_good=last_good)
                raise
            finally:
                if guard is not None:
                    guard.close()
            if loss is None:  # a non-finite loss, skipped: bad batch or bad weights?
                _raise_if_nonfinite(net, optimizer, when=_at_batch(epoch, index, inputs),
                                    ckpt=ckpt, last_good=last_good)
                if _finite_inputs(inputs):
                    overflowed.append(index)
                continue
            overflowed = []
            if max_grad_norm is not None:
                # every parameter the optimizer steps, regulator-owned ones (MMPareto's
                # separate unimodal heads) included
                torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            run.batch_end()
        _raise_if_nonfinite(net, optimizer, when=f"by the end of epoch {epoch}", ckpt=ckpt,
                            last_good=last_good)
        if overflowed and run.epoch_stats["n"]:
            raise _overflow_error(epoch, overflowed, optimizer=optimizer, ckpt=ckpt,
                                  last_good=last_good)
        stats = run.epoch_stats
        if stats["n"] == 0:
            if batches_of_one:
                raise ValueError(
                    f"fit: every training batch of epoch {epoch} held ONE sample, which BatchNorm "
                    f"layer {refused_layer!r} cannot normalise in training; use a batch size of at "
                    "least 2 (and drop_last=True).")
            if stats["skipped"]:
                raise ValueError(f"every batch of epoch {epoch} had a non-finite loss and was skipped.")
            raise ValueError("the training loader yielded no batches (empty loader).")
        seen_classes |= stats["classes"]
        if epoch == start_epoch and classes is None and len(seen_classes) < 2:
            raise ValueError(f"the training data hold a single class {sorted(seen_classes)}; a "
                             "classifier needs at least two.")
        logs = run.epoch_end()
        if run.callbacks:  # only a regulator's epoch-end action can have changed the weights
            _raise_if_nonfinite(net, optimizer, when=f"at the end of epoch {epoch} (after the "
                                "regulators' epoch-end actions)", ckpt=ckpt, last_good=last_good)
        record = {"epoch": epoch,
                  "train": {"loss": stats["loss"] / stats["n"], "acc": stats["correct"] / stats["n"],
                            "n": stats["n"], "skipped": stats["skipped"],
                            "skipped_batch_of_one": batches_of_one},
                  "lr": optimizer.param_groups[0].get("lr")}
        if val_loader is not None:
            try:
                val = validate(net, val_loader, device=dev, predict=run.predictor).to_dict()
            except ValueError as exc:
                if "non-finite" not in str(exc) and "NaN/inf" not in str(exc):
                    raise
                where = f"the checkpoint of epoch {last_good} in {ckpt}" if (
                    ckpt is not None and last_good is not None) else "no checkpoint"
                raise ValueError(
                    f"the model diverged during epoch {epoch}: its weights are finite but so large "
                    f"that validation produced non-finite values ({exc}) Lower the learning rate "
                    f"(lr={optimizer.param_groups[0].get('lr')}) or pass max_grad_norm=1.0; "
                    f"nothing of epoch {epoch} was saved ({where} is intact).") from None
            record["val"] = val
            for cb in run.callbacks:
                cb.on_validation_end(ctx, val)
            if val["acc"] > best_score:
                best_score = val["acc"]
                best_state = {"epoch": epoch, "model": copy.deepcopy(net.state_dict())}
                history.meta["best_epoch"] = epoch
                if ckpt is not None and is_main_process():
                    atomic_torch_save(best_state, ckpt / "best.pt")
        if scheduler is not None:
            scheduler.step()
        record.update(logs)
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        if ckpt is not None and is_main_process():
            atomic_torch_save({
                "epoch": epoch + 1, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "regulation": run.state_dict(), "history": history.to_dict(), "rng": rng_state(),
                "best_score": best_score,
                "fit": configured,
            }, ckpt / "last.pt")
            history.save(ckpt / "history.json")
        last_good = epoch
        barrier()  # no rank runs ahead of rank 0's checkpoint
        bar.set_postfix(loss=f"{record['train']['loss']:.3f}",
                        val_acc=f"{record['val']['acc']:.3f}" if "val" in record else "-")
        bar.update(1)
    bar.close()
    run.end()
    if isinstance(model, nn.parallel.DistributedDataParallel) and model.module is net:
        # free the DDP wrapper (its reducer holds gloo/NCCL work) now, while the process group
        # is alive: freed later by the cyclic GC at interpreter exit, after the user's
        # destroy_process_group, it can abort the process ("terminate called ...")
        run.ctx.ddp_model = None
        del model, run
        gc.collect()
    if restore_best and best_state is not None:
        net.load_state_dict(best_state["model"])
        history.meta["restored_epoch"] = best_state["epoch"]
    return history
