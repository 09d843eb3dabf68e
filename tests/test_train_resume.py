"""`modaldiag train` survives crashes: SIGKILLed mid-run, the same command resumes from the last
completed epoch and ends bit-identical to an uninterrupted run; a changed command is refused;
two processes writing the same folder are serialised by a lock; a diverged run saves nothing."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import modaldiag
from modaldiag.cli import main
from modaldiag.runs import work_dir

ROOT = Path(modaldiag.__file__).resolve().parent.parent
EPOCHS = 8
OPTIONS = {"--dataset": "nutrimouse", "--method": "ogm-ge", "--epochs": str(EPOCHS)}


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}


def _argv(out, *flags, **changes) -> list[str]:
    """``train`` arguments: OPTIONS with ``changes`` (``seed="1"`` -> ``--seed 1``) and ``flags``."""
    options = {**OPTIONS, **{f"--{k.replace('_', '-')}": v for k, v in changes.items()}}
    return ["train", *[x for kv in options.items() for x in kv], "--quiet", "--out", str(out),
            *flags]


def _cli(out, *flags, **changes):
    return [sys.executable, "-m", "modaldiag.cli", *_argv(out, *flags, **changes)]


def _epochs_done(out: Path) -> int:
    try:
        return len(json.loads((work_dir(out) / "history.json").read_text())["epochs"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _kill_when(out: Path, condition, timeout=120) -> int:
    proc = subprocess.Popen(_cli(out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    start = time.time()
    while not condition() and proc.poll() is None and time.time() - start < timeout:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def _finish(out: Path, *extra) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cli(out, *extra), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _same_run(a: Path, b: Path) -> None:
    wa = torch.load(a / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "model.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ra, rb = (json.loads((p / "run.json").read_text()) for p in (a, b))
    for key in ("test_acc", "test_unimodal_acc", "best_epoch"):
        assert ra[key] == rb[key], key
    ha, hb = (json.loads((p / "history.json").read_text())["epochs"] for p in (a, b))
    assert [e["val"]["acc"] for e in ha] == [e["val"]["acc"] for e in hb]
    assert [e["train"]["loss"] for e in ha] == [e["train"]["loss"] for e in hb]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _finish(out)
    assert "resuming" not in proc.stderr
    return out


def test_sigkill_then_same_command_resumes_bit_identical(tmp_path, reference, capsys):
    out = tmp_path / "run"
    code = _kill_when(out, lambda: _epochs_done(out) >= 3)
    assert code == -signal.SIGKILL
    done = _epochs_done(out)
    assert 3 <= done < EPOCHS
    assert not out.exists()  # nothing that looks like a finished run
    # a changed command into the interrupted folder is refused, naming what differs
    for change, differs in (({"seed": "1"}, "seed 0 -> 1"), ({"lr": "0.1"}, "lr 0.01 -> 0.1"),
                            ({"method": "joint"}, "method 'ogm-ge' -> 'joint'"),
                            ({"batch_size": "8"}, "batch_size 64 -> 8")):
        assert main(_argv(out, **change)) == 2
        err = capsys.readouterr().err
        assert "interrupted run with a different command" in err and differs in err, err
    assert _epochs_done(out) == done
    proc = _finish(out)
    match = re.search(r"resuming from epoch (\d+) of (\d+)", proc.stderr)
    assert match and int(match.group(1)) >= done and int(match.group(2)) == EPOCHS, proc.stderr
    _same_run(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # checkpoints, lock removed


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    delay = random.Random(3).uniform(0.0, 0.3)  # possibly mid-epoch or mid-checkpoint-write
    first: list[float] = []

    def moment() -> bool:
        if not first and _epochs_done(out) >= 1:
            first.append(time.time())
        return bool(first) and time.time() > first[0] + delay

    assert _kill_when(out, moment) == -signal.SIGKILL
    assert not (out / "run.json").exists()
    _finish(out)
    _same_run(out, reference)


class _Interrupt(modaldiag.Callback):
    def on_train_epoch_start(self, ctx):
        if ctx.epoch == 2:
            raise KeyboardInterrupt


def test_ctrl_c_then_restart_then_finished_run_not_retrained(tmp_path, capsys, monkeypatch):
    import modaldiag.runs as runs

    real_fit = runs.fit
    monkeypatch.setattr(runs, "fit", lambda *a, **k: real_fit(*a, **{**k, "callbacks": [_Interrupt()]}))
    out = tmp_path / "run"
    assert main(_argv(out)) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert _epochs_done(out) == 2 and not out.exists()
    monkeypatch.undo()
    assert main(_argv(out, "--restart")) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and (out / "run.json").exists()
    history = json.loads((out / "history.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == list(range(EPOCHS))
    model = (out / "model.pt").read_bytes()
    mtime = (out / "model.pt").stat().st_mtime_ns
    assert main(_argv(out)) == 0
    captured = capsys.readouterr()
    assert ("is already complete: it holds this finished run (8 epochs); nothing was "
            "retrained") in captured.err
    assert (out / "model.pt").read_bytes() == model
    assert (out / "model.pt").stat().st_mtime_ns == mtime
    assert main(_argv(out, epochs="3")) == 2
    assert "finished run of a different command (what differs: epochs 8 -> 3)" in \
        capsys.readouterr().err
    assert (out / "model.pt").read_bytes() == model
    assert main(_argv(out, "--overwrite", epochs="3")) == 0
    assert json.loads((out / "run.json").read_text())["epochs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_two_processes_into_one_folder_second_refused(tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, epochs="400"), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        start = time.time()
        while _epochs_done(out) < 1 and proc.poll() is None and time.time() - start < 120:
            time.sleep(0.005)
        assert proc.poll() is None
        assert main(_argv(out, epochs="400")) == 2
        err = capsys.readouterr().err
        assert f"another modaldiag process (pid {proc.pid}) is writing {out}" in err, err
        assert proc.poll() is None  # the first one was not disturbed
    finally:
        proc.kill()
        proc.wait()


def test_diverged_training_saves_nothing(tmp_path, capsys, monkeypatch):
    import modaldiag.runs as runs

    real_fit = runs.fit

    def fit_then_weights_blow_up(model, *args, **kwargs):
        history = real_fit(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))
        return history

    monkeypatch.setattr(runs, "fit", fit_then_weights_blow_up)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "nutrimouse", "--epochs", "2", "--quiet",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "training diverged: 1 weight tensor(s) hold NaN or inf" in err
    assert "Nothing was saved to" in err
    assert os.listdir(tmp_path) == []  # no run, no checkpoints, no lock
    monkeypatch.undo()
    assert main(["train", "--dataset", "nutrimouse", "--epochs", "2", "--quiet", "--lr", "1e30",
                 "--out", str(out)]) == 2
    assert "Nothing was saved to" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_crash_after_the_last_epoch_resumes_without_training(tmp_path, capsys, monkeypatch):
    import modaldiag.runs as runs

    argv = ["train", "--dataset", "nutrimouse", "--method", "inforeg", "--epochs", "3", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "ref")]) == 0

    class Crash:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            raise KeyboardInterrupt  # killed while writing the finished run

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runs, "atomic_directory", Crash)
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == 130
    assert not out.exists() and _epochs_done(out) == 3
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "resuming from epoch 3 of 3" in capsys.readouterr().err
    _same_run(out, tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "run"]


@pytest.mark.parametrize("bad, message", [
    ({"lr": float("inf")}, r"lr must be a finite number in \(0, inf\); got inf"),
    ({"lr": float("nan")}, r"lr must be a finite number in \(0, inf\); got nan"),
    ({"lr": -0.1}, r"lr must be a finite number in \(0, inf\); got -0.1"),
    ({"epochs": 0}, r"epochs must be an integer in \[1, inf\); got 0"),
    ({"method": "magic"}, r"method must be one of 'joint'"),
    ({"fusion": "mean"}, r"fusion must be one of 'concat'"),
])
def test_train_run_refuses_bad_arguments_before_touching_disk(tmp_path, bad, message):
    from modaldiag.runs import train_run

    args = {"method": "joint", "epochs": 1, **bad}
    with pytest.raises(ValueError, match=message):
        train_run(modaldiag.datasets.load("nutrimouse"), out=tmp_path / "run", **args)
    assert os.listdir(tmp_path) == []
