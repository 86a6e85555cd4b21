"""What the bench scripts share: their child processes, the GPU's memory in use, and their plots.

A benchmark measures each bundle or engine in a fresh process (peak RSS and device memory then belong to it
alone; CUPTI and CUDA graphs leave nothing behind for the next one). The child prints one JSON line last; the
parent runs it with `run_json_child` and gets that line parsed, or a `ChildError` that carries the exit status
and the child's last lines of output.

How the scripts reach this module: each is run as `python bench/X.py`, and Python puts the script's own folder
first on sys.path, so `import harness` (or `import gpu_reference`) finds the sibling file; the children they
start are run the same way. `nectar-export bench` runs bench/decode_latency.py as such a program too, and
tests/conftest.py puts bench/ on sys.path once for the tests, as the interpreter does for a script.
No script edits sys.path. Only the standard library is imported here (matplotlib when a plot is drawn): the
GPU hosts that run these scripts have no matplotlib, and gpu_reference imports no project package.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
TAIL_LINES = 3


class ChildError(RuntimeError):
    """A child process that failed: a non-zero exit, or a last line that is not JSON. str() is its last
    lines of output (stderr, else stdout) joined by " | "."""

    def __init__(self, returncode: int, lines: Sequence[str]):
        self.returncode = returncode
        self.lines = list(lines) or ["no output"]
        super().__init__(" | ".join(self.lines))

    @property
    def last(self) -> str:
        """The child's last line of output: usually the error it printed."""
        return self.lines[-1]


def python_cmd(script: str | Path, *args: Any) -> list[str]:
    """`python SCRIPT ARGS...` with this interpreter, SCRIPT as an absolute path, every argument a string."""
    return [sys.executable, str(Path(script).resolve()), *map(str, args)]


def tail(text: str, count: int = TAIL_LINES) -> list[str]:
    """The last `count` non-empty lines of `text`."""
    return [line for line in text.strip().splitlines() if line.strip()][-count:]


def check_child(returncode: int, stdout: str, stderr: str = "") -> str:
    """A finished child's stdout; ChildError with its last lines (stderr, else stdout) when it exited non-zero."""
    if returncode != 0:
        raise ChildError(returncode, tail(stderr) or tail(stdout))
    return stdout


def last_json(stdout: str) -> Any:
    """The child's result: its last line of stdout, parsed as JSON (ChildError when there is none)."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        shown = lines[-1][:300] if lines else "nothing"
        raise ChildError(0, [f"no JSON on the last line of its output: {shown}"]) from None


def run_child(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Run `cmd` to its end and return its stdout; ChildError when it fails."""
    done = subprocess.run(list(cmd), capture_output=True, text=True, env=None if env is None else dict(env))
    return check_child(done.returncode, done.stdout, done.stderr)


def run_json_child(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Any:
    """Run `cmd` to its end and return its last stdout line parsed as JSON; ChildError when it fails."""
    return last_json(run_child(cmd, env))


def gpu_mem_used_mb(index: int = 0) -> float:
    """Device memory in use on GPU `index`, all processes, as nvidia-smi reports it (MiB)."""
    done = subprocess.run(["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[0])


# -- plots -------------------------------------------------------------------------------------------


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display); ImportError where matplotlib is absent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lines(series: dict[str, list[dict[str, Any]]], title: str, png: Path, floor: float | None = None) -> None:
    """ms_per_token against n, one line per label (rows sorted by n), an optional dashed floor; log2 n axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["n"])
        if rows:
            ax.plot([r["n"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=label)
    if floor:
        ax.axhline(floor, linestyle="--", color="gray", label=f"weight-streaming floor {floor:.2f} ms")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens n")
    ax.set_ylabel("median ms per decoded token")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
