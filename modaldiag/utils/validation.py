"""Input checks at the public boundary, in one place.

Every check raises :class:`ValueError` (or :class:`TypeError` for a wrong type) with a message
that says what was expected, what was given, and what to do about it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "check_modality_names",
    "check_inputs",
    "check_labels",
    "check_present",
    "check_finite",
    "check_features",
]

_FORBIDDEN_CHARS = ".\n\r\t"


def check_modality_names(names: Iterable[str], *, what: str = "modality names") -> tuple[str, ...]:
    """Return ``names`` as a tuple after checking there are >= 2 unique, usable strings."""
    names = tuple(names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} must be non-empty strings; got {name!r}.")
        bad = [c for c in _FORBIDDEN_CHARS if c in name]
        if bad:
            raise ValueError(
                f"modality name {name!r} contains {bad!r}; names may not contain '.', tabs or "
                "newlines (they key a torch ModuleDict)."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must be unique; got {list(names)}.")
    if len(names) < 2:
        raise ValueError(
            f"a multimodal model needs at least 2 modalities (M >= 2); got {list(names)}."
        )
    return names


def _name_diff(given: Iterable[str], expected: Sequence[str]) -> tuple[list[str], list[str]]:
    given = list(given)
    missing = [m for m in expected if m not in given]
    extra = [m for m in given if m not in expected]
    return missing, extra


def check_inputs(
    inputs: Mapping[str, torch.Tensor], modalities: Sequence[str], *, batch_index: int | None = None
) -> int:
    """Check a batch of inputs against the model's modalities; return the batch size.

    ``inputs`` must be a mapping with exactly the model's modality names, each a tensor whose
    first dimension is the same batch size.
    """
    where = f" (batch {batch_index})" if batch_index is not None else ""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs{where} must be a dict mapping modality name -> Tensor; got "
            f"{type(inputs).__name__}. Loaders must yield (inputs: dict[str, Tensor], labels)."
        )
    missing, extra = _name_diff(inputs.keys(), modalities)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(
            f"inputs{where} do not match the model's modalities {list(modalities)}: "
            f"{'; '.join(parts)}. Rename the keys your loader yields to the model's modality names."
        )
    sizes = {}
    for m in modalities:
        x = inputs[m]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input for modality {m!r}{where} must be a Tensor; got {type(x).__name__}.")
        if x.dim() == 0:
            raise ValueError(f"input for modality {m!r}{where} is a scalar; expected a batch (B, ...).")
        sizes[m] = x.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"batch sizes differ between modalities{where}: {sizes}. Every modality must hold the "
            "same samples in the same order."
        )
    return next(iter(sizes.values()))


def check_features(features: Mapping[str, torch.Tensor], modalities: Sequence[str]) -> int:
    """Like :func:`check_inputs` but for encoder outputs (feature dict)."""
    missing, extra = _name_diff(features.keys(), modalities)
    if missing or extra:
        raise ValueError(
            f"features must have exactly the modalities {list(modalities)}; missing {missing}, "
            f"unexpected {extra}."
        )
    sizes = {m: features[m].shape[0] for m in modalities}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"feature batch sizes differ between modalities: {sizes}.")
    return next(iter(sizes.values()))


def check_present(present: Iterable[str] | None, modalities: Sequence[str]) -> tuple[str, ...]:
    """Normalise ``present`` (None means all modalities) and check every name is known."""
    if present is None:
        return tuple(modalities)
    if isinstance(present, str):
        present = (present,)
    present = tuple(present)
    unknown = [m for m in present if m not in modalities]
    if unknown:
        raise ValueError(
            f"present={list(present)} names unknown modalities {unknown}; the model has "
            f"{list(modalities)}."
        )
    return present


def check_labels(
    labels: torch.Tensor, num_classes: int, *, batch_size: int | None = None,
    batch_index: int | None = None,
) -> torch.Tensor:
    """Check labels are an integer tensor of shape (B,) with values in [0, num_classes)."""
    where = f" (batch {batch_index})" if batch_index is not None else ""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels{where} must be a LongTensor of shape (B,); got {type(labels).__name__}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels{where} must be integer class indices (torch.long); got dtype {labels.dtype}."
        )
    if labels.dim() != 1:
        raise ValueError(f"labels{where} must have shape (B,); got {tuple(labels.shape)}.")
    if batch_size is not None and labels.shape[0] != batch_size:
        raise ValueError(
            f"labels{where} hold {labels.shape[0]} samples but the inputs hold {batch_size}."
        )
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels{where} must lie in [0, {num_classes}) for num_classes={num_classes}; "
                f"found values from {lo} to {hi}."
            )
    return labels.long()


def check_finite(value: torch.Tensor | float, what: str) -> None:
    """Raise if ``value`` holds NaN or inf. ``what`` names it (e.g. 'loss at epoch 3, batch 7')."""
    if isinstance(value, torch.Tensor):
        ok = bool(torch.isfinite(value).all())
    else:
        ok = math.isfinite(value)
    if not ok:
        raise ValueError(
            f"non-finite value (NaN or inf) in {what}. Lower the learning rate, check the inputs "
            "for NaN/inf, or clip gradients."
        )


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return value


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}.")
    return value
