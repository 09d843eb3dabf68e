"""Reliability cases for the user's files: modaldiag replaces only folders it made (marker),
refuses dangerous or self-destructive output paths before any work, survives crashes in the
middle of a folder swap, cleans its own leftovers, serialises two writers with a lock, and
resumes or refuses an interrupted ``modaldiag train`` but never mixes two commands."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

from modaldiag.cli import main
from modaldiag.runs import work_dir
from modaldiag.training import History
from modaldiag.utils.io import (
    DirectoryLock,
    atomic_directory,
    atomic_write_json,
    read_marker,
    recover,
    write_marker,
)

from . import Case

AREA = "files"
CONFIG = {"dataset": "nutrimouse", "method": "joint", "epochs": 2, "seed": 0, "fusion": "concat",
          "batch_size": 64, "lr": 0.01}
TRAIN = ["train", "--dataset", "nutrimouse", "--epochs", "2", "--quiet"]


def _exit(argv: list[str]):
    return lambda: sys.exit(main(argv))


def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""


def _fake_run(folder: Path, **changes) -> Path:
    """A finished run folder as ``modaldiag train`` leaves it (no weights: cases never load them)."""
    folder.mkdir(parents=True)
    atomic_write_json(folder / "run.json", {"name": "joint training", **CONFIG, **changes,
                                            "test_acc": 0.5, "test_unimodal_acc": {}})
    History(("gene", "lipid")).save(folder / "history.json")
    write_marker(folder, "run", command="modaldiag train ...")
    return folder


def _foreign(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("three years of work")
    (folder / "data").mkdir()
    (folder / "data" / "x.csv").write_text("1,2,3")
    return folder


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _foreign_untouched(tmp: Path):
    project = _foreign(tmp / "foreign-2")
    before = _files(project)
    results = [_run_cli([*TRAIN, "--out", str(project), "--overwrite"])[0],
               _run_cli(["demo", "--out", str(project), "--quiet", "--overwrite"])[0]]
    return results, before == _files(project), sorted(p.name for p in tmp.iterdir()
                                                      if p.name.startswith(".foreign-2"))


def _concurrent(tmp: Path):
    out = tmp / "locked"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other writer: holds the lock until killed
        try:
            DirectoryLock(out).acquire()
            os.write(write, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        os.read(read, 1)
        code, line = _run_cli([*TRAIN, "--out", str(out)])
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(read)
        os.close(write)
    return code, line, pid, out.exists()


def _leftovers(tmp: Path):
    out = _fake_run(tmp / "left")
    dead = _dead_pid()
    (tmp / ".left.x1y2z3w4.partial").mkdir()
    (tmp / f".left.{dead}-abcd1234.partial").mkdir()
    _fake_run(tmp / f".left.old-{dead}")
    (tmp / ".left.notes").mkdir()  # not named like modaldiag's own: kept
    with atomic_directory(out, kind="run") as new:
        (new / "run.json").write_text("{}")
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(".left.")), read_marker(out)


def _backup_restored(tmp: Path):
    dead = _dead_pid()
    _fake_run(tmp / f".swap.old-{dead}-aaaa1111")
    actions = recover(tmp / "swap")
    return actions, (tmp / "swap" / "run.json").is_file(), sorted(
        p.name for p in tmp.iterdir() if p.name.startswith(".swap."))


def _interrupted(tmp: Path, name: str) -> Path:
    out = tmp / name
    work = work_dir(out)
    work.mkdir(parents=True)
    write_marker(work, "train-work", command="modaldiag train ...", config=CONFIG)
    return out


def _not_retrained(result) -> tuple[bool, str]:
    (code, line), record = result
    said = "is already complete" in line and "nothing was retrained" in line
    kept = '"test_acc": 0.5' in record
    return (code == 0 and said and kept,
            f"exit code {code}; stderr says '... is already complete ... nothing was retrained':"
            f" {said}; run.json unchanged: {kept}")


def cases(tmp: Path) -> list[Case]:
    tmp = Path(tmp)
    run = _fake_run(tmp / "runs" / "a")
    other = _fake_run(tmp / "runs" / "b", method="ogm")
    finished = _fake_run(tmp / "finished")
    mine = tmp / "demo-earlier"
    mine.mkdir()
    write_marker(mine, "demo", command="modaldiag demo")
    return [
        Case(AREA, "CLI: train --out into a non-empty folder modaldiag did not create",
             _exit([*TRAIN, "--out", str(_foreign(tmp / "foreign-1"))]),
             raises=SystemExit, match=r"exit code 2: .*foreign folder.*nothing in it was touched"),
        Case(AREA, "CLI: train/demo --overwrite into a foreign folder: refused, its files intact",
             lambda: _foreign_untouched(tmp),
             check=lambda r: (r[0] == [2, 2] and r[1] and r[2] == [],
                              f"exit codes {r[0]}; files identical: {r[1]}; leftovers: {r[2]}")),
        Case(AREA, "CLI: --out . (the current folder)", _exit([*TRAIN, "--out", "."]),
             raises=SystemExit, match=r"exit code 2: .*it is the current folder"),
        Case(AREA, "CLI: --out .. (contains the current folder)", _exit([*TRAIN, "--out", ".."]),
             raises=SystemExit, match=r"exit code 2: .*(containing the current folder|root)"),
        Case(AREA, "CLI: --out '' (empty)", _exit(["demo", "--out", "", "--quiet"]),
             raises=SystemExit, match=r"exit code 2: .*--out is empty"),
        Case(AREA, "CLI: --out / (filesystem root)", _exit([*TRAIN, "--out", "/", "--overwrite"]),
             raises=SystemExit, match=r"exit code 2: .*filesystem root"),
        Case(AREA, "CLI: --out $HOME", _exit([*TRAIN, "--out", str(Path.home())]),
             raises=SystemExit, match=r"exit code 2: .*(home folder|current folder|root)"),
        Case(AREA, "CLI: diagnose --run R --out R (the run itself)",
             _exit(["diagnose", "--run", str(run), "--out", str(run), "--overwrite"]),
             raises=SystemExit, match=r"exit code 2: .*is the input .* itself"),
        Case(AREA, "CLI: diagnose --out inside the run (other than RUN/diagnosis)",
             _exit(["diagnose", "--run", str(run), "--out", str(run / "report")]),
             raises=SystemExit, match=r"exit code 2: .*inside the input"),
        Case(AREA, "CLI: compare A B --out A",
             _exit(["compare", str(run), str(other), "--out", str(run), "--overwrite"]),
             raises=SystemExit, match=r"exit code 2: .*is the input .* itself"),
        Case(AREA, "CLI: compare A B --out PARENT-OF-A (contains the runs)",
             _exit(["compare", str(run), str(other), "--out", str(run.parent), "--overwrite"]),
             raises=SystemExit, match=r"exit code 2: .*contains the input"),
        Case(AREA, "CLI: demo into an earlier demo without --overwrite",
             _exit(["demo", "--out", str(mine), "--quiet"]),
             raises=SystemExit, match=r"exit code 2: .*already holds a modaldiag demo.*--overwrite"),
        Case(AREA, "CLI: train --out under a file (location checked before training)",
             _exit([*TRAIN, "--out", str(run / "run.json" / "x")]),
             raises=SystemExit, match=r"exit code 2: .*not a writable folder"),
        Case(AREA, "CLI: --lr inf", _exit([*TRAIN, "--lr", "inf", "--out", str(tmp / "lr")]),
             raises=SystemExit, match=r"exit code 2: .*--lr: expected a finite positive number"),
        Case(AREA, "CLI: --lr nan", _exit([*TRAIN, "--lr", "nan", "--out", str(tmp / "lr")]),
             raises=SystemExit, match=r"exit code 2: .*--lr: expected a finite positive number"),
        Case(AREA, "CLI: a second train into a folder another process is writing",
             lambda: _concurrent(tmp),
             check=lambda r: (r[0] == 2 and f"another modaldiag process (pid {r[2]}) is writing"
                              in r[1] and not r[3], f"exit code {r[0]}: {r[1][:120]}")),
        Case(AREA, "CLI: train with another --seed into an interrupted run",
             _exit([*TRAIN, "--seed", "1", "--out", str(_interrupted(tmp, "int-1"))]),
             raises=SystemExit,
             match=r"exit code 2: .*interrupted run with a different command.*seed 0 -> 1"),
        Case(AREA, "CLI: train with another --method over a finished run",
             _exit([*TRAIN, "--method", "ogm", "--out", str(finished)]),
             raises=SystemExit,
             match=r"exit code 2: .*finished run of a different command.*method 'joint' -> 'ogm'"),
        Case(AREA, "CLI: the same train command over its finished run",
             lambda: (_run_cli([*TRAIN, "--out", str(finished)]),
                      (finished / "run.json").read_text()),
             check=_not_retrained),
        Case(AREA, "CLI: a training run that diverges (--lr 1e30)",
             lambda: (*_run_cli([*TRAIN[:-2], "1", "--quiet", "--lr", "1e30",
                                 "--out", str(tmp / "diverged")]),
                      sorted(p.name for p in tmp.iterdir() if "diverged" in p.name)),
             check=lambda r: (r[0] == 2 and "Nothing was saved" in r[1] and r[2] == [],
                              f"exit code {r[0]}; '...{r[1][-80:]}'; left on disk: {r[2]}")),
        Case(AREA, "stale leftovers (.NAME.*.partial, .NAME.old-PID) of dead processes",
             lambda: _leftovers(tmp),
             check=lambda r: (r[0] == [".left.notes"] and r[1]["kind"] == "run",
                              f"left beside the folder after the next write: {r[0]}")),
        Case(AREA, "crash between the two renames of a folder swap (folder missing, backup left)",
             lambda: _backup_restored(tmp),
             check=lambda r: (r[1] and r[2] == [] and "restored" in r[0][0],
                              f"{r[0][0][:60]}...; run.json back: {r[1]}; leftovers: {r[2]}")),
    ]
