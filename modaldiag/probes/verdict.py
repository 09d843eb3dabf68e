r"""Intervals and the decision rule behind ``Diagnosis.verdict``.

Two probes give one number per sample and modality on the diagnosed split (``n`` samples):

* unimodal correctness through the joint head, :math:`c_{im} \in \{0, 1\}` (every other modality
  at its baseline), whose mean is the unimodal accuracy :math:`a_m`;
* the sample-level Shapley contribution :math:`\phi_{im}`, whose mean is :math:`\bar\phi_m`.

**Intervals.** A seeded paired bootstrap over samples: ``n_resamples`` (default 1000) draws of
``n`` sample indices with replacement, the *same* draws for every modality and both probes, give
the bootstrap distribution of every mean and of every pairwise difference
:math:`d_{kl} = \bar x_k - \bar x_l`; the interval is its central ``level`` (default 95 %)
percentile range. Vectorised: one ``(B, n)`` count matrix times the ``(n, M)`` sample matrix.

**Practical margins.** :math:`\delta_{acc} = 0.02` (2 accuracy points) and
:math:`\delta_\phi = |\bar g| \max(0.05 / M, 0.02)`: 5 % of the fair share of the total Shapley
gain :math:`\bar g = \frac{1}{n}\sum_i \sum_m \phi_{im}`, and at least 2 % of the gain itself
(for ``value="paper"`` and M = 2 the fair share is the fused accuracy, so
:math:`\delta_\phi \approx` 2-5 points as well).

**Rule.** Let :math:`t` and :math:`w` be the first and last modality of the point-estimate
``ranking`` and :math:`[L_p, U_p]` the interval of :math:`d_{tw}` on probe :math:`p`.

1. *Too few samples* (inconclusive) when :math:`1/n \ge \delta_{acc}`: an accuracy on ``n``
   samples moves in steps of :math:`1/n`, so it cannot resolve the margin.
2. *Imbalanced* when, on **both** probes, :math:`L_p > 0` (the lead is significant, and in the
   same direction on both) and :math:`\hat d_{tw} \ge \delta_p` (it is larger than the margin),
   and :math:`t, w` are not copies of one view (identical inputs, or identical encoder outputs,
   on every sample: a head's preference between two copies of one signal is an accident of
   initialisation, not a modality imbalance).
   Then ``dominant = t`` and ``weakest = w``.
3. *Balanced* when, on both probes, every pairwise interval lies inside
   :math:`[-\delta_p, \delta_p]`; or when the only lead is between copies of one view.
4. Otherwise *inconclusive*, with the reason: the interval of the lead is wider than the margin
   (*too few samples*), the probes point in different directions, the lead is not significant,
   or it is significant but smaller than the margin.

An imbalance degree :math:`D` bounds the lead of the first over the last modality by
:math:`D \sum_m |\bar\phi_m|` (for any M), which is :math:`D \bar g` when the mean contributions are
non-negative: a degree of 0.01 is a lead of at most 1 % of the gain, below :math:`\delta_\phi`,
and never declares a dominant modality.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations

import numpy as np

from ..utils.validation import POSITIVE_INT, Interval, validate_params
from ._common import SEED

__all__ = ["ProbeIntervals", "Verdict", "bootstrap_intervals", "seed_intervals", "decide",
           "ACCURACY_MARGIN",
           "SHAPLEY_MARGIN_FRACTION", "SHAPLEY_MARGIN_FLOOR", "VERDICTS"]

#: practical margin of a unimodal-accuracy lead (2 accuracy points)
ACCURACY_MARGIN = 0.02
#: practical margin of a Shapley lead, as a fraction of the fair share of the total gain...
SHAPLEY_MARGIN_FRACTION = 0.05
#: ...and at least this fraction of the total gain (keeps the margin above any imbalance
#: degree below 0.02 for every number of modalities)
SHAPLEY_MARGIN_FLOOR = 0.02
#: the three verdicts
VERDICTS = ("imbalanced", "balanced", "inconclusive")
#: the two probes the verdict is based on (names as in ``Diagnosis.evidence``)
ACCURACY, SHAPLEY = "unimodal accuracy", "shapley"
#: count-matrix cells per chunk of resamples (keeps memory bounded for large n)
_CHUNK_CELLS = 4_000_000


@dataclass
class ProbeIntervals:
    """Bootstrap intervals of one probe's per-modality means and pairwise differences.

    ``differences[f"{k}|{l}"] = {"estimate", "low", "high"}`` is the lead of ``k`` over ``l``
    (its mirror is ``l|k`` with the sign flipped). ``margin`` is the probe's practical margin.
    """

    probe: str
    split: str
    n: int
    mean: dict[str, float]
    low: dict[str, float]
    high: dict[str, float]
    differences: dict[str, dict[str, float]]
    margin: float
    level: float = 0.95
    n_resamples: int = 1000

    def difference(self, first: str, second: str) -> tuple[float, float, float]:
        """``(estimate, low, high)`` of the lead of ``first`` over ``second``."""
        if f"{first}|{second}" in self.differences:
            d = self.differences[f"{first}|{second}"]
            return d["estimate"], d["low"], d["high"]
        d = self.differences[f"{second}|{first}"]
        return 0.0 - d["estimate"], 0.0 - d["high"], 0.0 - d["low"]  # 0.0 - 0.0 is +0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProbeIntervals:
        return cls(**d)


@dataclass
class Verdict:
    """The decision: ``verdict`` in :data:`VERDICTS`, ``dominant``/``weakest`` (None unless
    imbalanced), the ``reason`` in words and the point-estimate ``ranking`` (first = most used)."""

    verdict: str
    dominant: str | None
    weakest: str | None
    reason: str
    ranking: list[str]
    intervals: dict[str, ProbeIntervals] = field(default_factory=dict)


_BOOT_CONSTRAINTS = {"n_resamples": [POSITIVE_INT], "level": [Interval(0, 1, closed="neither")],
                     "seed": SEED}


def _count_chunks(n: int, n_resamples: int, seed: int):
    """Bootstrap count matrices ``(b, n)`` (float64), ``b`` rows per chunk, seeded."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // max(n, 1))
    done = 0
    while done < n_resamples:
        b = min(per_chunk, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def _check_samples(samples: dict[str, np.ndarray], mods: list[str], what: str):
    arrays = {p: np.asarray(x, dtype=np.float64) for p, x in samples.items()}
    sizes = {p: x.shape for p, x in arrays.items()}
    n = next(iter(arrays.values())).shape[0] if arrays else 0
    if n == 0 or any(s != (n, len(mods)) for s in sizes.values()):
        raise ValueError(f"{what} needs arrays of shape (n, {len(mods)}) with the same n >= 1 "
                         f"for every probe; got {sizes}.")
    return arrays, n


def _boot_means(stacked: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Bootstrap means ``(B, K)`` of the columns of ``stacked`` ``(n, K)``."""
    n = stacked.shape[0]
    return np.concatenate([c @ stacked for c in _count_chunks(n, n_resamples, seed)]) / n


def _summarise(boot: np.ndarray, est: np.ndarray, probes: list[str], mods: list[str], *,
               split: str, n: int, margins: dict[str, float], level: float,
               n_resamples: int) -> dict[str, ProbeIntervals]:
    """Percentile intervals from bootstrap means ``boot`` (B, P*M) and estimates ``est`` (P*M,)."""
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    m = len(mods)
    out = {}
    for pi, p in enumerate(probes):
        b, e = boot[:, pi * m:(pi + 1) * m], est[pi * m:(pi + 1) * m]  # (B, M), (M,)
        lo, hi = np.percentile(b, q, axis=0)
        diffs = {}
        for k, j in combinations(range(m), 2):
            dlo, dhi = np.percentile(b[:, k] - b[:, j], q)
            diffs[f"{mods[k]}|{mods[j]}"] = {"estimate": float(e[k] - e[j]),
                                            "low": float(dlo), "high": float(dhi)}
        out[p] = ProbeIntervals(p, split, n, {x: float(v) for x, v in zip(mods, e, strict=True)},
                                {x: float(v) for x, v in zip(mods, lo, strict=True)},
                                {x: float(v) for x, v in zip(mods, hi, strict=True)},
                                diffs, float(margins[p]), level, n_resamples)
    return out


def bootstrap_intervals(samples: dict[str, np.ndarray], modalities, *, split: str,
                        margins: dict[str, float], n_resamples: int = 1000, level: float = 0.95,
                        seed: int = 0) -> dict[str, ProbeIntervals]:
    """Paired percentile bootstrap of per-modality means and pairwise differences.

    Parameters
    ----------
    samples : dict[str, ndarray (n, M)]
        Per probe, one value per sample and modality (columns in ``modalities`` order). Every
        probe must hold the same ``n`` rows: the same resamples are used for all of them.
    modalities : sequence of str
    split : str
        The split the samples come from (stored with the intervals).
    margins : dict[str, float]
        Practical margin per probe.
    n_resamples : int, default 1000
    level : float, default 0.95
    seed : int, default 0

    Returns
    -------
    dict[str, ProbeIntervals]
    """
    validate_params(_BOOT_CONSTRAINTS, {"n_resamples": n_resamples, "level": level, "seed": seed},
                    "bootstrap_intervals")
    mods = list(modalities)
    arrays, n = _check_samples(samples, mods, "bootstrap_intervals")
    stacked = np.concatenate(list(arrays.values()), axis=1)  # (n, P*M)
    return _summarise(_boot_means(stacked, n_resamples, seed), stacked.mean(0), list(arrays),
                      mods, split=split, n=n, margins=margins, level=level,
                      n_resamples=n_resamples)


def seed_intervals(runs: list[dict[str, np.ndarray]], modalities, *, split: str,
                   margins: dict[str, float], n_resamples: int = 1000, level: float = 0.95,
                   seed: int = 0) -> dict[str, ProbeIntervals]:
    """Two-level bootstrap over training seeds and samples.

    ``runs`` holds, per training seed, the per-sample arrays of :func:`bootstrap_intervals` (same
    probes, same ``n``: the same evaluation samples). Each resample draws ``S`` seeds with
    replacement and, within each drawn seed, ``n`` samples with replacement; the statistic is
    the mean over the drawn seeds. Estimates are the means over seeds. The intervals so cover
    both the sampling of the evaluation data and training randomness.
    """
    validate_params(_BOOT_CONSTRAINTS, {"n_resamples": n_resamples, "level": level, "seed": seed},
                    "seed_intervals")
    mods = list(modalities)
    if not runs:
        raise ValueError("seed_intervals needs at least one run.")
    checked = [_check_samples(r, mods, "seed_intervals") for r in runs]
    probes = list(checked[0][0])
    if any(list(a) != probes or k != checked[0][1] for a, k in checked):
        raise ValueError("seed_intervals: every run must hold the same probes over the same n "
                         f"samples; got {[(list(a), k) for a, k in checked]}.")
    stacked = [np.concatenate([a[p] for p in probes], axis=1) for a, _ in checked]
    boots = np.stack([_boot_means(x, n_resamples, seed + 1 + i)
                      for i, x in enumerate(stacked)])  # (S, B, P*M)
    pick = np.random.default_rng(seed).integers(0, len(runs), size=(n_resamples, len(runs)))
    boot = boots[pick, np.arange(n_resamples)[:, None]].mean(1)  # (B, P*M)
    est = np.mean([x.mean(0) for x in stacked], axis=0)
    return _summarise(boot, est, probes, mods, split=split, n=checked[0][1], margins=margins,
                      level=level, n_resamples=n_resamples)


def shapley_margin(values: np.ndarray) -> float:
    """The practical margin of a Shapley lead from per-sample values ``(n, M)``:
    ``|g| * max(SHAPLEY_MARGIN_FRACTION / M, SHAPLEY_MARGIN_FLOOR)`` with
    ``g = mean_i sum_m phi_im`` the mean total gain (``|g| / M`` is the fair share)."""
    values = np.asarray(values, dtype=np.float64)
    gain = abs(float(values.sum(1).mean()))
    return gain * max(SHAPLEY_MARGIN_FRACTION / values.shape[1], SHAPLEY_MARGIN_FLOOR)


def _steps(n: int) -> str:
    return f"{100 / n:.3g}-point steps"


def decide(intervals: dict[str, ProbeIntervals], ranking, *, n: int,
           copies: tuple[tuple[str, str], ...] = ()) -> Verdict:
    """Apply the rule of this module's docstring to the intervals of :data:`ACCURACY` and
    :data:`SHAPLEY`; ``ranking`` is the point-estimate order (first = most used); ``copies``
    lists pairs of modalities whose encoder outputs coincide on every sample."""
    ranking = list(ranking)
    top, bottom = ranking[0], ranking[-1]
    probes = [intervals[ACCURACY], intervals[SHAPLEY]]
    copy_pairs = {frozenset(p) for p in copies}

    def verdict(kind, reason, dominant=None, weakest=None):
        return Verdict(kind, dominant, weakest, reason, ranking, intervals)

    if 1.0 / n >= ACCURACY_MARGIN:
        return verdict("inconclusive", f"too few samples (n = {n}: accuracy moves in "
                       f"{_steps(n)}, coarser than the {100 * ACCURACY_MARGIN:g}-point margin)")

    def within(p: ProbeIntervals, first, second) -> bool:
        if frozenset((first, second)) in copy_pairs:
            return True
        _, lo, hi = p.difference(first, second)
        return -p.margin <= lo and hi <= p.margin

    leads = {p.probe: p.difference(top, bottom) for p in probes}
    is_copy = frozenset((top, bottom)) in copy_pairs
    significant = all(lo > 0 for _, lo, _ in leads.values())
    large = all(est >= p.margin for p, (est, _, _) in zip(probes, leads.values(), strict=True))
    if significant and large and not is_copy:
        return verdict("imbalanced",
                       f"{top!r} leads {bottom!r} on both probes, significantly and by more than "
                       "the practical margin", top, bottom)
    if all(within(p, *pair) for p in probes for pair in combinations(ranking, 2)):
        why = "every pairwise difference lies inside the practical margin on both probes"
        if copy_pairs:
            named = ", ".join(" and ".join(repr(m) for m in sorted(p))
                              for p in sorted(copy_pairs, key=sorted))
            why = (f"{named} are copies of one view (identical on every sample), so no lead "
                   f"between them is an imbalance; "
                   + ("every other pairwise difference lies inside the practical margin"
                      if len(ranking) > 2 else "there is no other pair"))
        return verdict("balanced", why)
    wide = [p for p in probes if (leads[p.probe][2] - leads[p.probe][1]) / 2 > p.margin]
    if wide:
        p = wide[0]
        half = (leads[p.probe][2] - leads[p.probe][1]) / 2
        return verdict("inconclusive",
                       f"too few samples (n = {n}: the {100 * p.level:g} % interval of the "
                       f"{p.probe} lead of {top!r} over {bottom!r} is ±{half:.3f}, wider than its "
                       f"{p.margin:.3f} margin)")
    directions = {p.probe: np.sign(leads[p.probe][0]) for p in probes}
    if len(set(directions.values())) > 1:
        return verdict("inconclusive", f"the probes point in different directions for {top!r} "
                       f"vs {bottom!r}")
    if not significant:
        weak = [p.probe for p in probes if leads[p.probe][1] <= 0]
        return verdict("inconclusive", f"the lead of {top!r} over {bottom!r} is not significant "
                       f"on {' and '.join(weak)}")
    return verdict("inconclusive", f"the lead of {top!r} over {bottom!r} is significant but "
                   "smaller than the practical margin on at least one probe")
