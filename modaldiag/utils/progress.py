"""One progress bar for every long phase (fit, probes, diagnose), quiet on request.

``progress_bar(iterable, enabled=..., desc=...)`` returns a tqdm bar on an interactive terminal.
When ``enabled`` is False nothing is printed. When stderr is not a terminal (a log file, CI, a
pipe) the carriage-return bar is replaced by one plain line per phase when it ends
(``"modaldiag: shapley: 12 batches in 3.1 s"``), and only for phases that took at least
:data:`PLAIN_MIN_SECONDS` (a phase longer than a second), so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "is_interactive", "length_or_none", "PLAIN_MIN_SECONDS"]

#: when stderr is not a terminal, phases shorter than this many seconds print nothing
PLAIN_MIN_SECONDS = 1.0


def is_interactive() -> bool:
    """True when stderr is a terminal (where a live bar can redraw itself)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def length_or_none(iterable) -> int | None:
    """``len(iterable)`` when it has one (a DataLoader, a list), else None (a generator)."""
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


_IRREGULAR = {"epoch": "epochs"}


def _plural(unit: str, n: int) -> str:
    if n == 1:
        return unit
    if unit in _IRREGULAR:
        return _IRREGULAR[unit]
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


class _NoProgress:
    """The silent bar (``enabled=False``): counts, prints nothing; the tqdm methods callers use."""

    def __init__(self, iterable: Iterable | None, initial: int = 0):
        self.iterable = iterable
        self.n = initial

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, desc: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PlainProgress(_NoProgress):
    """The non-terminal stand-in: counts, and prints one line when closed (phases of at least
    :data:`PLAIN_MIN_SECONDS`)."""

    def __init__(self, iterable: Iterable | None, *, desc: str, unit: str, initial: int = 0):
        super().__init__(iterable, initial)
        self.desc, self.unit = desc, unit
        self._start = time.perf_counter()
        self._closed = False

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        took = time.perf_counter() - self._start
        if took < PLAIN_MIN_SECONDS:
            return
        print(f"modaldiag: {self.desc}: {self.n} {_plural(self.unit, self.n)} in {took:.1f} s",
              file=sys.stderr, flush=True)


def progress_bar(iterable: Iterable | None = None, *, enabled: bool, desc: str,
                 total: int | None = None, unit: str = "batch", initial: int = 0,
                 leave: bool = False):
    """A progress bar over ``iterable`` (or a manual one with ``.update``) for phase ``desc``.

    Parameters
    ----------
    iterable : iterable, optional
    enabled : bool
        False: silent (``progress=False`` / ``--quiet``).
    desc : str
        The phase, shown as the bar's label (``"fit"``, ``"shapley"``, ``"separability"``...).
    total : int, optional
        Number of steps when it cannot be read from ``len(iterable)``.
    unit : str, default "batch"
    initial : int, default 0
        Steps already done (a resumed run).
    leave : bool, default False
        Keep the finished bar on screen (terminal only).
    """
    if not enabled:
        return _NoProgress(iterable, initial)
    if not is_interactive():
        return _PlainProgress(iterable, desc=desc, unit=unit, initial=initial)
    if total is None and iterable is not None:
        total = length_or_none(iterable)
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=leave,
                dynamic_ncols=True)
