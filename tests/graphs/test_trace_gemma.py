"""The step graph of a hybrid model (tiny random Gemma 3: sliding window 16, one global layer among three sliding
ones) against torch in ONNX Runtime (CPU, its optimizations off), with a context three windows long and more new
tokens than a window, so every sliding layer's window moves past the context's end.

Nectar graph, dynamic and static cache layouts: the global layer's past starts with its exact tokens (sinks and a
short window of the context, padded at the front with dead slots to the sliding layers' length), each sliding
layer's with the context's last window; against the Hugging Face model with Nectar attention (random heads on the
global layer). Baseline graph: the whole context's KV in every layer against the stock model over the whole
sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nectar_export.attention import ExactContext, cache_keyword, nectar_mode
from nectar_export.heads import HeadsContext
from nectar_export.prefill import ContextCache, aligned, prefill, sink_window_index, take
from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, run_pipeline
from nectar_graphs.step import StepModule, nectar_contexts
from nectar_graphs.trace import export_step
from tests.helpers import (GEMMA_WINDOW, STEPS, TOL, ort_session, random_heads, run_dynamic_graph, run_static_graph,
                           tiny_model, torch_decode)

N, PROMPT, SINKS, RECENT = 3 * GEMMA_WINDOW, GEMMA_WINDOW + 4, 2, 3


def _run_static(session, first_ids: torch.Tensor, steps: list[int], start: int, past: list[np.ndarray]) -> list[np.ndarray]:
    """The same run on a static-layout graph: buffers of C + new-token slots (zeros after the cached ones), the new
    tokens scattered into slots C, C + 1, ..., the presents fed back whole."""
    C, extra = past[0].shape[2], first_ids.shape[1] + len(steps) + 3
    past = [np.concatenate([t, np.zeros((*t.shape[:2], extra, t.shape[3]), t.dtype)], axis=2) for t in past]
    return run_static_graph(session, first_ids, steps, start, past, C)


def _session(step: StepModule, path):
    graph = export_step(step.eval())
    run_pipeline(graph, [fold_constants, fuse_sibling_matmuls, convert_precision("fp32"), cleanup])
    return ort_session(graph, path)


@pytest.fixture(scope="module")
def gemma():
    model = tiny_model("gemma3_text", seed=5)
    g = torch.Generator().manual_seed(6)
    context = torch.randint(0, model.config.vocab_size, (1, N), generator=g)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g)
    cache = prefill(model, context[0].tolist(), chunk=16, progress=False)
    return model, context, prompt, cache


def test_nectar_graph_matches_torch_nectar_model(gemma, tmp_path):
    model, _, prompt, cache = gemma
    from transformers import DynamicCache

    assert cache.head_layers == [1] and N > GEMMA_WINDOW and PROMPT + STEPS > GEMMA_WINDOW
    pairs = random_heads(model)[0][:len(cache.head_layers)]
    index = sink_window_index(N, SINKS, RECENT)
    heads = cache.heads()
    exact = ContextCache([take(k, index) for k in heads.keys], [take(v, index) for v in heads.values])
    contexts = cache.localized([HeadsContext(p, ExactContext(k, v)) for p, k, v in zip(pairs, exact.keys, exact.values)])
    with nectar_mode(model, contexts):
        ref, tokens = torch_decode(model, prompt, N, DynamicCache(config=model.config))
    # every layer's past: C slots, the last ones its exact tokens (global) or the context's last window (sliding)
    C = GEMMA_WINDOW
    keys, values, graph_contexts = [], [], []
    exact_kv, given = iter(zip(exact.keys, exact.values)), iter(nectar_contexts(pairs))
    for layer, window in enumerate(cache.windows):
        k, v = (cache.keys[layer][:, -window:], cache.values[layer][:, -window:]) if window else next(exact_kv)
        keys.append(k)
        values.append(v)
        graph_contexts.append(None if window else next(given))
    padded, dead = aligned(keys, values)
    assert dead == [0, C - SINKS - RECENT, 0, 0]
    past = [t.unsqueeze(0).numpy() for k, v in zip(padded.keys, padded.values) for t in (k, v)]
    for static, run in ((False, run_dynamic_graph), (True, _run_static)):
        session = _session(StepModule(model, graph_contexts, static=static, dead=dead), tmp_path / f"nectar-{static}.onnx")
        gaps = [float(np.abs(a - b).max()) for a, b in zip(run(session, prompt, tokens, N, past), ref)]
        assert len(gaps) == STEPS + 1
        assert max(gaps) < TOL, f"static={static}: logit gaps per step {gaps}"
    # the dead slots matter: a graph that attends to them (dead = 0) gives other logits
    careless = _session(StepModule(model, graph_contexts), tmp_path / "careless.onnx")
    assert float(np.abs(run_dynamic_graph(careless, prompt, tokens, N, past)[0] - ref[0]).max()) > 1e-3


def test_baseline_graph_matches_transformers_full_attention(gemma, tmp_path):
    model, context, prompt, cache = gemma
    from transformers import DynamicCache

    stock = DynamicCache(config=model.config)               # the model's own sliding cache layers
    with torch.inference_mode():
        model(input_ids=context, use_cache=True, **{cache_keyword(model): stock})
    ref, tokens = torch_decode(model, prompt, N, stock)
    past = [t.unsqueeze(0).numpy() for k, v in zip(cache.keys, cache.values) for t in (k, v)]   # all N tokens
    session = _session(StepModule(model), tmp_path / "full.onnx")
    got = run_dynamic_graph(session, prompt, tokens, N, past)
    gaps = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    assert max(gaps) < TOL, f"logit gaps per step {gaps}"
    spread = max(float(np.abs(r).max()) for r in ref)
    assert spread > 0.1, "logits too flat for the comparison to mean anything"
