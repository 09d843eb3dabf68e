"""Safe output: atomic files and folders, ownership markers and locks.

A crash leaves either the old file (folder) or the new one, never half of one. modaldiag removes
or replaces only folders that carry its marker file (:data:`MARKER`); a non-empty folder without
one is never touched.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save",
           "safe_torch_load", "MARKER", "MIN_FREE_BYTES", "write_marker", "read_marker",
           "folder_state", "check_output_dir", "recover", "discard_folder", "DirectoryLock",
           "atomic_directory", "refuse_foreign_overwrite"]

#: the file that says "modaldiag made this folder" (JSON: tool, kind, version, created, command, pid)
MARKER = ".modaldiag"
#: free space required on the output disk before any work starts
MIN_FREE_BYTES = 16 * 2**20


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary sibling, fsync, rename over ``path`` (permissions follow the
    umask, like a plain ``open(path, "wb")``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a checkpoint without executing code (``weights_only=True``).

    A file that is corrupt, truncated, or holds objects other than tensors and plain containers
    (e.g. a pickle that would run code) raises a ValueError that says so.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError / ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot load checkpoint {str(path)!r} safely: {first}. It is corrupt, truncated or "
            "contains more than tensors and plain containers (nothing was executed); delete it "
            "to start over, or re-create it with modaldiag."
        ) from None


# ---------------------------------------------------------------- ownership markers
def _version() -> str:
    return str(getattr(sys.modules.get("modaldiag"), "__version__", "unknown"))


def write_marker(folder: str | os.PathLike, kind: str, *, command: str | None = None,
                 **fields: Any) -> Path:
    """Write ``folder/.modaldiag``, the JSON record that says modaldiag made ``folder``.

    Parameters
    ----------
    folder : path
        An existing folder.
    kind : str
        What the folder is: ``"run"``, ``"diagnosis"``, ``"comparison"``, ``"demo"``...
    command : str, optional
        The command line that made it (shown in refusals).
    **fields
        Extra JSON-serialisable fields (e.g. ``config``).
    """
    record = {"tool": "modaldiag", "kind": kind, "version": _version(),
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command, "pid": os.getpid(), **fields}
    return atomic_write_json(Path(folder) / MARKER, record)


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker record of ``folder``, or None when it has no (readable, modaldiag) marker."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(record, dict) and record.get("tool") == "modaldiag" and isinstance(
            record.get("kind"), str):
        return record
    return None


def refuse_foreign_overwrite(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Refuse (ValueError, before any work) to write files ``names`` into an existing folder that
    modaldiag did not create (no marker) and that already holds any of them: a writer may then
    replace only files in folders it made."""
    folder = Path(folder)
    if read_marker(folder) is not None or not folder.is_dir():
        return
    wanted = set(names)
    clash = sorted(p.name for p in folder.iterdir() if p.name in wanted)
    if clash:
        raise ValueError(
            f"{str(folder)!r} already holds {clash} and modaldiag did not create that folder (no "
            f"{MARKER} marker); nothing was overwritten. Write into a new or empty folder.")


def folder_state(path: str | os.PathLike) -> str:
    """What is at ``path``: ``"missing"``, ``"empty"`` (an empty folder), ``"modaldiag"`` (a
    folder with a marker), ``"foreign"`` (a non-empty folder without one), ``"link"`` (a symbolic
    link) or ``"file"``."""
    path = Path(path)
    if path.is_symlink():
        return "link"
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    if read_marker(path) is not None:
        return "modaldiag"
    with os.scandir(path) as entries:
        return "foreign" if any(True for _ in entries) else "empty"


def _describe_marker(record: dict) -> str:
    made = f" by `{record['command']}`" if record.get("command") else ""
    when = f" on {record['created']}" if record.get("created") else ""
    return f"a modaldiag {record.get('kind', 'folder')} (made{made}{when})"


def _absolute(path: str | os.PathLike, option: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{option} must be a path (str or os.PathLike); got {type(path).__name__}.")
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise ValueError(f"{option} is empty; give the path of the folder to write (e.g. "
                         "runs/joint).")
    return Path(os.path.abspath(text))


def _canonical(path: str | os.PathLike) -> Path:
    """Absolute, with the parent's symbolic links resolved (the last component kept as is)."""
    absolute = Path(os.path.abspath(path))
    return absolute.parent.resolve() / absolute.name if absolute.name else absolute


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _refuse_protected(target: Path, option: str, given: str) -> None:
    """ValueError when ``target`` is, or contains, the filesystem root, home or current folder."""
    protected = [(Path(target.anchor), "the filesystem root"),
                 (Path.cwd().resolve(), "the current folder")]
    try:
        protected.insert(1, (Path.home().resolve(), "your home folder"))
    except RuntimeError:  # no home folder known
        pass
    for place, what in protected:
        if _is_within(place, target):
            relation = what if place == target else f"a folder containing {what} ({place})"
            raise ValueError(f"refusing {option} {given!r}: it is {relation}; modaldiag replaces "
                             f"its output folder as a whole. Give a new sub-folder instead, e.g. "
                             f"{option} {os.path.join(given, 'modaldiag-out')}.")


def check_output_dir(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (),
                     allowed_inside: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                     existing_ok: bool = False, option: str = "--out",
                     min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """Check, before any work, that ``path`` may receive a modaldiag output folder.

    First repairs what an interrupted swap may have left at ``path`` (:func:`recover`: only
    modaldiag's own leftovers of processes that are no longer running). Then refused with a
    ValueError (nothing is created or touched): an empty path; the filesystem
    root, the home folder, the current folder or any folder containing one of them (``.``,
    ``..``); a symbolic link or a file; a path equal to, containing, or inside one of ``inputs``
    (except the paths in ``allowed_inside``); a non-empty folder without the modaldiag marker
    (a *foreign* folder); an existing modaldiag folder unless ``overwrite`` (or ``existing_ok``:
    the caller decides); a location whose nearest existing folder is not writable or whose disk
    has less than ``min_free_bytes`` free.

    Parameters
    ----------
    path : path
        The output folder.
    inputs : paths
        Folders the job reads (runs): the output may not replace or contain them.
    allowed_inside : paths
        Outputs allowed inside an input (e.g. ``RUN/diagnosis``).
    overwrite, existing_ok : bool, default False
    option : str, default "--out"
        How the path is named in messages.
    min_free_bytes : int, default :data:`MIN_FREE_BYTES`

    Returns
    -------
    Path
        The absolute output path (symbolic links of its parents resolved).
    """
    absolute = _absolute(path, option)
    shown = repr(os.fspath(path))
    if absolute.is_symlink():
        raise ValueError(f"refusing {option} {shown}: it is a symbolic link; give the folder it "
                         f"points to ({absolute.resolve()}) or a new path.")
    target = absolute.resolve()
    _refuse_protected(target, option, os.fspath(path))
    if target.parent.is_dir():
        recover(target)
    allowed = {Path(p).resolve() for p in allowed_inside}
    for source in inputs:
        src = Path(source).resolve()
        if target == src:
            raise ValueError(f"refusing {option} {shown}: it is the input {src} itself; writing "
                             f"there would replace what is being read. Choose another {option}.")
        if _is_within(src, target):
            raise ValueError(f"refusing {option} {shown}: it contains the input {src}; replacing "
                             f"it would delete that input. Choose another {option}.")
        if _is_within(target, src) and target not in allowed:
            raise ValueError(f"refusing {option} {shown}: it is inside the input {src}; choose "
                             f"a folder outside the inputs.")
    state = folder_state(target)
    if state == "file":
        raise ValueError(f"refusing {option} {shown}: it is a file, not a folder; choose a folder.")
    if state == "foreign":
        raise ValueError(f"refusing {option} {shown}: it is a non-empty folder that modaldiag did "
                         f"not create (a foreign folder: no {MARKER} marker), so nothing in it "
                         f"was touched. Choose a new or empty folder.")
    if state == "modaldiag" and not (overwrite or existing_ok):
        raise ValueError(f"{option} {shown} already holds {_describe_marker(read_marker(target))};"
                         f" pass --overwrite to replace it, or choose another {option}.")
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"refusing {option} {shown}: cannot write into {existing} (not a "
                         f"writable folder). Choose a location you can write to.")
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise ValueError(f"refusing {option} {shown}: only {free / 2**20:.1f} MiB free on the disk "
                         f"holding {existing}; modaldiag needs at least "
                         f"{min_free_bytes / 2**20:.0f} MiB. Free some space or choose another "
                         f"location.")
    return target


# ---------------------------------------------------------------- leftovers
_ACTIVE: set[str] = set()  # partial/backup folders this process is using right now


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _leftover(name: str, entry: str) -> tuple[str | None, int | None]:
    """``(kind, pid)`` of a sibling named like one of modaldiag's temporary folders for ``name``.

    ``.NAME.PID-XXXX.partial`` (and the older ``.NAME.XXXX.partial``): a folder being built;
    ``.NAME.old-PID-XXXX`` (and ``.NAME.old-PID``): the previous folder during a swap;
    ``.NAME.trash-PID-XXXX``: being deleted.
    """
    prefix = f".{name}."
    if not entry.startswith(prefix):
        return None, None
    rest = entry[len(prefix):]
    m = re.fullmatch(r"(?:(\d+)-)?[\w-]+\.partial", rest, re.ASCII)
    if m:
        return "partial", int(m.group(1)) if m.group(1) else None
    m = re.fullmatch(r"old-(\d+)(?:-[\w-]+)?", rest, re.ASCII)
    if m:
        return "backup", int(m.group(1))
    m = re.fullmatch(r"trash-(\d+)-[\w-]+", rest, re.ASCII)
    if m:
        return "trash", int(m.group(1))
    return None, None


def _sibling(path: Path, label: str) -> Path:
    return path.parent / f".{path.name}.{label}-{os.getpid()}-{os.urandom(4).hex()}"


def discard_folder(path: str | os.PathLike) -> None:
    """Delete one of modaldiag's own folders: renamed to a ``.NAME.trash-*`` name first (atomic),
    so a crash half-way leaves a folder that is recognisably garbage, never a half-deleted one
    under a name that could be restored or resumed."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"refusing to delete {path}: it is a symbolic link.")
    if not path.exists():
        return
    trash = _sibling(path, "trash")
    try:
        os.replace(path, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def recover(path: str | os.PathLike) -> list[str]:
    """Repair what an interrupted :class:`atomic_directory` left beside ``path``.

    If ``path`` is missing and a backup of the previous complete folder exists
    (``.NAME.old-PID-*`` of a process that is no longer running), it is renamed back. Stale
    partial (``.NAME.*.partial``), backup and trash folders of processes that are no longer running
    are deleted. Folders of running processes, symbolic links and anything not named like
    modaldiag's own temporary folders are left alone.

    Returns
    -------
    list of str
        One line per action taken.
    """
    path = _canonical(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    stale: list[tuple[str, Path]] = []
    with os.scandir(parent) as entries:
        for entry in entries:
            kind, pid = _leftover(path.name, entry.name)
            if kind is None or entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.path in _ACTIVE or (pid is not None and pid != os.getpid()
                                         and _pid_alive(pid)):
                continue
            stale.append((kind, Path(entry.path)))
    actions = []
    backups = sorted((p for kind, p in stale if kind == "backup"), key=_mtime, reverse=True)
    if backups and not os.path.lexists(path):
        try:
            os.replace(backups[0], path)
            actions.append(f"restored {path} from the interrupted swap's backup "
                           f"{backups[0].name}")
        except FileNotFoundError:  # another process restored it first
            pass
        stale = [(k, p) for k, p in stale if p != backups[0]]
    for _, leftover in stale:
        discard_folder(leftover)
        actions.append(f"removed stale leftover {leftover.name}")
    if _remove_stale_lock(parent / f".{path.name}.lock"):
        actions.append(f"removed stale lock file .{path.name}.lock")
    return actions


def _remove_stale_lock(lockfile: Path) -> bool:
    """Delete a lock file nobody holds (its holder died); never one held by anyone."""
    if fcntl is None or str(lockfile) in _HELD or not lockfile.is_file() or lockfile.is_symlink():
        return False
    try:
        fd = os.open(lockfile, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        current, mine = os.stat(lockfile), os.fstat(fd)
        if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
            return False
        os.unlink(lockfile)
        return True
    except OSError:  # held by a live process, or already gone
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------- locks
_HELD: dict[str, list] = {}  # lock file -> [fd, depth, thread id]
_HELD_GUARD = threading.Lock()


class DirectoryLock:
    """Exclusive, non-blocking lock on writing ``path``: ``fcntl.flock`` on ``PARENT/.NAME.lock``.

    A second process asking for the same path gets a ValueError naming the holder's pid.
    Re-entrant within one thread (an outer CLI lock and the inner :class:`atomic_directory`);
    another thread of the same process is refused too. The lock file is removed on release.
    Where ``fcntl`` is unavailable (Windows) it only guards within the process.

    >>> with DirectoryLock("runs/joint"):
    ...     ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _canonical(path)
        self.lockfile = self.path.parent / f".{self.path.name}.lock"
        self._depth = 0

    def _busy(self, holder: str) -> ValueError:
        return ValueError(f"another modaldiag {holder} is writing {self.path}; wait for it to "
                          "finish, or choose another output folder.")

    def acquire(self) -> DirectoryLock:
        key = str(self.lockfile)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                if held[2] != threading.get_ident():
                    raise self._busy(f"thread of this process (pid {os.getpid()})")
                held[1] += 1
                self._depth += 1
                return self
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._lock_file() if fcntl is not None else -1
            _HELD[key] = [fd, 1, threading.get_ident()]
            self._depth += 1
        return self

    def _lock_file(self) -> int:
        while True:
            fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                finally:
                    os.close(fd)
                raise self._busy(f"process (pid {holder})") from None
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    return fd  # a filesystem without locks: proceed unguarded
                os.close(fd)
                raise
            try:
                current = os.stat(self.lockfile)
                mine = os.fstat(fd)
                same = (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)  # the previous holder removed that file on release: lock the new one

    def release(self) -> None:
        if self._depth == 0:
            return
        key = str(self.lockfile)
        with _HELD_GUARD:
            self._depth -= 1
            held = _HELD[key]
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[key]
            if held[0] >= 0:
                try:
                    os.unlink(self.lockfile)
                except FileNotFoundError:
                    pass
                os.close(held[0])

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.release()
        return False


# ---------------------------------------------------------------- atomic folders
def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or filesystem cannot (the caller falls back to renames)."""
    if _RENAMEAT2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _RENAMEAT2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(new: Path, path: Path) -> None:
    """Put the complete folder ``new`` at ``path``; at every instant ``path`` holds the old or the
    new folder, or (fallback on systems without an atomic exchange) the old one sits in a
    ``.NAME.old-PID-*`` backup that :func:`recover` restores."""
    if folder_state(path) in ("missing", "empty"):
        os.replace(new, path)  # rename(2) replaces an empty folder atomically
        _fsync_dir(path.parent)
        return
    if _exchange(new, path):  # path: new folder; `new`: the old one, now a stale partial
        _fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    backup = _sibling(path, "old")
    _ACTIVE.add(str(backup))
    try:
        os.replace(path, backup)
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(backup, path)
            raise
        _fsync_dir(path.parent)
        discard_folder(backup)
    finally:
        _ACTIVE.discard(str(backup))


class atomic_directory:
    """Context manager: build a folder under a temporary name, put it in place when complete.

    On entry: takes :class:`DirectoryLock` on ``path``, runs :func:`recover` (restores a folder
    left in a backup by a crash, deletes stale leftovers of dead processes), refuses a foreign
    folder at ``path`` (non-empty, no marker) and, unless ``overwrite``, an existing modaldiag
    folder, then yields an empty sibling ``.NAME.PID-XXXX.partial``. On success the marker is
    written into it and it is swapped in (atomically: ``renameat2`` exchange on Linux; elsewhere a
    backup rename that :func:`recover` completes after a crash), then the old folder is deleted.
    On an exception the partial folder is deleted and ``path`` is left as it was.

    Parameters
    ----------
    path : path
        The folder to create or replace.
    kind : str, default "folder"
        Written into the marker (``"run"``, ``"diagnosis"``, ``"comparison"``, ``"demo"``...).
    command : str, optional
        Written into the marker.
    overwrite : bool, default True
        Replace an existing modaldiag folder at ``path`` (a foreign one is always refused).
    **fields
        Extra marker fields.

    >>> with atomic_directory("out", kind="diagnosis") as tmp:
    ...     (tmp / "report.html").write_text("...")
    """

    def __init__(self, path: str | os.PathLike, *, kind: str = "folder",
                 command: str | None = None, overwrite: bool = True, **fields: Any):
        self.path = _canonical(_absolute(path, "output folder"))
        _refuse_protected(self.path.resolve(), "output folder", os.fspath(path))
        self.kind, self.command, self.overwrite, self.fields = kind, command, overwrite, fields
        self._lock = DirectoryLock(self.path)

    def _check_target(self) -> None:
        state = folder_state(self.path)
        if state in ("foreign", "file", "link"):
            what = {"foreign": f"a non-empty folder that modaldiag did not create (a foreign "
                               f"folder: no {MARKER} marker)", "file": "a file",
                    "link": "a symbolic link"}[state]
            raise ValueError(f"refusing to replace {self.path}: it is {what}; nothing was "
                             "touched. Choose a new or empty folder.")
        if state == "modaldiag" and not self.overwrite:
            raise ValueError(f"{self.path} already holds {_describe_marker(read_marker(self.path))};"
                             " pass --overwrite (overwrite=True) to replace it.")

    def __enter__(self) -> Path:
        self._lock.acquire()
        try:
            recover(self.path)
            self._check_target()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{os.getpid()}-",
                                             suffix=".partial", dir=self.path.parent))
            _ACTIVE.add(str(self.tmp))
            os.chmod(self.tmp, 0o777 & ~_umask())
        except BaseException:
            self._lock.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                try:
                    write_marker(self.tmp, self.kind, command=self.command, **self.fields)
                    self._check_target()
                    _swap_in(self.tmp, self.path)
                except BaseException:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            _ACTIVE.discard(str(self.tmp))
            self._lock.release()
        return False
