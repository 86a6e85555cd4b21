"""Writing a folder atomically: fill a staging folder beside the target, then swap it into place; one writer per
target at a time (an exclusive lock beside it), and what killed writers left behind is cleared by the next one.

Beside an output folder `out`, in its parent:

    .{out.name}.lock              held (fcntl.flock) by the process writing `out`; holds its pid
    .{out.name}.staging-XXXXXXXX  the folder being filled (mkdtemp's eight characters)
    .{out.name}.old               the earlier `out`, for the instant between the two renames of a replacement

Every writer takes the lock before it creates a staging folder, so whoever holds it owns the only staging folder
that can be live: the ones it finds were left by a killed writer (SIGKILL runs no cleanup) and are removed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from nectar_runtime.errors import NectarError

_held: dict[str, int] = {}          # lock file -> how many `writing` blocks of this process hold it


def _owned(relative: Path, owned: Iterable[str]) -> bool:
    """Whether a path inside the folder is one the tool writes: the same parts as one of `owned`, '*' for any name."""
    return any(len(relative.parts) == len(Path(name).parts) and relative.match(name) for name in owned)


def check_output_folder(out: Path, manifest: str, owned: Iterable[str], overwrite: bool, kind: str) -> None:
    """Refuse, before any work, an -o that would lose something: a file; a folder that is neither empty nor a
    `kind` (it has no `manifest`); an existing `kind` unless `overwrite`; and even then one that holds files the
    tool does not write (`owned`, relative paths with '*' for one name part), since the whole folder is replaced."""
    out = Path(out).expanduser()
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise NectarError(f"{out} exists and is not a folder; choose an empty or new -o folder")
    if not any(out.iterdir()):
        return
    if not (out / manifest).is_file():
        raise NectarError(f"{out} exists and is not a {kind}; choose an empty or new -o folder")
    if not overwrite:
        raise NectarError(f"{out} already holds a {kind}; pass --overwrite to replace it, or choose another -o folder")
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if not p.is_dir() and not _owned(p.relative_to(out), owned))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise NectarError(f"{out} holds files that are not part of a {kind} ({shown}); replacing the {kind} would "
                          "delete them: move them out, or choose another -o folder")


def _unwritable(out: Path, exc: OSError) -> NectarError:
    where = f" ({exc.filename})" if exc.filename else ""
    return NectarError(f"cannot write {out}: {(exc.strerror or str(exc)).lower()}{where}; "
                       "choose an -o folder you can write")


def _make_parents(folder: Path, out: Path) -> list[Path]:
    """Create `folder` and whatever of its parents is missing; returns the folders it created."""
    missing, probe = [], folder
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise NectarError(f"cannot write {out}: {probe} is not a folder; choose an -o folder you can write")
    created: list[Path] = []
    try:
        for parent in reversed(missing):
            parent.mkdir()
            created.append(parent)
    except OSError as exc:
        _remove_empty(created)
        raise _unwritable(out, exc) from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass


def _holder(fd: int) -> str:
    """' (pid N)' as the lock's holder wrote it, or '' when it wrote nothing yet."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f" (pid {text})" if text.isdigit() else ""


def _lock(lock: Path, out: Path) -> int:
    """An exclusive, non-blocking flock on `lock` (created if absent); NectarError naming `out` if another process
    holds it. A holder removes the file as it lets go: a lock taken on a removed file is let go and taken again."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _unwritable(out, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise NectarError(f"{out} is being written by another process{holder}; wait for it to finish, "
                              "or choose another -o folder") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def remove_stale(out: Path) -> list[Path]:
    """Remove the staging folders of `out` that killed writers left (call with `out` locked); an earlier `out` that
    a writer killed between its two renames left as .old comes back when `out` is missing. Returns what it removed."""
    pattern = re.compile(re.escape(f".{out.name}.staging-") + r"[a-z0-9_]{8}")
    stale = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    old = out.with_name(f".{out.name}.old")
    if old.is_dir() and not old.is_symlink():
        if out.exists() or out.is_symlink():
            stale.append(old)
        else:
            os.replace(old, out)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


@contextmanager
def writing(out: Path) -> Iterator[Path]:
    """Hold the output folder `out` for writing, before any work: its parent made (refused in one line when it
    cannot be: a file on the way, no permission, a read-only file system), the lock beside it taken (refused when
    another process holds it), and stale staging folders removed. Yields `out` as an absolute path. Nested blocks
    for the same `out` in one process share the lock. Parents it made are removed again if the block fails and
    they are still empty."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    lock = out.with_name(f".{out.name}.lock")
    if str(lock) in _held:
        _held[str(lock)] += 1
        try:
            yield out
        finally:
            _held[str(lock)] -= 1
        return
    made = _make_parents(out.parent, out)
    try:
        fd = _lock(lock, out)
    except BaseException:
        _remove_empty(made)
        raise
    _held[str(lock)], done = 1, False
    try:
        if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
            raise NectarError(f"cannot write {out}: permission denied; choose an -o folder you can write")
        remove_stale(out)
        yield out
        done = True
    finally:
        del _held[str(lock)]
        lock.unlink(missing_ok=True)
        os.close(fd)
        if not done:
            _remove_empty(made)


def check_writable(folder: Path) -> None:
    """Refuse, before any work, a folder whose files cannot be written in place (build's engine, eval's report):
    a file is created in it and removed, which finds a read-only file system or missing permission as root too."""
    folder = Path(folder).expanduser()
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    except OSError as exc:
        raise NectarError(f"cannot write into {folder}: {(exc.strerror or str(exc)).lower()}; the command stores "
                          "its result there, so make the folder writable first") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a staging folder next to `out` (with `out` locked, see writing); on success it replaces `out`, on any
    error it is removed."""
    with writing(out) as out:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        try:
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
