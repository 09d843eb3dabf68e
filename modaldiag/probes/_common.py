"""Helpers shared by the probes: the read-only probe context, streaming over a loader, the
baseline rule, and the checks run on encoder features and head logits.

The baseline rule: absence is what the model's stored baseline says (``model.set_baseline``:
``"zero"``, ``"mean"`` or a custom dict) unless the call overrides it with ``baseline="zero"`` or
``baseline="mean"``. Every probe resolves the rule once (:func:`baseline_context`) and records the
kind it used in its result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch

from ..models.contract import MultimodalModel
from ..utils.torch_utils import (
    all_finite,
    module_device,
    preserved_state,
    rng_state,
    set_rng_state,
    to_device,
    unwrap,
)
from ..utils.validation import (
    NON_NEGATIVE_INT,
    Options,
    Satisfies,
    check_inputs,
    check_labels,
    unpack_batch_present,
)

__all__ = ["contract_model", "iterate_batches", "eval_mode", "probe_state", "baseline_context",
           "resolve_baseline", "autocast_context", "encode_checked", "present_of", "ProbeInputs",
           "light_probe_state", "split_of", "BASELINES", "BASELINE_CONSTRAINT", "SEED", "ITERABLE"]

BASELINES = ("zero", "mean")
#: ``baseline=`` of every probe: None (the model's stored baseline) or an override
BASELINE_CONSTRAINT = [Options(None, *BASELINES)]
SEED = [NON_NEGATIVE_INT]
ITERABLE = Satisfies(lambda x: isinstance(x, Iterable) and not isinstance(x, (str, bytes, Mapping)),
                     "an iterable of (inputs, labels) batches (e.g. a DataLoader)")


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
    """Put every submodule in eval mode; on exit restore each submodule's own ``training`` flag.

    ``model.train(was)`` would put a user's frozen (eval-mode) BatchNorm back into train mode;
    this restores the flags module by module.
    """
    modes = [(mod, mod.training) for mod in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for mod, training in modes:
            mod.training = training


@contextlib.contextmanager
def probe_state(model: torch.nn.Module | None):
    """The context every probe runs in: eval mode inside, and on exit the model (every
    submodule's mode, ``requires_grad``, ``.grad``, buffers) and the python / numpy / torch global
    RNG states exactly as found (:class:`~modaldiag.utils.torch_utils.preserved_state`)."""
    with preserved_state(model):
        if model is not None:
            model.eval()
        yield model


@contextlib.contextmanager
def light_probe_state(model: torch.nn.Module):
    """:func:`probe_state` for a caller that owns the gradients and parameters (``md.fit``'s
    per-epoch validation): eval mode inside, and on exit every submodule's mode and the global RNG
    states as found. Under ``torch.no_grad`` in eval mode nothing else can change."""
    rng = rng_state()
    try:
        with eval_mode(model):
            yield model
    finally:
        set_rng_state(rng)


class ProbeInputs(dict):
    """The inputs dict of one probed batch, carrying its per-sample presence mask.

    ``present`` is ``{m: BoolTensor (B,)}`` on the batch's device (True = present) or None when
    every sample has every modality. :func:`encode_checked` applies it, so a probe that encodes
    through it honours presence without handling it; :func:`present_of` reads it.
    """

    present: dict[str, torch.Tensor] | None = None


def present_of(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The presence mask carried by ``inputs`` from :func:`iterate_batches` (None: all present)."""
    return getattr(inputs, "present", None)


def iterate_batches(model: MultimodalModel, loader: Iterable, device=None, *,
                    check_finite: bool = True,
                    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Validated ``(inputs, labels)`` batches moved to the model's device; raises on an empty loader.

    A loader item that is not an ``(inputs: dict, labels)`` pair (e.g. a published repository's
    ``(audio, video, label)`` tuple) gives a ValueError that shows how to adapt the loader. A
    third item, the per-sample presence mask ``{m: BoolTensor (B,)}``, is validated and travels
    with the inputs (:class:`ProbeInputs`; :func:`present_of`): :func:`encode_checked` replaces
    the features of absent samples by the model's baseline, so every probe sees absence as the
    contract defines it. The placeholder inputs of absent samples must still be finite.
    ``check_finite=False`` skips the NaN/inf check of the inputs, for a caller that checks its
    totals instead and re-runs with the check to name the batch (``md.fit``'s validation).
    """
    device = device or module_device(model)
    n = 0
    for b, batch in enumerate(loader):
        inputs, labels, present = unpack_batch_present(batch, model.modalities, batch_index=b)
        size = check_inputs(inputs, model.modalities, batch_index=b)
        labels = check_labels(labels, model.num_classes or 10**9, batch_size=size, batch_index=b)
        for m in ([] if not check_finite or all_finite(inputs[m] for m in model.modalities)
                  else model.modalities):
            x = inputs[m]
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise ValueError(
                    f"input of modality {m!r} in batch {b} contains NaN/inf; probes would return "
                    "NaN values. Clean or drop those samples first.")
        n += size
        moved = ProbeInputs(to_device(inputs, device))
        moved.present = to_device(present, device) if present is not None else None
        yield moved, labels.to(device)
    if n == 0:
        raise ValueError("the loader is empty: no samples to probe.")


def encode_checked(model: MultimodalModel, inputs: Mapping[str, torch.Tensor],
                   batch_index: int, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """``model.encode(inputs)`` with a clear error when an encoder turns finite inputs into
    NaN/inf features (a diverged encoder, or a float16 overflow under autocast). Features of
    samples whose modality is absent (the presence mask :func:`iterate_batches` attaches) are the
    model's baseline (:meth:`~modaldiag.models.contract.MultimodalModel.mask_features`).
    ``check_finite=False`` skips the check, as in :func:`iterate_batches`."""
    feats = model.encode(inputs)
    for m in ([] if not check_finite or all_finite(feats.values()) else model.modalities):
        f = feats[m]
        if f.is_floating_point() and not torch.isfinite(f).all():
            bad = int((~torch.isfinite(f)).flatten(1).any(1).sum())
            raise ValueError(
                f"the encoder of modality {m!r} produced NaN/inf features from finite inputs "
                f"(batch {batch_index}, {bad} of {f.shape[0]} samples). Its weights or running "
                "statistics are probably non-finite (a diverged training run) or a float16 "
                "activation overflowed (autocast); check torch.isfinite on "
                f"model.encoders[{m!r}]'s parameters and buffers.")
    return model.mask_features(feats, present_of(inputs))


def resolve_baseline(model: MultimodalModel, baseline: str | None) -> str:
    """The kind of absence a probe will use: ``baseline`` when given, else the model's stored
    kind (``model.baseline_kind``: ``"zero"``, ``"mean"`` or ``"custom"``)."""
    return model.baseline_kind if baseline is None else baseline


@contextlib.contextmanager
def baseline_context(model: MultimodalModel, baseline: str | None,
                     baseline_loader: Iterable | None = None):
    """Use the requested absence for the duration of a probe; yields the kind used.

    ``baseline=None`` keeps the model's stored baseline (``baseline_loader`` must then be None);
    ``"zero"`` uses zero features; ``"mean"`` uses the mean feature over ``baseline_loader`` when
    given, else the model's stored mean baseline (set by ``model.set_baseline("mean", loader)``).
    The stored baseline is restored on exit.
    """
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"baseline must be None (the model's stored baseline) or one of "
                         f"{list(BASELINES)}; got {baseline!r}.")
    if baseline is None and baseline_loader is not None:
        raise ValueError("baseline_loader is only used with baseline='mean'; pass "
                         "baseline='mean' with it, or drop it to use the model's stored baseline.")
    if baseline == "mean" and baseline_loader is None and model.baseline_kind != "mean":
        raise ValueError(
            "baseline='mean' needs the training-set mean features: call "
            "model.set_baseline('mean', train_loader) first or pass baseline_loader=train_loader.")
    kind = resolve_baseline(model, baseline)
    saved = {m: model.baselines.get(m) for m in model.modalities}
    had_kind = "_baseline_kind" in model.__dict__
    saved_kind = model.__dict__.get("_baseline_kind")
    try:
        if baseline == "zero":
            model.set_baseline("zero")
        elif baseline == "mean" and baseline_loader is not None:
            with eval_mode(model):
                model.set_baseline("mean", baseline_loader)
        yield kind
    finally:
        for m, v in saved.items():
            if v is None:
                model.baselines._buffers.pop(m, None)
            else:
                model.baselines.register_buffer(m, v)
        if had_kind:
            model._baseline_kind = saved_kind
        else:
            model.__dict__.pop("_baseline_kind", None)


def split_of(loader) -> str | None:
    """The ``split`` attribute of a loader's dataset (following ``.dataset`` through wrappers
    such as ``Subset`` or a batch view), or None."""
    obj = loader
    for _ in range(4):
        obj = getattr(obj, "dataset", None)
        if obj is None:
            return None
        name = getattr(obj, "split", None)
        if isinstance(name, str) and name:
            return name
    return None
