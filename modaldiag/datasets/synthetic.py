"""A synthetic multimodal classification task with controllable imbalance (ground truth for tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..utils.validation import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    PROBABILITY,
    InstanceOf,
    Interval,
    Satisfies,
    as_plain_int,
    check_modality_names,
    validate_params,
)
from .base import DatasetSplits, MultimodalDataset, stratified_split

__all__ = ["synthetic"]


_parameter_constraints = {
    "n_samples": [POSITIVE_INT],
    "num_classes": [Interval(2, None, integer=True)],
    "strength": [None, InstanceOf(Mapping, what="a dict {modality name: float >= 0}")],
    "splits": [Satisfies(lambda v: len(v) == 3 and all(float(f) > 0 for f in v)
                         and abs(sum(float(f) for f in v) - 1.0) < 1e-6,
                         "3 positive fractions (train, val, test) summing to 1")],
    "seed": [NON_NEGATIVE_INT],
}
_per_modality_constraints = {
    "strength": NON_NEGATIVE,
    "dims": POSITIVE_INT,
    "noise": NON_NEGATIVE,
    "label_noise": PROBABILITY,
    "missing_rate": PROBABILITY,
}


def _per_modality(value, modalities, name, default):
    """``{m: value}`` for a scalar or a partial dict, each value checked against its constraint."""
    if value is None:
        out = {m: default for m in modalities}
    elif isinstance(value, Mapping):
        unknown = [k for k in value if k not in modalities]
        if unknown:
            raise ValueError(f"synthetic: {name} names unknown modalities {sorted(map(str, unknown))}; "
                             f"known: {list(modalities)}.")
        out = {m: as_plain_int(value.get(m, default)) for m in modalities}
    else:
        out = {m: as_plain_int(value) for m in modalities}
    constraint = _per_modality_constraints[name]
    validate_params({f"{name}[{m!r}]": [constraint] for m in modalities},
                    {f"{name}[{m!r}]": v for m, v in out.items()}, "synthetic")
    return out


def synthetic(
    n_samples: int = 2000,
    num_classes: int = 6,
    strength: Mapping[str, float] | None = None,
    dims: Mapping[str, int] | int | None = None,
    *,
    noise: Mapping[str, float] | float = 1.0,
    label_noise: Mapping[str, float] | float = 0.0,
    missing_rate: Mapping[str, float] | float = 0.0,
    splits: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> DatasetSplits:
    """Gaussian class clusters per modality, with a known class-signal strength per modality.

    For modality m and a sample of class y: ``x_m = strength[m] * P_m[y'] + noise[m] * eps``,
    where the prototypes ``P_m[c]`` are random unit vectors in ``R^dims[m]``, ``eps ~ N(0, I)``,
    and ``y'`` is ``y`` except with probability ``label_noise[m]`` a uniformly random class (the
    modality is then uninformative for that sample). With probability ``missing_rate[m]`` the
    modality is missing for a sample (``info["missing"][m]`` holds the mask per split): when any
    missing rate is > 0 the datasets carry the presence mask (``present[m] = ~missing``) and yield
    ``(inputs, labels, present)``, so training and probes replace the missing entries by the
    model's baseline; the input row of a missing entry is a zero placeholder (the mean of the
    inputs' distribution up to the class signal) that the encoder runs on but nothing reads.

    Parameters
    ----------
    n_samples : int, default 2000
        Total samples, split into train/val/test by ``splits`` (stratified).
    num_classes : int, default 6
        At least 2.
    strength : dict[str, float], default {"a": 2.0, "b": 0.5}
        Class-signal strength per modality; its keys define the modalities and their order.
    dims : dict[str, int] or int, default 32
        Input dimension per modality.
    noise, label_noise, missing_rate : float or dict[str, float]
        Per-modality noise std (default 1.0, >= 0), label-noise rate (0.0, in [0, 1]), missing
        rate (0.0, in [0, 1]). A dict may name a subset of the modalities.
    splits : (float, float, float), default (0.7, 0.15, 0.15)
        Positive train/val/test fractions summing to 1; every split must get at least about one
        sample per class (a ValueError says the smallest ``n_samples`` that works).
    seed : int, default 0
        Everything (prototypes, samples, split) is deterministic given the seed.
    """
    n_samples, num_classes, seed = (as_plain_int(v) for v in (n_samples, num_classes, seed))
    validate_params(_parameter_constraints, {"n_samples": n_samples, "num_classes": num_classes,
                                             "strength": strength, "splits": splits, "seed": seed},
                    "synthetic")
    strength = dict(strength) if strength is not None else {"a": 2.0, "b": 0.5}
    modalities = check_modality_names(strength.keys())
    strength = _per_modality(strength, modalities, "strength", 0.0)
    dims_m = _per_modality(dims, modalities, "dims", 32)
    noise_m = _per_modality(noise, modalities, "noise", 1.0)
    label_noise_m = _per_modality(label_noise, modalities, "label_noise", 0.0)
    missing_m = _per_modality(missing_rate, modalities, "missing_rate", 0.0)
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % num_classes
    rng.shuffle(y)
    inputs, missing = {}, {}
    for m in modalities:
        protos = rng.standard_normal((num_classes, dims_m[m]))
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        y_eff = y.copy()
        flip = rng.random(n_samples) < label_noise_m[m]
        y_eff[flip] = rng.integers(0, num_classes, flip.sum())
        x = strength[m] * protos[y_eff] + noise_m[m] * rng.standard_normal((n_samples, dims_m[m]))
        miss = rng.random(n_samples) < missing_m[m]
        x[miss] = 0.0
        inputs[m] = x.astype(np.float32)
        missing[m] = miss
    parts = stratified_split(y, splits, seed)
    empty = [name for name, p in zip(("train", "val", "test"), parts, strict=True) if not len(p)]
    if empty:
        suggest = int(np.ceil(2 * num_classes / min(float(f) for f in splits)))
        raise ValueError(
            f"synthetic: n_samples={n_samples} is too small for {num_classes} classes and splits "
            f"{tuple(splits)}: the {'/'.join(empty)} split would be empty. Use a larger n_samples "
            f"(e.g. {suggest}).")
    masked = [m for m in modalities if missing_m[m] > 0]
    sets = [MultimodalDataset({m: inputs[m][p] for m in modalities}, y[p], num_classes=num_classes,
                              name="synthetic",
                              present={m: ~missing[m][p] for m in masked} if masked else None)
            for p in parts]
    info = {"strength": strength, "dims": dims_m, "noise": noise_m, "label_noise": label_noise_m,
            "missing_rate": missing_m, "seed": seed,
            "missing": {m: [missing[m][p] for p in parts] for m in modalities}}
    return DatasetSplits("synthetic", *sets,
                         description="Gaussian class clusters with per-modality signal strength.",
                         license="generated", info=info)
