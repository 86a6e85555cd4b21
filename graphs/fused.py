"""The step graph for ONNX Runtime (`export --ops ort`): built node by node from the model's weights with
com.microsoft contrib operators, for the static cache layout (the portable graph of graphs/step.py stays the
TensorRT input and the default).

Per decoder layer (Nectar; `full` drops the heads and the merge, see below):

    SkipSimplifiedLayerNormalization          residual add + input norm (layer 0: see HALVES below)
    MatMul (q|k|v packed) [+ Add]             one product; the Add writes the constant channels (below)
    Split (q, k, v)                           [Qwen3: + SkipSimplifiedLayerNormalization of q and of k, per head]
    RotaryEmbedding (q), RotaryEmbedding (k)  the heads need the rotated q, so rotary runs outside the attention
    heads: MatMul, QuickGelu, MatMul,         all KV-heads of the layer in each batched product, no carried
           QuickGelu, MatMul, MatMul, Add     q/-q columns (the linear skip is its own product)
    Slice (the predicted lse) -> head_sink
    GroupQueryAttention                       in place on the static buffer (past and present share memory)
    Slice, Sub, Mul, Add                      the exact merge (below)
    MatMul (o), SkipSimplifiedLayerNormalization, MatMul (gate|up), Split, QuickGelu, Mul, MatMul (down)

Reshapes are not counted: ONNX Runtime runs them as views.

**The merge, and why it is exact.** GroupQueryAttention's `head_sink` input adds exp(sink_h) to head h's softmax
denominator. With the pair's predicted log-normalizer S as the sink, the operator returns
g = sum_j e^{z_j} v_j / (e^S + Z), Z = sum_j e^{z_j} over the exact and new tokens, which is the second term of
the Nectar merge exp(lse_new - lse) * out_new exactly (lse = logaddexp(S, lse_new)). The first term needs the
pair's weight w = e^S / (e^S + Z): every real token's value carries one extra channel fixed at 1 (the head size
is padded from D to D' = a multiple of 8 above D; keys and the real queries are 0 there, so no score changes, and
`scale` is given explicitly), so g's channel D is Z / (e^S + Z) = 1 - w, and o = g + (1 - g_D) * T(q). o_proj's
rows for the padded channels are zero. The alternative, one extra key slot whose score comes from
`attention_bias`, is exact for any batch and token count, but ONNX Runtime's CUDA GroupQueryAttention refuses
attention_bias ("attention_bias is not supported in GroupQueryAttention cuda kernel"), while head_sink runs in its
flash kernels (it is how gpt-oss's sinks run); under a CUDA graph, every input of the one-token step keeps its
address and shape, and the lengths GroupQueryAttention reads on the device (seqlens_k) are computed in the graph.

**head_sink is per head, not per query**: shape [num_heads], shared by every batch row and new token. The graph is
therefore exact only for one sequence and one new token per call, and says so: bundle.json records
`step_tokens: 1` and `max_batch: 1`; the runtime feeds a prompt one token at a time (exact: causal attention over
the tokens so far is the same whether they came in one call or several) and refuses a larger batch.

The constant channel also gives the heads their first bias: where no q norm sits between the product and the
rotary (Llama, Qwen2, Mistral), the packed product's Add writes 1 into q's channel D too, and the heads' first
layer reads its bias from that row. With Qwen3's q norm (which would normalize the 1 away) the heads add it.
Later biases ride on a carried constant column (CARRIER, as in graphs/step.py's JointPair): one column, not 2D.

Qwen3's q/k norm: GroupQueryAttention 1.32 takes q_norm_weight/k_norm_weight, but only the CUDA and WebGPU
providers honour them; here they are norm nodes over the padded head (weight scaled by sqrt(D/D') and epsilon by
D/D', so the padded zeros change nothing), exact on every provider.

HALVES: every norm is a SkipSimplifiedLayerNormalization (com.microsoft), never ONNX Runtime's
SimplifiedLayerNormalization, which it registers in the standard ONNX domain where onnx's checker (run on every
bundle) knows no such op. A norm without a residual takes x/2 as both its input and its skip: x/2 + x/2 = x exactly
(halving and doubling are exact in binary floating point), so the embedding table is stored halved (a tied lm_head
is then Gemm with alpha = 2) and Qwen3's q and k columns of the packed product are halved.

**Full attention** (`full`): no padding, no heads; GroupQueryAttention takes the packed q|k|v and does the rotary
itself (cos/sin caches, position_ids), over the whole context's KV in the static buffer. Any batch of one and
any token count (a prompt of T > 1 tokens with a past is ONNX Runtime's "subsequent prompt" case, which needs
batch 1).

Lengths: GroupQueryAttention's seqlens_k (device, [B] int32) is the last new token's slot, cache_position[-1];
total_sequence_length (a host scalar) is the buffer's slot count R, constant for a session, so a captured CUDA
graph never holds a stale length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from nectar_runtime.bundle import past_names, present_names
from nectar_runtime.heads import CARRIER, silu_carrier

CONTRIB = "com.microsoft"
OPSET = 20
IR_VERSION = 10
PAD_ALIGN = 8                      # head size of the fused Nectar KV: a multiple of this above D (kernels want 8)
DTYPES = {"fp32": (np.float32, ir.DataType.FLOAT), "fp16": (np.float16, ir.DataType.FLOAT16)}


def padded_head(dim: int) -> int:
    """D' >= D + 1, a multiple of PAD_ALIGN: room for the constant channel."""
    return -(-(dim + 1) // PAD_ALIGN) * PAD_ALIGN


@dataclass(frozen=True)
class Shape:
    """The numbers of the model the builder reads (from its Hugging Face config)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    scaling: float


class Builder:
    """A graph under construction: initializers, nodes and values in onnx_ir, named in order."""

    def __init__(self, dtype: str):
        self.np_dtype, self.ir_dtype = DTYPES[dtype]
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.scope = ""
        self._names: dict[str, int] = {}

    def _name(self, base: str) -> str:
        base = f"{self.scope}{base}"
        count = self._names.get(base, 0)
        self._names[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def const(self, name: str, array: np.ndarray, dtype: Any = None) -> ir.Value:
        """An initializer; float arrays are stored in the graph's float type unless `dtype` says otherwise."""
        array = np.asarray(array)
        if dtype is None:
            dtype = self.np_dtype if array.dtype.kind == "f" else array.dtype
        tensor = ir.tensor(np.ascontiguousarray(array.astype(dtype, copy=False)), name=self._name(name))
        value = ir.Value(name=tensor.name, const_value=tensor, shape=tensor.shape, type=ir.TensorType(tensor.dtype))
        self.initializers.append(value)
        return value

    def ints(self, name: str, values: Sequence[int]) -> ir.Value:
        return self.const(name, np.array(values, dtype=np.int64))

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], outputs: int = 1, domain: str = "",
           name: str | None = None, **attributes: Any) -> Any:
        """Append one node; returns its output (or the tuple of its outputs when outputs > 1)."""
        node = ir.node(op_type, list(inputs), attributes=attributes or None, domain=domain, num_outputs=outputs,
                       name=self._name(name or op_type))
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}/out{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else tuple(node.outputs)


def model_shape(config: Any, scaling: float) -> Shape:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads, kv_heads=kv_heads,
                 head_dim=head_dim, vocab=config.vocab_size, scaling=scaling)


def _np(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _eps(norm: Any) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def rotary_caches(rotary: Any, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [positions, D/2] of the model's rotary (its attention scaling included). The angles are rounded to
    float32 as transformers (and graphs/step.py's Rotary) compute them, position * inv_freq in float32: at position
    1e5 an angle's float32 rounding moves its cosine by ~4e-3, and the model was run with those angles."""
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    angles = (np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    return np.cos(angles) * scaling, np.sin(angles) * scaling


def pad_heads(weight: np.ndarray, heads: int, dim: int, padded: int) -> np.ndarray:
    """[in, heads * dim] columns -> [in, heads * padded], zeros in each head's channels dim.. padded - 1."""
    rows = weight.shape[0]
    out = np.zeros((rows, heads, padded), weight.dtype)
    out[:, :, :dim] = weight.reshape(rows, heads, dim)
    return out.reshape(rows, heads * padded)


def fused_heads(joint: Sequence[np.ndarray], dim: int, padded: int, bias_in_q: bool) -> dict[str, np.ndarray]:
    """One layer's heads for the fused graph from a pair's joint weights (MLPPair.joint_weights, float64):

        z1 = q~ A1 (+ B1)    a1 = silu(z1)    a2 = silu(a1 A2)    T^ = a2 A3 + q~ K

    with q~ [.., D'] the rotated query and its constant channel D (1 when bias_in_q, else 0 and B1 adds the bias),
    a carried constant column at index h (CARRIER before each activation) for the later biases, and T^ [.., D']
    = [out_1 .. out_D, lse, 0 ..]: the target in the attention's channels, the score where the constant sits."""
    w1, b1, w2, b2, w3, b3 = (np.asarray(t, dtype=np.float64) for t in joint)
    heads, hidden = w1.shape[0], w2.shape[1]
    width = -(-(hidden + 1) // 16) * 16
    c = silu_carrier()
    a1 = np.zeros((heads, padded, width))
    a1[:, :dim, :hidden] = w1[..., :hidden]
    bias1 = np.zeros((heads, 1, width))
    bias1[..., :hidden], bias1[..., hidden] = b1[..., :hidden], CARRIER
    if bias_in_q:
        a1[:, dim:dim + 1] = bias1
    a2 = np.zeros((heads, width, width))
    a2[:, :hidden, :hidden] = w2
    a2[:, hidden, :hidden] = b2[:, 0] / c
    a2[:, hidden, hidden] = CARRIER / c
    skip_w, skip_b = w1[..., hidden:], b1[..., hidden:]                  # [H, D, 1 + D] and [H, 1, 1 + D]: [lse, out]
    order = np.r_[np.arange(1, dim + 1), 0]                               # [out, lse]
    a3 = np.zeros((heads, width, padded))
    a3[:, :hidden, :dim + 1] = w3[..., order]
    a3[:, hidden, :dim + 1] = (b3[:, 0] + skip_b[:, 0])[..., order] / c
    skip = np.zeros((heads, padded, padded))
    skip[:, :dim, :dim + 1] = skip_w[..., order]
    out = {"a1": a1, "a2": a2, "a3": a3, "skip": skip}
    if not bias_in_q:
        out["b1"] = bias1
    return out


class FusedStep:
    """Builds the fused static-cache step graph of a Hugging Face decoder (see the module docstring)."""

    def __init__(self, hf_model: Any, joint: Sequence[Sequence[np.ndarray]] | None, precision: str, positions: int):
        self.model, self.joint, self.precision = hf_model, joint, precision
        body = hf_model.model
        self.shape = model_shape(hf_model.config, float(body.layers[0].self_attn.scaling))
        self.nectar = joint is not None
        self.dim = self.shape.head_dim
        self.padded = padded_head(self.dim) if self.nectar else self.dim
        self.qk_norm = getattr(body.layers[0].self_attn, "q_norm", None) is not None
        self.g = Builder(precision)
        self.positions = positions

    # -- graph I/O -----------------------------------------------------------------------------

    def _inputs(self) -> tuple[list[ir.Value], list[ir.Value]]:
        s, kv = self.shape, self.g.ir_dtype
        def value(name: str, dtype: ir.DataType, dims: list) -> ir.Value:
            return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
        ids = value("input_ids", ir.DataType.INT64, ["batch", "sequence"])
        pos = value("position_ids", ir.DataType.INT64, ["batch", "sequence"])
        slots = value("cache_position", ir.DataType.INT64, ["sequence"])
        past = [value(name, kv, ["batch", s.kv_heads, "cache_slots", self.padded]) for name in past_names(s.layers)]
        return [ids, pos, slots, *past], past

    def build(self) -> ir.Model:
        g, s = self.g, self.shape
        inputs, past = self._inputs()
        ids, positions, slots = inputs[:3]
        body = self.model.model
        cos, sin = rotary_caches(body.rotary_emb, self.positions)
        g.scope = "rotary."
        cos_cache, sin_cache = g.const("cos", cos), g.const("sin", sin)
        lengths = self._lengths(ids, slots, past[0])
        g.scope = "embed."
        table = g.const("half_weight", _np(body.embed_tokens.weight) / 2)           # HALVES (module docstring)
        half = g.op("Gather", [table, ids])                                          # [B, T, hidden] / 2
        h, mlp_out, presents = half, half, []
        for i, layer in enumerate(body.layers):
            g.scope = f"layers.{i}."
            x, h = self._skip_norm(mlp_out, h, layer.input_layernorm, "input_norm")
            attn, key, value = self._attention(i, layer.self_attn, x, positions, past[2 * i], past[2 * i + 1],
                                               lengths, cos_cache, sin_cache)
            presents += [key, value]
            x, h = self._skip_norm(attn, h, layer.post_attention_layernorm, "post_norm")
            mlp_out = self._mlp(layer.mlp, x)
        g.scope = "final."
        x, _ = self._skip_norm(mlp_out, h, body.norm, "norm")
        last = g.op("Gather", [x, g.ints("last", [-1])], axis=1)                       # [B, 1, hidden]
        flat = g.op("Reshape", [last, g.ints("rows", [-1, s.hidden])])
        if self.model.lm_head.weight is body.embed_tokens.weight:          # tied: the halved table, times 2
            logits = g.op("Gemm", [flat, table], transB=1, alpha=2.0)
        else:
            logits = g.op("Gemm", [flat, g.const("lm_head", _np(self.model.lm_head.weight))], transB=1)
        if self.precision != "fp32":
            logits = g.op("Cast", [logits], to=ir.DataType.FLOAT)
        logits = g.op("Reshape", [logits, g.ints("logit_shape", [-1, 1, s.vocab])])
        return self._model(inputs, logits, presents)

    def _model(self, inputs: list[ir.Value], logits: ir.Value, presents: list[ir.Value]) -> ir.Model:
        s = self.shape
        logits.name, logits.type = "logits", ir.TensorType(ir.DataType.FLOAT)
        logits.shape = ir.Shape(["batch", 1, s.vocab])
        for value, name in zip(presents, present_names(s.layers)):
            value.name, value.type = name, ir.TensorType(self.g.ir_dtype)
            value.shape = ir.Shape(["batch", s.kv_heads, "cache_slots", self.padded])
        graph = ir.Graph(inputs, [logits, *presents], nodes=self.g.nodes, initializers=self.g.initializers,
                         opset_imports={"": OPSET, CONTRIB: 1}, name="nectar_fused_step")
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="nectar-export")

    # -- pieces --------------------------------------------------------------------------------

    def _lengths(self, ids: ir.Value, slots: ir.Value, past_key: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k [B] int32 on the device: the last new token's slot; total_sequence_length: the slot count)."""
        g = self.g
        g.scope = "lengths."
        last = g.op("Gather", [slots, g.ints("last", [-1])], axis=0)               # [1]
        batch = g.op("Shape", [ids], start=0, end=1)
        seqlens = g.op("Cast", [g.op("Expand", [last, batch])], to=ir.DataType.INT32)
        capacity = g.op("Shape", [past_key], start=2, end=3)
        total = g.op("Cast", [g.op("Squeeze", [capacity])], to=ir.DataType.INT32)
        return seqlens, total

    def _skip_norm(self, x: ir.Value, residual: ir.Value, norm: Any, name: str) -> tuple[ir.Value, ir.Value]:
        """(norm(x + residual), x + residual) in one SkipSimplifiedLayerNormalization."""
        g = self.g
        out = g.op("SkipSimplifiedLayerNormalization", [x, residual, g.const(name, _np(norm.weight))], outputs=4,
                   domain=CONTRIB, epsilon=_eps(norm))
        return out[0], out[3]

    def _mlp(self, mlp: Any, x: ir.Value) -> ir.Value:
        g = self.g
        inter = mlp.gate_proj.weight.shape[0]
        gate_up = np.concatenate([_np(mlp.gate_proj.weight).T, _np(mlp.up_proj.weight).T], axis=1)
        both = g.op("MatMul", [x, g.const("gate_up", gate_up)])
        gate, up = g.op("Split", [both, g.ints("halves", [inter, inter])], outputs=2, axis=-1)
        act = g.op("Mul", [g.op("QuickGelu", [gate], domain=CONTRIB, alpha=1.0), up])   # silu(gate) * up
        return g.op("MatMul", [act, g.const("down", _np(mlp.down_proj.weight).T)])

    def _qkv_weights(self, attn: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """The packed [hidden, (Hq + 2 Hkv) D'] weight and the bias added after it (None when it is all zeros)."""
        s, d, p = self.shape, self.dim, self.padded
        parts, biases = [], []
        for proj, heads, normed in ((attn.q_proj, s.heads, self.qk_norm), (attn.k_proj, s.kv_heads, self.qk_norm),
                                    (attn.v_proj, s.kv_heads, False)):
            scale = 0.5 if normed else 1.0                        # a normed q or k comes out halved (HALVES)
            parts.append(pad_heads(_np(proj.weight).T, heads, d, p) * scale)
            bias = _np(proj.bias) if getattr(proj, "bias", None) is not None else np.zeros(heads * d, np.float32)
            biases.append(pad_heads(bias[None], heads, d, p)[0].reshape(heads, p) * scale)
        if self.nectar:
            biases[2][:, d] = 1.0                                   # every real token's value: channel D is 1
            if not self.qk_norm:
                biases[0][:, d] = 1.0                               # q~'s constant: the heads' first bias
        bias = np.concatenate([b.reshape(-1) for b in biases])
        return np.concatenate(parts, axis=1), (bias if bias.any() else None)

    def _qk_norm(self, half: ir.Value, norm: Any, heads: int, name: str) -> ir.Value:
        """Qwen3's per-head RMS norm of q (or k) from its half (HALVES), over the padded head: weight * sqrt(D/D'),
        epsilon * D/D' (module docstring)."""
        g, d, p = self.g, self.dim, self.padded
        weight = np.zeros(p, np.float32)
        weight[:d] = _np(norm.weight) * math.sqrt(d / p)
        per_head = g.op("Reshape", [half, g.ints(f"{name}_heads", [0, -1, p])])            # [B, T * heads, D']
        normed = g.op("SkipSimplifiedLayerNormalization", [per_head, per_head, g.const(name, weight)], domain=CONTRIB,
                      epsilon=_eps(norm) * d / p)
        return g.op("Reshape", [normed, g.ints(f"{name}_flat", [0, -1, heads * p])])

    def _attention(self, i: int, attn: Any, x: ir.Value, positions: ir.Value, past_k: ir.Value, past_v: ir.Value,
                   lengths: tuple[ir.Value, ir.Value], cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ...]:
        g, s, d, p = self.g, self.shape, self.dim, self.padded
        weight, bias = self._qkv_weights(attn)
        qkv = g.op("MatMul", [x, g.const("qkv", weight)])
        if bias is not None:
            qkv = g.op("Add", [qkv, g.const("qkv_bias", bias)])
        gqa = dict(domain=CONTRIB, num_heads=s.heads, kv_num_heads=s.kv_heads, scale=s.scaling)
        seqlens, total = lengths
        o_weight = pad_heads(_np(attn.o_proj.weight), s.heads, d, p).T        # zero rows for the padded channels
        if not self.nectar and not self.qk_norm:                # rotary inside the attention, packed q|k|v
            out, key, value = g.op("GroupQueryAttention", [qkv, None, None, past_k, past_v, seqlens, total, cos, sin,
                                                           positions], outputs=3, do_rotary=1, **gqa)
            return g.op("MatMul", [out, g.const("o_proj", o_weight)]), key, value
        sizes = g.ints("qkv_sizes", [s.heads * p, s.kv_heads * p, s.kv_heads * p])
        q, k, v = g.op("Split", [qkv, sizes], outputs=3, axis=-1)
        if self.qk_norm:
            q = self._qk_norm(q, attn.q_norm, s.heads, "q_norm")
            k = self._qk_norm(k, attn.k_norm, s.kv_heads, "k_norm")
        if not self.nectar:
            out, key, value = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos, sin,
                                                           positions], outputs=3, do_rotary=1, **gqa)
            return g.op("MatMul", [out, g.const("o_proj", o_weight)]), key, value
        rope = dict(domain=CONTRIB, interleaved=0, rotary_embedding_dim=d)
        q = g.op("RotaryEmbedding", [q, positions, cos, sin], num_heads=s.heads, **rope)
        k = g.op("RotaryEmbedding", [k, positions, cos, sin], num_heads=s.kv_heads, **rope)
        target = self._heads(i, q)                                            # [B, T, Hkv, G, D']: [out, lse, 0..]
        sink = g.op("Reshape", [g.op("Slice", [target, g.ints("lse_at", [d]), g.ints("lse_end", [d + 1]),
                                               g.ints("last_axis", [-1])]), g.ints("per_head", [s.heads])])
        out, key, value = g.op("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, None, None, None,
                                                       None, sink], outputs=3, **gqa)
        merged = self._merge(out, target)
        return g.op("MatMul", [merged, g.const("o_proj", o_weight)]), key, value

    def _heads(self, i: int, q: ir.Value) -> ir.Value:
        """The layer's pair on the rotated q [B, T, Hq D'] -> T^ [B, T, Hkv, G, D'] (fused_heads)."""
        g, s, p = self.g, self.shape, self.padded
        w = fused_heads(self.joint[i], self.dim, p, bias_in_q=not self.qk_norm)
        g.scope = f"layers.{i}.heads."
        x = g.op("Reshape", [q, g.ints("grouped", [0, 0, s.kv_heads, s.heads // s.kv_heads, p])])
        z = g.op("MatMul", [x, g.const("a1", w["a1"])])
        if "b1" in w:
            z = g.op("Add", [z, g.const("b1", w["b1"])])
        a = g.op("QuickGelu", [z], domain=CONTRIB, alpha=1.0)
        a = g.op("QuickGelu", [g.op("MatMul", [a, g.const("a2", w["a2"])])], domain=CONTRIB, alpha=1.0)
        target = g.op("Add", [g.op("MatMul", [a, g.const("a3", w["a3"])]), g.op("MatMul", [x, g.const("skip", w["skip"])])])
        g.scope = f"layers.{i}."
        return target

    def _merge(self, out: ir.Value, target: ir.Value) -> ir.Value:
        """o = g + (1 - g_D) T^ per query head, back to [B, T, Hq D'] (module docstring)."""
        g, s, d, p = self.g, self.shape, self.dim, self.padded
        grouped = g.op("Reshape", [out, g.ints("grouped", [0, 0, s.kv_heads, s.heads // s.kv_heads, p])])
        rest = g.op("Slice", [grouped, g.ints("one_at", [d]), g.ints("one_end", [d + 1]), g.ints("last_axis", [-1])])
        weight = g.op("Sub", [g.const("one", np.ones(1)), rest])                     # the pair's share w
        merged = g.op("Add", [grouped, g.op("Mul", [weight, target])])
        return g.op("Reshape", [merged, g.ints("flat", [0, 0, s.heads * p])])


def build_fused_step(hf_model: Any, pairs: Sequence[Any] | None, precision: str, positions: int) -> ir.Model:
    """The fused static-cache step graph of `hf_model` (Nectar with `pairs`' joint weights, full attention without)
    in `precision` ("fp32" or "fp16"), with rotary caches for positions 0 .. positions - 1 and up to the next multiple
    of SLOT_ALIGN: GroupQueryAttention wants at least total_sequence_length rows, the buffer's slot count, which the
    runtime rounds up to that multiple (nectar_runtime.backends.base.kv_capacity)."""
    import torch

    from nectar_runtime.backends.base import SLOT_ALIGN

    positions = -(-positions // SLOT_ALIGN) * SLOT_ALIGN

    joint = None
    if pairs is not None:
        with torch.no_grad():
            joint = [[t.detach().double().cpu().numpy() for t in p.joint_weights()] for p in pairs]
    return FusedStep(hf_model, joint, precision, positions).build()


def pad_context_kv(keys: np.ndarray, values: np.ndarray, padded: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact tokens' KV [.., D] -> [.., D'] in the fused Nectar layout: keys 0 and values 1 in channel D, 0 after."""
    dim = keys.shape[-1]
    pad = [(0, 0)] * (keys.ndim - 1) + [(0, padded - dim)]
    k, v = np.pad(keys, pad), np.pad(values, pad)
    v[..., dim] = 1
    return k, v


def layer_node_counts(model: ir.Model) -> dict[int, dict[str, int]]:
    """Per decoder layer, op type -> count of nodes (Reshape excluded: a view), read from the node names."""
    counts: dict[int, dict[str, int]] = {}
    for node in model.graph:
        name = node.name or ""
        if not name.startswith("layers.") or node.op_type == "Reshape":
            continue
        layer = int(name.split(".")[1])
        counts.setdefault(layer, {})
        counts[layer][node.op_type] = counts[layer].get(node.op_type, 0) + 1
    return counts
