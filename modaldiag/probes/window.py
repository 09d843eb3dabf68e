"""P2: the prime learning window (InfoReg, CVPR 2025, Eq. 11).

Epochs are 0-based; ``traces[m][t]`` is the Fisher trace measured during epoch t. The decision for
epoch t is taken at its start, from the traces of epochs < t.

- ``"paper"`` (default): for t >= 2, ``rho_m = (Tr_{t-1} - Tr_{t-2}) / Tr_{t-1}``; the window of m
  is open while ``rho_m > K`` (K = 0.04). Epochs 0 and 1 have no growth to measure and count as
  open. With ``sticky=True`` (default) the window is one interval: once it closes it stays closed.
- ``"code"``: the released code: the trace list is pre-filled with 10 zeros, the growth is taken
  between 10-epoch moving averages, K = 0.05, and only the *first* modality's trace decides (the
  same decision for every modality). The zeros keep the window open for epochs 0..10.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..utils.validation import BOOL, NON_NEGATIVE_INT, Interval, Options, validate_params

__all__ = ["LearningWindow", "learning_window", "window_state", "growth_ratio"]

DEFAULT_K = {"paper": 0.04, "code": 0.05}
CODE_WINDOW = 10
_PARAMETER_CONSTRAINTS = {"rule": [Options("paper", "code")], "K": [None, Interval(None, None)],
                          "sticky": [BOOL], "epoch": [NON_NEGATIVE_INT]}


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


def window_state(traces: Mapping[str, Sequence[float]], epoch: int, *, rule: str = "paper",
                 K: float | None = None, previous: Mapping[str, bool] | None = None,
                 sticky: bool = True) -> tuple[dict[str, bool], dict[str, float | None]]:
    """Whether each modality's window is open at the start of ``epoch``, and the growth ratio.

    ``previous`` is the state at ``epoch - 1`` (for ``sticky`` windows).
    """
    validate_params(_PARAMETER_CONSTRAINTS, {"rule": rule, "K": K, "sticky": sticky,
                                             "epoch": epoch}, "window_state")
    K = DEFAULT_K[rule] if K is None else float(K)
    names = list(traces)
    if rule == "code":
        rho0 = _code_rho(traces[names[0]], epoch)
        rho = {m: rho0 for m in names}
    else:
        rho = {m: _paper_rho(traces[m], epoch) for m in names}
    state = {}
    for m in names:
        is_open = True if rho[m] is None else rho[m] > K
        if sticky and previous is not None and not previous.get(m, True):
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
    """

    traces: dict[str, list[float]]
    open: dict[str, list[bool]]
    rho: dict[str, list[float | None]]
    rule: str
    K: float
    sticky: bool = True

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
        return {"rule": self.rule, "K": self.K, "sticky": self.sticky, "traces": self.traces,
                "open": self.open, "rho": self.rho, "open_epochs": self.open_epochs(),
                "peak_growth_epoch": self.peak_growth_epoch, "peak_epoch": self.peak_epoch}


def learning_window(traces, *, rule: str = "paper", K: float | None = None,
                    sticky: bool = True) -> LearningWindow:
    """Detect the prime learning window from a per-epoch trace series.

    Parameters
    ----------
    traces : dict[str, sequence of float] or History
        ``{m: [Tr_0, Tr_1, ...]}``, or a :class:`~modaldiag.History` recorded with
        ``monitor=True`` (its ``fisher`` entries are used).
    rule : {"paper", "code"}, default "paper"
    K : float, optional
        Threshold; default 0.04 (paper) or 0.05 (code).
    sticky : bool, default True
        The window is a single interval from epoch 0 (paper rule only; the code rule re-evaluates
        every epoch, as released).
    """
    validate_params(_PARAMETER_CONSTRAINTS, {"rule": rule, "K": K, "sticky": sticky},
                    "learning_window")
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
    K = DEFAULT_K[rule] if K is None else float(K)
    sticky = sticky and rule == "paper"
    n = lengths.pop()
    opened: dict[str, list[bool]] = {m: [] for m in traces}
    rhos: dict[str, list[float | None]] = {m: [] for m in traces}
    prev = None
    for t in range(n):
        state, rho = window_state(traces, t, rule=rule, K=K, previous=prev, sticky=sticky)
        for m in traces:
            opened[m].append(state[m])
            rhos[m].append(rho[m])
        prev = state
    return LearningWindow(traces, opened, rhos, rule, K, sticky)
