"""graphs/trace.py: the step graph export_step traces, for every architecture, against torch in ONNX Runtime
(CPU, its optimizations off), dynamic cache layout (tests/graphs/test_trace_static_cache.py: the static one).

Nectar graph: against the Hugging Face model with Nectar attention (random heads and exact tokens),
over a prefill and ten decode steps; the exact tokens' KV is the graph's first past, as a bundle ships it.
Baseline graph: against transformers' own attention with the context's KV in its cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nectar_export.attention import ExactContext, cache_keyword, nectar_mode
from nectar_export.heads import HeadsContext
from nectar_graphs.trace import export_step
from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, run_pipeline
from nectar_graphs.step import StepModule, nectar_contexts
from tests.helpers import (N, PROMPT, STEPS, TOL, ort_session, random_heads, run_dynamic_graph, tiny_model,
                           torch_decode)


@pytest.mark.parametrize("plain_arch, variant", [("llama", "llama-rope-llama3"), ("qwen2", "qwen2-rope-yarn")])
def test_rotary_variants_have_their_own_frequencies(plain_arch, variant):
    """The parity below covers a rotary scaling only if the variant's frequencies differ from the plain ones."""
    plain, scaled = tiny_model(plain_arch).model.rotary_emb, tiny_model(variant).model.rotary_emb
    changed = ~torch.isclose(plain.inv_freq, scaled.inv_freq)
    assert int(changed.sum()) >= plain.inv_freq.numel() // 2


@pytest.fixture(scope="module", params=["llama", "llama-rope-llama3", "mistral", "qwen2", "qwen2-rope-yarn", "qwen3"])
def exported(request, tmp_path_factory):
    arch = request.param
    model = tiny_model(arch)
    pairs, keys, values = random_heads(model)
    folder = tmp_path_factory.mktemp(arch)
    graphs = {}
    for kind, contexts in (("nectar", nectar_contexts(pairs)), ("full", None)):
        graph = export_step(StepModule(model, contexts).eval())
        reports = run_pipeline(graph, [fold_constants, fuse_sibling_matmuls, convert_precision("fp32"), cleanup])
        graphs[kind] = (ort_session(graph, folder / f"{kind}.onnx"), reports, graph)
    return arch, model, (pairs, keys, values), graphs


def test_nectar_graph_matches_torch_nectar_model(exported):
    arch, model, (pairs, keys, values), graphs = exported
    from transformers import DynamicCache

    session = graphs["nectar"][0]
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    contexts = [HeadsContext(p, ExactContext(k, v)) for p, k, v in zip(pairs, keys, values)]
    with nectar_mode(model, contexts):
        ref, tokens = torch_decode(model, prompt, N, DynamicCache(config=model.config))
    exact = [t.unsqueeze(0).numpy() for k, v in zip(keys, values) for t in (k, v)]     # [1, Hkv, E, D] each
    got = run_dynamic_graph(session, prompt, tokens, N, exact)
    gaps = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    assert len(gaps) == STEPS + 1
    assert max(gaps) < TOL, f"{arch}: logit gaps per step {gaps}"
    spread = max(float(np.abs(r).max()) for r in ref)
    assert spread > 0.1, "logits too flat for the comparison to mean anything"


def test_baseline_graph_matches_transformers_full_attention(exported):
    arch, model, _, graphs = exported
    from transformers import DynamicCache

    session = graphs["full"][0]
    g = torch.Generator().manual_seed(3)
    context = torch.randint(0, model.config.vocab_size, (1, N), generator=g)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=context, use_cache=True, **{cache_keyword(model): cache})   # stock attention
    past = [t.numpy().copy() for layer in cache.layers for t in (layer.keys, layer.values)]
    ref, tokens = torch_decode(model, prompt, N, cache)
    got = run_dynamic_graph(session, prompt, tokens, N, past)
    gaps = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    assert max(gaps) < TOL, f"{arch}: logit gaps per step {gaps}"


def test_graph_io_and_fusions(exported):
    arch, model, _, graphs = exported
    session, reports, graph = graphs["nectar"]
    layers = model.config.num_hidden_layers
    fused = next(r for r in reports if r.name == "fuse_sibling_matmuls").counts
    assert fused == {"gate_up": layers, "qkv": layers}           # the MLP pairs are one network already (JointPair)
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert inputs["input_ids"] == ["batch", "sequence"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.0.key"][2] == "past_sequence"
    assert [o.name for o in session.get_outputs()][:2] == ["logits", "present.0.key"]
    dims = {d for v in graph.graph.initializers.values() for d in v.const_value.shape}
    assert N not in dims, "a constant carries the context length"
