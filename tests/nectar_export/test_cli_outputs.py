"""Where fit, export, build and eval write, with real processes (issue 18): an output that cannot be written is
refused before any work, in one line, even as root (a file on the way, a read-only file system); a second fit or
export to an output another process is writing is refused, naming it; an export killed by SIGKILL while it writes
leaves a staging folder that the next export to the same output removes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import read_only, run_cli

FIT = ("--context-tokens", "512", "--quick", "--epochs", "1", "--no-ablations")


def _refused_at_once(done: subprocess.CompletedProcess, *words: str) -> str:
    """Exit 2 and stderr of exactly one `error:` line: no progress bar before it, so no work was done."""
    assert done.returncode == 2, done.stderr[-1500:]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-1500:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _export(artifact: Path, out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nectar_export.cli", "export", str(artifact), "-o", str(out),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_outputs_under_a_file_are_refused_before_any_work(tmp_path, tiny_ckpt, artifact):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "out"
    _refused_at_once(run_cli("fit", "--model", str(tiny_ckpt), *FIT, "-o", str(out)), f"cannot write {out}",
                     "is not a folder")
    _refused_at_once(run_cli("export", str(artifact), "-o", str(out)), f"cannot write {out}", "is not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path, tiny_ckpt, artifact, nectar_bundle):
    """As root too: a read-only bind mount in a private mount namespace. fit and export write beside -o; build
    and eval write into the bundle or artifact they read."""
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.copytree(artifact, ro / "art")
    shutil.copytree(nectar_bundle, ro / "bundle")
    before = sorted(str(p.relative_to(ro)) for p in ro.rglob("*"))
    cli = [sys.executable, "-m", "nectar_export.cli"]
    cases = [(["fit", "--model", str(tiny_ckpt), *FIT, "-o", str(ro / "new")], f"cannot write {ro / 'new'}"),
             (["export", str(ro / "art"), "-o", str(ro / "b")], f"cannot write {ro / 'b'}"),
             (["build", str(ro / "bundle")], f"cannot write into {ro / 'bundle'}"),
             (["eval", str(ro / "art"), "--questions", "1"], f"cannot write into {ro / 'art'}")]
    for args, words in cases:
        _refused_at_once(read_only(ro, *cli, *args), words, "read-only file system")
    assert sorted(str(p.relative_to(ro)) for p in ro.rglob("*")) == before


def test_a_second_export_to_the_same_output_is_refused_while_the_first_runs(tmp_path, artifact):
    out = tmp_path / "bundle"
    lock = tmp_path / ".bundle.lock"
    first = _export(artifact, out)
    try:
        _wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), "the first export's lock")
        first.send_signal(signal.SIGSTOP)                # hold it there, whatever the machine's speed
        line = _refused_at_once(run_cli("export", str(artifact), "-o", str(out), "--overwrite"), str(out),
                                f"is being written by another process (pid {first.pid})")
        assert "wait for it to finish" in line
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-2000:]
    assert (out / "bundle.json").is_file() and not lock.exists()


def test_a_fit_to_an_output_being_written_is_refused(tmp_path, tiny_ckpt):
    out = tmp_path / "art"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nectar_graphs.files import writing\n"
                               "with writing(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _refused_at_once(run_cli("fit", "--model", str(tiny_ckpt), *FIT, "-o", str(out)), str(out),
                         f"another process (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_an_export_killed_while_writing_leaves_a_folder_the_next_export_removes(tmp_path, artifact):
    out = tmp_path / "bundle"
    staging = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.staging-")]   # noqa: E731
    first = _export(artifact, out)
    try:
        _wait_for(lambda: any((p / "model.onnx").exists() for p in staging()), "the export to start writing")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL and len(staging()) == 1 and not out.exists()
    # the next export to the same -o (one that fails early: its model is gone) clears what the killed one left
    done = run_cli("export", str(artifact), "-o", str(out), "--model", str(tmp_path / "gone"))
    assert done.returncode == 2 and "error: model not found" in done.stderr.splitlines()[-1], done.stderr[-1500:]
    assert staging() == [] and sorted(p.name for p in tmp_path.iterdir()) == []
