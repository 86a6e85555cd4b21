"""What tests share besides fixtures: tiny model configs, the CLI in a subprocess, step-graph parity pieces.

Import it as `from tests.helpers import ...`: tests/ and its folders are packages, so pytest (import mode
prepend) puts the repository root on sys.path whatever folder it is started on. Fixtures live in
tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nectar_runtime.backends.ort_cuda import OrtCudaBackend

# --- tiny random models of every supported architecture, built from configs in code ---

TINY = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**TINY, rope_theta=10000.0)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**TINY, sliding_window=None)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**TINY, use_sliding_window=False)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**TINY, head_dim=16, use_sliding_window=False)   # q/k norm, head_dim != hidden/heads


GEMMA_WINDOW = 16        # tiny Gemma 3's sliding window: the tests' contexts (48+ tokens) are longer


def _gemma3():
    """Gemma 3's hybrid attention in small: sliding layers around a global one (not the last layer), the local and
    global rotary bases, a query pre-attention scalar other than head_dim, q/k norms, the embedding scale, and a
    final logit soft-cap small enough to change the logits."""
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**{**TINY, "num_hidden_layers": 4}, head_dim=16, sliding_window=GEMMA_WINDOW,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                         "sliding_attention"],
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                            query_pre_attn_scalar=24, final_logit_softcapping=3.0, attn_logit_softcapping=None,
                            hidden_activation="gelu_pytorch_tanh")


def _llama_rope_llama3():
    """Llama 3's rotary scaling (Llama-3.1/3.2 checkpoints), sized so that it changes most frequencies here."""
    from transformers import LlamaConfig
    return LlamaConfig(**TINY, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})


def _qwen2_rope_yarn():
    """YaRN rotary scaling (Qwen2.5's long-context setting): new frequencies and a scaled cos/sin."""
    from transformers import Qwen2Config
    return Qwen2Config(**TINY, use_sliding_window=False,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                        "original_max_position_embeddings": 64})


TINY_CONFIGS = {"gemma3_text": _gemma3, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}
VARIANTS = {"llama-rope-llama3": _llama_rope_llama3, "qwen2-rope-yarn": _qwen2_rope_yarn}       # not every architecture test needs these


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config({**TINY_CONFIGS, **VARIANTS}[arch](), dtype=torch.float32)
    if model.config.model_type == "gemma3_text":       # Gemma's norms start at weight 0 (scale 1 + w): make w count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.3)
    return model.eval()


def collected_layers(arch: str = "llama", n: int = 96, sinks: int = 2):
    """A tiny model, its cache of n random context tokens, and per-layer train (24 samples) and validation
    (6 samples) data with sinks exact tokens: what fitting sees, in small."""
    from nectar_export.prefill import prefill
    from nectar_export.queries import collect, targets
    from nectar_export.samples import Sample

    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    cache = prefill(model, torch.randint(0, 256, (n,), generator=g).tolist(), progress=False)
    make = lambda count: [Sample("continuation", tuple(torch.randint(0, 256, (24,), generator=g).tolist()))
                          for _ in range(count)]
    scaling = float(model.model.layers[0].self_attn.scaling)
    exact = cache.exact_index(sinks, 0)
    heads = cache.heads()                     # a hybrid model's global layers: the ones queries are collected for
    train = targets(collect(model, cache, make(24), batch_size=8, desc="train"), heads, exact, scaling)
    val = targets(collect(model, cache, make(6), batch_size=8, desc="val"), heads, exact, scaling)
    return model, cache, train, val


# --- the CLI in a subprocess (it inherits PYTHONPATH, so it runs the code under test) ---

def run_cli(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nectar_export.cli", *args], capture_output=True, text=True,
                          cwd=cwd, input=input, timeout=900)


def read_only(folder: Path, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command where `folder` is a read-only bind mount of itself, in a mount namespace of its own (nothing
    outside the command sees the mount). Skips the calling test where `unshare` cannot make one."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare here to make a private read-only mount")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no private read-only mount here: {probe.stderr.decode(errors='replace').strip()[:200]}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), *command], capture_output=True,
                          text=True, timeout=timeout)


# the last line of `nectar-export run` and `python -m nectar_runtime`
TIMING = re.compile(r"^\[ort-cpu\] prefill [\d.]+ ms \(\d+ prompt tokens\), [\d.]+ ms/token median over \d+ steps")


def export_bundle(artifact: Path, out: Path, *flags: str) -> Path:
    result = run_cli("export", str(artifact), "-o", str(out), *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


# --- step graphs against torch (tests/graphs): random heads, ONNX Runtime sessions, the torch decode ---

N, EXACT, PROMPT, STEPS, TOL = 37, 5, 6, 10, 1e-4     # context, exact tokens, prompt, decode steps, logit gap


def ort_session(model, path):
    """Save an onnx_ir model, check it in full, and open it in ONNX Runtime (CPU, its optimizations off)."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    proto = ir.to_proto(model)
    onnx.save(proto, path)
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def random_heads(model, seed: int = 1):
    """Random MLP pairs and exact tokens per layer, scaled so their partial matters in the merge."""
    from nectar_export.heads import MLPPair

    cfg = model.config
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    pairs, keys, values = [], [], []
    for _ in range(cfg.num_hidden_layers):
        pair = MLPPair(cfg.num_key_value_heads, dim, 16, 8)
        for p in pair.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        pairs.append(pair.eval())
        keys.append(torch.randn(cfg.num_key_value_heads, EXACT, dim, generator=g))
        values.append(torch.randn(cfg.num_key_value_heads, EXACT, dim, generator=g))
    return pairs, keys, values


def torch_decode(model, first_ids: torch.Tensor, start: int, cache) -> tuple[list[np.ndarray], list[int]]:
    """Greedy decode in torch: logits after the prefill and after each of STEPS tokens, and those tokens."""
    from nectar_export.attention import forward

    ids, position, logits, tokens = first_ids, start, [], []
    with torch.inference_mode():
        for _ in range(STEPS + 1):
            T = ids.shape[1]
            out = forward(model, ids, torch.arange(position, position + T).unsqueeze(0), cache, logits_to_keep=1)[:, -1]
            logits.append(out.numpy())
            position += T
            ids = out.argmax(-1, keepdim=True)
            tokens.append(int(ids))
    return logits, tokens[:-1]



class HostBoundBackend(OrtCudaBackend):
    """OrtCudaBackend's buffers and bindings exactly (IOBinding, ping-pong or in-place static buffers, the fixed
    one-token binding), with "cpu" as the device and ONNX Runtime's CPU provider: what a machine without a GPU
    can run of the ort-cuda backend. A real session, not a stand-in."""

    device = "cpu"

    def _open(self):
        return ort, ort.InferenceSession(str(self.bundle.onnx_path), providers=["CPUExecutionProvider"])



# a prompt of token ids for a backend's step
def run_dynamic_graph(session, first_ids: torch.Tensor, steps: list[int], start: int,
                      past: list[np.ndarray]) -> list[np.ndarray]:
    """Logits of a step graph (dynamic layout) over a prefill of first_ids then one step per token in steps,
    feeding the presents back as the next past."""
    names = [i.name for i in session.get_inputs()]
    ids, length, position, logits = first_ids, past[0].shape[2], start, []
    for token in [None, *steps]:
        if token is not None:
            ids = torch.tensor([[token]])
        T = ids.shape[1]
        feeds = [ids.numpy(), np.arange(position, position + T).reshape(1, T), np.ones((1, length + T), np.int64), *past]
        out = session.run(None, dict(zip(names, feeds)))
        logits.append(out[0][:, -1])
        past, length, position = out[1:], length + T, position + T
    return logits


def run_static_graph(session, first_ids: torch.Tensor, steps: list[int], start: int, buffers: list[np.ndarray],
                     first_slot: int) -> list[np.ndarray]:
    """Logits of a static-layout step graph over a prefill then one step per token, each step writing slots
    first_slot + 0, 1, ..., and every present the whole buffer, fed back as the next past."""
    names = [i.name for i in session.get_inputs()]
    ids, slot, position, logits = first_ids, first_slot, start, []
    for token in [None, *steps]:
        if token is not None:
            ids = torch.tensor([[token]])
        T = ids.shape[1]
        feeds = [ids.numpy(), np.arange(position, position + T).reshape(1, T), np.arange(slot, slot + T), *buffers]
        out = session.run(None, dict(zip(names, feeds)))
        assert all(o.shape == b.shape for o, b in zip(out[1:], buffers)), "a present is not the whole buffer"
        logits.append(out[0][:, -1])
        buffers, slot, position = out[1:], slot + T, position + T
    return logits


STEP_PROMPT = np.array([[1, 17, 300, 4000, 9]], dtype=np.int64)


def same_greedy_sequences(plain: Any, bound: Any) -> None:
    """Two greedy sequences of 6 steps (the second reuses the buffers): identical logits at every step."""
    for _ in range(2):
        plain.reset(1)
        bound.reset(1)
        tokens = STEP_PROMPT
        for _ in range(6):
            want, got = plain.step(tokens), bound.step(tokens)
            np.testing.assert_array_equal(got, want)
            tokens = want.argmax(-1)[:, None]


# --- mutations of a real JSON manifest (the fuzz tests: tests/runtime/test_fuzz_bundle.py and
# tests/nectar_export/test_fuzz_artifact.py) ---

@dataclass(frozen=True)
class Raw:
    """JSON text written as it is where a value goes: what json.dumps cannot write (5,000-digit numbers,
    nesting deeper than Python's recursion limit)."""

    text: str


@dataclass(frozen=True)
class Paths:
    """Path-like strings that lead out of a folder: an absolute path, `..` steps, a symbolic link in it."""

    absolute: str
    parent: str
    symlink: str


def hostile_copy(folder: Path, root: Path, bait: str) -> tuple[Path, Path, Paths]:
    """A copy of folder at root/case/NAME, a file outside it holding the copy's `bait` file's bytes (so an entry
    renamed to reach it still has the right size and sha256), a symbolic link to that file inside the copy, and
    the three ways out of the copy that lead to it."""
    import shutil

    copy = Path(shutil.copytree(folder, root / "case" / folder.name))
    suffix = Path(bait).suffix
    secret = root / f"secret{suffix}"
    shutil.copyfile(copy / bait, secret)
    (copy / f"link{suffix}").symlink_to(secret)
    return copy, secret, Paths(absolute=str(secret), parent=f"../../secret{suffix}", symlink=f"link{suffix}")


def json_paths(data: Any, path: tuple = ()) -> Iterator[tuple]:
    """The path (keys and indices) of every node under the root. A list's first element stands for all of them
    (they share a schema), and so does the first entry of a map (eight or more entries, all values of one type)."""
    if isinstance(data, dict):
        keys = list(data)
        if len(keys) >= 8 and len({type(v) for v in data.values()}) == 1:
            keys = keys[:1]
        children = [(k, data[k]) for k in keys]
    elif isinstance(data, list):
        children = [(0, data[0])] if data else []
    else:
        return
    for key, value in children:
        yield path + (key,)
        yield from json_paths(value, path + (key,))


def _replacements(value: Any, paths: Paths) -> list[tuple[str, Any]]:
    """(label, new value) for one node: other types, bounds, sizes, paths out of the folder, nesting."""
    out = [("null", None), ("true", True), ("in a list", [value]), ("in an object", {"v": value}),
           ("nested 100000 deep", Raw("[" * 100_000 + "]" * 100_000))]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out += [("-1", -1), ("0", 0), ("10**18", 10**18), ("10**400", 10**400), ("5000 digits", Raw("9" * 5000)),
                ("0.5", 0.5), ("-2.5", -2.5), ("nan", float("nan")), ("inf", float("inf")), ("'7'", "7")]
    else:
        out += [("7", 7), ("-7", -7)]
    if isinstance(value, str):
        out += [("''", ""), ("200000 characters", "x" * 200_000), ("absolute path", paths.absolute),
                ("../ path", paths.parent), ("symlink", paths.symlink), ("format spec", "{question:>99999999}"),
                ("attribute field", "{question.__class__}")]
    else:
        out += [("'x'", "x")]
    if isinstance(value, list) and value:
        out += [("[]", []), ("10000 copies", value[:1] * 10_000), ("without its first", value[1:])]
    if isinstance(value, dict) and value:
        key = next(iter(value))
        out += [("{}", {}), ("an extra key", {**value, "zz_extra": {"x": [1, None]}})]
        out += [(f"key {key!r} renamed {how}", {name if k == key else k: v for k, v in value.items()})
                for how, name in (("''", ""), ("absolute", paths.absolute), ("../", paths.parent),
                                  ("symlink", paths.symlink))]
    return out


def mutations(data: Any, paths: Paths) -> Iterator[tuple[str, Any]]:
    """(label, mutated deep copy of data) for every node of json_paths and every replacement of it, and its
    removal; then whole-document damage."""
    for path in json_paths(data):
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        where = "/".join(map(str, path))
        for label, new in [*_replacements(parent[path[-1]], paths), ("removed", ...)]:
            copy = json.loads(json.dumps(data))
            target = copy
            for key in path[:-1]:
                target = target[key]
            if new is ...:
                del target[path[-1]]
            else:
                target[path[-1]] = new
            yield f"{where}: {label}", copy
    for label, raw in (("a JSON list", Raw("[]")), ("null", Raw("null")), ("empty", Raw("")),
                       ("not JSON", Raw("{bundle")), ("nested 100000 deep", Raw("[" * 100_000 + "]" * 100_000)),
                       ("not UTF-8", Raw("\udcff")), ("a 5000-digit number", Raw("9" * 5000))):
        yield f"the whole file: {label}", raw


def dump(data: Any) -> bytes:
    """data as JSON bytes, with each Raw's text in its place (a lone surrogate stands for an invalid byte)."""
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(data))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw)
    return text.encode("utf-8", "surrogateescape")


# --- the HTTP server (nectar_runtime.serve) in a subprocess, always stopped ---

SERVING = re.compile(r"^serving (http://\S+)/v1 ")


@dataclass
class Served:
    """A running `python -m nectar_runtime.serve`: its process, base URL (no /v1) and stderr log."""

    proc: subprocess.Popen
    url: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(*flags: str, log: Path, ready_s: float = 60, python: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> Iterator[Served]:
    """The server started with `flags`, once it printed its ready line (bounded by `ready_s`); SIGTERM, then
    SIGKILL after 15 s, when the block ends whatever happened. `python` holds interpreter flags (-X importtime),
    `env` variables added to this process's."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, *python, "-m", "nectar_runtime.serve", *flags],
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env=None if env is None else {**os.environ, **env})
    try:
        yield Served(proc, _ready_url(proc, ready_s, log), log)
    finally:
        stop_process(proc)


def _ready_url(proc: subprocess.Popen, ready_s: float, log: Path) -> str:
    """The URL of the server's ready line; fails the test when the process exits or is silent for `ready_s`."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:                    # keeps reading so the pipe never fills
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + ready_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            pytest.fail(f"the server exited with {proc.wait()}: {log.read_text(errors='replace')[-2000:]}")
        if match := SERVING.match(line):
            return match.group(1)
    pytest.fail(f"the server printed no ready line in {ready_s} s: {log.read_text(errors='replace')[-2000:]}")


def stop_process(proc: subprocess.Popen, wait_s: float = 15) -> int:
    """SIGTERM, then SIGKILL if it is still there after `wait_s`; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
