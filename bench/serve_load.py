"""Serving under load: requests/s and p50/p95 latency at 1, 8 and 32 concurrent local clients against a real
server (`python -m nectar_runtime.serve` in a subprocess), and the server's memory with its model ids loaded.

Each level sends `--requests` streamed, greedy chat completions of `--max-tokens` tokens (the same length
every time: the answers of this benchmark's questions run past it), spread round-robin over the model ids and
`QUESTIONS`, from that many client threads at once (each with its own keep-alive connection). The 1-client
level runs first and its answers are the reference: at every level each answer must equal its own model's and
question's, so a crossed answer counts as a mismatch. The queue is sized for the largest level, so no request
is refused; any refusal (429) or other failure is counted, never retried. Latency is a request's whole time and
TTFT the time to its first text chunk, both from the client. The clients share the machine with the server.

Memory: the server's resident set (VmRSS) right after its ready line, and its high-water mark (VmHWM) after
the run (ONNX Runtime's arenas grow with the first requests, so the peak is the figure to size a box by).
Packs: `--base BASE --pack NAME=PACK ...` serves packs on one base instead of (or beside) bundles;
round-robin over them switches the pack before every request, and the server's own
nectar_pack_switch_milliseconds histogram gives the switch time. `--pack-counts 1,4,16` starts one server per
count with the first K packs and records its memory and switch time (needs at least max(K) packs).

    python bench/serve_load.py --bundle nectar=runs/demo/nectar --bundle full=runs/demo/full --out bench/results
    python bench/serve_load.py --base BASE --pack a=PA --pack b=PB ... --pack-counts 1,4,16 --out bench/results

Writes OUT/serve_load.json and OUT/serve_load.png and prints a table.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import harness              # bench/harness.py: found beside this script (see its docstring)

QUESTIONS = ("What does the with statement do?", "How do I open a file and read its lines?",
             "What is the difference between a list and a tuple?", "How are exceptions raised and caught?")
READY_S = 600


@dataclass(frozen=True)
class Sample:
    """One request as its client saw it."""

    model: str
    question: str
    status: int
    latency_ms: float
    ttft_ms: float
    text: str
    tokens: int


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=BUNDLE")
    parser.add_argument("--base", default=None)
    parser.add_argument("--pack", action="append", default=[], metavar="NAME=PACK")
    parser.add_argument("--pack-counts", default="", help="servers with the first K packs, e.g. 1,4,16")
    parser.add_argument("--clients", default="1,8,32", help="concurrency levels; the first is the reference")
    parser.add_argument("--requests", type=int, default=64, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--no-hash-check", action="store_true")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)
    if not args.bundle and not args.pack:
        parser.error("pass --bundle NAME=BUNDLE (repeatable) or --base BASE --pack NAME=PACK")
    return args


# -- the server --------------------------------------------------------------------------------------


def server_flags(args: argparse.Namespace, packs: Sequence[str], queue_size: int) -> list[str]:
    flags = [f"--bundle={b}" for b in args.bundle] + ([f"--base={args.base}"] if args.base else [])
    flags += [f"--pack={p}" for p in packs] + ["--port", "0", "--queue", str(queue_size), "--timeout", "3600"]
    flags += (["--threads", str(args.threads)] if args.threads else []) + (["--no-hash-check"] * args.no_hash_check)
    return flags


class Server:
    """`python -m nectar_runtime.serve FLAGS` until stopped; `url` once its ready line came."""

    def __init__(self, flags: Sequence[str]):
        self.errors = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "nectar_runtime.serve", *flags], stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.url = self._ready()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _ready(self) -> str:
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                self.proc.wait()
                self.errors.seek(0)
                raise harness.ChildError(self.proc.returncode, harness.tail(self.errors.read()))
            if line.startswith("serving http://"):
                return line.split()[1].removesuffix("/v1")
        raise harness.ChildError(0, [f"no ready line in {READY_S} s"])

    def memory_mib(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak) of the server, MiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = {line.split(":")[0]: line.split()[1] for line in status if line.startswith(("VmRSS", "VmHWM"))}
        return {"rss_mib": round(int(fields["VmRSS"]) / 1024, 1), "peak_rss_mib": round(int(fields["VmHWM"]) / 1024, 1)}

    def metric_sum(self, name: str) -> float:
        """The sum of every sample called `name` at /metrics (over all label sets)."""
        import httpx2

        text = httpx2.get(f"{self.url}/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


# -- clients -----------------------------------------------------------------------------------------


def stream_chunks(response: Any) -> Iterator[dict[str, Any]]:
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def one_request(client: Any, url: str, model: str, question: str, max_tokens: int) -> Sample:
    """A streamed greedy completion, timed from the client."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, texts, tokens = None, [], 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return Sample(model, question, response.status_code, (time.perf_counter() - start) * 1e3, 0.0, "", 0)
        for chunk in stream_chunks(response):
            if "error" in chunk:
                return Sample(model, question, 500, (time.perf_counter() - start) * 1e3, 0.0, "", 0)
            for choice in chunk.get("choices", []):
                if content := choice["delta"].get("content"):
                    first = first if first is not None else time.perf_counter()
                    texts.append(content)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return Sample(model, question, 200, (end - start) * 1e3, ((first or end) - start) * 1e3, "".join(texts), tokens)


def run_level(url: str, models: Sequence[str], clients: int, requests: int, max_tokens: int) -> tuple[list[Sample], float]:
    """`requests` requests from `clients` threads at once; the samples in job order and the wall seconds."""
    import httpx2

    jobs = [(models[i % len(models)], QUESTIONS[(i // len(models)) % len(QUESTIONS)]) for i in range(requests)]
    local = threading.local()

    def send(job: tuple[str, str]) -> Sample:
        if not hasattr(local, "client"):
            local.client = httpx2.Client(timeout=3600)
        return one_request(local.client, url, *job, max_tokens)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        samples = list(pool.map(send, jobs))
    return samples, time.perf_counter() - start


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(clients: int, samples: list[Sample], wall_s: float, reference: dict[tuple[str, str], str]) -> dict:
    ok = [s for s in samples if s.status == 200]
    latency, ttft = [s.latency_ms for s in ok], [s.ttft_ms for s in ok]
    return {"clients": clients, "requests": len(samples), "ok": len(ok),
            "rejected_429": sum(s.status == 429 for s in samples),
            "failed": sum(s.status not in (200, 429) for s in samples),
            "mismatches": sum(reference.get((s.model, s.question), s.text) != s.text for s in ok),
            "wall_s": round(wall_s, 3), "requests_per_s": round(len(ok) / wall_s, 2),
            "tokens_per_s": round(sum(s.tokens for s in ok) / wall_s, 1),
            "latency_ms": {"p50": round(percentile(latency, 0.5), 1), "p95": round(percentile(latency, 0.95), 1),
                           "max": round(max(latency, default=float("nan")), 1)},
            "ttft_ms": {"p50": round(percentile(ttft, 0.5), 1), "p95": round(percentile(ttft, 0.95), 1)}}


# -- runs --------------------------------------------------------------------------------------------


def names(specs: Sequence[str]) -> list[str]:
    return [spec.split("=", 1)[0] for spec in specs]


def load_run(args: argparse.Namespace) -> dict[str, Any]:
    """Every concurrency level against one server over all model ids."""
    levels = [int(c) for c in args.clients.split(",")]
    server = Server(server_flags(args, args.pack, max(levels)))
    try:
        loaded = server.memory_mib()
        models = names(args.bundle) + names(args.pack)
        rows, reference = [], {}
        for clients in levels:
            samples, wall = run_level(server.url, models, clients, args.requests, args.max_tokens)
            if not reference:
                reference = {(s.model, s.question): s.text for s in samples if s.status == 200}
            rows.append(summarize(clients, samples, wall, reference))
        switches = {"count": server.metric_sum("nectar_pack_switch_milliseconds_count"),
                    "ms_sum": server.metric_sum("nectar_pack_switch_milliseconds_sum")}
        return {"models": models, "memory_loaded": loaded, "memory_after": server.memory_mib(), "levels": rows,
                "pack_switches": switches}
    finally:
        server.stop()


def pack_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A server with the first K packs for each K of --pack-counts, its memory and switch time."""
    rows = []
    for count in [int(k) for k in args.pack_counts.split(",") if k]:
        if count > len(args.pack):
            raise SystemExit(f"--pack-counts {count} needs at least {count} --pack NAME=PACK, got {len(args.pack)}")
        server = Server(server_flags(args, args.pack[:count], 1))
        try:
            loaded = server.memory_mib()
            run_level(server.url, names(args.pack[:count]), 1, max(2 * count, 4), 1)
            switched = server.metric_sum("nectar_pack_switch_milliseconds_count")
            total = server.metric_sum("nectar_pack_switch_milliseconds_sum")
            rows.append({"packs": count, "memory_loaded": loaded, "memory_after": server.memory_mib(),
                         "switches": switched, "switch_ms_mean": round(total / switched, 3) if switched else None})
        finally:
            server.stop()
    return rows


def plot(result: dict[str, Any], png: Path) -> None:
    plt = harness.pyplot()
    rows = result["levels"]
    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["requests_per_s"] for r in rows], marker="o")
    left.set_ylabel("requests / s")
    for key, style in (("p50", "-"), ("p95", "--")):
        right.plot(clients, [r["latency_ms"][key] for r in rows], style, marker="o", label=f"latency {key}")
        right.plot(clients, [r["ttft_ms"][key] for r in rows], style, marker="x", label=f"first chunk {key}")
    right.set_ylabel("ms")
    right.legend()
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"serve_load: {', '.join(result['models'])}, {result['max_tokens']} tokens per answer")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def table(result: dict[str, Any]) -> str:
    lines = [f"models {', '.join(result['models'])}; server RSS {result['memory_loaded']['rss_mib']} MiB loaded, "
             f"peak {result['memory_after']['peak_rss_mib']} MiB",
             "clients  requests/s  tokens/s  p50 ms  p95 ms  ttft p50  ttft p95  ok/429/failed/mismatch"]
    for r in result["levels"]:
        lines.append(f"{r['clients']:>7}  {r['requests_per_s']:>10}  {r['tokens_per_s']:>8}  {r['latency_ms']['p50']:>6}"
                     f"  {r['latency_ms']['p95']:>6}  {r['ttft_ms']['p50']:>8}  {r['ttft_ms']['p95']:>8}  "
                     f"{r['ok']}/{r['rejected_429']}/{r['failed']}/{r['mismatches']}")
    for r in result.get("pack_memory", []):
        lines.append(f"{r['packs']} packs: RSS {r['memory_loaded']['rss_mib']} MiB loaded, peak "
                     f"{r['memory_after']['peak_rss_mib']} MiB; switch {r['switch_ms_mean']} ms mean")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    result = {"max_tokens": args.max_tokens, "requests_per_level": args.requests, **load_run(args)}
    if args.pack_counts:
        result["pack_memory"] = pack_memory(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_load.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "serve_load.png")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
