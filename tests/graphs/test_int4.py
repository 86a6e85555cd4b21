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
    documentation lays them out: B [N, blocks, block/2] bytes, element 2i in the low nibble; scales [N, blocks];
    zero points [N, ceil(blocks/2)] packed the same way (8 when absent)."""
    a = {name: attr.value for name, attr in node.attributes.items()}
    packed, scales = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy().astype(np.float32)
    n, blocks, _ = packed.shape
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, a["block_size"]).astype(np.float32)
    if len(node.inputs) > 3:
        zp = node.inputs[3].const_value.numpy()
        zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zero = np.full((n, blocks), 8.0, np.float32)
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
