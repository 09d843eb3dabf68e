"""Shared pieces of the benchmark suites: timing, tables, machine info."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Table:
    """One results table: a title, a note on how it was measured, column names and rows."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""

    def to_markdown(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
            return str(v)

        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info() -> dict:
    import numpy
    import sklearn

    import modaldiag

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"{platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "modaldiag": modaldiag.__version__,
    }
