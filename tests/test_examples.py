"""Every example runs (small budgets) and returns sensible numbers."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"train_joint", "plain_loop", "lightning_example"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} <= tested


@pytest.mark.parametrize("name", ["train_joint", "plain_loop"])
def test_example_runs(name):
    result = _load(name).main(epochs=3)
    assert set(result) == {"fou", "pix"} and all(0 <= v <= 1 for v in result.values())


def test_lightning_example_runs():
    pytest.importorskip("lightning")
    result = _load("lightning_example").main(epochs=2)
    assert set(result) == {"fou", "pix"}
