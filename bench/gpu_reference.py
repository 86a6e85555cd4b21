"""GPU decode references: random-weight model shapes, a bandwidth floor, transformers' StaticCache baseline.

Plain functions for a benchmark script on a CUDA host (they also run on CPU, for the tests):
    config = make_config("llama-3.1-8b")
    model = random_model(config, torch.bfloat16, "cuda")
    floor = floor_ms(weight_bytes(model), copy_bandwidth("cuda")["gb_per_s"])
    row = hf_static_decode(model, context_ids, prompt_ids, tokens=64, warmup=8, compile=True)
Works with transformers 5.17 and 5.24: the forward's cache argument is `past_key_values` in 5.17 and `cache` in
5.24 (see `_cache_kwarg`); configs spell RoPE as `rope_parameters` in both.
"""

from __future__ import annotations

import copy
import functools
import inspect
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

CONTEXT_CHUNK = 4096        # context prefill chunk: bounds the [chunk, max_cache_len] mask and activations
MAX_POSITIONS = 139264      # 136K: a 128K context plus prompt and decoded tokens

# Published values from each model's config.json on the Hugging Face Hub (Qwen/Qwen3-1.7B,
# meta-llama/Llama-3.1-8B), with max_position_embeddings raised to MAX_POSITIONS.
SHAPES: dict[str, dict] = {
    "qwen3-1.7b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu", rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, max_position_embeddings=MAX_POSITIONS,
        attention_bias=False, tie_word_embeddings=True, use_sliding_window=False, max_window_layers=28,
        bos_token_id=151643, eos_token_id=151645,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=MAX_POSITIONS, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001,
    ),
}


def make_config(shape: str, **overrides: Any):
    """The transformers config of a named shape, with `overrides` (e.g. fewer layers for a test) applied."""
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: expected one of {sorted(SHAPES)}")
    values = copy.deepcopy(SHAPES[shape]) | overrides
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_model(config, dtype: torch.dtype, device: str | torch.device, seed: int = 0) -> torch.nn.Module:
    """A causal LM with random weights, allocated and initialized directly on `device` in `dtype`, SDPA attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters one decode step reads: each parameter once (a tied embedding once), except an untied
    input embedding, of which a step reads a single row."""
    embedding = model.get_input_embeddings().weight
    tied = embedding is model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())     # parameters() skips shared tensors
    if not tied:
        total -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    return total


# -- the bandwidth floor ----------------------------------------------------------------------------------


def copy_bandwidth(device: str | torch.device, nbytes: int = 2**30, repeats: int = 20) -> dict[str, float]:
    """Device memory bandwidth measured by `dst.copy_(src)` of `nbytes`, median over `repeats`.

    Convention: `gb_per_s` counts the bytes a copy moves, read plus write (2 * nbytes / time, 1 GB = 1e9 bytes),
    because memory bandwidth is shared by reads and writes: a copy at that rate shows the traffic the device
    sustains, and a decode step, which reads its weights once and writes next to nothing, can read at about
    that rate. `read_gb_per_s` (nbytes / time) is half of it and is NOT what `floor_ms` takes.
    """
    device = torch.device(device)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)                                  # warm-up: page faults, clocks
    times = [_elapsed_ms(device, lambda: dst.copy_(src)) for _ in range(repeats)]
    ms = statistics.median(times)
    return {"bytes": nbytes, "ms": ms, "gb_per_s": 2 * nbytes / ms / 1e6, "read_gb_per_s": nbytes / ms / 1e6}


def floor_ms(weight_bytes: int, gb_per_s: float) -> float:
    """Lower bound on ms per decoded token: streaming every weight once at `gb_per_s` (copy_bandwidth's
    read-plus-write rate, the traffic the device memory sustains)."""
    return weight_bytes / (gb_per_s * 1e9) * 1e3


def _elapsed_ms(device: torch.device, fn: Callable[[], Any]) -> float:
    """Milliseconds from launching `fn` until the device has finished it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


# -- transformers' StaticCache decode ------------------------------------------------------------------------


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """Name of the forward's cache argument: `past_key_values` in 5.17, `cache` in 5.24 (where the old name warns)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def static_cache(model: torch.nn.Module, max_cache_len: int):
    """A transformers StaticCache for `model`; its tensors are allocated on the first forward."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def forward(call: Callable, model: torch.nn.Module, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits of the last position after appending `ids` ([1, S]) to `cache`; positions come from the cache."""
    out = call(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(type(model)): cache})
    return out.logits[:, -1]                        # [1, V]


def prefill(model: torch.nn.Module, cache, ids: list[int], chunk: int = CONTEXT_CHUNK) -> torch.Tensor:
    """Append `ids` to `cache` in chunks of `chunk` tokens (eager); returns the last position's logits."""
    tokens = torch.tensor([ids], device=model.device)
    for start in range(0, len(ids), chunk):
        logits = forward(model, model, tokens[:, start:start + chunk], cache)
    return logits


def _compiled_call(model: torch.nn.Module) -> Callable:
    """transformers' compiled forward, as `generate` uses it for decode steps (inductor, reduce-overhead)."""
    from transformers import CompileConfig

    compiled = model.get_compiled_call(CompileConfig())

    def call(**kwargs: Any):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        return compiled(**kwargs)

    return call


def _decode_pass(model: torch.nn.Module, call: Callable, cache, prompt_ids: list[int],
                 feed: torch.Tensor) -> tuple[float, list[float]]:
    """Prompt prefill then one forced step per row of `feed` ([T, 1]); returns prefill ms and ms per step."""
    device = model.device
    prefill_ms = _elapsed_ms(device, lambda: prefill(model, cache, prompt_ids))
    steps = [_elapsed_ms(device, lambda: forward(call, model, feed[i:i + 1], cache)) for i in range(len(feed))]
    return prefill_ms, steps


def hf_static_decode(model: torch.nn.Module, context_ids: list[int], prompt_ids: list[int], tokens: int,
                     warmup: int, compile: bool = False) -> dict[str, Any]:
    """transformers' own batch-1 decode with a StaticCache and SDPA: median ms per forced token after a context.

    The context is prefilled once in chunks (untimed). Then a warm-up pass (prompt prefill + `warmup` steps) and a
    measured pass (prompt prefill + `tokens` steps) both append after it; positions keep increasing, which costs
    the same. Steps feed fixed tokens (the prompt's, cycled) whatever the logits, and each is synchronized, as a
    generate loop is. `compile` runs the decode steps through transformers' compiled call (what `generate` picks
    on CUDA for a StaticCache; prefill stays eager there too); CUDA graphs need a few warm-up steps, so it wants
    `warmup >= 3`. `device_mem_mb` is the peak allocated during the call, weights and cache included.
    """
    if compile and warmup < 3:
        raise ValueError(f"compile=True needs warmup >= 3 to compile and record CUDA graphs, got {warmup}")
    device = model.device
    cycles = -(-(warmup + tokens) // len(prompt_ids))
    feed = torch.tensor(prompt_ids * cycles, device=device)[:warmup + tokens, None]        # [T, 1]
    needed = len(context_ids) + 2 * len(prompt_ids) + warmup + tokens
    cache = static_cache(model, -(-needed // 16) * 16)     # SDPA's memory-efficient kernel wants the mask 16-aligned
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        prefill(model, cache, context_ids)
        call = _compiled_call(model) if compile else model
        try:
            _decode_pass(model, call, cache, prompt_ids, feed[:warmup])
        except Exception as error:
            if not compile:
                raise
            raise RuntimeError(f"torch.compile of the decode step failed ({type(error).__name__}: {error}); "
                               "measure with compile=False instead") from error
        prefill_ms, steps = _decode_pass(model, call, cache, prompt_ids, feed[warmup:])
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {"ms_per_token": statistics.median(steps), "prefill_ms": prefill_ms, "device_mem_mb": memory,
            "tokens": tokens, "compiled": compile}


# -- plot -----------------------------------------------------------------------------------------------------


def plot_rows(rows: list[dict[str, Any]], floor: float | None, title: str, png: str | Path) -> None:
    """ms/token against context length n, one line per engine, with the bandwidth floor dashed."""
    import harness                              # bench/harness.py, beside this file

    engines = dict.fromkeys(r["engine"] for r in rows)
    harness.plot_lines({e: [r for r in rows if r["engine"] == e] for e in engines}, title, Path(png), floor)
