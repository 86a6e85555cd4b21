"""The traceable decoder step: new tokens in, logits and the new tokens' keys/values out.

One plain module for every supported architecture (Llama, Mistral, Qwen2, Qwen3). It reuses the
Hugging Face model's own weights and submodules (projections, norms, MLP) and writes out only what
the export needs to control: rotary embedding from the model's inverse frequencies, the masks, the
norms' form, and attention with the fitted pair merged exactly.

- Nectar step: per layer, the fitted pair (target and score networks) stands in for the modeled
  context; the exact tokens (sinks, window) are constants; the past is the earlier *new* tokens.
  Everything meets in one softmax: the pair enters it as one more key whose score is its predicted
  log-normalizer and whose value is its predicted output, beside the exact tokens' and the new tokens'
  real keys. That is the exact Nectar merge (the pair's share of the joint mass is
  exp(lse) / (exp(lse) + sum exp(scores))), written as a softmax and one product, with no separate
  log-sum-exp or merge nodes.
- Full step: no pair and no constants; the past holds the context's real KV too (the baseline).

Two cache layouts:
- dynamic (default): the past is [B, Hkv, P, D] and grows; presents are past + new, concatenated.
- static: the past is a fixed buffer of R slots [B, Hkv, R, D]; the new tokens' keys and values are
  scattered into slots `cache_position` [T] and the present is the whole buffer. Every shape of a
  decode step is then the same at every step, and a runtime may bind the present to the past's own
  memory (ONNX Runtime's ScatterElements skips its copy when input and output share memory): no KV
  copy per step and a step that CUDA graphs can capture. A slot s is visible to new token t when
  s <= cache_position[t] (slots fill in order; full bundles keep the context in slots [0, n)).
  Slots not yet written must hold finite numbers (a runtime zero-fills its buffers): a masked slot's
  weight is exactly 0, but 0 * NaN is NaN.

Shapes: B batch, T new tokens this step, P past tokens, Hq query heads, Hkv KV heads, G = Hq/Hkv,
D head dim, E exact context tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


# a fitted pair: any module mapping q [Hkv, N, D] and the softmax scale to (lse [Hkv, N], out [Hkv, N, D]);
# nectar_export.heads defines them (this package does not import it: dependencies point the other way)
Pair = nn.Module
# finite "minus infinity" in fp32, fp16 and bf16 alike: exp underflows to 0 and no row ever gives NaN
MASKED = -6.0e4


class Rotary(nn.Module):
    """Each position's rotary embedding as one [D, D] matrix, [B, T, D, D], computed in fp32 (positions reach 1e5).

    Rotate-half rotary is x * cos + turn(x) * sin with turn a signed permutation, so it is x @ (I cos + P sin):
    one batched MatMul per projection instead of the slice/negate/concat/multiply/add chain, and in a
    low-precision graph each output is rounded once (fp32 accumulation) instead of after every op."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().float().clone())
        self.scaling = scaling
        dim = 2 * inv_freq.numel()
        half = torch.arange(dim // 2)
        turn = torch.zeros(dim, dim)
        turn[half + dim // 2, half] = -1.0          # out[i] gets -x[i + D/2] sin[i] for i < D/2
        turn[half, half + dim // 2] = 1.0           # and x[i - D/2] sin[i] for i >= D/2
        self.register_buffer("eye", torch.eye(dim))
        self.register_buffer("turn", turn)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq                # [B, T, D/2]
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(-2)                  # [B, T, 1, D]
        return (self.eye * angles.cos() + self.turn * angles.sin()) * self.scaling


class Normalize(nn.Module):
    """x / sqrt(mean(x^2) + eps) in fp32, back in x's type: the part of an RMS norm that stays fp32."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """The model's RMS norm (its weight and epsilon): Normalize in fp32, then the weight in the graph's type,
    the order transformers uses.

    Transformers writes x * rsqrt(...), which exports as Sqrt -> Reciprocal -> Mul; ONNX Runtime's
    SimplifiedLayerNormFusion matches this Sqrt -> Div form and replaces the nodes with one. In an fp16
    graph the pattern is Cast -> ... -> Div -> Cast -> Mul(fp16 weight), which the CUDA provider fuses
    into one fp16-in, fp16-out kernel (casts included)."""

    def __init__(self, hf_norm: nn.Module):
        super().__init__()
        self.weight = hf_norm.weight
        self.normalize = Normalize(float(getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", 1e-6))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * self.normalize(x)


def rms_norm(hf_norm: nn.Module | None) -> RMSNorm | None:
    return RMSNorm(hf_norm) if hf_norm is not None else None


class JointPair(nn.Module):
    """An MLP pair's score and target networks run as one network of three batched products.

    From `MLPPair.joint_weights()`: the input standardization folded into the first layer, both first
    layers and both linear skips side by side in one product, the second and third layers block-diagonal.
    The output row per query is [lse, out_1 .. out_D]."""

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 w3: torch.Tensor, b3: torch.Tensor):
        super().__init__()
        for name, t in zip(("w1", "b1", "w2", "b2", "w3", "b3"), (w1, b1, w2, b2, w3, b3)):
            self.register_buffer(name, t.detach().clone())
        self.hidden = w2.shape[-1]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q [Hkv, N, D] -> [Hkv, N, 1 + D]."""
        hidden, skip = torch.baddbmm(self.b1, q, self.w1).split([self.hidden, self.w1.shape[-1] - self.hidden], -1)
        h = F.silu(torch.baddbmm(self.b2, F.silu(hidden), self.w2))
        return torch.baddbmm(self.b3, h, self.w3) + skip


class NectarHeads(nn.Module):
    """One layer's context stand-in: the fitted pair, and the exact tokens' real KV (attended beside the new
    tokens' by Attention)."""

    def __init__(self, pair: Pair, exact_keys: torch.Tensor, exact_values: torch.Tensor):
        super().__init__()
        self.pair = pair
        self.register_buffer("exact_keys", exact_keys.unsqueeze(0).clone())       # [1, Hkv, E, D]
        self.register_buffer("exact_values", exact_values.unsqueeze(0).clone())   # [1, Hkv, E, D]

    @property
    def exact_tokens(self) -> int:
        return self.exact_keys.shape[2]

    def forward(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hkv, G, T, D] -> the pair's partial over the modeled context (lse [B, Hkv, G, T, 1], out [..., D])."""
        B, Hkv, G, T, D = q.shape
        flat = q.permute(1, 0, 2, 3, 4).reshape(Hkv, B * G * T, D)
        if isinstance(self.pair, JointPair):
            joint = self.pair(flat).reshape(Hkv, B, G, T, D + 1).permute(1, 0, 2, 3, 4)
            lse, out = joint.split([1, D], -1)
            return lse, out
        lse, out = self.pair(flat, scaling)                                        # [Hkv, N], [Hkv, N, D]
        return lse.reshape(Hkv, B, G, T, 1).permute(1, 0, 2, 3, 4), out.reshape(Hkv, B, G, T, D).permute(1, 0, 2, 3, 4)


class Attention(nn.Module):
    """Grouped-query attention of the new tokens, merged with a context partial when there is one."""

    def __init__(self, hf_attention: nn.Module, heads: int, kv_heads: int, head_dim: int,
                 context: NectarHeads | None):
        super().__init__()
        self.q_proj, self.k_proj = hf_attention.q_proj, hf_attention.k_proj
        self.v_proj, self.o_proj = hf_attention.v_proj, hf_attention.o_proj
        self.q_norm = rms_norm(getattr(hf_attention, "q_norm", None))     # Qwen3 normalizes q and k per head
        self.k_norm = rms_norm(getattr(hf_attention, "k_norm", None))
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scaling = float(hf_attention.scaling)
        self.context = context

    def _project(self, proj: nn.Module, norm: nn.Module | None, x: torch.Tensor, heads: int,
                 rotation: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        y = proj(x).view(B, T, heads, self.head_dim)
        if norm is not None:
            y = norm(y)
        if rotation is not None:
            y = y @ rotation                                                     # [B, T, H, D] @ [B, T, D, D]
        return y.transpose(1, 2)                                                 # [B, H, T, D]

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                keep: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self._project(self.q_proj, self.q_norm, x, self.heads, rotation)
        k = self._project(self.k_proj, self.k_norm, x, self.kv_heads, rotation)
        v = self._project(self.v_proj, None, x, self.kv_heads)
        if slots is None:
            keys = torch.cat([past_k, k], dim=2)                                  # [B, Hkv, P+T, D]
            values = torch.cat([past_v, v], dim=2)
        else:                                                                     # static: [B, Hkv, R, D]
            index = slots.view(1, 1, T, 1).expand(B, self.kv_heads, T, self.head_dim)
            keys = past_k.scatter(2, index, k)
            values = past_v.scatter(2, index, v)
        G = self.heads // self.kv_heads
        qg = q.view(B, self.kv_heads, G, T, self.head_dim)                        # [B, Hkv, G, T, D]
        seen_k, seen_v = keys, values
        if self.context is not None and self.context.exact_tokens:                # exact tokens first, always seen
            seen_k = torch.cat([self.context.exact_keys.expand(B, -1, -1, -1), keys], dim=2)
            seen_v = torch.cat([self.context.exact_values.expand(B, -1, -1, -1), values], dim=2)
        S = seen_k.shape[2]
        # a group's G query heads are rows of one product with its KV head: [B, Hkv, G*T, D] @ [B, Hkv, D, S].
        # Both operands then have the same batch dims, which ONNX Runtime's CUDA MatMul runs as one strided
        # batched GEMM; broadcasting the KV over G instead makes it build per-matrix pointer arrays on the
        # host and copy them to the device at every run (no place for that in a captured CUDA graph).
        scores = (q.reshape(B, self.kv_heads, G * T, self.head_dim) @ seen_k.transpose(-1, -2)) * self.scaling
        scores = scores.view(B, self.kv_heads, G, T, S).masked_fill(~keep.unsqueeze(2), MASKED)
        if self.context is None:
            probs = torch.softmax(scores, dim=-1)
        else:                                                                      # the pair: one more key
            pair_lse, pair_out = self.context(qg, self.scaling)
            pair_share, probs = torch.softmax(torch.cat([pair_lse, scores], dim=-1), dim=-1).split([1, S], -1)
        out = (probs.reshape(B, self.kv_heads, G * T, S) @ seen_v).view(B, self.kv_heads, G, T, self.head_dim)
        if self.context is not None:
            out = pair_share * pair_out + out
        out = out.reshape(B, self.heads, T, self.head_dim).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(out), keys, values


class Layer(nn.Module):
    def __init__(self, hf_layer: nn.Module, attention: Attention):
        super().__init__()
        self.input_layernorm = RMSNorm(hf_layer.input_layernorm)
        self.post_attention_layernorm = RMSNorm(hf_layer.post_attention_layernorm)
        self.mlp = hf_layer.mlp
        self.self_attn = attention

    def forward(self, h: torch.Tensor, rotation: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                keep: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, keys, values = self.self_attn(self.input_layernorm(h), rotation, past_k, past_v, keep, slots)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), keys, values


class StepModule(nn.Module):
    """forward(input_ids, position_ids, attention_mask, *past) -> (logits, *present).

    input_ids, position_ids: [B, T] int64; attention_mask: [B, P+T] int64 (1 = real token) over the
    past and the new tokens; past: key_0, value_0, key_1, ... each [B, Hkv, P, D]. Outputs logits
    [B, 1, V] (or [B, T, V] with all_logits) in fp32 and the presents [B, Hkv, P+T, D].

    static=True: forward(input_ids, position_ids, cache_position, *past) with cache_position [T] int64,
    the slots the new tokens fill, and past and presents [B, Hkv, R, D] (see the module docstring).
    """

    def __init__(self, hf_model: nn.Module, contexts: Sequence[NectarHeads | None] | None = None,
                 all_logits: bool = False, static: bool = False):
        super().__init__()
        config = hf_model.config
        body = hf_model.model
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        contexts = list(contexts) if contexts is not None else [None] * len(body.layers)
        self.embed_tokens, self.norm, self.lm_head = body.embed_tokens, RMSNorm(body.norm), hf_model.lm_head
        self.layers = nn.ModuleList(
            Layer(layer, Attention(layer.self_attn, heads, kv_heads, head_dim, ctx))
            for layer, ctx in zip(body.layers, contexts))
        rotary = body.rotary_emb
        self.rotary = Rotary(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        self.all_logits, self.static = all_logits, static
        sizes = {c.exact_tokens for c in contexts if c is not None}
        if len(sizes) > 1:
            raise ValueError(f"every layer must keep the same number of exact tokens, got {sorted(sizes)}")
        self.exact_tokens = sizes.pop() if sizes else 0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask_or_slots: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embed_tokens(input_ids)                                          # [B, T, hidden]
        T = input_ids.shape[1]
        rotation = self.rotary(position_ids).to(h.dtype)                           # [B, T, D, D]
        if self.static:
            slots = mask_or_slots
            keep = slot_keep(slots, past[0].shape[2])                             # [1, 1, T, R]
        else:
            slots, keep = None, causal_keep(mask_or_slots, T)                     # [B, 1, T, P+T]
        if self.exact_tokens:                                                     # the exact tokens: always seen
            seen = torch.ones_like(keep[..., :1]).expand(*keep.shape[:-1], self.exact_tokens)
            keep = torch.cat([seen, keep], dim=-1)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            h, keys, values = layer(h, rotation, past[2 * i], past[2 * i + 1], keep, slots)
            presents += [keys, values]
        if not self.all_logits:
            h = h[:, -1:]
        h = self.norm(h)
        # a 2-D product with the (possibly tied) weight exports as Gemm(transB=1) on the embedding table
        # itself; a 3-D one gets a folded transposed copy: 113 MB more for SmolLM2's tied head
        logits = F.linear(h.reshape(-1, h.shape[-1]), self.lm_head.weight).float()
        return (logits.reshape(h.shape[0], h.shape[1], -1), *presents)


def causal_keep(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[B, 1, T, S] keep-mask: new token i sees key j <= P + i where the attention mask is 1."""
    S = attention_mask.shape[1]
    i = torch.arange(T, device=attention_mask.device).unsqueeze(1)
    j = torch.arange(S, device=attention_mask.device).unsqueeze(0)
    causal = j <= i + (S - T)                                                     # [T, S]
    return causal.unsqueeze(0).unsqueeze(0) & (attention_mask > 0).unsqueeze(1).unsqueeze(2)


def slot_keep(slots: torch.Tensor, R: int) -> torch.Tensor:
    """[1, 1, T, R] keep-mask of a static cache: new token t sees slot s <= slots[t]."""
    s = torch.arange(R, device=slots.device).unsqueeze(0)
    return (s <= slots.unsqueeze(1)).unsqueeze(0).unsqueeze(0)


def nectar_contexts(pairs: Sequence[Pair], exact_keys: Sequence[torch.Tensor],
                    exact_values: Sequence[torch.Tensor]) -> list[NectarHeads]:
    """Per-layer NectarHeads from fitted pairs and the exact tokens' keys/values [Hkv, E, D]; a pair that
    offers `joint_weights()` (an MLP pair) runs as a JointPair."""
    def graph_pair(pair: Pair) -> nn.Module:
        return JointPair(*pair.joint_weights()) if hasattr(pair, "joint_weights") else pair
    return [NectarHeads(graph_pair(p), k, v) for p, k, v in zip(pairs, exact_keys, exact_values)]

