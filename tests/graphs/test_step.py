"""graphs/step.py: the step graph's building blocks against their plain definitions, and the graph properties
the CUDA provider depends on (checked on exported graphs, since no GPU runs here).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from nectar_export.heads import MLPPair
from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, run_pipeline
from nectar_graphs.step import WIDTH_ALIGN, JointPair, Rotary


def test_joint_pair_computes_the_pair():
    """Standardization folded into layer 1, both networks side by side: the same (lse, out) as MLPPair."""
    g = torch.Generator().manual_seed(0)
    pair = MLPPair(3, 16, 24, 8)
    for p in pair.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    pair.q_mean.copy_(torch.randn(pair.q_mean.shape, generator=g))
    pair.q_scale.copy_(torch.rand(pair.q_scale.shape, generator=g) + 0.5)
    q = torch.randn(3, 7, 16, generator=g) * 2
    with torch.no_grad():
        lse, out = pair(q, 0.25)
        joint = JointPair(*pair.joint_weights())(q)
    assert joint.shape == (3, 7, 32)                              # 1 + 16 columns, padded to WIDTH_ALIGN
    torch.testing.assert_close(joint[..., 0], lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(joint[..., 1:17], out, rtol=0, atol=1e-5)
    assert not joint[..., 17:].any()
    assert all(w.shape[-1] % WIDTH_ALIGN == 0 for w in JointPair(*pair.joint_weights()).buffers())


def test_rotary_matrix_is_rotate_half_rotary():
    """x @ Rotary(positions) equals x cos + rotate_half(x) sin, attention scaling included, at large positions."""
    from transformers.models.llama.modeling_llama import rotate_half

    dim, scaling = 16, 0.9
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    positions = torch.tensor([[0, 7, 131071]])
    x = torch.randn(1, 3, 4, dim)                                     # [B, T, H, D]
    angles = positions.unsqueeze(-1).float() * inv_freq
    angles = torch.cat([angles, angles], -1).unsqueeze(2)             # [B, T, 1, D]
    expected = (x * angles.cos() + rotate_half(x) * angles.sin()) * scaling
    torch.testing.assert_close(x @ Rotary(inv_freq, scaling)(positions), expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def fp16_graphs(static_traces):
    """fp16 Nectar and full-attention step graphs (static layout) of a tiny model, as ONNX protos."""
    arch, _, _, traced = static_traces
    out = {}
    for kind in ("nectar", "full"):
        graph = ir.from_proto(onnx.load_model_from_string(traced[kind]))
        run_pipeline(graph, [fold_constants, convert_precision("fp16"), fuse_sibling_matmuls, cleanup])
        out[kind] = onnx.shape_inference.infer_shapes(ir.to_proto(graph))
    return arch, out


def _shapes(proto: onnx.ModelProto) -> dict[str, list]:
    values = [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    shapes.update({t.name: list(t.dims) for t in proto.graph.initializer})
    return shapes


def test_every_matmul_is_one_strided_gemm_in_a_decode_step(fp16_graphs):
    """ONNX Runtime's CUDA MatMul runs a product as one strided batched GEMM only when the right operand is 2-D
    or both operands hold as many matrices (`CanUseStridedBatchedGemm` in cuda/math/matmul.cc); otherwise it
    copies pointer arrays from the host at every run. Checked for a one-token step of batch 1, the step a
    CUDA graph replays."""
    arch, graphs = fp16_graphs
    step = {"batch": 1, "sequence": 1}

    def matrices(dims: list) -> int:
        sizes = [step.get(d, d) for d in dims]
        assert all(isinstance(d, int) for d in sizes), dims       # no other symbolic size among batch dims
        return int(np.prod(sizes))

    for kind, proto in graphs.items():
        shapes = _shapes(proto)
        products = [n for n in proto.graph.node if n.op_type == "MatMul"]
        assert len(products) > 4
        for node in products:
            left, right = shapes[node.input[0]], shapes[node.input[1]]
            assert len(left) >= 3, (arch, kind, node.name, left)
            assert len(right) == 2 or matrices(left[:-2]) == matrices(right[:-2]), (arch, kind, node.name, left, right)


def test_norms_take_the_form_the_cuda_provider_fuses(fp16_graphs):
    """Each RMS norm: Cast(fp32) -> Pow -> ReduceMean -> Add -> Sqrt -> Div -> Cast(fp16) -> Mul(1-D fp16 weight),
    which SimplifiedLayerNormFusion turns into one fp16-in, fp16-out kernel on CUDA."""
    arch, graphs = fp16_graphs
    proto = graphs["nectar"]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {t.name: t for t in proto.graph.initializer}
    divs = [n for n in proto.graph.node if n.op_type == "Div"]
    layers = len([i for i in proto.graph.input if i.name.endswith(".key")])
    assert len(divs) == layers * (4 if arch == "qwen3" else 2) + 1
    for div in divs:
        [cast] = consumers[div.output[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT16
        [mul] = consumers[cast.output[0]]
        weight = weights[next(name for name in mul.input if name in weights)]
        assert mul.op_type == "Mul" and len(weight.dims) == 1 and weight.data_type == onnx.TensorProto.FLOAT16


def test_the_pair_joins_the_softmax(fp16_graphs):
    """One Softmax per layer and no log-sum-exp nodes in either graph; the attention runs in fp16."""
    _, graphs = fp16_graphs
    for kind, proto in graphs.items():
        ops = [n.op_type for n in proto.graph.node]
        layers = len([i for i in proto.graph.input if i.name.endswith(".key")])
        assert ops.count("Softmax") == layers, kind
        assert not {"Log", "Exp", "ReduceMax", "ReduceLogSumExp"} & set(ops), kind
