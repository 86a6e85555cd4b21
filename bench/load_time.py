"""What the sha256 check on every load costs: a bundle loaded with and without it, in one run.

For each of `--runs` rounds, in alternating order (so drift in the machine's load falls on both), it times
`load_bundle` alone (manifest, sizes, paths, external data; sha256 or not) and a whole `Generator` start
(the same load, the tokenizer, the ONNX Runtime session), and prints the medians with the hash cost. The files
are read once before the first round, so every round reads from the page cache (a cold read adds the disk's time
to both, since ONNX Runtime reads the same bytes).

    python bench/load_time.py runs/demo/nectar --runs 7 [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    if hasattr(result, "close"):
        result.close()
    return seconds


def measure(bundle: Path, runs: int) -> dict[str, Any]:
    """Median seconds of load_bundle and of a Generator start, with and without sha256, over `runs` rounds."""
    from nectar_runtime.bundle import load_bundle
    from nectar_runtime.generator import Generator

    load_bundle(bundle, check_hashes=True)                           # warm the page cache
    samples: dict[str, list[float]] = {k: [] for k in ("load_hashed", "load_sizes", "start_hashed", "start_sizes")}
    for i in range(runs):
        order = (True, False) if i % 2 == 0 else (False, True)
        for hashed in order:
            suffix = "hashed" if hashed else "sizes"
            samples[f"load_{suffix}"].append(timed(lambda: load_bundle(bundle, check_hashes=hashed)))
            samples[f"start_{suffix}"].append(timed(lambda: Generator(bundle, check_hashes=hashed)))
    medians = {k: round(statistics.median(v), 4) for k, v in samples.items()}
    files = load_bundle(bundle, check_hashes=False).manifest.files
    total = sum(entry.bytes for entry in files.values())
    hash_s = medians["load_hashed"] - medians["load_sizes"]
    return {"bundle": str(bundle), "bytes": total, "runs": runs, "median_s": medians, "samples_s": samples,
            "hash_s": round(hash_s, 4), "hash_mb_per_s": round(total / 2**20 / hash_s, 1) if hash_s > 0 else None,
            "hash_share_of_start": round(hash_s / medians["start_hashed"], 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="Folder for load_time.json (none: print only).")
    args = parser.parse_args(argv)
    row = measure(args.bundle, args.runs)
    m = row["median_s"]
    print(f"{row['bundle']}: {row['bytes'] / 2**20:.1f} MiB in its files, median of {row['runs']} runs")
    print(f"  load_bundle       sha256 {m['load_hashed']:.3f} s   sizes only {m['load_sizes']:.3f} s")
    print(f"  Generator start   sha256 {m['start_hashed']:.3f} s   sizes only {m['start_sizes']:.3f} s")
    print(f"  sha256 costs {row['hash_s']:.3f} s ({row['hash_mb_per_s']} MiB/s), "
          f"{100 * row['hash_share_of_start']:.0f}% of a hashed start")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load_time.json").write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
