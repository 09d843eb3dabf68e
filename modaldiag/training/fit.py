"""``md.fit``: the reference training loop (joint training, optionally regulated)."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from ..datasets.base import MultimodalDataset, batch_loader, loader_dataset
from ..models.contract import MultimodalModel
from ..utils.distributed import barrier, is_distributed, is_main_process
from ..utils.distributed import rank as dist_rank
from ..utils.io import atomic_torch_save, safe_torch_load
from ..utils.torch_utils import resolve_device, rng_state, seed_everything, set_rng_state, unwrap
from ..utils.validation import check_choice, check_positive_int
from .callbacks import Callback
from .history import History
from .loop import Regulation

__all__ = ["fit", "default_optimizer"]


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
    batch_size : int, default 64
        Used when a Dataset (not a loader) is given.
    amp : bool, default False
        Mixed precision: autocast float16 with a GradScaler on CUDA (regulators see unscaled
        gradients), autocast bfloat16 on CPU.

    Distributed training: when a ``torch.distributed`` process group is initialised (e.g. under
    ``torchrun``), the model is wrapped in ``DistributedDataParallel`` (or used as given if it
    already is), RNGs are seeded with ``seed + rank``, a Dataset is sharded with a
    ``DistributedSampler``, every regulator reduces its statistics over ranks, and only rank 0
    writes checkpoints and the History file (every rank returns the History).

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
    classes = _label_classes(train_loader)
    if classes is not None and len(classes) < 2:
        raise ValueError(f"the training data hold a single class {sorted(classes)}; a classifier "
                         "needs at least two.")

    from ..probes.unimodal import evaluate

    scaler = torch.amp.GradScaler("cuda") if amp and dev.type == "cuda" else None
    run = Regulation(model, optimizer, regulator, monitor=monitor, callbacks=callbacks,
                     unimodal_loss_weight=unimodal_loss_weight, on_nonfinite=on_nonfinite,
                     device=dev, amp=amp, scaler=scaler)
    history = History(net.modalities, config={
        "epochs": epochs, "seed": seed, "optimizer": type(optimizer).__name__,
        "lr": optimizer.param_groups[0].get("lr"),
        "regulators": [repr(cb) if hasattr(cb, "config") else cb.name for cb in run.callbacks],
        "unimodal_loss_weight": unimodal_loss_weight, "fusion": getattr(net, "fusion_type", None),
        "modalities": list(net.modalities), "num_classes": net.num_classes,
        "baseline": net.baseline_kind, "device": str(dev),
    })
    ctx = run.ctx
    ctx.history = history
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_epoch, best_score, best_state = 0, -float("inf"), None
    barrier()
    if resume and ckpt is not None and (ckpt / "last.pt").exists():
        state = safe_torch_load(ckpt / "last.pt", map_location=dev)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        run.load_state_dict(state["regulation"])
        history = History.from_dict(state["history"])
        ctx.history = history
        start_epoch = int(state["epoch"])
        best_score = float(state.get("best_score", -float("inf")))
        if (ckpt / "best.pt").exists():
            best_state = safe_torch_load(ckpt / "best.pt", map_location=dev)
        set_rng_state(state["rng"])

    run.start(train_loader, val_loader, epochs)
    bar = tqdm(total=epochs, initial=start_epoch, desc="fit", unit="epoch",
               disable=not progress or not is_main_process(), leave=False)
    seen_classes: set[int] = set()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        loader = run.epoch_start(epoch, train_loader)
        model.train()
        for inputs, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            if run.backward(inputs, labels) is None:
                continue
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            run.batch_end()
        stats = run.epoch_stats
        if stats["n"] == 0:
            if stats["skipped"]:
                raise ValueError(f"every batch of epoch {epoch} had a non-finite loss and was skipped.")
            raise ValueError("the training loader yielded no batches (empty loader).")
        seen_classes |= stats["classes"]
        if epoch == start_epoch and classes is None and len(seen_classes) < 2:
            raise ValueError(f"the training data hold a single class {sorted(seen_classes)}; a "
                             "classifier needs at least two.")
        logs = run.epoch_end()
        record = {"epoch": epoch,
                  "train": {"loss": stats["loss"] / stats["n"], "acc": stats["correct"] / stats["n"],
                            "n": stats["n"], "skipped": stats["skipped"]},
                  "lr": optimizer.param_groups[0].get("lr")}
        if val_loader is not None:
            val = evaluate(net, val_loader, device=dev).to_dict()
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
            }, ckpt / "last.pt")
            history.save(ckpt / "history.json")
        barrier()  # no rank runs ahead of rank 0's checkpoint
        bar.set_postfix(loss=f"{record['train']['loss']:.3f}",
                        val_acc=f"{record['val']['acc']:.3f}" if "val" in record else "-")
        bar.update(1)
    bar.close()
    run.end()
    if restore_best and best_state is not None:
        net.load_state_dict(best_state["model"])
        history.meta["restored_epoch"] = best_state["epoch"]
    return history
