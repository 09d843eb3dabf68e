"""R6: valuation-based enhancement (Wei et al., CVPR 2024) — re-sample the weak modality.

Sample level (``level="sample"``): after ``warmup`` epochs, every training sample is valued at the
start of each epoch (P4, paper value function). For each modality m with ``phi_m < 1`` the sample
gets extra copies in which every *other* modality is absent, so the weak encoder trains alone
through the shared head. Paper form (``copies="round"``): ``2 * (1 - phi_m)`` "rounded as integers",
read as round half up, ``floor(2 * (1 - phi_m) + 1/2)`` (phi = 0.75 -> 1 copy, 0.25 -> 2,
-0.25 -> 3). Released form (``copies="bins"``, the authors' code): 1 copy if ``0.4 < phi < 0.9``,
2 if ``-0.1 < phi < 0.4``, 3 if ``phi < -0.1``, else 0 (strict bounds, at most 3; it equals
``2 * (1 - phi)`` on the two-modality values -0.5, 0, 0.5).

Modality level (``level="modality"``): a random subset Z (``subset`` = 20 %) is valued;
``gap_m = 1 - mean_Z phi_m``; ``ratio = alpha * (2/3) * spread`` where spread is
``|gap_a - gap_v|`` for two modalities and ``max_m gap_m - min_m gap_m`` for M > 2;
``n_extra`` samples drawn uniformly WITH replacement are added, trained on the weakest modality
(largest gap) only. Paper form (``draw="paper"``): Z drawn without replacement, ``|Z| =
max(1, round(subset * N))`` and ``n_extra = round(ratio * N)`` (round half up), a gap tie goes to
the first modality. Released form (``draw="released"``): Z drawn WITH replacement (duplicates count
twice in the mean), ``|Z| = max(1, int(subset * N))``, ``n_extra = int(ratio * N)`` (truncation), a
gap tie goes to the last modality (the code's ``gap_a > gap_v`` else visual).

The epoch's loader is rebuilt from indices (the dataset is never copied): it yields ordinary
``(inputs, labels)`` batches of original and extra entries, and the regulator applies each extra
entry's presence mask to the features before the head (absent = baseline, as everywhere).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import default_collate

from ..datasets.base import MultimodalDataset, batch_loader, loader_dataset
from ..probes.shapley import VALUE_FUNCTIONS, shapley
from ..utils.distributed import all_gather_cat, rank, world_size
from ..utils.validation import (
    NON_NEGATIVE_INT,
    POSITIVE,
    Interval,
    Options,
    Satisfies,
    as_plain_int,
)
from .base import SEED, Regulator

__all__ = ["ValuationResampling", "extra_copies"]


def extra_copies(values: torch.Tensor, rule: str = "round") -> torch.Tensor:
    """``(N, M)`` extra-copy counts.

    ``rule="round"`` (paper): ``floor(2 * (1 - phi) + 1/2)`` (round half up) where ``phi < 1``,
    else 0. ``rule="bins"`` (released code): 1 if ``0.4 < phi < 0.9``, 2 if ``-0.1 < phi < 0.4``,
    3 if ``phi < -0.1``, else 0.
    """
    if rule == "bins":  # compared in the values' own precision (float32 0.9 is not < 0.9)
        v = values if values.is_floating_point() else values.double()
        counts = torch.zeros(v.shape, dtype=torch.long, device=v.device)
        counts[(v > 0.4) & (v < 0.9)] = 1
        counts[(v > -0.1) & (v < 0.4)] = 2
        counts[v < -0.1] = 3
        return counts
    if rule != "round":
        raise ValueError(f"extra_copies: rule must be 'round' or 'bins', got {rule!r}")
    v = values.double()
    counts = torch.floor(2 * (1 - v) + 0.5)
    return torch.where(v < 1, counts, torch.zeros_like(counts)).clamp(min=0).long()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _dataset_and_batch_size(loader):
    dataset = loader_dataset(loader)
    sampler = getattr(loader, "batch_sampler", None)
    batch_size = getattr(sampler, "batch_size", None) or getattr(loader, "batch_size", None)
    if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError("ValuationResampling needs a DataLoader over a map-style dataset "
                         "(indexable, with len()) to re-sample from.")
    return dataset, int(batch_size or 64)


class _EpochLoader:
    """Iterates shuffled (index, presence-mask) entries as ordinary batches."""

    def __init__(self, regulator, dataset, entries, masks, batch_size, generator):
        self.regulator, self.dataset = regulator, dataset
        self.entries, self.masks, self.batch_size, self.generator = entries, masks, batch_size, generator

    def _order(self) -> torch.Tensor:
        """Shuffled entry positions; under DDP this rank's equal-length share of them."""
        order = torch.randperm(len(self.entries), generator=self.generator)
        world = world_size()
        if world > 1:
            pad = (-len(order)) % world
            order = torch.cat([order, order[:pad]])[rank()::world]
        return order

    def __len__(self):
        return math.ceil(math.ceil(len(self.entries) / world_size()) / self.batch_size)

    def __iter__(self):
        order = self._order()
        fetch = getattr(self.dataset, "inputs", None)
        for start in range(0, len(order), self.batch_size):
            pick = order[start:start + self.batch_size]
            idx = self.entries[pick]
            if fetch is not None:  # modaldiag's in-memory dataset: one fancy-indexing call
                batch = self.dataset[idx]  # (inputs, labels[, presence mask]) by fancy indexing
            else:
                batch = default_collate([self.dataset[int(i)] for i in idx])
            self.regulator._pending_mask = self.masks[pick]
            yield batch


class ValuationResampling(Regulator):
    """Valuation-based re-sampling regulator.

    Parameters
    ----------
    level : {"sample", "modality"}, default "sample"
    warmup : int >= 0, default 5
        Epochs of plain joint training before re-sampling starts.
    alpha : float > 0, default 1.0
        Modality-level ratio factor.
    subset : float in (0, 1], default 0.2
        Modality-level: share of training samples valued each epoch.
    value : str or callable, default "paper"
        Valuation game (see :func:`modaldiag.shapley`; default the paper's ``|S| * correct``).
    baseline : {None, "zero", "mean"}, default None
        Absence in the valuation game; None: the model's stored baseline, the same one the
        re-sampled copies are trained with.
    seed : int >= 0, default 0
        Seed of the epoch's shuffling and of the modality-level draws (seeded by (seed, epoch)).
    variant : {"paper", "released"}, default "paper"
        ``"released"`` sets ``copies="bins"`` and ``draw="released"`` (the authors' code) for the
        finer options not given explicitly.
    copies : {None, "round", "bins"}, default None
        Sample-level copy counts: round half up of ``2 (1 - phi)`` (paper) or the released code's
        bins. None: from ``variant``.
    draw : {None, "paper", "released"}, default None
        Modality-level draws: Z without replacement and round half up (paper), or Z with
        replacement and ``int`` truncation (released). None: from ``variant``.
    """

    _parameter_constraints = {
        "level": [Options("sample", "modality")], "warmup": [NON_NEGATIVE_INT],
        "alpha": [POSITIVE], "subset": [Interval(0, 1, closed="right")],
        "value": [Options(*VALUE_FUNCTIONS),
                  Satisfies(callable, "a callable (logits (K, B, C), labels (B,), sizes (K,)) "
                                      "-> values (K, B)")],
        "baseline": [None, Options("zero", "mean")], "seed": [SEED],
        "variant": [Options("paper", "released")], "copies": [None, Options("round", "bins")],
        "draw": [None, Options("paper", "released")],
    }

    def __init__(self, level: str = "sample", *, warmup: int = 5, alpha: float = 1.0,
                 subset: float = 0.2, value: str = "paper", baseline: str | None = None,
                 seed: int = 0, variant: str = "paper", copies: str | None = None,
                 draw: str | None = None):
        warmup, seed = as_plain_int(warmup), as_plain_int(seed)
        self._validate(level=level, warmup=warmup, alpha=alpha, subset=subset, value=value,
                       baseline=baseline, seed=seed, variant=variant, copies=copies, draw=draw)
        super().__init__()
        self.level = level
        self.warmup, self.alpha, self.subset = warmup, float(alpha), float(subset)
        self.value, self.baseline, self.seed = value, baseline, seed
        self.variant = variant
        released = variant == "released"
        self.copies = copies if copies is not None else ("bins" if released else "round")
        self.draw = draw if draw is not None else ("released" if released else "paper")

    def reset(self) -> None:
        """Forget the pending presence mask and the last counts (a fresh run)."""
        super().reset()
        self._pending_mask: torch.Tensor | None = None
        self.last_counts: dict[str, int] = {}

    def config(self) -> dict:
        return {"level": self.level, "warmup": self.warmup, "alpha": self.alpha,
                "subset": self.subset, "value": self.value, "variant": self.variant,
                "copies": self.copies, "draw": self.draw}

    def _value(self, model, dataset, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Shapley values ``(len(indices), M)`` of the given samples, identical on every rank.

        Under DDP each rank values its share of ``indices``; the union is gathered and put back in
        the order of ``indices``.
        """
        mine = indices[rank()::world_size()]
        if isinstance(dataset, MultimodalDataset):
            loader = batch_loader(dataset.subset(mine), 512)
        else:
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine.tolist()),
                                                 batch_size=batch_size)
        sv = shapley(model, loader, value=self.value, baseline=self.baseline)
        order = all_gather_cat(mine)  # the sample index of each gathered row
        position = torch.empty(len(dataset), dtype=torch.long)
        position[indices] = torch.arange(len(indices))
        values = torch.empty(len(indices), len(model.modalities), dtype=sv.values.dtype)
        values[position[order]] = sv.values
        return values

    def plan(self, model, dataset, batch_size: int, epoch: int):
        """``(entries, masks)`` for this epoch: indices into the dataset and presence masks."""
        n, m = len(dataset), len(model.modalities)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        base_idx = torch.arange(n)
        full = torch.ones(n, m, dtype=torch.bool)
        if self.level == "sample":
            values = self._value(model, dataset, base_idx, batch_size)
            counts = extra_copies(values, self.copies)  # (N, M)
            extra_idx, extra_masks = [], []
            for j in range(m):
                reps = counts[:, j]
                idx = torch.repeat_interleave(base_idx, reps)
                mask = torch.zeros(len(idx), m, dtype=torch.bool)
                mask[:, j] = True
                extra_idx.append(idx)
                extra_masks.append(mask)
            self.last_counts = {mod: int(counts[:, j].sum()) for j, mod in enumerate(model.modalities)}
            self.record_epoch("mean_phi", {mod: float(values[:, j].mean())
                                           for j, mod in enumerate(model.modalities)})
        else:
            released = self.draw == "released"
            if released:  # with replacement, int(): np.random.choice(N, int(N * part_ratio))
                k = max(1, int(self.subset * n))
                z = torch.randint(0, n, (k,), generator=gen)
                unique, inverse = torch.unique(z, return_inverse=True)
                values = self._value(model, dataset, unique, batch_size)[inverse]
            else:
                k = max(1, _round_half_up(self.subset * n))
                z = torch.randperm(n, generator=gen)[:k].sort().values
                values = self._value(model, dataset, z, batch_size)
            if released:  # the code sums Python floats (double precision)
                values = values.double()
            gaps = {mod: 1.0 - float(values[:, j].mean()) for j, mod in enumerate(model.modalities)}
            spread = max(gaps.values()) - min(gaps.values())
            if released:  # the code's order of operations: |gap_a - gap_v| / 3 * 2 * alpha
                ratio = spread / 3 * 2 * self.alpha
            else:
                ratio = self.alpha * (2.0 / 3.0) * spread
            top = max(gaps.values())
            ties = [mod for mod in model.modalities if gaps[mod] == top]
            weakest = ties[-1] if released else ties[0]
            j = model.modalities.index(weakest)
            n_extra = int(ratio * n) if released else _round_half_up(ratio * n)
            idx = torch.randint(0, n, (n_extra,), generator=gen)
            mask = torch.zeros(n_extra, m, dtype=torch.bool)
            mask[:, j] = True
            extra_idx, extra_masks = [idx], [mask]
            self.last_counts = {mod: (n_extra if mod == weakest else 0) for mod in model.modalities}
            self.record_epoch("gap", gaps)
            self.record_epoch("ratio", ratio)
            self.record_epoch("subset_size", k)
        entries = torch.cat([base_idx, *extra_idx])
        masks = torch.cat([full, *extra_masks])
        self.record_epoch("extra_copies", dict(self.last_counts))
        return entries, masks, gen

    def train_loader(self, ctx):
        if ctx.epoch < self.warmup:
            self._pending_mask = None
            return None
        dataset, batch_size = _dataset_and_batch_size(ctx.train_loader)
        entries, masks, gen = self.plan(ctx.model, dataset, batch_size, ctx.epoch)
        return _EpochLoader(self, dataset, entries, masks, batch_size, gen)

    def transform_features(self, features, ctx):
        mask = self._pending_mask
        self._pending_mask = None
        if mask is None or bool(mask.all()):
            return features
        model = ctx.model
        out = {}
        for j, m in enumerate(model.modalities):
            f = features[m]
            keep = mask[:, j].to(f.device).view((-1,) + (1,) * (f.dim() - 1))
            out[m] = torch.where(keep, f, model.absent_feature(m, f))
        return out
