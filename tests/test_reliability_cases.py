"""Every case on docs/reliability.md must hold: the page is generated from the same cases."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from benchmarks.cases import all_cases, run_case


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        scratch = tempfile.mkdtemp(prefix="modaldiag-reliability-")
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        cases = all_cases(Path(scratch))
        metafunc.parametrize("case", cases, ids=[f"{c.area}:{c.name}" for c in cases])


def test_case_holds(case):
    outcome = run_case(case)
    assert outcome.ok, f"{case.area}: {case.name}: {outcome.happened}"
