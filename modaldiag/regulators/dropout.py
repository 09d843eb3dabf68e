"""Modality dropout: each training sample loses each modality with probability p.

The common robustness baseline for missing modalities (as in the multimodal-robustness
literature: drop whole modalities at random during training so the fusion head learns to predict
from any subset). Per training step, for every sample ``i`` and droppable modality ``m``:

    drop_{i,m} ~ Bernoulli(p_m)                       (independent, from a seeded generator)
    kept_i     = #{m present in the data and not dropped}
    if kept_i < min_present: re-keep dropped modalities of sample i, chosen uniformly at random,
                             until min(min_present, #present in the data) are kept
    f_{i,m}'   = baseline_m  if drop_{i,m} else f_{i,m}        (model.mask_features: torch.where)

A dropped entry is *absent* exactly as a missing one (the contract's baseline, no rescaling of
the kept features): the head, the unimodal logits and every later regulator see the baseline, and
the encoder of m gets no gradient from that sample. Nothing happens at evaluation (the hook runs
only in training steps; probes and validation never call it).

Realised rate. With equal ``p`` over ``M`` droppable modalities, all present in the data, the number
dropped before the floor is ``K ~ Binomial(M, p)`` and after it ``min(K, M - min_present)``, so
the expected drop rate per modality is (:func:`expected_drop_rate`)

    E[rate] = E[min(K, M - min_present)] / M

(``p = 0.3, M = 2, min_present = 1``: ``(1 - 0.7^2) / 2 = 0.255``; ``min_present = 0``: ``p``).

Randomness: step ``t`` on DDP rank ``r`` draws from a ``torch.Generator`` seeded with
``(seed, r, t)`` (never the global RNG), on the CPU: samples differ across ranks (each rank holds
other samples) and a run is reproducible, in ``md.fit``, a plain loop and Lightning alike; a
resumed run continues with the draws of the uninterrupted one (the step counter is saved with
the run). The logged rate is summed over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..utils.distributed import rank
from ..utils.validation import (
    NON_NEGATIVE_INT,
    PROBABILITY,
    Satisfies,
    as_plain_int,
    closest_match,
)
from .base import SEED, EpochMeans, Regulator

__all__ = ["ModalityDropout", "expected_drop_rate", "dropout_generator"]


def expected_drop_rate(p: float, n_modalities: int, min_present: int = 1) -> float:
    """Expected per-modality drop rate for equal ``p`` over ``n_modalities`` droppable modalities
    (all present in the data): ``E[min(K, M - min_present)] / M`` with ``K ~ Binomial(M, p)``."""
    m = int(n_modalities)
    cap = max(0, m - int(min_present))
    total = sum(min(k, cap) * math.comb(m, k) * p ** k * (1 - p) ** (m - k) for k in range(m + 1))
    return total / m


def dropout_generator(seed: int, rank_index: int, step: int) -> torch.Generator:
    """The CPU generator of one step on one rank: depends on ``(seed, rank, step)`` only."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank_index) * 1_000_003 + step) % 2**63)


def _is_rate(value) -> bool:
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and PROBABILITY.accepts(v) for k, v in value.items())
    return PROBABILITY.accepts(value)


def _names(value) -> bool:
    return (not isinstance(value, str) and isinstance(value, Sequence) and len(value) > 0
            and all(isinstance(v, str) for v in value))


class ModalityDropout(Regulator):
    """Modality dropout regulator (see the module docstring for the rule).

    Parameters
    ----------
    p : float in [0, 1] or dict {modality: float in [0, 1]}, default 0.3
        Drop probability per sample; a dict gives one per modality (a modality left out: 0).
    modalities : sequence of str, optional
        The modalities that may be dropped (default: every modality of the model).
    min_present : int >= 0, default 1
        At least this many modalities kept per sample (counting only those present in the data);
        0 allows dropping every modality of a sample.
    seed : int >= 0, default 0
        Seed of the draws: step ``t`` on DDP rank ``r`` uses a generator seeded with
        ``(seed, r, t)``.

    Attributes
    ----------
    last_keep : dict[str, BoolTensor (B,)]
        The keep mask of the last training step (True = kept by the regulator), per droppable
        modality.
    """

    _parameter_constraints = {
        "p": [Satisfies(_is_rate, "a probability in [0, 1] or a dict {modality: probability}")],
        "modalities": [None, Satisfies(_names, "a non-empty list of modality names")],
        "min_present": [NON_NEGATIVE_INT],
        "seed": [SEED],
    }

    def __init__(self, p: float | Mapping[str, float] = 0.3, *,
                 modalities: Sequence[str] | None = None, min_present: int = 1, seed: int = 0):
        min_present, seed = as_plain_int(min_present), as_plain_int(seed)
        self._validate(p=p, modalities=modalities, min_present=min_present, seed=seed)
        self.p = {str(k): float(v) for k, v in p.items()} if isinstance(p, Mapping) else float(p)
        self.modalities = tuple(modalities) if modalities is not None else None
        self.min_present, self.seed = min_present, seed
        super().__init__()

    def config(self) -> dict:
        return {"p": self.p, "modalities": list(self.modalities) if self.modalities else None,
                "min_present": self.min_present, "seed": self.seed}

    def reset(self) -> None:
        """Forget the run's counts and last mask (a fresh run)."""
        super().reset()
        self.last_keep: dict[str, torch.Tensor] = {}
        self._means = EpochMeans()
        #: over the whole run: {m: [dropped by the regulator, present in the data]}
        self.totals: dict[str, list[float]] = {}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The run's drop counts. The draws need no saved generator: step ``t`` on rank ``r``
        re-seeds from ``(seed, r, t)`` and the step counter is saved with the run."""
        return {"totals": {m: list(v) for m, v in self.totals.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.totals = {m: [float(a), float(b)] for m, (a, b) in state.get("totals", {}).items()}
        super().load_state_dict(state)

    @property
    def realised_rate(self) -> dict[str, float]:
        """Share of the data-present (sample, modality) entries dropped so far in the run (this
        rank's samples; the History's ``regulator.drop_rate`` is summed over ranks)."""
        return {m: (a / b if b else 0.0) for m, (a, b) in self.totals.items()}

    # ------------------------------------------------------------ the rule
    def rates(self, model) -> dict[str, float]:
        """``{m: p_m}`` for the model's modalities (0 for those that are never dropped)."""
        mods = model.modalities
        for what, names in (("p", self.p if isinstance(self.p, Mapping) else {}),
                            ("modalities", self.modalities or ())):
            for name in names:
                if name not in mods:
                    close = closest_match(name, mods)
                    hint = f" Did you mean {close!r}?" if close else ""
                    raise ValueError(f"ModalityDropout: {what} names {name!r}, which is not a "
                                     f"modality of the model {list(mods)}.{hint}")
        allowed = set(self.modalities or mods)
        return {m: ((self.p.get(m, 0.0) if isinstance(self.p, Mapping) else self.p)
                    if m in allowed else 0.0) for m in mods}

    def on_fit_start(self, ctx) -> None:
        self.rates(ctx.model)  # name checks before the first step
        if self.min_present > len(ctx.model.modalities):
            raise ValueError(
                f"ModalityDropout: min_present={self.min_present} exceeds the model's "
                f"{len(ctx.model.modalities)} modalities, so nothing could ever be dropped; use "
                f"min_present <= {len(ctx.model.modalities)} (1 keeps one modality per sample).")
        super().on_fit_start(ctx)

    def keep_mask(self, p: Sequence[float], data_present: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
        """``(B, M)`` keep mask (True = kept by the regulator) for drop rates ``p`` (M,) and the
        data's presence ``(B, M)`` (CPU bool); see the module docstring."""
        batch, m = data_present.shape
        drop = torch.rand(batch, m, generator=gen, dtype=torch.float64) < torch.tensor(
            p, dtype=torch.float64)
        priority = torch.rand(batch, m, generator=gen, dtype=torch.float64)
        drop &= data_present  # an entry missing from the data cannot be dropped again
        kept = (data_present & ~drop).sum(1)
        need = (torch.clamp(data_present.sum(1), max=self.min_present) - kept).clamp(min=0)
        if bool((need > 0).any()):
            score = torch.where(drop, priority, torch.full_like(priority, -1.0))
            order = score.argsort(1, descending=True).argsort(1)  # rank of each candidate
            drop &= ~(order < need.unsqueeze(1))
        return ~drop

    def transform_features(self, features, ctx):
        model = ctx.model
        mods = model.modalities
        rates = self.rates(model)
        batch = features[mods[0]].shape[0]
        data = getattr(ctx, "present", None) or {}
        data_present = torch.stack([data[m].cpu() if m in data else torch.ones(batch, dtype=torch.bool)
                                    for m in mods], 1)
        gen = dropout_generator(self.seed, rank(), ctx.step)
        keep = self.keep_mask([rates[m] for m in mods], data_present, gen)
        droppable = [m for m in mods if rates[m] > 0]
        self.last_keep = {m: keep[:, i] for i, m in enumerate(mods) if m in droppable}
        for i, m in enumerate(mods):
            dropped = float((~keep[:, i] & data_present[:, i]).sum())
            seen = float(data_present[:, i].sum())
            self._means.add("drop_rate", m, dropped, seen)
            acc = self.totals.setdefault(m, [0.0, 0.0])
            acc[0] += dropped
            acc[1] += seen
        masks = {m: keep[:, i].to(features[m].device) for i, m in enumerate(mods)
                 if m in droppable and not bool(keep[:, i].all())}
        if not masks:
            return features
        out = model.mask_features(features, masks)
        combined = dict(data)
        for m, k in masks.items():
            combined[m] = k if m not in combined else combined[m] & k
        ctx.present = combined  # later regulators see what is absent now
        return out

    def on_train_epoch_end(self, ctx) -> None:
        ref = next(iter(ctx.model.parameters()), None)
        device = ref.device if ref is not None and ref.device.type != "cpu" else None
        for key, values in self._means.reduce(device).items():
            self.record_epoch(key, values)
