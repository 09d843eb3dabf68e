"""``md.fit``: the reference training loop (joint training, optionally regulated)."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.contract import MultimodalModel
from ..utils.io import atomic_torch_save, safe_torch_load
from ..utils.torch_utils import (
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    to_device,
    unwrap,
)
from ..utils.validation import (
    check_choice,
    check_finite,
    check_inputs,
    check_labels,
    check_positive_int,
)
from .callbacks import Callback, StepContext
from .history import History

__all__ = ["fit", "default_optimizer", "train_one_epoch"]


def default_optimizer(model: torch.nn.Module, lr: float = 0.01, momentum: float = 0.9,
                      weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD with momentum 0.9, the optimiser of the published audio-visual baselines."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _as_callbacks(regulator, callbacks) -> list[Callback]:
    out: list[Callback] = []
    for item in ([] if regulator is None else regulator if isinstance(regulator, (list, tuple)) else [regulator]):
        out.append(item)
    out.extend(callbacks or ())
    for cb in out:
        if not isinstance(cb, Callback):
            raise TypeError(f"regulators and callbacks must be modaldiag Callbacks; got {type(cb).__name__}.")
    owners = [cb.name for cb in out if type(cb).backward is not Callback.backward]
    if len(owners) > 1:
        raise ValueError(f"{owners} each run their own backward pass; they cannot be combined.")
    return out


def _label_classes(loader) -> set[int] | None:
    ds = getattr(loader, "dataset", None)
    ds = getattr(ds, "dataset", ds)
    labels = getattr(ds, "labels", None)
    if isinstance(labels, torch.Tensor):
        return set(torch.unique(labels).tolist())
    return None


def _diagnose_nonfinite(ctx: StepContext, where: str) -> str:
    for m, x in (ctx.inputs or {}).items():
        if x.is_floating_point() and not torch.isfinite(x).all():
            return f"{where}: input of modality {m!r} contains NaN/inf"
    for m, f in (ctx.features or {}).items():
        if not torch.isfinite(f).all():
            return f"{where}: features of modality {m!r} contain NaN/inf"
    bad = [k for k, v in ctx.losses.items() if not torch.isfinite(v).all()]
    return f"{where}: loss term(s) {bad or ['total']}"


def train_one_epoch(ctx: StepContext, loader: Iterable, callbacks: Sequence[Callback], *,
                    unimodal_loss_weight: float = 0.0, on_nonfinite: str = "raise",
                    max_grad_norm: float | None = None, progress=None) -> dict:
    """One epoch of the reference step (see :mod:`modaldiag.training.callbacks`)."""
    model, optimizer, net = ctx.model, ctx.optimizer, ctx.ddp_model or ctx.model
    need_uni = unimodal_loss_weight > 0 or any(cb.needs_unimodal_logits for cb in callbacks)
    backward_owner = next((cb for cb in callbacks if type(cb).backward is not Callback.backward), None)
    total_loss, correct, seen, skipped = 0.0, 0, 0, 0
    classes: set[int] = set()
    net.train()
    for b, (inputs, labels) in enumerate(loader):
        size = check_inputs(inputs, model.modalities, batch_index=b)
        labels = check_labels(labels, model.num_classes, batch_size=size, batch_index=b)
        ctx.batch_index = b
        ctx.inputs, ctx.labels = to_device(inputs, ctx.device), labels.to(ctx.device)
        ctx.unimodal_logits, ctx.losses, ctx.loss = None, {}, None
        for cb in callbacks:
            cb.on_train_batch_start(ctx)
        features = model.encode(ctx.inputs)
        for cb in callbacks:
            features = cb.transform_features(features, ctx)
        ctx.features = features
        ctx.logits = model.head(features)
        ctx.losses["multimodal"] = F.cross_entropy(ctx.logits, ctx.labels)
        if need_uni:
            uni = ctx.compute_unimodal_logits()
            if unimodal_loss_weight > 0:
                for m, lg in uni.items():
                    ctx.losses[f"unimodal/{m}"] = unimodal_loss_weight * F.cross_entropy(lg, ctx.labels)
        for cb in callbacks:
            cb.on_after_forward(ctx)
        ctx.loss = sum(ctx.losses.values())
        if not torch.isfinite(ctx.loss):
            where = _diagnose_nonfinite(ctx, f"epoch {ctx.epoch}, batch {b}")
            if on_nonfinite == "raise":
                check_finite(ctx.loss, f"the training loss ({where})")
            warnings.warn(f"skipping a batch with a non-finite loss ({where}).", stacklevel=2)
            skipped += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        if backward_owner is None or not backward_owner.backward(ctx):
            ctx.loss.backward()
        for cb in callbacks:
            cb.on_after_backward(ctx)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        for cb in callbacks:
            cb.on_before_optimizer_step(ctx)
        optimizer.step()
        for cb in callbacks:
            cb.on_train_batch_end(ctx)
        ctx.step += 1
        total_loss += float(ctx.losses["multimodal"].detach()) * size
        correct += int((ctx.logits.detach().argmax(1) == ctx.labels).sum())
        seen += size
        classes.update(ctx.labels.unique().tolist())
        if progress is not None:
            progress.update(1)
    if seen == 0 and skipped == 0:
        raise ValueError("the training loader yielded no batches (empty loader).")
    if seen == 0:
        raise ValueError(f"every batch of epoch {ctx.epoch} had a non-finite loss and was skipped.")
    return {"loss": total_loss / seen, "acc": correct / seen, "n": seen, "skipped": skipped,
            "classes": classes}


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
) -> History:
    """Train a multimodal model with cross-entropy, optionally regulated.

    Parameters
    ----------
    model : MultimodalModel
        A :class:`~modaldiag.MultimodalClassifier` or a :func:`~modaldiag.wrap`-ped model.
    train_loader, val_loader : iterables of ``(inputs: dict[str, Tensor], labels: LongTensor)``
        ``val_loader`` (optional) is used for per-epoch records and model selection. Never pass
        the test set here.
    epochs : int, default 30
    optimizer : torch.optim.Optimizer, optional
        Default: SGD(lr=``lr``, momentum=0.9, weight_decay=``weight_decay``).
    regulator : Callback or list of Callbacks, optional
        An intervention (``md.InfoReg()``, ``md.OGM()``...). ``None``: plain joint training.
    monitor : bool, default True
        Record the online Fisher trace per modality and epoch (``record["fisher"]``).
    seed : int or None, default 0
        Seeds python, numpy and torch before the model is touched (``None``: leave RNGs alone).
    scheduler : LR scheduler or callable(optimizer) -> scheduler, optional
        Stepped once per epoch.
    unimodal_loss_weight : float, default 0
        Adds ``w * CE(head(present=(m,)), y)`` per modality (auxiliary unimodal losses).
    checkpoint_dir : path, optional
        Writes ``last.pt`` (model, optimizer, scheduler, callbacks, RNG, history) and ``best.pt``
        atomically after every epoch, and ``history.json``.
    resume : bool, default False
        Continue from ``checkpoint_dir/last.pt`` when it exists.
    restore_best : bool, default True
        With a ``val_loader``, load the weights of the best validation epoch at the end.
    on_nonfinite : {"raise", "skip"}, default "raise"
        What to do with a batch whose loss is NaN/inf.

    Returns
    -------
    History
        Per-epoch records: ``train`` (loss, acc), ``val`` (loss, acc, unimodal_acc/prob/ce per
        modality), ``fisher`` (when monitored), regulator logs, ``lr`` and ``time_s``.
    """
    net = unwrap(model)
    if not isinstance(net, MultimodalModel):
        raise TypeError(
            f"fit() needs a modaldiag model (md.MultimodalClassifier or md.wrap(...)); got "
            f"{type(net).__name__}. Wrap your model: md.wrap(model, encoders=..., head=...)."
        )
    check_positive_int(epochs, "epochs")
    check_choice(on_nonfinite, ("raise", "skip"), "on_nonfinite")
    if net.num_classes is None:
        raise ValueError("the model's num_classes is unknown; pass num_classes to md.wrap(...).")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir.")
    if seed is not None:
        seed_everything(seed)
    dev = resolve_device(device, net)
    model.to(dev)
    if optimizer is None:
        optimizer = default_optimizer(net, lr=lr, weight_decay=weight_decay)
    if callable(scheduler) and not hasattr(scheduler, "step"):
        scheduler = scheduler(optimizer)
    classes = _label_classes(train_loader)
    if classes is not None and len(classes) < 2:
        raise ValueError(f"the training data hold a single class {sorted(classes)}; a classifier "
                         "needs at least two.")

    from ..probes.fisher import FisherMonitor
    from ..probes.unimodal import evaluate

    cbs = ([FisherMonitor()] if monitor else []) + _as_callbacks(regulator, callbacks)
    history = History(net.modalities, config={
        "epochs": epochs, "seed": seed, "optimizer": type(optimizer).__name__,
        "lr": optimizer.param_groups[0].get("lr"), "regulators": [cb.name for cb in cbs],
        "unimodal_loss_weight": unimodal_loss_weight, "fusion": getattr(net, "fusion_type", None),
        "modalities": list(net.modalities), "num_classes": net.num_classes,
        "baseline": net.baseline_kind, "device": str(dev),
    })
    ctx = StepContext(model=net, optimizer=optimizer, train_loader=train_loader,
                      val_loader=val_loader, device=dev, history=history, epochs=epochs,
                      ddp_model=model if model is not net else None)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_epoch, best_score, best_state = 0, -float("inf"), None
    if resume and ckpt is not None and (ckpt / "last.pt").exists():
        state = safe_torch_load(ckpt / "last.pt", map_location=dev)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        for i, cb in enumerate(cbs):
            cb.load_state_dict(state["callbacks"].get(f"{i}:{cb.name}", {}))
        history = History.from_dict(state["history"])
        ctx.history = history
        start_epoch, ctx.step = int(state["epoch"]), int(state["step"])
        best_score = float(state.get("best_score", -float("inf")))
        if (ckpt / "best.pt").exists():
            best_state = safe_torch_load(ckpt / "best.pt", map_location=dev)
        set_rng_state(state["rng"])

    for cb in cbs:
        cb.on_fit_start(ctx)
    bar = tqdm(total=epochs, initial=start_epoch, desc="fit", unit="epoch", disable=not progress,
               leave=False)
    seen_classes: set[int] = set()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        ctx.epoch, ctx.logs = epoch, {}
        for cb in cbs:
            cb.on_train_epoch_start(ctx)
        loader = next((ld for cb in cbs if (ld := cb.train_loader(ctx)) is not None), train_loader)
        train = train_one_epoch(ctx, loader, cbs, unimodal_loss_weight=unimodal_loss_weight,
                                on_nonfinite=on_nonfinite, max_grad_norm=max_grad_norm)
        seen_classes |= train.pop("classes")
        if epoch == start_epoch and classes is None and len(seen_classes) < 2:
            raise ValueError(f"the training data hold a single class {sorted(seen_classes)}; a "
                             "classifier needs at least two.")
        for cb in cbs:
            cb.on_train_epoch_end(ctx)
        record = {"epoch": epoch, "train": train, "lr": optimizer.param_groups[0].get("lr")}
        if val_loader is not None:
            val = evaluate(net, val_loader, device=dev).to_dict()
            record["val"] = val
            for cb in cbs:
                cb.on_validation_end(ctx, val)
            if val["acc"] > best_score:
                best_score = val["acc"]
                best_state = {"epoch": epoch, "model": copy.deepcopy(net.state_dict())}
                history.meta["best_epoch"] = epoch
                if ckpt is not None:
                    atomic_torch_save(best_state, ckpt / "best.pt")
        if scheduler is not None:
            scheduler.step()
        record.update(ctx.logs)
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        if ckpt is not None:
            atomic_torch_save({
                "epoch": epoch + 1, "step": ctx.step, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "callbacks": {f"{i}:{cb.name}": cb.state_dict() for i, cb in enumerate(cbs)},
                "history": history.to_dict(), "rng": rng_state(), "best_score": best_score,
            }, ckpt / "last.pt")
            history.save(ckpt / "history.json")
        bar.set_postfix(loss=f"{train['loss']:.3f}",
                        val_acc=f"{record['val']['acc']:.3f}" if "val" in record else "-")
        bar.update(1)
    bar.close()
    for cb in cbs:
        cb.on_fit_end(ctx)
    if restore_best and best_state is not None:
        net.load_state_dict(best_state["model"])
        history.meta["restored_epoch"] = best_state["epoch"]
    return history
