"""Switching document packs on one base bundle: how long a switch takes and what each loaded pack costs (issue 16).

One Generator holds the base's session; the packs given (`--pack NAME=PACK`, repeated) are loaded into it in turn,
and with `--copies K` each is also loaded K-1 more times from copies in a temporary folder (so 16 packs can be
measured from 2 documents: the memory per pack is the same; the answers are then checked on the originals).

Measured, in one process on one backend:
- memory: the process's RSS (and, on ort-cuda, the device memory the process holds, from nvidia-smi) after the
  base alone with its first pack, then after 4 and 16 packs loaded (or as many as there are);
- the first switch to each pack (it reads the pack file and, on ort-cuda, uploads it) and, once all are loaded,
  `--rounds` switches among them in a fixed round-robin order (medians and the largest);
- one greedy answer per original pack after a switch, which must equal the answer given right after loading;
- with `--compare BUNDLE` (the first pack's document as a single-file bundle), the median ms per decode step of
  that bundle and of the base with the first pack, in alternating rounds of forced steps: what taking the heads
  as graph inputs instead of initializers costs.

    python bench/pack_switch.py --base runs/base --pack manual=runs/pack-manual --pack whole=runs/pack-whole \
        --copies 8 --out docs/results/pack-switch-cpu

Writes OUT/pack_switch.json and OUT/pack_switch.png (memory against packs loaded; switch times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

QUESTION = "What does the document say about assignment?"
MARKS = (1, 4, 16)


def rss_mb() -> float:
    """Resident memory of this process now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def device_mb() -> float | None:
    """Device memory this process holds (nvidia-smi's compute apps), in MiB; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    used = [float(f.split(",")[1]) for f in out.splitlines() if f.split(",")[0].strip() == str(os.getpid())]
    return sum(used) if used else 0.0


def copies_of(packs: dict[str, Path], copies: int, work: Path) -> list[tuple[str, Path]]:
    """The packs in load order: every original, then copies under `work` (name#k), round-robin."""
    order = list(packs.items())
    for k in range(1, copies):
        for name, path in packs.items():
            order.append((f"{name}#{k}", Path(shutil.copytree(path, work / f"{path.name}-{k}"))))
    return order


def answer(generator: Any) -> list[int]:
    from nectar_runtime.sampling import Sampling

    return generator.generate(QUESTION, Sampling(max_new_tokens=16)).token_ids


def step_ms(generator: Any, tokens: int) -> float:
    """Median ms of `tokens` forced one-token steps after the question's prefill."""
    from nectar_runtime.generator import forced_decode

    prompt = generator.prompt_ids(QUESTION)
    return statistics.median(forced_decode(generator.backend, prompt, [prompt[-1]] * tokens).token_ms)


def compare(args: argparse.Namespace, first: Path, rounds: int = 5, tokens: int = 32) -> dict[str, float]:
    """Median ms/step of the single-file bundle and of the base with the first pack, rounds alternating."""
    from nectar_runtime.generator import Generator

    check = not args.no_hash_check
    with Generator(args.compare, args.backend, check_hashes=check) as single, \
            Generator(args.base, args.backend, check_hashes=check, pack=first) as packed:
        times: dict[str, list[float]] = {"bundle": [], "base_and_pack": []}
        for _ in range(rounds):
            times["bundle"].append(step_ms(single, tokens))
            times["base_and_pack"].append(step_ms(packed, tokens))
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Load, switch and answer as the module docstring says; returns the report."""
    from nectar_runtime.generator import Generator

    packs = dict(args.pack)
    order = copies_of(packs, args.copies, work)
    before = rss_mb()
    generator = Generator(args.base, args.backend, check_hashes=not args.no_hash_check, pack=order[0][1])
    loaded = {order[0][0]: generator.pack}
    first_answers = {order[0][0]: answer(generator)}
    memory = [{"packs": 1, "rss_mb": round(rss_mb(), 1), "device_mb": device_mb()}]
    cold = []
    for name, path in order[1:]:
        pack = generator.load_pack(path)
        cold.append(round(generator.use(pack), 3))
        loaded[name] = pack
        if name in packs:
            first_answers[name] = answer(generator)
        if len(loaded) in MARKS[1:]:
            memory.append({"packs": len(loaded), "rss_mb": round(rss_mb(), 1), "device_mb": device_mb()})
    warm = []
    names = list(loaded)
    for i in range(args.rounds):
        warm.append(generator.use(loaded[names[(i + 1) % len(names)]]))
    agree = {}
    for name in packs:
        generator.use(loaded[name])
        agree[name] = answer(generator) == first_answers[name]
    generator.close()
    return {"config": {"base": str(args.base), "packs": {k: str(v) for k, v in packs.items()}, "copies": args.copies,
                       "backend": args.backend, "rounds": args.rounds},
            "base_bytes": sum(p.stat().st_size for p in Path(args.base).iterdir() if p.is_file()),
            "pack_bytes": {k: sum(p.stat().st_size for p in v.iterdir()) for k, v in packs.items()},
            "rss_before_mb": round(before, 1), "memory": memory,
            "first_switch_ms": {"median": statistics.median(cold) if cold else None, "max": max(cold, default=None)},
            "switch_ms": {"median": round(statistics.median(warm), 4), "p95": round(sorted(warm)[int(0.95 * (len(warm) - 1))], 4),
                          "max": round(max(warm), 4)},
            "answers_unchanged_after_switches": agree,
            "ms_per_step": compare(args, order[0][1]) if args.compare else None}


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rows = report["memory"]
    left.plot([r["packs"] for r in rows], [r["rss_mb"] for r in rows], "o-", label="process RSS")
    if all(r["device_mb"] is not None for r in rows):
        left.plot([r["packs"] for r in rows], [r["device_mb"] for r in rows], "s-", label="device memory")
    left.set(xlabel="packs loaded", ylabel="MiB", title="memory: one base, N packs")
    left.legend()
    values = [report["first_switch_ms"]["median"] or 0, report["switch_ms"]["median"], report["switch_ms"]["p95"]]
    right.bar(["first use\n(median)", "switch\n(median)", "switch\n(p95)"], values)
    right.set(ylabel="ms", title=f"pack switch, {report['config']['backend']}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PACK, got {text!r}")
    return name, Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--pack", type=named_path, action="append", required=True, help="NAME=PACK (repeat).")
    p.add_argument("--copies", type=int, default=1, help="Load each pack this many times (copies).")
    p.add_argument("--rounds", type=int, default=200, help="Switches timed once every pack is loaded.")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--no-hash-check", action="store_true")
    p.add_argument("--compare", type=Path, default=None,
                   help="The first pack's document as a single-file bundle: ms/step of both.")
    p.add_argument("--out", type=Path, required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from nectar_runtime.errors import NectarError

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="pack-switch-") as work:
            report = run(args, Path(work))
    except NectarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (args.out / "pack_switch.json").write_text(json.dumps(report, indent=2))
    plot(report, args.out / "pack_switch.png")
    print(json.dumps({k: report[k] for k in ("memory", "first_switch_ms", "switch_ms",
                                             "answers_unchanged_after_switches", "ms_per_step")}, indent=2))
    return 0 if all(report["answers_unchanged_after_switches"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
