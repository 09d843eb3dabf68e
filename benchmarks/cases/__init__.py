"""Reliability cases: every bad input, hostile name and silent-wrong-result regression that
modaldiag guards against, each with the check that proves the guard works.

Each module here (one per area) exposes ``cases(tmp: Path) -> list[Case]``. The same cases feed
``docs/reliability.md`` (``python -m benchmarks.reliability``) and the test suite
(``tests/test_reliability_cases.py``), so every cell of that page comes from a check that ran.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Case", "Outcome", "AREAS", "all_cases", "run_case"]

#: the modules holding cases, in the order the page shows them
AREAS = ("inputs", "files", "training", "probes", "fisher", "regulators", "models")


@dataclass
class Case:
    """One reliability case.

    ``run`` does what a user would do. Either ``raises`` (an exception type) and ``match`` (a
    regular expression the message must match, case-insensitive) say the error the user must get,
    or ``check`` receives ``run``'s return value and returns ``(ok, what_happened)``.
    """

    area: str
    name: str
    run: Callable[[], object]
    raises: type[BaseException] | tuple[type[BaseException], ...] | None = None
    match: str = ""
    check: Callable[[object], tuple[bool, str]] | None = None


@dataclass
class Outcome:
    case: Case
    ok: bool
    happened: str


def _first_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def run_case(case: Case) -> Outcome:
    """Run one case; never raises (the outcome says what happened and whether it passed)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            result = case.run()
    except SystemExit as exc:  # the CLI: judge the exit code and the stderr line
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        happened = f"exit code {exc.code}: {lines[-1][:300] if lines else ''}"
        ok = case.raises is SystemExit and bool(re.search(case.match, happened, re.I))
        return Outcome(case, ok, happened)
    except Exception as exc:  # noqa: BLE001 - we report whatever the user would see
        happened = f"{type(exc).__name__}: {_first_line(exc)}"
        ok = (case.raises is not None and case.raises is not SystemExit
              and isinstance(exc, case.raises) and bool(re.search(case.match, str(exc), re.I)))
        return Outcome(case, ok, happened)
    if case.raises is not None:
        return Outcome(case, False, f"no error (expected {getattr(case.raises, '__name__', case.raises)})")
    if case.check is None:
        return Outcome(case, True, "ran without error")
    try:
        ok, happened = case.check(result)
    except Exception as exc:  # noqa: BLE001
        return Outcome(case, False, f"check failed: {type(exc).__name__}: {_first_line(exc)}")
    return Outcome(case, bool(ok), happened)


def all_cases(tmp: Path) -> list[Case]:
    """Every area's cases (``tmp``: a scratch folder the cases may write into)."""
    import importlib

    out: list[Case] = []
    for area in AREAS:
        try:
            module = importlib.import_module(f"{__name__}.{area}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{area}":
                continue
            raise
        sub = Path(tmp) / area
        sub.mkdir(parents=True, exist_ok=True)
        out.extend(module.cases(sub))
    return out
