"""Writing a folder atomically: fill a temp folder beside the target, then swap it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from nectar_runtime.errors import NectarError


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


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield a temp folder next to `out`; on success it replaces `out`, on any error it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
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

