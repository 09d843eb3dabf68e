"""Shared pieces of the benchmark suites: timing, tables, machine info, code fingerprints and the
versioned results cache."""

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


# ---------------------------------------------------------------- code / configuration fingerprints
def code_fingerprint(package_dir=None) -> str:
    """sha256 (hex) of the modaldiag package's ``.py`` sources: every file's path relative to the
    package and its bytes, in sorted path order. Any change to the library's code changes it, so
    results cached under it are never mixed with results of other code."""
    import hashlib
    from pathlib import Path

    if package_dir is None:
        import modaldiag

        package_dir = Path(modaldiag.__file__).resolve().parent
    package_dir = Path(package_dir)
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(package_dir).as_posix()
        data = path.read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def short(fingerprint: str, n: int = 12) -> str:
    """The first ``n`` hex digits of a fingerprint (what the tables print)."""
    return fingerprint[:n]


def _canonical(obj):
    """JSON-able, deterministic form of a configuration value (tensors, tuples, classes, ...)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN
        return "nan"
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.detach().cpu().tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return repr(obj)


def config_fingerprint(config: dict) -> str:
    """sha256 (hex) of a configuration dict in canonical JSON (sorted keys)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(_canonical(config), sort_keys=True).encode()).hexdigest()


def regulator_config(regulator) -> dict | None:
    """A regulator's full configuration record: class, ``config()`` and ``repr`` (None = joint)."""
    if regulator is None:
        return None
    config = regulator.config() if hasattr(regulator, "config") else {}
    return {"class": f"{type(regulator).__module__}.{type(regulator).__qualname__}",
            "config": _canonical(config), "repr": repr(regulator)}


def optimizer_config(optimizer) -> dict:
    """Class and hyper-parameters (every param group's settings, parameters excluded)."""
    return {"class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "defaults": _canonical(dict(optimizer.defaults)),
            "groups": [_canonical({k: v for k, v in g.items() if k != "params"})
                       for g in optimizer.param_groups]}


class RunCache:
    """A results cache whose every cell is keyed by the code fingerprint and the full configuration.

    File layout (JSON, written atomically after every new cell)::

        {"format": 2,
         "runs":  {key: {"code": <sha256>, "config": {...}, "result": {...}}},   # current code
         "stale": {key: {...}}}   # cells of other code versions / old formats: never read back

    ``key = "<label>|<code[:12]>|<sha256(config)[:12]>"``. On load, every cell whose code
    fingerprint differs from the current one (and every cell of the old, unversioned format) is
    moved to ``stale``, so a table can only be built from cells of the code that is running.
    :meth:`put` re-hashes the package and refuses to store a result if the sources changed since
    the cache was opened (a run that straddles an edit is not attributable to either version).
    """

    FORMAT = 2

    def __init__(self, path, code: str | None = None):
        import json
        from pathlib import Path

        self.path = Path(path)
        self.code = code or code_fingerprint()
        raw = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.runs: dict = {}
        self.stale: dict = {}
        if raw.get("format") == self.FORMAT:
            self.stale.update(raw.get("stale", {}))
            for key, cell in raw.get("runs", {}).items():
                (self.runs if cell.get("code") == self.code else self.stale)[key] = cell
        else:  # the old unversioned cache: keyed by (dataset, method, seed, epochs) only
            self.stale.update({f"unversioned|{k}": {"code": None, "config": None, "result": v}
                               for k, v in raw.items()})
        self.n_stale_loaded = len(self.stale)
        self.hits = 0
        self.computed = 0

    def key(self, label: str, config: dict) -> str:
        return f"{label}|{short(self.code)}|{short(config_fingerprint(config))}"

    def get(self, label: str, config: dict):
        cell = self.runs.get(self.key(label, config))
        if cell is None or cell.get("code") != self.code or cell.get("config") != _canonical(config):
            return None
        self.hits += 1
        return cell["result"]

    def put(self, label: str, config: dict, result: dict) -> None:
        now = code_fingerprint()
        if now != self.code:
            raise RuntimeError(
                f"the modaldiag sources changed while the benchmark ran (fingerprint "
                f"{short(self.code)} -> {short(now)}); the result cannot be attributed to either "
                "version. Re-run the benchmark on a fixed checkout.")
        self.runs[self.key(label, config)] = {"code": self.code, "config": _canonical(config),
                                              "result": result}
        self.computed += 1
        self.save()

    def get_or_run(self, label: str, config: dict, fn):
        result = self.get(label, config)
        if result is None:
            result = fn()
            self.put(label, config, result)
        return result

    def save(self) -> None:
        from modaldiag.utils.io import atomic_write_json

        atomic_write_json(self.path, {"format": self.FORMAT, "code": self.code,
                                      "runs": self.runs, "stale": self.stale})
