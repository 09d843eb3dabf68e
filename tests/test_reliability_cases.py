"""Every case on docs/reliability.md must hold: the page is generated from the same cases."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.cases import all_cases, run_case


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = all_cases(Path(tempfile.mkdtemp(prefix="modaldiag-reliability-")))
        metafunc.parametrize("case", cases, ids=[f"{c.area}:{c.name}" for c in cases])


def test_case_holds(case):
    outcome = run_case(case)
    assert outcome.ok, f"{case.area}: {case.name}: {outcome.happened}"
