"""In-memory multimodal datasets and the train/val/test bundle every loader function returns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..utils.validation import (
    BOOL,
    POSITIVE_INT,
    InstanceOf,
    Satisfies,
    as_plain_int,
    check_modality_names,
    closest_match,
    validate_params,
)

__all__ = ["MultimodalDataset", "DatasetSplits", "batch_loader", "loader_dataset"]

_loader_constraints = {
    "batch_size": [POSITIVE_INT],
    "shuffle": [BOOL],
    "shuffle_train": [BOOL],
    "drop_last": [BOOL],
    "generator": [None, InstanceOf(torch.Generator)],
}


def _as_input_tensor(x, modality: str) -> torch.Tensor:
    """One modality's input array as a tensor with a sample dimension, or a clear error."""
    if isinstance(x, np.ndarray) and x.dtype.kind not in "biuf":
        raise TypeError(
            f"MultimodalDataset: input of modality {modality!r} has dtype {x.dtype}; it must be a "
            "numeric array (N, ...), e.g. np.float32.")
    try:
        t = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"MultimodalDataset: input of modality {modality!r} ({type(x).__name__}) cannot be "
            f"turned into a numeric tensor (N, ...): {exc}") from None
    if t.dim() == 0:
        raise ValueError(f"MultimodalDataset: input of modality {modality!r} is a scalar; it must "
                         "have a sample dimension (N, ...).")
    return t


def _as_label_tensor(labels) -> torch.Tensor:
    """Labels as a LongTensor (N,); whole-number floats are converted, anything else refused."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind not in "biuf":
        raise TypeError(f"MultimodalDataset: labels have dtype {labels.dtype}; they must be "
                        "integer class indices (N,).")
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"MultimodalDataset: labels ({type(labels).__name__}) cannot be turned "
                        f"into a tensor of class indices (N,): {exc}") from None
    if y.dim() != 1:
        raise ValueError(f"MultimodalDataset: labels must have shape (N,); got {tuple(y.shape)}. "
                         "Give one integer class index per sample (not one-hot rows).")
    if y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"MultimodalDataset: labels have dtype {y.dtype}; they must be integer "
                         "class indices.")
    if y.is_floating_point():
        bad_nan = torch.isnan(y) | torch.isinf(y)
        if bool(bad_nan.any()):
            i = int(torch.nonzero(bad_nan)[0])
            raise ValueError(f"MultimodalDataset: labels contain NaN or inf (first at index {i}); "
                             "every sample needs an integer class index.")
        frac = y != torch.round(y)
        if bool(frac.any()):
            i = int(torch.nonzero(frac)[0])
            raise ValueError(
                f"MultimodalDataset: labels must be integer class indices; got the non-integral "
                f"value {float(y[i])!r} at index {i}. They are never truncated: map your targets "
                "to classes 0..C-1 (e.g. np.unique(y, return_inverse=True)[1]).")
    return y.long()


def _as_presence(present, modalities: Sequence[str], n: int) -> dict[str, torch.Tensor] | None:
    """``present`` as ``{m: BoolTensor (N,)}`` (None stays None), or a clear error."""
    if present is None:
        return None
    if not isinstance(present, Mapping):
        raise TypeError(f"MultimodalDataset: present must be a dict {{modality: bool array (N,)}}; "
                        f"got {type(present).__name__}.")
    out = {}
    for m, flags in present.items():
        if m not in modalities:
            close = closest_match(str(m), [str(k) for k in modalities])
            hint = f" Did you mean {close!r}?" if close else ""
            raise ValueError(f"MultimodalDataset: present names {m!r}, which is not one of the "
                             f"modalities {list(modalities)}.{hint}")
        arr = np.asarray(flags.cpu() if isinstance(flags, torch.Tensor) else flags)
        if arr.shape != (n,):
            raise ValueError(f"MultimodalDataset: present[{m!r}] has shape {arr.shape}; expected "
                             f"({n},): one flag per sample.")
        if arr.dtype != bool:
            if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
                raise ValueError(f"MultimodalDataset: present[{m!r}] must hold booleans or 0/1 "
                                 "(1 = the modality is present for that sample).")
            arr = arr.astype(bool)
        out[m] = torch.from_numpy(arr.copy())
    return out


class MultimodalDataset(Dataset):
    """Tensors per modality plus labels; ``ds[i]`` is ``({m: x_m[i]}, y[i])``, or
    ``({m: x_m[i]}, y[i], {m: present_m[i]})`` when the dataset carries a presence mask.

    Parameters
    ----------
    inputs : dict[str, Tensor or ndarray]
        ``{m: (N, ...)}``, one numeric array per modality, same N >= 1 for every modality.
    labels : Tensor or ndarray or sequence (N,)
        Integer class labels in ``[0, num_classes)``. Floating-point labels are accepted only when
        every value is a whole number (``2.0`` becomes ``2``); ``2.7`` or NaN is refused, never
        truncated.
    num_classes : int, optional
        Defaults to ``len(class_names)`` or ``labels.max() + 1``.
    class_names : sequence of str, optional
        One name per class (``len(class_names) == num_classes``).
    name : str, default ""
    present : dict[str, bool array (N,)], optional
        Per-sample presence of some modalities (True or 1 = present; a modality left out is
        present for every sample). With it, items and batches are 3-tuples
        ``(inputs, labels, present)``: training and every probe replace the features of absent
        entries by the model's baseline. The input row of an absent entry is a placeholder the
        encoder still runs on (its output is discarded): keep it finite and neutral (zeros for
        standardised inputs).

    Attributes
    ----------
    present : dict[str, BoolTensor (N,)] or None
        The presence mask (None: every modality present for every sample).
    split : str or None
        ``"train"``, ``"val"`` or ``"test"`` when the dataset belongs to a :class:`DatasetSplits`
        (reports name the split of every number from it), else None.

    Raises
    ------
    ValueError
        On an empty dataset, modalities with different sample counts, non-integral, NaN or
        out-of-range labels, or non-numeric inputs (TypeError for a wrong kind of object).
    """

    _parameter_constraints = {
        "inputs": [InstanceOf(Mapping, what="a dict {modality name: Tensor (N, ...)}")],
        "num_classes": [None, POSITIVE_INT],
        "class_names": [None, Satisfies(
            lambda v: not isinstance(v, str) and all(isinstance(c, str) for c in v),
            "a sequence of strings (one per class)")],
        "name": [str],
    }

    def __init__(self, inputs: Mapping[str, torch.Tensor | np.ndarray],
                 labels: torch.Tensor | np.ndarray | Sequence[int], *,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 name: str = "", present: Mapping[str, Sequence[bool]] | None = None):
        num_classes = as_plain_int(num_classes)
        validate_params(self._parameter_constraints, {"inputs": inputs, "num_classes": num_classes,
                                                      "class_names": class_names, "name": name},
                        "MultimodalDataset")
        self.modalities = check_modality_names(inputs.keys())
        self.inputs = {m: _as_input_tensor(inputs[m], m) for m in self.modalities}
        self.labels = _as_label_tensor(labels)
        n = self.labels.shape[0]
        counts = {m: int(x.shape[0]) for m, x in self.inputs.items()}
        if any(c != n for c in counts.values()):
            raise ValueError(
                f"MultimodalDataset: every modality must hold one row per label; labels have {n} "
                f"rows but the modalities have {counts}. Give every modality the same samples, in "
                "the same order.")
        if n == 0:
            raise ValueError("MultimodalDataset: the dataset is empty (0 samples); give at least one "
                             "sample per modality and one label.")
        self.class_names = list(class_names) if class_names is not None else None
        if num_classes is None:
            num_classes = len(self.class_names) if self.class_names else int(self.labels.max()) + 1
        elif self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(
                f"MultimodalDataset: class_names has {len(self.class_names)} names but "
                f"num_classes={num_classes}; give one name per class.")
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"MultimodalDataset: labels must lie in [0, {num_classes}) for num_classes="
                f"{num_classes}; found values from {lo} to {hi}. Map the classes to 0..C-1 or "
                "pass the right num_classes.")
        self.num_classes = int(num_classes)
        self.name = name
        self.present = _as_presence(present, self.modalities, n)
        #: which split this is ("train", "val", "test"), set by DatasetSplits; None otherwise
        self.split: str | None = None

    @classmethod
    def _from_checked(cls, inputs: dict[str, torch.Tensor], labels: torch.Tensor, *,
                      num_classes: int, class_names: list[str] | None,
                      name: str, present: dict[str, torch.Tensor] | None = None
                      ) -> MultimodalDataset:
        """A dataset from tensors that were already checked (may be empty: a subset)."""
        ds = cls.__new__(cls)
        ds.modalities = tuple(inputs)
        ds.inputs, ds.labels, ds.present = inputs, labels, present
        ds.num_classes, ds.class_names, ds.name = num_classes, class_names, name
        return ds

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index):
        return _item(self, index)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample input shape of each modality (no batch dimension)."""
        return {m: tuple(x.shape[1:]) for m, x in self.inputs.items()}

    def subset(self, indices) -> MultimodalDataset:
        """The samples at ``indices`` (any integer index sequence; may be empty)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1), dtype=torch.long)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ValueError(f"subset indices must lie in [0, {len(self)}); got values from "
                             f"{int(idx.min())} to {int(idx.max())}.")
        present = getattr(self, "present", None)
        return type(self)._from_checked({m: x[idx] for m, x in self.inputs.items()},
                                        self.labels[idx], num_classes=self.num_classes,
                                        class_names=self.class_names, name=self.name,
                                        present=None if present is None else
                                        {m: p[idx] for m, p in present.items()})

    def loader(self, batch_size: int = 64, shuffle: bool = False, drop_last: bool = False,
               generator: torch.Generator | None = None) -> DataLoader:
        """A fast DataLoader that slices whole batches (no per-sample collation).

        ``batch_size`` >= 1 (default 64); ``shuffle`` with an optional seeded ``generator``;
        ``drop_last`` drops a last incomplete batch.
        """
        return batch_loader(self, batch_size, shuffle=shuffle, drop_last=drop_last,
                            generator=generator)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{m}: {s}" for m, s in self.input_shapes.items())
        return f"MultimodalDataset({self.name!r}, n={len(self)}, classes={self.num_classes}, {shapes})"


class _BatchView(Dataset):
    """Indexes a MultimodalDataset by a list of indices, returning a whole batch."""

    def __init__(self, dataset: MultimodalDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, indices):
        return _item(self.dataset, torch.as_tensor(indices, dtype=torch.long))


def _item(dataset: MultimodalDataset, index):
    """``(inputs, labels)`` at ``index`` (an int or an index tensor), with the presence mask as a
    third item when the dataset carries one."""
    inputs = {m: x[index] for m, x in dataset.inputs.items()}
    present = getattr(dataset, "present", None)
    if present is None:
        return inputs, dataset.labels[index]
    return inputs, dataset.labels[index], {m: p[index] for m, p in present.items()}


def loader_dataset(loader):
    """The map-style dataset behind ``loader`` (seeing through modaldiag's batch view only), or None."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, _BatchView):
        return dataset.dataset
    return dataset


def batch_loader(dataset: MultimodalDataset, batch_size: int = 64, *, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None,
                 sampler=None) -> DataLoader:
    """A DataLoader over ``dataset`` that fetches batches by fancy indexing.

    ``sampler`` (any iterable of indices, e.g. a weighted sampler) overrides ``shuffle``.
    ``batch_size`` >= 1; every batch is ``({m: (b, ...)}, labels (b,))`` with ``b <= batch_size``.
    """
    batch_size = as_plain_int(batch_size)
    validate_params(_loader_constraints, {"batch_size": batch_size, "shuffle": shuffle,
                                          "drop_last": drop_last, "generator": generator},
                    "batch_loader")
    if sampler is None:
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(_BatchView(dataset), sampler=BatchSampler(sampler, batch_size, drop_last),
                      batch_size=None)


@dataclass
class DatasetSplits:
    """What :func:`load` and :func:`synthetic` return: train/val/test splits plus metadata.

    Standardisation (where applied) was fitted on ``train`` only. ``val`` is for model selection;
    keep ``test`` for the final number.
    """

    name: str
    train: MultimodalDataset
    val: MultimodalDataset
    test: MultimodalDataset
    description: str = ""
    license: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # name each split (kept when already set), so probes and reports can say which data a
        # number comes from
        for name in ("train", "val", "test"):
            ds = getattr(self, name)
            if getattr(ds, "split", None) is None:
                try:
                    ds.split = name
                except AttributeError:  # a dataset type that refuses new attributes
                    pass

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.train.modalities

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.train.class_names

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.train.input_shapes

    def loaders(self, batch_size: int = 64, *, shuffle_train: bool = True):
        """``(train_loader, val_loader, test_loader)``; only the training loader is shuffled."""
        validate_params(_loader_constraints, {"batch_size": as_plain_int(batch_size),
                                              "shuffle_train": shuffle_train}, "loaders")
        return (self.train.loader(batch_size, shuffle=shuffle_train),
                self.val.loader(batch_size), self.test.loader(batch_size))

    def __len__(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{m}: {s}" for m, s in self.input_shapes.items())
        return (f"DatasetSplits({self.name!r}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, classes={self.num_classes}, {shapes})")


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Indices of a stratified train/val/test split, deterministic by ``seed``."""
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or np.any(fractions <= 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"split fractions must be 3 positive numbers summing to 1; got {list(fractions)}.")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train:n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val:].tolist()
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def standardize(train: dict[str, np.ndarray], *others: dict[str, np.ndarray],
                channel_axis: dict[str, int] | None = None):
    """Standardise each modality with statistics fitted on ``train`` only.

    Vector views are scaled per feature; for arrays ``(N, C, T)`` the statistics are per channel
    (``channel_axis[m] = 1``).
    """
    channel_axis = channel_axis or {}
    out_sets: list[dict[str, np.ndarray]] = [{} for _ in range(1 + len(others))]
    for m, x in train.items():
        x = x.astype(np.float32)
        if m in channel_axis:
            axes = tuple(a for a in range(x.ndim) if a != channel_axis[m])
        else:
            axes = (0,)
        mean = x.mean(axis=axes, keepdims=True)
        std = x.std(axis=axes, keepdims=True)
        std = np.where(std < 1e-8, 1.0, std)
        for i, s in enumerate((train, *others)):
            out_sets[i][m] = ((s[m].astype(np.float32) - mean) / std).astype(np.float32)
    return out_sets
