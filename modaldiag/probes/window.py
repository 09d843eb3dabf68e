"""P2: the prime learning window (InfoReg, CVPR 2025, Eq. 11).

Epochs are 0-based; ``traces[m][t]`` is the Fisher trace measured during epoch t. The decision for
epoch t is taken at its start, from the traces of epochs < t.

- ``"paper"`` (default): for t >= 2, ``rho_m = (Tr_{t-1} - Tr_{t-2}) / Tr_{t-1}``; the window of m
  is open while ``rho_m > K`` (K = 0.04). Epochs 0 and 1 have no growth to measure and count as
  open. With ``sticky=True`` (default) the window is one interval: once it closes it stays closed.
- ``"code"``: the released code: the trace list is pre-filled with 10 zeros, the growth is taken
  between 10-epoch moving averages, K = 0.05, and only the *first* modality's trace decides (the
  same decision for every modality). The zeros keep a flat or rising trace's window open for
  epochs 0..10; a fast-falling trace can close it sooner (``0.5**t`` closes at epoch 5).
- ``"robust"`` (ours, not in the paper): for t >= 2, ``b_m`` is the Theil-Sen slope (median of the
  pairwise slopes) of ``log Tr`` over the last ``min(span, t)`` epochs ``t-span .. t-1``, reported on
  the paper's scale as ``rho_m = 1 - exp(-b_m)`` (equal to the paper's rho when the trace grows
  geometrically). Hysteresis: an open window closes when ``rho_m <= K`` and a closed one reopens
  only when ``rho_m > K_open`` (K = 0.04, K_open = 2K by default). See :func:`window_state`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..utils.validation import BOOL, NON_NEGATIVE_INT, Interval, Options, validate_params

__all__ = ["LearningWindow", "learning_window", "window_state", "growth_ratio"]

DEFAULT_K = {"paper": 0.04, "code": 0.05, "robust": 0.04}
CODE_WINDOW = 10
ROBUST_SPAN = 5
_PARAMETER_CONSTRAINTS = {"rule": [Options("paper", "code", "robust")],
                          "K": [None, Interval(None, None)], "K_open": [None, Interval(None, None)],
                          "span": [Interval(2, None, integer=True)], "sticky": [BOOL],
                          "epoch": [NON_NEGATIVE_INT]}


def growth_ratio(previous: float, current: float) -> float:
    """``(current - previous) / current``; 0 when both are 0, -inf when the trace fell to 0."""
    if current == 0:
        return 0.0 if previous == 0 else float("-inf")
    return (current - previous) / current


def _paper_rho(trace: Sequence[float], t: int) -> float | None:
    if t < 2:
        return None
    return growth_ratio(trace[t - 2], trace[t - 1])


def _code_rho(trace: Sequence[float], t: int) -> float | None:
    padded = [0.0] * CODE_WINDOW + list(trace[:t])
    cur = sum(padded[-CODE_WINDOW:]) / CODE_WINDOW
    prev = sum(padded[-CODE_WINDOW - 1:-1]) / CODE_WINDOW
    return growth_ratio(prev, cur) if cur != 0 else None


def _theil_sen(y: Sequence[float]) -> float:
    """Median of the pairwise slopes ``(y_j - y_i) / (j - i)``, i < j (y at unit spacing)."""
    slopes = sorted((y[j] - y[i]) / (j - i) for i in range(len(y)) for j in range(i + 1, len(y)))
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else 0.5 * (slopes[mid - 1] + slopes[mid])


def _robust_rho(trace: Sequence[float], t: int, span: int) -> float | None:
    if t < 2:
        return None
    recent = [float(v) for v in trace[max(0, t - span):t]]
    top = max(recent)
    if top <= 0:
        return 0.0
    floor = top * 1e-12
    slope = _theil_sen([math.log(max(v, floor)) for v in recent])
    return -math.expm1(-slope)


def _resolve(rule: str, K, K_open, owner: str) -> tuple[float, float | None]:
    K = DEFAULT_K[rule] if K is None else float(K)
    if rule != "robust":
        return K, None
    K_open = K + abs(K) if K_open is None else float(K_open)
    if K_open < K:
        raise ValueError(f"{owner}: K_open must be >= K (the window reopens only above K_open and "
                         f"closes at or below K); got K_open={K_open:g} < K={K:g}.")
    return K, K_open


def window_state(traces: Mapping[str, Sequence[float]], epoch: int, *, rule: str = "paper",
                 K: float | None = None, previous: Mapping[str, bool] | None = None,
                 sticky: bool = True, K_open: float | None = None,
                 span: int = ROBUST_SPAN) -> tuple[dict[str, bool], dict[str, float | None]]:
    """Whether each modality's window is open at the start of ``epoch``, and the growth ratio.

    Parameters
    ----------
    traces : dict[str, sequence of float]
        ``{m: [Tr_0, Tr_1, ...]}``; only the entries of epochs ``< epoch`` are read.
    epoch : int >= 0
        The epoch about to start (0-based).
    rule : {"paper", "code", "robust"}, default "paper"
    K : float, optional
        Threshold on rho; default 0.04 (paper, robust) or 0.05 (code). For "robust" it is the
        closing threshold.
    previous : dict[str, bool], optional
        The state at ``epoch - 1``; None at the start of a run (every window counts as open).
        Used by ``sticky`` windows and by the robust rule's hysteresis.
    sticky : bool, default True
        Once closed, stay closed ("paper" and "code"). The robust rule ignores it: its hysteresis
        decides whether a closed window reopens.
    K_open : float, optional
        Robust rule only: a closed window reopens when rho > K_open; default ``K + |K|`` (2K).
        Must be >= K (K_open = K switches the hysteresis off).
    span : int >= 2, default 5
        Robust rule only: the number of past epochs in the slope fit.

    Returns
    -------
    state : dict[str, bool]
        Open (True) or closed, per modality.
    rho : dict[str, float | None]
        The growth ratio behind each decision (None for epochs 0 and 1, where it is undefined
        and the window counts as open).

    Why the robust rule is built this way: the paper's rho compares two single noisy epochs, so
    on small data a multiplicative fluctuation of a few per cent opens or closes the window.
    Fitting the slope of ``log Tr`` over ``span`` epochs averages that noise; the Theil-Sen
    estimator also ignores a single outlying epoch (a breakdown point of 29 %), which a
    least-squares slope or a moving average would follow; working on ``log Tr`` makes the
    multiplicative noise additive and keeps the rule scale-free, as the paper's ratio is. The
    hysteresis band ``(K, K_open]`` then stops the remaining estimator noise from flickering the
    state. Each decision reads only ``traces[m][:epoch]`` and ``previous``, so the rule is
    causal, deterministic and per modality.
    """
    validate_params(_PARAMETER_CONSTRAINTS, {"rule": rule, "K": K, "sticky": sticky,
                                             "epoch": epoch, "K_open": K_open, "span": span},
                    "window_state")
    K, K_open = _resolve(rule, K, K_open, "window_state")
    names = list(traces)
    if rule == "code":
        rho0 = _code_rho(traces[names[0]], epoch)
        rho = {m: rho0 for m in names}
    elif rule == "robust":
        rho = {m: _robust_rho(traces[m], epoch, span) for m in names}
    else:
        rho = {m: _paper_rho(traces[m], epoch) for m in names}
    state = {}
    for m in names:
        was_open = True if previous is None else previous.get(m, True)
        if rho[m] is None:
            is_open = True
        elif rule == "robust":
            is_open = rho[m] > (K if was_open else K_open)
        else:
            is_open = rho[m] > K
        if sticky and rule != "robust" and not was_open:
            is_open = False
        state[m] = is_open
    return state, rho


@dataclass
class LearningWindow:
    """The prime learning window of every modality over a run.

    Attributes
    ----------
    traces : dict[str, list[float]]
        The trace series (one value per epoch).
    open : dict[str, list[bool]]
        ``open[m][t]``: the window of m is open at epoch t.
    rho : dict[str, list[float | None]]
        Growth ratio used for each decision (None where undefined).
    rule, K, sticky
        The rule and its parameters (``sticky`` as applied: False for "code" and "robust").
    K_open, span
        The robust rule's reopening threshold and slope span (None for the other rules).
    """

    traces: dict[str, list[float]]
    open: dict[str, list[bool]]
    rho: dict[str, list[float | None]]
    rule: str
    K: float
    sticky: bool = True
    K_open: float | None = None
    span: int | None = None

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.traces)

    def open_epochs(self, modality: str | None = None):
        """Epochs with the window open: a list for one modality, or a dict for all."""
        if modality is None:
            return {m: self.open_epochs(m) for m in self.traces}
        return [t for t, o in enumerate(self.open[modality]) if o]

    @property
    def peak_growth_epoch(self) -> dict[str, int | None]:
        """Per modality, the epoch t with the largest trace increase ``Tr_t - Tr_{t-1}``."""
        out = {}
        for m, tr in self.traces.items():
            if len(tr) < 2:
                out[m] = None
                continue
            diffs = [tr[t] - tr[t - 1] for t in range(1, len(tr))]
            out[m] = 1 + max(range(len(diffs)), key=diffs.__getitem__)
        return out

    @property
    def peak_epoch(self) -> dict[str, int | None]:
        """Per modality, the epoch of the largest trace."""
        return {m: (max(range(len(tr)), key=tr.__getitem__) if tr else None)
                for m, tr in self.traces.items()}

    def to_dict(self) -> dict:
        return {"rule": self.rule, "K": self.K, "sticky": self.sticky, "K_open": self.K_open,
                "span": self.span, "traces": self.traces,
                "open": self.open, "rho": self.rho, "open_epochs": self.open_epochs(),
                "peak_growth_epoch": self.peak_growth_epoch, "peak_epoch": self.peak_epoch}


def learning_window(traces, *, rule: str = "paper", K: float | None = None,
                    sticky: bool = True, K_open: float | None = None,
                    span: int = ROBUST_SPAN) -> LearningWindow:
    """Detect the prime learning window from a per-epoch trace series.

    Parameters
    ----------
    traces : dict[str, sequence of float] or History
        ``{m: [Tr_0, Tr_1, ...]}``, or a :class:`~modaldiag.History` recorded with
        ``monitor=True`` (its ``fisher`` entries are used).
    rule : {"paper", "code", "robust"}, default "paper"
        "robust" is a noise-robust variant of ours (Theil-Sen slope of the log-trace over
        ``span`` epochs, with hysteresis); see :func:`window_state` for the rule and its
        rationale. It is never the default.
    K : float, optional
        Threshold; default 0.04 (paper, robust) or 0.05 (code). The robust rule closes an open
        window when rho <= K.
    sticky : bool, default True
        The window is a single interval from epoch 0 (paper rule only; the code rule re-evaluates
        every epoch, as released, and the robust rule reopens through its hysteresis).
    K_open : float, optional
        Robust rule: a closed window reopens when rho > K_open; default ``K + |K|`` (2K); must
        be >= K.
    span : int >= 2, default 5
        Robust rule: number of past epochs in the slope fit.

    Returns
    -------
    LearningWindow
        ``open[m][t]`` and ``rho[m][t]`` for every modality m and epoch t (lists of length T).
    """
    validate_params(_PARAMETER_CONSTRAINTS, {"rule": rule, "K": K, "sticky": sticky,
                                             "K_open": K_open, "span": span}, "learning_window")
    K, K_open = _resolve(rule, K, K_open, "learning_window")
    if hasattr(traces, "series") and hasattr(traces, "modalities"):
        history = traces
        traces = {m: history.series(f"fisher.{m}") for m in history.modalities}
        if any(v != v for vals in traces.values() for v in vals):  # NaN: not monitored
            raise ValueError("the History has no Fisher traces; train with md.fit(..., monitor=True).")
    if not isinstance(traces, Mapping):
        raise TypeError(f"learning_window: traces must be a dict {{modality: [Tr_0, Tr_1, ...]}} "
                        f"or a History; got {type(traces).__name__}.")
    traces = {m: [float(v) for v in vals] for m, vals in traces.items()}
    if not traces:
        raise ValueError("no traces given.")
    bad = [m for m, vals in traces.items() if not all(math.isfinite(v) for v in vals)]
    if bad:
        raise ValueError(f"learning_window: the traces of {bad} contain NaN/inf; pass finite "
                         "Fisher traces (one per epoch).")
    lengths = {len(v) for v in traces.values()}
    if len(lengths) != 1:
        raise ValueError(f"every modality needs one trace per epoch; lengths differ: "
                         f"{ {m: len(v) for m, v in traces.items()} }.")
    sticky = sticky and rule == "paper"
    n = lengths.pop()
    opened: dict[str, list[bool]] = {m: [] for m in traces}
    rhos: dict[str, list[float | None]] = {m: [] for m in traces}
    prev = None
    for t in range(n):
        state, rho = window_state(traces, t, rule=rule, K=K, previous=prev, sticky=sticky,
                                  K_open=K_open, span=span)
        for m in traces:
            opened[m].append(state[m])
            rhos[m].append(rho[m])
        prev = state
    return LearningWindow(traces, opened, rhos, rule, K, sticky, K_open,
                          span if rule == "robust" else None)
