"""A training process killed with SIGKILL resumes from its last checkpoint and ends bit-identical
to an uninterrupted run (CPU, deterministic algorithms, one thread)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "crash" / "train.py"
ROOT = SCRIPT.parent.parent.parent
EPOCHS = 6


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(ckpt, out, *flags):
    subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(out), str(EPOCHS), *flags],
                   check=True, env=_env(), capture_output=True, timeout=300)
    return torch.load(out, weights_only=True)


def _epochs_done(ckpt: Path) -> int:
    try:
        return len(json.loads((ckpt / "history.json").read_text())["epochs"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _kill_when(ckpt, condition, *flags, timeout=120):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(ckpt), str(ckpt / "unused.pt"),
                             str(EPOCHS), *flags], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start = time.time()
    while not condition() and proc.poll() is None and time.time() - start < timeout:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    return _run(tmp / "ckpt", tmp / "final.pt")


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_right_after_a_checkpoint_then_resume(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    code = _kill_when(ckpt, lambda: _epochs_done(ckpt) >= 2)
    assert code == -signal.SIGKILL
    assert 2 <= _epochs_done(ckpt) < EPOCHS
    _assert_identical(_run(ckpt, tmp_path / "final.pt", "--resume"), reference)


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_at_a_random_moment_then_resume(tmp_path, reference, seed):
    ckpt = tmp_path / "ckpt"
    delay = random.Random(seed).uniform(0.0, 0.4)  # mid-epoch, possibly mid-checkpoint-write
    first_seen: list[float] = []

    def moment() -> bool:
        if not first_seen and _epochs_done(ckpt) >= 1:
            first_seen.append(time.time())
        return bool(first_seen) and time.time() > first_seen[0] + delay

    code = _kill_when(ckpt, moment, "--slow")
    assert code == -signal.SIGKILL  # it was still running: a real crash, not a finished run
    assert _epochs_done(ckpt) < EPOCHS
    # whatever survived loads safely (weights_only) and resumes to the same end point
    _assert_identical(_run(ckpt, tmp_path / "final.pt", "--resume", "--slow"), reference)


def test_corrupt_or_malicious_checkpoints_are_refused_cleanly(tmp_path):
    import pickle

    from modaldiag.utils.io import safe_torch_load

    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(3)}, ok)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ok.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot load checkpoint .*truncated.pt.* safely"):
        safe_torch_load(truncated)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(ValueError, match="nothing was executed"):
        safe_torch_load(evil)
    assert not (tmp_path / "pwned").exists()
