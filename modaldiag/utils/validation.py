"""Input checks at the public boundary, in one place.

Every check raises :class:`ValueError` (or :class:`TypeError` for a wrong type) with a message
that says what was expected, what was given, and what to do about it.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "closest_match",
    "check_modality_names",
    "check_inputs",
    "check_labels",
    "check_present",
    "check_finite",
    "check_features",
    "check_logits",
    "check_positive_int",
    "check_choice",
    "as_plain_int",
    "unpack_batch",
    "unpack_batch_present",
    "check_presence",
    "Interval",
    "Options",
    "InstanceOf",
    "Satisfies",
    "validate_params",
    "POSITIVE",
    "NON_NEGATIVE",
    "PROBABILITY",
    "POSITIVE_INT",
    "NON_NEGATIVE_INT",
    "BOOL",
]

_FORBIDDEN_CHARS = ".\n\r\t"



def closest_match(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a mistyped ``word`` (difflib ratio >= 0.6), for "did you mean"
    hints; None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None

def check_modality_names(names: Iterable[str], *, what: str = "modality names") -> tuple[str, ...]:
    """Return ``names`` as a tuple after checking there are >= 2 unique, usable strings.

    Any non-empty string is usable except one containing ``'.'`` (it separates the parts of
    ``state_dict`` keys and of History keys such as ``val.unimodal_acc.<name>``), a tab or a
    newline (they break the tables and CSV files of reports). Names that collide with attributes
    of torch containers (``keys``, ``type``, ``training``...), start with ``_`` or ``__``, or hold
    ``$``, spaces or unicode are fine: models store them under escaped keys
    (:mod:`modaldiag.models.names`) and figures draw them literally.
    """
    if isinstance(names, str):
        raise TypeError(f"{what} must be a collection of strings, not the single string {names!r}.")
    names = tuple(names)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} must be non-empty strings; got {name!r}.")
        bad = [c for c in _FORBIDDEN_CHARS if c in name]
        if bad:
            raise ValueError(
                f"modality name {name!r} contains {bad!r}; names may not contain '.', tabs or "
                "newlines ('.' separates the parts of state_dict and History keys; tabs and "
                "newlines break report tables). Rename it, e.g. "
                f"{''.join('_' if c in _FORBIDDEN_CHARS else c for c in name)!r}."
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


def check_logits(logits, batch_size: int, num_classes: int | None, *,
                 what: str = "the model's head") -> torch.Tensor:
    """Check that ``logits`` has shape ``(batch_size, num_classes)``; return it unchanged.

    ``num_classes=None`` accepts any number of columns (a wrapped model before its first call).
    A cheap shape check, run on every head output: a head returning ``(B,)``, the wrong number of
    classes or another batch size would otherwise give silently wrong losses and scores.
    """
    expected = f"(B, num_classes) = ({batch_size}, {'C' if num_classes is None else num_classes})"
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"{what} returned {type(logits).__name__}; it must return a logits Tensor of shape "
            f"{expected}.")
    shape = tuple(logits.shape)
    if logits.dim() != 2:
        hint = ("return one logit per class (for a single score z per sample, return "
                "torch.stack([torch.zeros_like(z), z], dim=1))" if logits.dim() == 1 else
                "flatten or pool the extra dimensions inside the head")
        raise ValueError(f"{what} returned logits of shape {shape}; expected {expected}: {hint}.")
    if shape[0] != batch_size:
        raise ValueError(
            f"{what} returned logits of shape {shape} for a batch of {batch_size} samples; "
            f"expected {expected}: one row per sample, in order (look for a transpose, a reshape "
            "or a reduction over the batch inside the head).")
    if num_classes is None and shape[1] < 2:
        raise ValueError(
            f"{what} returned logits of shape {shape}; expected {expected} with C >= 2: one logit "
            "per class (for a single score z per sample, return "
            "torch.cat([torch.zeros_like(z), z], dim=1)).")
    if num_classes is not None and shape[1] != num_classes:
        raise ValueError(
            f"{what} returned logits of shape {shape}; expected {expected}: the head gives "
            f"{shape[1]} class scores but the model has num_classes={num_classes}. Make the head's "
            "last layer output num_classes values or pass the matching num_classes.")
    return logits


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
        lo, hi = (int(v) for v in torch.aminmax(labels))  # one kernel, one host sync
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


def as_plain_int(value):
    """``value`` as a Python ``int`` when it is an integer scalar of another type (``numpy.int64``,
    a 0-d integer tensor); anything else is returned unchanged for the constraint check to judge."""
    if isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_floating_point() and not value.is_complex() \
                and value.dtype != torch.bool:
            return int(value.item())
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return value


def check_choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}.")
    return value


# ---------------------------------------------------------------- declared parameter constraints
class Interval:
    """A numeric range constraint, e.g. ``Interval(0, None, closed="neither")`` for ``x > 0``.

    ``integer=True`` requires an ``int`` (``bool`` is refused). NaN and inf are always refused
    unless an unbounded side admits inf explicitly (``allow_inf=True``).
    """

    def __init__(self, low: float | None, high: float | None, *, closed: str = "both",
                 integer: bool = False, allow_inf: bool = False):
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed must be both/left/right/neither; got {closed!r}.")
        self.low, self.high, self.closed = low, high, closed
        self.integer, self.allow_inf = integer, allow_inf

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is None and self.high is None:
            return kind
        left = "[" if self.closed in ("both", "left") and self.low is not None else "("
        right = "]" if self.closed in ("both", "right") and self.high is not None else ")"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{kind} in {left}{lo}, {hi}{right}"

    def accepts(self, value) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return False
            value = value.item()
        if self.integer:
            if not isinstance(value, int):
                return False
        elif not isinstance(value, (int, float)):
            return False
        value = float(value)
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            return False
        if self.low is not None:
            if value < self.low or (value == self.low and self.closed in ("right", "neither")):
                return False
        if self.high is not None:
            if value > self.high or (value == self.high and self.closed in ("left", "neither")):
                return False
        return True


class Options:
    """One of a fixed set of values (compared with ``==``)."""

    def __init__(self, *choices):
        self.choices = choices

    def describe(self) -> str:
        if len(self.choices) == 1:
            return repr(self.choices[0])
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def accepts(self, value) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)


class InstanceOf:
    """An instance of one of the given types (``bool`` is not an ``int`` here)."""

    def __init__(self, *types: type, what: str | None = None):
        self.types, self.what = types, what

    def describe(self) -> str:
        return self.what or "an instance of " + " or ".join(t.__name__ for t in self.types)

    def accepts(self, value) -> bool:
        if isinstance(value, bool) and bool not in self.types:
            return False
        return isinstance(value, self.types)


class Satisfies:
    """A value for which ``predicate(value)`` is true; ``what`` says what that means."""

    def __init__(self, predicate, what: str):
        self.predicate, self.what = predicate, what

    def describe(self) -> str:
        return self.what

    def accepts(self, value) -> bool:
        try:
            return bool(self.predicate(value))
        except Exception:  # noqa: BLE001 - a predicate that cannot judge refuses
            return False


#: shorthands for the common constraints
POSITIVE = Interval(0, None, closed="neither")
NON_NEGATIVE = Interval(0, None, closed="left")
PROBABILITY = Interval(0, 1, closed="both")
POSITIVE_INT = Interval(1, None, integer=True)
NON_NEGATIVE_INT = Interval(0, None, integer=True)
BOOL = InstanceOf(bool, what="True or False")


def _as_constraint(c):
    if c is None:
        return Options(None)
    if isinstance(c, str):
        return Options(c)
    if isinstance(c, type):
        return InstanceOf(c)
    return c


def validate_params(constraints: Mapping[str, Sequence], params: Mapping[str, object],
                    owner: str) -> None:
    """Check every parameter against its declared constraints (scikit-learn's idea).

    ``constraints`` maps a parameter name to a list of admissible constraints (a value passes when
    any of them accepts it): :class:`Interval`, :class:`Options`, :class:`InstanceOf`,
    :class:`Satisfies`, a type, a string literal, or ``None`` (meaning ``None`` is allowed).
    Raises a ValueError (TypeError for the wrong kind of object) that names ``owner``, the
    parameter, what was given and what is admissible.
    """
    for name, value in params.items():
        if name not in constraints:
            continue
        allowed = [_as_constraint(c) for c in constraints[name]]
        if any(c.accepts(value) for c in allowed):
            continue
        described = " or ".join(c.describe() for c in allowed)
        numeric = any(isinstance(c, Interval) for c in allowed)
        wrong_kind = not numeric and not any(
            isinstance(c, Satisfies) or (isinstance(c, Options) and c.choices != (None,))
            for c in allowed)
        shown = repr(value) if not isinstance(value, torch.Tensor) else f"tensor {value.tolist()!r}"
        exc = TypeError if wrong_kind else ValueError
        raise exc(f"{owner}: {name} must be {described}; got {shown}.")


def unpack_batch(batch, modalities: Sequence[str] | None = None, *,
                 batch_index: int | None = None) -> tuple[Mapping, torch.Tensor]:
    """``(inputs, labels)`` from one loader item, or a ValueError that says how to adapt the loader.

    modaldiag's loaders yield ``(inputs: dict[str, Tensor], labels: LongTensor)``. Published
    audio-visual code yields tuples such as ``(audio, video, label)``: the message names what was
    received and shows the one-line adapter (``md.datasets.adapt_loader``).
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], Mapping):
        return batch[0], batch[1]  # the common case: no message to build
    where = f" (batch {batch_index})" if batch_index is not None else ""
    names = list(modalities) if modalities is not None else ["audio", "visual"]
    example = ", ".join(f"{m!r}: b[{i}]" for i, m in enumerate(names))
    recipe = (f"md.datasets.adapt_loader(loader, lambda b: ({{{example}}}, b[{len(names)}]))")
    if isinstance(batch, Mapping):
        raise ValueError(
            f"the loader{where} yielded a dict with keys {sorted(map(str, batch))}; modaldiag "
            "expects (inputs: dict[str, Tensor], labels: LongTensor) pairs. Adapt it, e.g. "
            f"md.datasets.adapt_loader(loader, lambda b: ({{m: b[m] for m in {names!r}}}, b['label'])).")
    if not isinstance(batch, (tuple, list)):
        raise ValueError(
            f"the loader{where} yielded a {type(batch).__name__}; modaldiag expects "
            f"(inputs: dict[str, Tensor], labels: LongTensor) pairs. Adapt it: {recipe}.")
    if len(batch) == 3 and isinstance(batch[0], Mapping) and isinstance(batch[2], Mapping):
        return batch[0], batch[1]  # (inputs, labels, present): see unpack_batch_present
    if len(batch) == 3 and isinstance(batch[0], Mapping):
        raise TypeError(
            f"the loader{where} yielded (inputs, labels, {type(batch[2]).__name__}); the third item "
            "must be the presence mask, a dict {modality: BoolTensor (B,)} (True = present).")
    if len(batch) != 2 or not isinstance(batch[0], Mapping):
        kinds = ", ".join(type(b).__name__ for b in batch)
        raise ValueError(
            f"the loader{where} yielded a {type(batch).__name__} of {len(batch)} items ({kinds}); "
            "modaldiag expects (inputs: dict[str, Tensor], labels: LongTensor), one dict entry "
            f"per modality. Adapt it without copying data: {recipe}.")
    return batch[0], batch[1]


def check_presence(present, modalities: Sequence[str], batch_size: int, *,
                   batch_index: int | None = None) -> dict[str, torch.Tensor] | None:
    """Validate a per-sample presence mask ``{m: BoolTensor (B,)}``; None when every sample has
    every modality.

    True means the modality is present for that sample; a modality left out of the dict is present
    for every sample. Names are checked against ``modalities`` (with a "did you mean"), each value
    must be a bool tensor of shape ``(batch_size,)``. Returns the entries that hold at least one
    False (the rest change nothing), or None when none does.
    """
    where = f" (batch {batch_index})" if batch_index is not None else ""
    if present is None:
        return None
    if not isinstance(present, Mapping):
        raise TypeError(
            f"the presence mask{where} must be a dict {{modality: BoolTensor (B,)}}; got "
            f"{type(present).__name__}. Loaders yield (inputs, labels) or (inputs, labels, present).")
    out = {}
    for m, mask in present.items():
        if m not in modalities:
            close = closest_match(str(m), [str(k) for k in modalities])
            hint = f" Did you mean {close!r}?" if close else ""
            raise ValueError(
                f"the presence mask{where} names {m!r}, which is not a modality of the model "
                f"{list(modalities)}.{hint} Its keys must be modality names (a modality left out "
                "is present for every sample).")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"the presence mask of modality {m!r}{where} must be a BoolTensor (B,); got "
                f"{type(mask).__name__}. Use torch.as_tensor(values, dtype=torch.bool).")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"the presence mask of modality {m!r}{where} has dtype {mask.dtype}; it must be "
                "torch.bool (True = present). Convert it with mask.bool() after checking that it "
                "holds only 0/1.")
        if tuple(mask.shape) != (batch_size,):
            raise ValueError(
                f"the presence mask of modality {m!r}{where} has shape {tuple(mask.shape)}; "
                f"expected ({batch_size},): one flag per sample of the batch.")
        if not bool(mask.all()):
            out[m] = mask
    return out or None


def unpack_batch_present(batch, modalities: Sequence[str], *, batch_index: int | None = None
                         ) -> tuple[Mapping, torch.Tensor, dict[str, torch.Tensor] | None]:
    """``(inputs, labels, present)`` from one loader item.

    A loader yields ``(inputs, labels)`` (every modality present for every sample; ``present`` is
    then None) or ``(inputs, labels, present)`` with ``present`` a dict ``{m: BoolTensor (B,)}``
    (True = present; a modality missing from the dict is present everywhere), validated by
    :func:`check_presence`. ``present`` comes back None when every flag is True, so an all-True
    mask trains and probes exactly like a 2-tuple batch.
    """
    inputs, labels = unpack_batch(batch, modalities, batch_index=batch_index)
    if len(batch) == 2:
        return inputs, labels, None
    size = check_inputs(inputs, modalities, batch_index=batch_index)
    return inputs, labels, check_presence(batch[2], modalities, size, batch_index=batch_index)
