"""graphs/files.py with real processes: a writer killed by SIGKILL leaves a staging folder that the next writer of
the same output removes (and only that output's, and never a live one); the lock beside an output refuses a second
writer while the first lives; outputs that cannot be written are refused before the block runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nectar_graphs.files import staged_folder, writing
from nectar_runtime.errors import NectarError
from tests.helpers import read_only

# A writer that fills a staging folder, says so, and waits to be killed
HOLD = """
import sys, time
from pathlib import Path
from nectar_graphs.files import staged_folder
with staged_folder(Path(sys.argv[1])) as tmp:
    (tmp / "half.bin").write_bytes(b"0" * 1_000_000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def _holder(out: Path) -> tuple[subprocess.Popen, Path]:
    """A child process in the middle of writing `out`, and its staging folder."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    line = child.stdout.readline().strip()
    assert line, "the writer child did not start"
    return child, Path(line)


def _leftovers(parent: Path, out: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_staging_folder_left_by_sigkill_is_removed_by_the_next_writer(tmp_path):
    out = tmp_path / "bundle"
    child, staging = _holder(out)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert staging.is_dir() and (staging / "half.bin").is_file()          # what SIGKILL leaves
    assert staging.name.startswith(".bundle.staging-")
    with staged_folder(out) as tmp:
        (tmp / "done.txt").write_text("complete")
        assert not staging.exists()                                       # gone before the new one is filled
    assert (out / "done.txt").read_text() == "complete"
    assert _leftovers(tmp_path, out) == []                                # no staging folder, no lock file


def test_a_live_writers_staging_folder_is_kept_and_its_output_refused(tmp_path):
    out = tmp_path / "bundle"
    child, staging = _holder(out)
    try:
        with pytest.raises(NectarError) as exc:
            with staged_folder(out):
                pass
        text = str(exc.value)
        assert "\n" not in text and str(out) in text and f"another process (pid {child.pid})" in text
        assert staging.is_dir() and (staging / "half.bin").is_file()
    finally:
        child.kill()
        child.wait(timeout=30)


def test_only_the_outputs_own_stale_folders_are_removed(tmp_path):
    """A killed writer of `bundle.b` left `.bundle.b.staging-*`, and one of `bundle` is alive: writing `bundle.b`
    clears its own leftover; writing `bundle` is refused and clears nothing."""
    child_b, staging_b = _holder(tmp_path / "bundle.b")
    child_b.kill()
    child_b.wait(timeout=30)
    child, staging = _holder(tmp_path / "bundle")
    try:
        with staged_folder(tmp_path / "bundle.b") as tmp:
            (tmp / "x").write_text("x")
        assert not staging_b.exists() and staging.is_dir()
        with pytest.raises(NectarError, match="another process"):
            with writing(tmp_path / "bundle"):
                pass
        assert staging.is_dir()
    finally:
        child.kill()
        child.wait(timeout=30)
    with writing(tmp_path / "bundle"):
        assert not staging.exists()                                       # its writer is dead now


def test_an_earlier_output_a_writer_was_killed_between_its_renames_comes_back(tmp_path):
    out = tmp_path / "art"
    old = tmp_path / ".art.old"
    old.mkdir()
    (old / "nectar.json").write_text("{}")                                # out renamed aside, the new one not in yet
    with writing(out):
        assert (out / "nectar.json").read_text() == "{}" and not old.exists()
    old.mkdir()                                                           # and with out present, .old is stale
    with writing(out):
        assert not old.exists() and (out / "nectar.json").is_file()


def test_the_lock_is_taken_again_after_its_holder_let_go(tmp_path):
    out = tmp_path / "out"
    with writing(out):
        with writing(out):                                                # nested blocks of one process share it
            assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
    assert _leftovers(tmp_path, out) == []
    with writing(out):
        pass


def test_outputs_that_cannot_be_written_are_refused_before_the_block(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    ran = []
    for out in (tmp_path / "file" / "out", tmp_path / "file" / "deeper" / "out"):
        with pytest.raises(NectarError) as exc:
            with writing(out):
                ran.append(out)
        assert "\n" not in str(exc.value) and str(exc.value).startswith(f"cannot write {out}")
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_parents_made_for_a_failed_block_are_removed(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with writing(out):
            assert out.parent.is_dir()
            raise RuntimeError("the work failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    try:
        with pytest.raises(NectarError, match="permission denied"):
            with writing(parent / "out"):
                pass
    finally:
        parent.chmod(0o755)


def test_a_read_only_file_system_is_refused(tmp_path):
    """A read-only bind mount in a private mount namespace (`unshare`): a real EROFS, for root too."""
    folder = tmp_path / "ro"
    folder.mkdir()
    code = ("import sys; from pathlib import Path; from nectar_graphs.files import writing\n"
            "from nectar_runtime.errors import NectarError\n"
            "try:\n    with writing(Path(sys.argv[1]) / 'out'): print('wrote')\n"
            "except NectarError as exc: print(exc)\n")
    done = read_only(folder, sys.executable, "-c", code, str(folder))
    assert done.stdout.strip() == f"cannot write {folder / 'out'}: read-only file system ({folder / '.out.lock'}); " \
                                  "choose an -o folder you can write", done.stdout + done.stderr
    assert list(folder.iterdir()) == []

