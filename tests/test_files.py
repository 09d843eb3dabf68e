"""Output folders: ownership markers, location checks, crash-safe atomic swaps, leftovers, locks.

Crashes are real: a forked child dies with ``os._exit`` (no cleanup, like SIGKILL) at each
filesystem step of a folder swap, and the folder must still be there, old or new, complete.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import modaldiag.utils.io as mio
from modaldiag.utils.io import (
    MARKER,
    DirectoryLock,
    atomic_directory,
    check_output_dir,
    folder_state,
    read_marker,
    recover,
    write_marker,
)


def _make(folder: Path, text: str, kind: str = "run") -> Path:
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.txt").write_text(text * 2)
    write_marker(folder, kind, command="test")
    return folder


def _content(folder: Path) -> str | None:
    """'old'/'new' when ``folder`` is complete (marker and both files agree), else None."""
    try:
        text = (folder / "a.txt").read_text()
        complete = (folder / "sub" / "b.txt").read_text() == text * 2
    except OSError:
        return None
    return text if complete and read_marker(folder) is not None else None


def _leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- markers and checks
def test_marker_round_trip_and_folder_states(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    assert folder_state(folder) == "empty" and folder_state(tmp_path / "nope") == "missing"
    (folder / "x").write_text("x")
    assert folder_state(folder) == "foreign" and read_marker(folder) is None
    write_marker(folder, "run", command="modaldiag train --out run", config={"seed": 3})
    record = read_marker(folder)
    assert record["tool"] == "modaldiag" and record["kind"] == "run"
    assert record["config"] == {"seed": 3} and record["pid"] == os.getpid()
    assert record["version"] == __import__("modaldiag").__version__
    assert folder_state(folder) == "modaldiag"
    (folder / MARKER).write_text("{not json")
    assert read_marker(folder) is None and folder_state(folder) == "foreign"
    (folder / MARKER).write_text(json.dumps({"tool": "other", "kind": "run"}))
    assert folder_state(folder) == "foreign"
    (tmp_path / "f").write_text("")
    os.symlink(folder, tmp_path / "link")
    assert folder_state(tmp_path / "f") == "file" and folder_state(tmp_path / "link") == "link"


@pytest.mark.parametrize("given, what", [
    ("", "is empty"), (".", "the current folder"), ("..", "containing the current folder"),
    ("/", "the filesystem root"), ("CWD", "the current folder"), ("HOME", "your home folder"),
])
def test_dangerous_locations_refused(tmp_path, monkeypatch, given, what):
    home, work = tmp_path / "home", tmp_path / "code" / "project"
    home.mkdir()
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    given = {"CWD": str(work), "HOME": str(home)}.get(given, given)
    with pytest.raises(ValueError, match=what):
        check_output_dir(given)
    with pytest.raises(ValueError, match=what):
        atomic_directory(given)
    assert os.listdir(home) == [] and os.listdir(work) == []


def test_output_relations_to_inputs(tmp_path):
    run = _make(tmp_path / "runs" / "a", "old")
    with pytest.raises(ValueError, match="is the input .* itself"):
        check_output_dir(run, inputs=[run], overwrite=True)
    with pytest.raises(ValueError, match="contains the input"):
        check_output_dir(tmp_path / "runs", inputs=[run])
    with pytest.raises(ValueError, match="inside the input"):
        check_output_dir(run / "other", inputs=[run])
    assert check_output_dir(run / "diagnosis", inputs=[run],
                            allowed_inside=[run / "diagnosis"]) == run / "diagnosis"
    assert check_output_dir(tmp_path / "runs" / "b", inputs=[run]) == tmp_path / "runs" / "b"
    assert _content(run) == "old"


def test_foreign_file_link_and_existing_folders(tmp_path):
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="foreign folder"):
        check_output_dir(foreign)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="not a writable folder"):
        check_output_dir(tmp_path / "file" / "out")
    os.symlink(foreign, tmp_path / "link")
    with pytest.raises(ValueError, match="symbolic link"):
        check_output_dir(tmp_path / "link")
    mine = _make(tmp_path / "mine", "old", kind="comparison")
    with pytest.raises(ValueError, match="already holds a modaldiag comparison .*--overwrite"):
        check_output_dir(mine)
    assert check_output_dir(mine, overwrite=True) == mine
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_space_and_permission_checked_before_work(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(mio.shutil, "disk_usage",
                        lambda p: usage._replace(free=3 * 2**20))
    with pytest.raises(ValueError, match=r"only 3\.0 MiB free .* at least 16 MiB"):
        check_output_dir(tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr(mio.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="cannot write into"):
        check_output_dir(tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- atomic_directory
def test_atomic_directory_refuses_foreign_and_keeps_its_files(tmp_path):
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2,3")
    mtime = (foreign / "data.csv").stat().st_mtime_ns
    with pytest.raises(ValueError, match="foreign folder"):
        with atomic_directory(foreign) as tmp:
            (tmp / "x").write_text("never")
    assert os.listdir(foreign) == ["data.csv"] and (foreign / "data.csv").read_text() == "1,2,3"
    assert (foreign / "data.csv").stat().st_mtime_ns == mtime
    assert _leftovers(tmp_path) == []


def test_atomic_directory_replaces_only_with_overwrite(tmp_path):
    out = _make(tmp_path / "out", "old")
    with pytest.raises(ValueError, match="already holds a modaldiag run"):
        with atomic_directory(out, kind="run", overwrite=False):
            pass
    with atomic_directory(out, kind="diagnosis", command="cmd") as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("newnew")
    assert _content(out) == "new" and read_marker(out)["kind"] == "diagnosis"
    assert read_marker(out)["command"] == "cmd" and _leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert _content(out) == "new" and _leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as tmp:
        (tmp / "a.txt").write_text("x")
    assert (empty / "a.txt").read_text() == "x"


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "out", kind="run") as tmp:
            mio.atomic_write_text(tmp / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out" / MARKER).stat().st_mode & 0o777 == 0o640


def _crash_swap_at(out: Path, step: int, *, exchange: bool, mid_delete: bool) -> int:
    """Fork; the child swaps 'new' into ``out`` and dies (os._exit, no cleanup) just before its
    ``step``-th filesystem mutation (or half-way through a deletion). Returns its exit status."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            calls = [0]

            def die_at(real, half=False):
                def wrapped(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        if half:
                            victim = next(Path(args[0]).rglob("*.txt"), None)
                            if victim is not None:
                                victim.unlink()
                        os._exit(9)
                    return real(*args, **kwargs)
                return wrapped

            os.replace = die_at(os.replace)
            shutil.rmtree = die_at(shutil.rmtree, half=mid_delete)
            if exchange:
                mio._exchange = die_at(mio._exchange)
            else:
                mio._RENAMEAT2 = None
            with atomic_directory(out, kind="run") as tmp:
                (tmp / "a.txt").write_text("new")
                (tmp / "sub").mkdir()
                (tmp / "sub" / "b.txt").write_text("newnew")
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] >> 8


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-fallback"])
@pytest.mark.parametrize("mid_delete", [False, True], ids=["between-steps", "mid-delete"])
def test_swap_killed_at_every_step_keeps_old_or_new(tmp_path, exchange, mid_delete):
    if exchange and mio._RENAMEAT2 is None:
        pytest.skip("no renameat2 on this system")
    seen = set()
    for step in range(1, 12):
        parent = tmp_path / f"s{step}"
        out = _make(parent / "out", "old")
        code = _crash_swap_at(out, step, exchange=exchange, mid_delete=mid_delete)
        if code == 0:
            assert _content(out) == "new" and _leftovers(parent) == []
            break
        assert code == 9
        # at the instant of the crash: the old or the new folder is at the path, or (fallback
        # only, between its two renames) the old one is complete in its backup
        state = _content(out)
        if state is None:
            assert not exchange and not out.exists()
            backups = [p for p in parent.iterdir() if p.name.startswith(".out.old-")]
            assert len(backups) == 1 and _content(backups[0]) == "old"
        actions = recover(out)
        after = _content(out)
        assert after in ("old", "new") and (state is None or after == state), (step, actions)
        assert _leftovers(parent) == [], (step, actions)
        seen.add(after)
        with atomic_directory(out, kind="run") as tmp:  # the next run works normally
            (tmp / "a.txt").write_text("next")
        assert (out / "a.txt").read_text() == "next" and _leftovers(parent) == []
    else:
        pytest.fail("the swap never completed")
    assert step == (4 if exchange else 6)  # the crash points above covered every step
    assert seen == {"old", "new"}


def test_recover_cleans_stale_leftovers_but_not_live_or_foreign_ones(tmp_path):
    out = _make(tmp_path / "out", "current")
    dead = _dead_pid()
    legacy_partial = tmp_path / ".out.x1y2z3w4.partial"
    legacy_partial.mkdir()
    (tmp_path / f".out.{dead}-abcd1234.partial").mkdir()
    _make(tmp_path / f".out.old-{dead}", "old")
    _make(tmp_path / f".out.trash-{dead}-q1w2e3r4", "gone")
    live = tmp_path / f".out.{os.getppid()}-live0000.partial"
    live.mkdir()
    mine = tmp_path / ".out.notes"  # not one of modaldiag's names
    mine.mkdir()
    target = tmp_path / "elsewhere"
    _make(target, "keep")
    os.symlink(target, tmp_path / f".out.old-{dead}-link0000")
    actions = recover(out)
    assert len(actions) == 4 and all("removed stale leftover" in a for a in actions)
    assert _content(out) == "current"
    assert _leftovers(tmp_path) == sorted([live.name, ".out.notes", f".out.old-{dead}-link0000"])
    assert _content(target) == "keep"


def test_recover_restores_the_backup_when_the_folder_is_missing(tmp_path):
    dead = _dead_pid()
    _make(tmp_path / f".out.old-{dead}-aaaa1111", "old")
    assert recover(tmp_path / "out") == [
        f"restored {tmp_path / 'out'} from the interrupted swap's backup .out.old-{dead}-aaaa1111"]
    assert _content(tmp_path / "out") == "old" and _leftovers(tmp_path) == []
    assert recover(tmp_path / "out") == []
    shutil.rmtree(tmp_path / "out")
    _make(tmp_path / f".out.old-{dead}-bbbb2222", "old")
    # the up-front check sees the restored folder, so a refusal comes before any work
    with pytest.raises(ValueError, match="already holds a modaldiag run"):
        check_output_dir(tmp_path / "out")
    assert _content(tmp_path / "out") == "old" and _leftovers(tmp_path) == []


# ---------------------------------------------------------------- locks
def test_lock_is_exclusive_across_processes_and_removed_after(tmp_path):
    out = tmp_path / "out"
    script = ("import sys, time; from modaldiag.utils.io import DirectoryLock\n"
              "with DirectoryLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    import modaldiag

    env = {**os.environ, "PYTHONPATH": str(Path(modaldiag.__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"another modaldiag process \(pid {proc.pid}\) is "
                                             rf"writing {out}"):
            DirectoryLock(out).acquire()
        with pytest.raises(ValueError, match=f"pid {proc.pid}"):
            with atomic_directory(out):
                pass
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".out.lock").exists()  # left by the killed holder: not a lock any more
    with DirectoryLock(out), DirectoryLock(out):  # re-entrant in one thread
        assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
        assert recover(out) == []  # a held lock file is never removed
    assert not (tmp_path / ".out.lock").exists()
    (tmp_path / ".out.lock").write_text("12345\n")  # a dead holder's
    assert recover(out) == ["removed stale lock file .out.lock"]
    assert not (tmp_path / ".out.lock").exists()


def test_lock_refuses_another_thread(tmp_path):
    errors = []
    ready, done = threading.Event(), threading.Event()

    def hold():
        with DirectoryLock(tmp_path / "out"):
            ready.set()
            done.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    try:
        DirectoryLock(tmp_path / "out").acquire()
    except ValueError as exc:
        errors.append(str(exc))
    done.set()
    thread.join()
    assert len(errors) == 1 and "another modaldiag thread of this process" in errors[0]
    start = time.time()
    with DirectoryLock(tmp_path / "out"):
        pass
    assert time.time() - start < 1
