"""A synthetic multimodal classification task with controllable imbalance (ground truth for tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..utils.validation import check_modality_names, check_positive_int
from .base import DatasetSplits, MultimodalDataset, stratified_split

__all__ = ["synthetic"]


def _per_modality(value, modalities, name, default):
    if value is None:
        return {m: default for m in modalities}
    if isinstance(value, Mapping):
        unknown = set(value) - set(modalities)
        if unknown:
            raise ValueError(f"{name} names unknown modalities {sorted(unknown)}; known: {list(modalities)}.")
        return {m: value.get(m, default) for m in modalities}
    return {m: value for m in modalities}


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
    modality is missing: its input is all zeros (``info["missing"][m]`` holds the mask).

    Parameters
    ----------
    n_samples : int, default 2000
        Total samples, split into train/val/test by ``splits`` (stratified).
    num_classes : int, default 6
    strength : dict[str, float], default {"a": 2.0, "b": 0.5}
        Class-signal strength per modality; its keys define the modalities and their order.
    dims : dict[str, int] or int, default 32
        Input dimension per modality.
    noise, label_noise, missing_rate : float or dict[str, float]
        Per-modality noise std (default 1.0), label-noise rate (0.0), missing rate (0.0).
    seed : int, default 0
        Everything (prototypes, samples, split) is deterministic given the seed.
    """
    check_positive_int(n_samples, "n_samples")
    check_positive_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2 (a single class cannot be classified).")
    strength = dict(strength) if strength is not None else {"a": 2.0, "b": 0.5}
    modalities = check_modality_names(strength.keys())
    dims_m = _per_modality(dims, modalities, "dims", 32)
    noise_m = _per_modality(noise, modalities, "noise", 1.0)
    label_noise_m = _per_modality(label_noise, modalities, "label_noise", 0.0)
    missing_m = _per_modality(missing_rate, modalities, "missing_rate", 0.0)
    for m in modalities:
        check_positive_int(dims_m[m], f"dims[{m!r}]")
        for name, v in (("label_noise", label_noise_m[m]), ("missing_rate", missing_m[m])):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}[{m!r}] must lie in [0, 1]; got {v}.")
        if noise_m[m] < 0 or strength[m] < 0:
            raise ValueError(f"strength and noise must be >= 0; got {strength[m]}, {noise_m[m]} for {m!r}.")

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
    sets = [MultimodalDataset({m: inputs[m][p] for m in modalities}, y[p], num_classes=num_classes,
                              name="synthetic") for p in parts]
    info = {"strength": strength, "dims": dims_m, "noise": noise_m, "label_noise": label_noise_m,
            "missing_rate": missing_m, "seed": seed,
            "missing": {m: [missing[m][p] for p in parts] for m in modalities}}
    return DatasetSplits("synthetic", *sets,
                         description="Gaussian class clusters with per-modality signal strength.",
                         license="generated", info=info)
