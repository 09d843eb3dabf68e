"""Helpers shared by the probes: streaming over a loader in eval mode, baseline selection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from ..models.contract import MultimodalModel
from ..utils.torch_utils import module_device, to_device, unwrap
from ..utils.validation import check_choice, check_inputs, check_labels

__all__ = ["contract_model", "iterate_batches", "eval_mode", "baseline_context", "autocast_context"]


def autocast_context(enabled: bool, inputs):
    """``torch.autocast`` on the inputs' device (float16 on CUDA, bfloat16 on CPU), or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    device = next(iter(inputs.values())).device.type
    return torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16)


def contract_model(model) -> MultimodalModel:
    net = unwrap(model)
    if not isinstance(net, MultimodalModel):
        raise TypeError(
            f"expected a modaldiag model (md.MultimodalClassifier or md.wrap(...)); got "
            f"{type(net).__name__}. Wrap it first: md.wrap(model, encoders=..., head=...)."
        )
    return net


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def iterate_batches(model: MultimodalModel, loader: Iterable, device=None,
                    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Validated ``(inputs, labels)`` batches moved to the model's device; raises on an empty loader."""
    device = device or module_device(model)
    n = 0
    for b, (inputs, labels) in enumerate(loader):
        size = check_inputs(inputs, model.modalities, batch_index=b)
        labels = check_labels(labels, model.num_classes or 10**9, batch_size=size, batch_index=b)
        for m, x in inputs.items():
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError(
                    f"input of modality {m!r} in batch {b} contains NaN/inf; probes would return "
                    "NaN values. Clean or drop those samples first.")
        n += size
        yield to_device(inputs, device), labels.to(device)
    if n == 0:
        raise ValueError("the loader is empty: no samples to probe.")


@contextlib.contextmanager
def baseline_context(model: MultimodalModel, baseline: str, baseline_loader: Iterable | None):
    """Temporarily use the requested baseline ("zero" or "mean") for absent modalities."""
    check_choice(baseline, ("zero", "mean"), "baseline")
    saved = {m: model.baselines.get(m) for m in model.modalities}
    saved_kind = getattr(model, "_baseline_kind", None)
    try:
        if baseline == "zero":
            model.set_baseline("zero")
        elif baseline_loader is not None:
            model.set_baseline("mean", baseline_loader)
        elif model.baseline_kind != "mean":
            raise ValueError(
                "baseline='mean' needs the training-set mean features: call "
                "model.set_baseline('mean', train_loader) first or pass baseline_loader=train_loader."
            )
        yield model
    finally:
        for m, v in saved.items():
            model.baselines.set(m, v)
        if saved_kind is not None:
            model._baseline_kind = saved_kind
