"""graphs/trace.py, static cache layout: step graphs with KV buffers of R slots, new tokens scattered into
`cache_position`, against torch.

Same references as test_trace.py: the Hugging Face model in Nectar mode for the Nectar graph, and
transformers' own attention with the context in its cache for the baseline. The buffers are longer than
what is used, so masked slots are exercised, and the presents are fed back as the next step's past, as a
runtime that binds the present to the past's memory would see them. The traces are conftest's static_traces,
which test_step.py takes through fp16 passes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from nectar_export.attention import ExactContext, cache_keyword, nectar_mode
from nectar_export.heads import HeadsContext
from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, op_counts, run_pipeline
from tests.helpers import N, PROMPT, STEPS, TOL, ort_session, run_static_graph, torch_decode

SPARE = 3          # buffer slots never filled


@pytest.fixture(scope="module")
def static(static_traces, tmp_path_factory):
    arch, model, (pairs, keys, values), traced = static_traces
    folder = tmp_path_factory.mktemp(f"static-{arch}")
    graphs = {}
    for kind in ("nectar", "full"):
        graph = ir.from_proto(onnx.load_model_from_string(traced[kind]))
        run_pipeline(graph, [fold_constants, fuse_sibling_matmuls, convert_precision("fp32"), cleanup])
        graphs[kind] = (ort_session(graph, folder / f"{kind}.onnx"), graph)
    return arch, model, (pairs, keys, values), graphs


def test_static_nectar_graph_matches_torch_nectar_model(static):
    arch, model, (pairs, keys, values), graphs = static
    from transformers import DynamicCache

    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    contexts = [HeadsContext(p, ExactContext(k, v)) for p, k, v in zip(pairs, keys, values)]
    with nectar_mode(model, contexts):
        ref, tokens = torch_decode(model, prompt, N, DynamicCache(config=model.config))
    cfg, dim, exact = model.config, keys[0].shape[-1], keys[0].shape[1]
    slots = exact + PROMPT + STEPS + SPARE
    rng = np.random.default_rng(0)          # junk in unfilled slots must not leak through the mask
    buffers = [rng.standard_normal((1, cfg.num_key_value_heads, slots, dim)).astype(np.float32)
               for _ in range(2 * cfg.num_hidden_layers)]
    for buffer, kv in zip(buffers, [t for k, v in zip(keys, values) for t in (k, v)]):
        buffer[0, :, :exact] = kv.numpy()   # the exact tokens hold the first slots, as a runtime loads them
    got = run_static_graph(graphs["nectar"][0], prompt, tokens, N, buffers, exact)
    gaps = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    assert len(gaps) == STEPS + 1
    assert max(gaps) < TOL, f"{arch}: logit gaps per step {gaps}"


def test_static_baseline_graph_matches_transformers_full_attention(static):
    arch, model, _, graphs = static
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, model.config.vocab_size, (1, N), generator=g)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=context, use_cache=True, **{cache_keyword(model): cache})
    buffers = []
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            buf = np.zeros((1, t.shape[1], N + PROMPT + STEPS + SPARE, t.shape[3]), np.float32)
            buf[:, :, :N] = t.numpy()
            buffers.append(buf)
    ref, tokens = torch_decode(model, prompt, N, cache)
    got = run_static_graph(graphs["full"][0], prompt, tokens, N, buffers, N)
    gaps = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    assert max(gaps) < TOL, f"{arch}: logit gaps per step {gaps}"


def test_static_graph_io(static):
    arch, model, _, graphs = static
    session, graph = graphs["nectar"]
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "position_ids", "cache_position"]
    assert inputs["cache_position"] == ["sequence"]
    assert inputs["past_key_values.0.key"][0] == "batch" and inputs["past_key_values.0.key"][2] == "cache_slots"
    assert outputs["present.0.key"] == inputs["past_key_values.0.key"], "present and past must share one shape"
    layers = model.config.num_hidden_layers
    counts = op_counts(graph)
    assert counts.get("ScatterElements") == 2 * layers, counts      # one per past tensor: K and V per layer
