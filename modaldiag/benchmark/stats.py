"""Paired statistics over seeds: a method against the baseline (joint training).

For one dataset and one metric (test fused accuracy, or one modality's test unimodal accuracy),
every seed s gives a paired difference ``d_s = metric(method, s) - metric(baseline, s)`` (same
seed: same initialisation, batch order and split). With n seeds, mean ``d̄`` and sample standard
deviation ``s_d`` (ddof 1):

* paired t-test: ``t = d̄ / (s_d / sqrt(n))`` with ``n - 1`` degrees of freedom, two-sided
  ``p = 2 * P(T_{n-1} >= |t|)`` (``scipy.stats.ttest_rel``);
* 95% confidence interval of the mean difference: ``d̄ ± t_{0.975, n-1} * s_d / sqrt(n)``;
* Holm's step-down correction across the methods compared with the baseline (one family per
  dataset and metric): with the m p-values sorted ``p_(1) <= ... <= p_(m)``,
  ``p̃_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``.

Edge cases: n < 2 gives NaN (no test possible); when every difference is equal (``s_d = 0``, up to rounding: ``s_d <= 1e-12``)
the test is degenerate: p = 1 when they are all 0 (identical results), p = 0 otherwise, and the
interval is the single value ``d̄``. NaN p-values are left out of the Holm family and stay NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["PairedTest", "paired_test", "holm", "FUSED", "unimodal_metric", "fmt_number"]

#: the metric name of the test fused accuracy
FUSED = "test_acc"


def unimodal_metric(modality: str) -> str:
    """The metric name of a modality's test unimodal accuracy (through the head)."""
    return f"test_unimodal_acc.{modality}"


def fmt_number(value: float | None) -> str:
    """A statistic for display: 3 decimals, ``n/a`` for NaN/None, small p-values in e-notation."""
    if value is None or value != value:
        return "n/a"
    if 0 < abs(value) < 0.001:
        return f"{value:.1e}"
    return f"{value:.3f}"


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison: mean difference (method - baseline), its CI, t and p."""

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    t: float
    p: float

    def to_dict(self) -> dict:
        return {"n": self.n, "mean_diff": self.mean_diff, "sd_diff": self.sd_diff,
                "ci_low": self.ci_low, "ci_high": self.ci_high, "t": self.t, "p": self.p}


def paired_test(method: Sequence[float], baseline: Sequence[float],
                confidence: float = 0.95) -> PairedTest:
    """Paired t-test of ``method`` against ``baseline`` (same length: one value per seed, in the
    same seed order; pairs with a NaN are dropped)."""
    a = np.asarray(method, dtype=float)
    b = np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test needs two 1-D sequences of equal length (one value per "
                         f"seed); got shapes {a.shape} and {b.shape}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}.")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.size)
    nan = math.nan
    if n == 0:
        return PairedTest(0, nan, nan, nan, nan, nan, nan)
    mean = float(d.mean())
    if n < 2:
        return PairedTest(n, mean, nan, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    if sd <= 1e-12 * max(1.0, abs(mean)) or not math.isfinite(sd):  # equal up to rounding
        degenerate_p = 1.0 if mean == 0.0 else 0.0
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return PairedTest(n, mean, 0.0, mean, mean, t, degenerate_p)
    se = sd / math.sqrt(n)
    t = mean / se
    p = float(2.0 * _scipy_stats.t.sf(abs(t), n - 1))
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1)) * se
    return PairedTest(n, mean, sd, mean - half, mean + half, float(t), min(1.0, p))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given (NaN stays NaN and is not counted)."""
    p = [float(v) for v in pvalues]
    idx = [i for i, v in enumerate(p) if math.isfinite(v)]
    out = [math.nan] * len(p)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: p[j])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out
