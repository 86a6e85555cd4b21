"""graphs/int4.py on a tiny Llama's Nectar step graph: which products become MatMulNBits, that the packed tensors are
the weights' 4-bit blocks, and what ONNX Runtime's CPU kernel computes from them (real sessions, optimizations off)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from nectar_graphs.int4 import Int4Config, quantize_int4
from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, run_pipeline
from tests.helpers import EXACT

PROMPT = 7


@pytest.fixture(scope="module")
def graphs(static_traces):
    """conftest's static-layout Nectar step graph of a tiny model (default init, random heads) after the fp32, fp16
    and int4 passes, and feeds for a 7-token prompt after the exact tokens' KV in buffers of a few spare slots."""
    arch, model, (_, keys, values), traced = static_traces
    folded = ir.from_proto(onnx.load_model_from_string(traced["nectar"]))
    fold_constants(folded)                                          # once for the three: it is most of the time
    proto = ir.to_proto(folded).SerializeToString()
    passes = {"fp32": [fuse_sibling_matmuls, cleanup],
              "fp16": [convert_precision("fp16"), fuse_sibling_matmuls, cleanup],
              "int4": [convert_precision("fp16"), fuse_sibling_matmuls, quantize_int4(), cleanup]}
    out, reports = {}, {}
    for name, pipeline in passes.items():
        out[name] = ir.from_proto(onnx.load_model_from_string(proto))
        reports[name] = run_pipeline(out[name], pipeline)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=g).numpy()
    feeds = {"input_ids": ids, "position_ids": np.arange(100, 100 + PROMPT)[None],
             "cache_position": np.arange(EXACT, EXACT + PROMPT)}
    for i, (k, v) in enumerate(zip(keys, values)):
        for kind, kv in (("key", k), ("value", v)):
            buffer = np.zeros((1, *kv.shape[:1], EXACT + PROMPT + 3, kv.shape[-1]), np.float32)
            buffer[0, :, :EXACT] = kv.numpy()                     # the exact tokens hold the first slots
            feeds[f"past_key_values.{i}.{kind}"] = buffer
    return out, reports, feeds


def _logits(model: ir.Model, feeds: dict[str, np.ndarray], kv_dtype: type) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    typed = {k: v.astype(kv_dtype) if k.startswith("past") else v for k, v in feeds.items()}
    return session.run(["logits"], typed)[0][0, -1]


def dequantized(node: ir.Node) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node multiplies by, unpacked from its inputs as ONNX Runtime's contrib-op
    documentation lays them out: B [N, blocks, block * bits / 8] bytes, for 4 bits element 2i in the low nibble;
    scales [N, blocks]; zero points either packed like B ([N, ceil(blocks * bits / 8)] bytes) or of the scales'
    type, one per block ([N, blocks]); 2^(bits - 1) when absent."""
    a = {name: attr.value for name, attr in node.attributes.items()}
    bits, block = a["bits"], a["block_size"]
    packed, scales = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy().astype(np.float32)
    n, blocks, _ = packed.shape
    scales = scales.reshape(n, blocks)

    def unpack(raw: np.ndarray) -> np.ndarray:
        return np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(*raw.shape[:-1], -1) if bits == 4 else raw

    q = unpack(packed).reshape(n, blocks, block).astype(np.float32)
    if len(node.inputs) > 3:
        zp = node.inputs[3].const_value.numpy()
        zero = zp.astype(np.float32).reshape(n, blocks) if zp.dtype != np.uint8 else \
            unpack(zp.reshape(n, -1))[:, :blocks].astype(np.float32)
    else:
        zero = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    weight = ((q - zero[..., None]) * scales[..., None]).reshape(n, -1)[:, :a["K"]]
    return weight.T                                                               # [K, N]


def _nbits(model: ir.Model) -> list[ir.Node]:
    return [node for node in model.graph if node.op_type == "MatMulNBits"]


def test_int4_quantizes_the_projections_and_lm_head_not_the_heads(graphs):
    models, reports, _ = graphs
    int4 = models["int4"]
    layers = 2
    # per layer the fused q|k|v, o_proj, the fused gate|up and down_proj; and lm_head
    assert reports["int4"][2].counts == {"lm_head": 1, "projection": 4 * layers}
    assert reports["int4"][2].notes == {"nectar head (kept in fp16)": 3 * layers}      # JointPair's three products
    nodes = _nbits(int4)
    assert len(nodes) == 4 * layers + 1 and all(n.domain == "com.microsoft" for n in nodes)
    assert not any(".context" in n.metadata_props.get("pkg.torch.onnx.name_scopes", "") for n in nodes)
    assert {n.attributes["bits"].value for n in nodes} == {4} and {n.attributes["block_size"].value for n in nodes} == {32}
    heads = [n for n in int4.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert len(heads) == 3 * layers and {n.inputs[1].dtype for n in heads} == {ir.DataType.FLOAT16}
    assert {"Gemm"} & {n.op_type for n in int4.graph} == set()                    # lm_head was the Gemm
    assert int4.opset_imports["com.microsoft"] == 1
    # no fp16 copy of a quantized weight is left: fp16's constant products' bytes shrink to about 4.6/16 of them
    fp16 = {n.name: n.inputs[1].const_value.nbytes for n in models["fp16"].graph
            if n.op_type in ("MatMul", "Gemm") and n.inputs[1].const_value is not None and ".context" not in
            n.metadata_props.get("pkg.torch.onnx.name_scopes", "")}
    packed = sum(v.const_value.nbytes for n in nodes for v in n.inputs[1:])
    assert 0.25 < packed / sum(fp16.values()) < 0.32, (packed, sum(fp16.values()))


def test_the_packed_tensors_are_the_weights_blocks(graphs):
    """Each unpacked weight lies within half a quantization step of the fp16 weight it replaced, and uses all 16
    levels of most blocks (asymmetric: a block's min and max are levels 0 and 15)."""
    models, _, _ = graphs
    by_name = {n.name + ".int4": n for n in models["fp16"].graph if n.op_type in ("MatMul", "Gemm")}
    for node in _nbits(models["int4"]):
        source = by_name[node.name]
        weight = source.inputs[1].const_value.numpy().astype(np.float32)
        weight = weight.T if source.op_type == "Gemm" else weight                      # Gemm(transB=1)
        scales = node.inputs[2].const_value.numpy().astype(np.float32)                # [N, blocks]
        step = np.repeat(scales.T, 32, axis=0)[:weight.shape[0]]                       # [K, N]
        err = np.abs(dequantized(node) - weight)
        assert (err <= 0.5 * step + 1e-3 * np.abs(weight) + 1e-6).all(), (node.name, float((err / step).max()))
        assert err.max() > 0.05 * step.max()                                           # it is quantized at all


def test_int4_graph_computes_with_its_4bit_weights(graphs):
    """The int4 graph's logits are the fp16 graph's with every projection's weight replaced by its unpacked 4-bit
    weight, up to rounding (0.005), while the 4-bit weights themselves move them ten times more than that: so
    MatMulNBits reads the blocks as dequantized() does, and nothing else in the graph changed."""
    models, _, feeds = graphs
    stand_in = ir.from_proto(ir.to_proto(models["fp16"]))
    weights = {n.name: dequantized(n) for n in _nbits(models["int4"])}
    for node in stand_in.graph:
        if node.name + ".int4" in weights:
            w = weights[node.name + ".int4"]
            w = w.T if node.op_type == "Gemm" else w
            node.inputs[1].const_value = ir.tensor(w.astype(np.float16), name=node.inputs[1].name)
    got, want = _logits(models["int4"], feeds, np.float16), _logits(stand_in, feeds, np.float16)
    gap, quantized = float(np.abs(got - want).max()), float(np.abs(got - _logits(models["fp16"], feeds, np.float16)).max())
    assert gap < 0.005 and quantized > 0.02, (gap, quantized)         # measured 0.0004-0.0005 and 0.055-0.071


def test_int4_logits_are_close_to_fp32(graphs):
    """Against the fp32 graph the gap is the 4-bit rounding's. A weight of this model (std 0.02) in a block of 32
    spans about 4.5 std, so a step is 0.3 std and the rounding error about 0.09 std a weight; through two layers and
    lm_head the logits move by about 0.1 of their spread (rms; measured 0.11-0.12, the fp16 graph 0.002). Bounds:
    0.2 of the spread rms, 0.5 at the worst logit (measured 0.30-0.39); a block laid out wrongly moves them by
    more than the spread itself."""
    models, _, feeds = graphs
    fp32, int4 = _logits(models["fp32"], feeds, np.float32), _logits(models["int4"], feeds, np.float16)
    spread = float(fp32.std())
    rms, worst = float(np.sqrt(((int4 - fp32) ** 2).mean())), float(np.abs(int4 - fp32).max())
    assert rms < 0.2 * spread and worst < 0.5 * spread, (rms, worst, spread)


def test_symmetric_blocks_have_no_zero_points(graphs):
    """Int4Config(symmetric=True): scales only, zero point 8 implied, the same products replaced."""
    models, reports, _ = graphs
    model = ir.from_proto(ir.to_proto(models["fp16"]))
    report = quantize_int4(Int4Config(symmetric=True, lm_head=False))(model)
    assert report.counts == {"projection": 8} and report.notes["lm_head (kept in fp16)"] == 1
    assert {len(n.inputs) for n in _nbits(model)} == {3}


def _on_grid(shape: tuple[int, int], bits: int, rng: np.random.Generator) -> np.ndarray:
    """A [K, N] weight as a GGUF stores it, blocks of 32 along K: Q4_1 (bits 4: min + step * q, q in 0..15, both
    ends used) or Q8_0 (bits 8: step * q, q in -127..127, |q| = 127 used), min and step in fp16 as ggml keeps
    them, and the weight in fp16 like the graph's copy."""
    k, n = shape
    blocks = (n, k // 32, 1)
    if bits == 4:
        low, step = (rng.normal(-0.05, 0.01, blocks).astype(np.float16).astype(np.float32),
                     rng.uniform(0.002, 0.01, blocks).astype(np.float16).astype(np.float32))
        q = rng.integers(0, 16, (n, k // 32, 32))
        q[..., 0], q[..., 1] = 0, 15
        w = low + step * q
    else:
        step = rng.uniform(0.0002, 0.001, blocks).astype(np.float16).astype(np.float32)
        q = rng.integers(-127, 128, (n, k // 32, 32))
        q[..., 0] = rng.choice([-127, 127], blocks[:2])
        w = step * q
    return w.reshape(n, k).T.astype(np.float16)


@pytest.mark.parametrize("repack", [True, False])
def test_weights_already_on_a_gguf_grid_are_repacked_not_rounded_again(graphs, repack):
    """Projections on a Q4_1 grid and an output table on a Q8_0 grid (what a GGUF source converts to) become
    MatMulNBits of their own levels (4-bit codes with zero point 0 plus the blocks' lows; for lm_head two 4-bit
    products, the 8-bit codes' nibbles), each weight back to its fp16 value within its fp16 rounding, and logits within rounding (0.005) of the fp16 graph with those weights. With
    repack=False ONNX Runtime's quantizer rounds them to its own grid and the logits move by more (measured
    0.001-0.0015 re-packed, 0.17-0.19 rounded again)."""
    models, _, feeds = graphs
    rng = np.random.default_rng(5)
    model = ir.from_proto(ir.to_proto(models["fp16"]))
    for node in model.graph:
        weight = node.inputs[1].const_value if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
        if weight is None or ".context" in node.metadata_props.get("pkg.torch.onnx.name_scopes", ""):
            continue
        shape = weight.shape.numpy()
        w = _on_grid(shape[::-1], 8, rng).T if node.op_type == "Gemm" else _on_grid(shape, 4, rng)
        node.inputs[1].const_value = ir.tensor(w, name=node.inputs[1].name)
    grid = ir.from_proto(ir.to_proto(model))
    report = quantize_int4(Int4Config(repack=repack))(model)
    if not repack:
        assert report.counts == {"lm_head": 1, "projection": 8}
    else:
        assert report.counts == {"lm_head (re-packed 8-bit grid)": 1, "projection (re-packed 4-bit grid)": 8}
        nodes = {n.name: n for n in model.graph}
        for source in grid.graph:
            if source.name + ".int4" not in nodes:
                continue
            weight = source.inputs[1].const_value.numpy().astype(np.float32)
            weight = weight.T if source.op_type == "Gemm" else weight                      # [K, N]
            parts = [n for name, n in nodes.items() if name.startswith(source.name + ".int4")]
            nbits = [n for n in parts if n.op_type == "MatMulNBits"]
            assert {n.attributes["bits"].value for n in nbits} == {4}
            if source.op_type == "Gemm":      # 8 bits as two 4-bit products: high nibble * 16 step + low nibble
                assert [n.op_type for n in parts] == ["MatMulNBits", "MatMulNBits", "Add"]
                unpacked = dequantized(nbits[0]) + dequantized(nbits[1])
            else:                             # codes * step, plus each block's low times the sum of x over it
                assert [n.op_type for n in parts] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
                low = model.graph.initializers[source.name + ".int4_low"].const_value.numpy().astype(np.float32)
                unpacked = dequantized(nbits[0]) + np.repeat(low, 32, axis=0)
            err = np.abs(unpacked - weight)
            # fp16 rounding: of the weight, and of the zero point (2^-11 of the block's min, bounded by its max |w|)
            block = np.repeat(np.abs(weight).reshape(-1, 32, weight.shape[1]).max(axis=1), 32, axis=0)
            assert (err <= 2.0 ** -9 * np.abs(weight) + 2.0 ** -10 * block).all(), (source.name, float(err.max()))
    gap = float(np.abs(_logits(model, feeds, np.float16) - _logits(grid, feeds, np.float16)).max())
    assert (gap < 0.005) if repack else (gap > 0.02), gap
