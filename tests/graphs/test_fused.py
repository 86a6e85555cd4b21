"""graphs/fused.py: the ONNX Runtime step graph (contrib operators) against the portable graph, on ONNX Runtime CPU.

The portable graph is the traced static-cache step (conftest's static_traces: llama and qwen3, random heads, 5 exact
tokens); the fused one is built from the same model and heads. Both run in real ONNX Runtime CPU sessions with the
optimizations off; the fused Nectar graph takes one token per call (its head_sink is per head), so its prompt goes
in token by token, the portable graph's in one call.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from nectar_graphs.fused import (PAD_ALIGN, build_fused_step, fused_heads, layer_node_counts, pad_context_kv,
                                 padded_head)
from nectar_graphs.passes import cleanup, fold_constants, run_pipeline
from tests.helpers import EXACT

PROMPT_IDS = [3, 17, 100, 42, 9, 200]
STEPS, SLOTS, FIRST = 10, 64, 37            # decode steps; buffer slots; position of the first new token
# nodes per decoder layer (Reshape, a view, not counted)
NECTAR = {"MatMul": 8, "Add": 3, "Split": 2, "RotaryEmbedding": 2, "QuickGelu": 3, "Slice": 2,
          "GroupQueryAttention": 1, "Sub": 1, "Mul": 2, "SkipSimplifiedLayerNormalization": 2}
FULL = {"MatMul": 4, "GroupQueryAttention": 1, "SkipSimplifiedLayerNormalization": 2, "Split": 1, "QuickGelu": 1,
        "Mul": 1}
QWEN3_EXTRA = {"SkipSimplifiedLayerNormalization": 2, "Split": 1}           # q and k norm outside the attention
QWEN3_NECTAR_EXTRA = {"SkipSimplifiedLayerNormalization": 2, "Add": 1}      # q norm: the heads add their first bias


def _session(model: ir.Model, path) -> ort.InferenceSession:
    ir.save(model, path)
    onnx.checker.check_model(str(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graphs(static_traces, tmp_path_factory):
    """(arch, model, heads, {kind: (portable session, fused session, fused ir model)}) in fp32."""
    arch, model, heads, traced = static_traces
    root = tmp_path_factory.mktemp("fused")
    out = {}
    for kind in ("nectar", "full"):
        portable = ir.from_proto(onnx.load_model_from_string(traced[kind]))
        run_pipeline(portable, [fold_constants, cleanup])
        fused = build_fused_step(model, heads[0] if kind == "nectar" else None, "fp32", FIRST + 64)
        out[kind] = (_session(portable, root / f"{kind}-portable.onnx"), _session(fused, root / f"{kind}-fused.onnx"),
                     fused)
    return arch, model, heads, out


def _expected(arch: str, kind: str, layer: int) -> dict[str, int]:
    want = dict(NECTAR if kind == "nectar" else FULL)
    extra = (QWEN3_NECTAR_EXTRA if kind == "nectar" else QWEN3_EXTRA) if arch == "qwen3" else {}
    for op, count in extra.items():
        want[op] = want.get(op, 0) + count
    return want


def test_every_layer_has_the_fused_structure(graphs):
    """Op counts per layer (the kernels a step launches, Reshape aside): Nectar 26 (Llama) or 29 (Qwen3), full
    attention 10 or 13; one GroupQueryAttention, no Softmax, and no standard attention or norm pieces anywhere."""
    arch, model, _, out = graphs
    for kind, (_, _, fused) in out.items():
        per_layer = layer_node_counts(fused)
        assert sorted(per_layer) == list(range(model.config.num_hidden_layers))
        for layer, counts in per_layer.items():
            assert counts == _expected(arch, kind, layer), (arch, kind, layer)
        ops = {node.op_type for node in fused.graph}
        assert not ops & {"Softmax", "Pow", "ReduceMean", "Sqrt", "Div", "ScatterElements", "Sigmoid",
                          "SimplifiedLayerNormalization"}, ops
        kv = fused.graph.inputs[3].shape
        dim = model.config.head_dim if arch == "qwen3" else model.config.hidden_size // model.config.num_attention_heads
        assert kv[-1] == (padded_head(dim) if kind == "nectar" else dim)
        assert kv[-1] % PAD_ALIGN == 0 or kind == "full"


def _buffers(model, heads, kind: str, dim: int, padded: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Static buffers for the portable ([.., D]) and fused ([.., D']) graphs with the same cached tokens' KV."""
    cfg = model.config
    rng = np.random.default_rng(5)
    portable, fused = [], []
    for layer in range(cfg.num_hidden_layers):
        if kind == "nectar":
            kv = [heads[1][layer].numpy(), heads[2][layer].numpy()]            # the exact tokens
        else:
            kv = [rng.standard_normal((cfg.num_key_value_heads, 20, dim)).astype(np.float32) for _ in range(2)]
        padded_kv = pad_context_kv(*kv, padded) if padded != dim else kv
        for a, b in zip(kv, padded_kv):
            p = np.zeros((1, cfg.num_key_value_heads, SLOTS, dim), np.float32)
            f = np.zeros((1, cfg.num_key_value_heads, SLOTS, padded), np.float32)
            p[0, :, :a.shape[1]], f[0, :, :b.shape[1]] = a, b
            portable.append(p)
            fused.append(f)
    return portable, fused


def _run(session, buffers, ids, slot, position, one_at_a_time):
    names = [i.name for i in session.get_inputs()]
    pieces = range(ids.shape[1]) if one_at_a_time else [slice(None)]
    for t in pieces:
        part = ids[:, t:t + 1] if one_at_a_time else ids
        n = part.shape[1]
        feeds = [part, np.arange(position, position + n)[None], np.arange(slot, slot + n), *buffers]
        logits, *buffers = session.run(None, dict(zip(names, feeds)))
        slot, position = slot + n, position + n
    return logits[:, -1], buffers


@pytest.mark.parametrize("kind", ["nectar", "full"])
def test_fused_logits_and_kv_match_the_portable_graph(graphs, kind):
    """A 6-token prompt and 10 steps: logits within 1e-4 (fp32), the same greedy token at every step, the same KV in
    the first D channels (and, for Nectar, the constant channel: keys 0, values 1)."""
    arch, model, heads, out = graphs
    portable, fused, graph = out[kind]
    dim = portable.get_inputs()[3].shape[-1]
    padded = graph.graph.inputs[3].shape[-1]
    want_kv, got_kv = _buffers(model, heads, kind, dim, padded)
    cached = EXACT if kind == "nectar" else 20
    ids, slot, position = np.array([PROMPT_IDS]), cached, FIRST
    gaps, tokens = [], ([], [])
    for _ in range(STEPS + 1):
        want, want_kv = _run(portable, want_kv, ids, slot, position, False)
        got, got_kv = _run(fused, got_kv, ids, slot, position, kind == "nectar")
        gaps.append(float(np.abs(got - want).max()))
        tokens[0].append(int(want.argmax()))
        tokens[1].append(int(got.argmax()))
        slot, position = slot + ids.shape[1], position + ids.shape[1]
        # teacher-forced varied tokens (a tiny random model's greedy answer repeats one token)
        ids = (want.argmax(-1)[:, None] + 31 * len(gaps)) % model.config.vocab_size
    assert max(gaps) < 1e-4, (arch, kind, gaps)
    assert tokens[0] == tokens[1]                        # the greedy token at every step
    for w, g in zip(want_kv, got_kv):
        np.testing.assert_allclose(g[:, :, :slot, :dim], w[:, :, :slot], rtol=0, atol=1e-5)
    if kind == "nectar":
        assert not got_kv[0][:, :, :slot, dim:].any()                            # keys: 0 in the padding
        assert (got_kv[1][:, :, :slot, dim] == 1).all()                          # values: the constant channel


def test_fp16_graph_stays_close(graphs, tmp_path):
    """The fp16 fused Nectar graph against the fp32 portable one: logits within 2e-2, the prompt's greedy token."""
    arch, model, heads, out = graphs
    portable = out["nectar"][0]
    fused = _session(build_fused_step(model, heads[0], "fp16", FIRST + 64), tmp_path / "fp16.onnx")
    dim = portable.get_inputs()[3].shape[-1]
    want_kv, got_kv = _buffers(model, heads, "nectar", dim, padded_head(dim))
    got_kv = [b.astype(np.float16) for b in got_kv]
    ids = np.array([PROMPT_IDS])
    want, _ = _run(portable, want_kv, ids, EXACT, FIRST, False)
    got, _ = _run(fused, got_kv, ids, EXACT, FIRST, True)
    assert np.abs(got - want).max() < 2e-2, arch
    assert int(got.argmax()) == int(want.argmax())


def test_heads_compute_the_pair():
    """fused_heads' four products (no carried q/-q columns) give the joint pair's [lse, out] for a rotated q with
    the constant channel, with the first bias in the weights or added."""
    import torch

    from nectar_export.heads import MLPPair

    g = torch.Generator().manual_seed(0)
    pair = MLPPair(2, 16, 24, 8)
    for p in pair.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    q = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        lse, want = pair(q, 0.25)
    joint = [t.double().numpy() for t in pair.joint_weights()]
    silu = lambda x: x / (1 + np.exp(-x))
    for bias_in_q in (True, False):
        w = fused_heads(joint, 16, 24, bias_in_q)
        x = np.zeros((2, 5, 24))
        x[..., :16], x[..., 16] = q.double().numpy(), 1.0 if bias_in_q else 0.0
        z = x @ w["a1"] + w.get("b1", 0)
        row = silu(silu(z) @ w["a2"]) @ w["a3"] + x @ w["skip"]
        np.testing.assert_allclose(row[..., :16], want.numpy(), atol=1e-5)
        np.testing.assert_allclose(row[..., 16], lse.numpy(), atol=1e-5)
        assert not row[..., 17:].any()
        assert w["a2"].shape[-1] % 16 == 0 and w["a2"].shape[-1] < 24 + 2 * 16   # h + 1 wide, not h + 2D + 1
