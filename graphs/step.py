"""The traceable decoder step: new tokens in, logits and the new tokens' keys/values out.

One plain module for every supported architecture (Llama, Mistral, Qwen2, Qwen3, Gemma 3). It reuses the
Hugging Face model's own weights and submodules (projections, norms, MLP) and writes out only what
the export needs to control: rotary embedding from the model's inverse frequencies, the masks, the
norms' form, and attention with the fitted pair merged exactly.

- Nectar step: per layer, the fitted pair (target and score networks) stands in for the modeled
  context. The exact tokens (sinks, window) are not in the graph: their real KV is the start of the
  past, as the context's is for the baseline, so the runtime loads them once with the bundle and the
  graph of both kinds differs only by the pair.
  Everything meets in one softmax: the pair enters it as one more key whose score is its predicted
  log-normalizer and whose value is its predicted output, beside the exact tokens' and the new tokens'
  real keys. That is the exact Nectar merge (the pair's share of the joint mass is
  exp(lse) / (exp(lse) + sum exp(scores))), written as a softmax and one product, with no separate
  log-sum-exp or merge nodes.
- Full step: no pair; the past starts with the whole context's real KV (the baseline).

Two cache layouts:
- dynamic (default): the past is [B, Hkv, P, D] and grows; presents are past + new, concatenated.
- static: the past is a fixed buffer of R slots [B, Hkv, R, D]; the new tokens' keys and values are
  scattered into slots `cache_position` [T] and the present is the whole buffer. Every shape of a
  decode step is then the same at every step, and a runtime may bind the present to the past's own
  memory (ONNX Runtime's ScatterElements skips its copy when input and output share memory): no KV
  copy per step and a step that CUDA graphs can capture. A slot s is visible to new token t when
  s <= cache_position[t] (slots fill in order; the context's tokens, the whole context or the exact
  ones, hold the first slots).
  Slots not yet written must hold finite numbers (a runtime zero-fills its buffers): a masked slot's
  weight is exactly 0, but 0 * NaN is NaN.

Attention runs in the layout the projections produce, [B, T, Hkv, G, D] for queries: the G query heads of a
KV head are rows of one product with its keys [B, 1, Hkv, D, S], and the output goes to o_proj without a
transpose. ONNX Runtime's CUDA MatMul runs such a product as one strided batched GEMM when both batch
counts match (B * T * Hkv = B * Hkv, so for a one-token step); prefills of T > 1 tokens take its slower
general path. The new keys and values are transposed once to the cache's [B, Hkv, T, D].

Gemma 3 (hybrid attention): its norms scale by 1 + weight in fp32 (GemmaRMSNorm), each layer has four (a norm
after attention and after the MLP too), the embedding table is scaled by sqrt(hidden) (its own module does it),
the final logits may be soft-capped (tanh), and each layer kind has its own rotary base. A sliding layer's key
at slot j is visible to the new token in slot s only while j > s - window: its slots hold consecutive positions
(the context's last tokens, then the new ones), so a slot distance is a position distance. Every layer's past
starts with the same number of slots, C (the runtime keeps one past length), so a layer whose exact tokens are
fewer than C has `dead` leading slots (zeros) that no token ever sees: a global layer's Nectar exact tokens, or
a sliding layer's window when the context is shorter than C.

Shapes: B batch, T new tokens this step, P past tokens, Hq query heads, Hkv KV heads, G = Hq/Hkv,
D head dim.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nectar_runtime.heads import WIDTH_ALIGN, carried  # noqa: F401 (WIDTH_ALIGN: the tests read it here)


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


class GemmaRMSNorm(nn.Module):
    """Gemma's RMS norm: Normalize, then the scale 1 + weight, both in fp32, back in x's type (transformers'
    Gemma3RMSNorm). The scale is a constant of the graph, so 1 + weight is computed once here."""

    def __init__(self, hf_norm: nn.Module):
        super().__init__()
        self.register_buffer("scale", 1.0 + hf_norm.weight.detach().float())
        self.eps = float(hf_norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale).to(x.dtype)


def is_gemma_norm(hf_norm: nn.Module) -> bool:
    return type(hf_norm).__name__.startswith("Gemma")


def rms_norm(hf_norm: nn.Module | None) -> nn.Module | None:
    if hf_norm is None:
        return None
    return GemmaRMSNorm(hf_norm) if is_gemma_norm(hf_norm) else RMSNorm(hf_norm)


class JointPair(nn.Module):
    """An MLP pair's score and target networks run as one network of three batched products and nothing else.

    From `MLPPair.joint_weights()`: the input standardization folded into the first layer, both first
    layers and both linear skips side by side in one product, the second and third layers block-diagonal.
    The output row per query is [lse, out_1 .. out_D].

    The second and third layers' biases and the linear skip are folded into the products, so a layer is
    one MatMul and one activation (each separate Add or Split is one more kernel per layer and step):
    - layer 1 also outputs q and -q, and a constant column CARRIER (its bias);
    - silu(x) - silu(-x) = x, so the next product gets q back exactly from silu(q) and silu(-q), and the
      constant silu(CARRIER) stands in for a bias row;
    - layer 2 passes q, -q and the constant on the same way; layer 3 applies the skip to them.
    The block-diagonal layers and the carried columns (zeros and identities) make the stored weights about
    4x the fitted ones, 70% of them zeros: at D = 128 and 130,289 fitted parameters per head, w1/w2/w3 are
    128x560, 560x560 and 560x144 (465,920 values); at D = 64 and 25,433, 64x256, 256x256 and 256x80.
    That is the price of running both networks as three products and two activations (above).

    Every width is padded with zero columns to a multiple of WIDTH_ALIGN, the output's too (its row is
    [lse, out_1 .. out_D, zeros]): cuBLAS runs products of unaligned widths with slow `align1` kernels."""

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                 w3: torch.Tensor, b3: torch.Tensor):
        super().__init__()
        for name, t in zip(("w1", "b1", "w2", "w3"), carried_weights(w1, b1, w2, b2, w3, b3)):
            self.register_buffer(name, t)                    # new tensors, built from the fitted ones

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q [..., Hkv, N, D] -> [..., Hkv, N, W >= 1 + D], row [lse, out, zeros] (any leading dims broadcast
        against the weights' Hkv)."""
        h = F.silu(q @ self.w1 + self.b1)
        return F.silu(h @ self.w2) @ self.w3


def carried_weights(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor,
                    b3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, b1, w2, w3) of the three-product network equal to silu(silu(q w1 + b1)[:H] w2 + b2) w3 + b3 + skip,
    skip = (q w1 + b1)[H:] (see JointPair), in w1's dtype: nectar_runtime.heads.carried, which builds a pack's
    heads at load the same way, so a pack's heads are bit for bit a single-file bundle's."""
    arrays = (t.detach().double().cpu().numpy() for t in (w1, b1, w2, b2, w3, b3))
    return tuple(torch.from_numpy(t).to(w1.dtype) for t in carried(*arrays))


class NectarHeads(nn.Module):
    """One layer's context stand-in: the fitted pair (the exact tokens' real KV is at the start of the past)."""

    def __init__(self, pair: Pair):
        super().__init__()
        self.pair = pair

    def forward(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, Hkv, G, D] -> the pair's partial over the modeled context (lse [B, T, Hkv, G, 1], out [..., D])."""
        B, T, Hkv, G, D = q.shape
        if isinstance(self.pair, JointPair):               # per-KV-head weights broadcast over B and T
            row = self.pair(q)                                                      # [..., lse, out, zeros]
            pad = row.shape[-1] - 1 - D
            return row.split([1, D, pad] if pad else [1, D], -1)[:2]
        flat = q.permute(2, 0, 1, 3, 4).reshape(Hkv, B * T * G, D)
        lse, out = self.pair(flat, scaling)                                        # [Hkv, N], [Hkv, N, D]
        return (lse.reshape(Hkv, B, T, G, 1).permute(1, 2, 0, 3, 4),
                out.reshape(Hkv, B, T, G, D).permute(1, 2, 0, 3, 4))


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
        return y                                                                 # [B, T, H, D]

    def forward(self, x: torch.Tensor, rotation: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                keep: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        Hkv, D = self.kv_heads, self.head_dim
        G = self.heads // Hkv
        q = self._project(self.q_proj, self.q_norm, x, self.heads, rotation).view(B, T, Hkv, G, D)
        k = self._project(self.k_proj, self.k_norm, x, Hkv, rotation).transpose(1, 2)     # [B, Hkv, T, D]
        v = self._project(self.v_proj, None, x, Hkv).transpose(1, 2)
        if slots is None:
            keys = torch.cat([past_k, k], dim=2)                                  # [B, Hkv, P+T, D]
            values = torch.cat([past_v, v], dim=2)
        else:                                                                     # static: [B, Hkv, R, D]
            index = slots.view(1, 1, T, 1).expand(B, Hkv, T, D)
            keys = past_k.scatter(2, index, k)
            values = past_v.scatter(2, index, v)
        S = keys.shape[2]
        # [B, T, Hkv, G, D] @ [B, 1, Hkv, D, S]: see the module docstring for the layout
        scores = (q @ keys.unsqueeze(1).transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~keep, MASKED)                                # keep [B or 1, T, 1, 1, S]
        if self.context is None:
            probs = torch.softmax(scores, dim=-1)
        else:                                                                      # the pair: one more key
            pair_lse, pair_out = self.context(q, self.scaling)
            pair_share, probs = torch.softmax(torch.cat([pair_lse, scores], dim=-1), dim=-1).split([1, S], -1)
        out = probs @ values.unsqueeze(1)                                          # [B, T, Hkv, G, D]
        if self.context is not None:
            out = pair_share * pair_out + out
        return self.o_proj(out.reshape(B, T, -1)), keys, values


class Layer(nn.Module):
    def __init__(self, hf_layer: nn.Module, attention: Attention):
        super().__init__()
        self.input_layernorm = rms_norm(hf_layer.input_layernorm)
        self.post_attention_layernorm = rms_norm(hf_layer.post_attention_layernorm)
        self.mlp = hf_layer.mlp
        self.self_attn = attention
        # Gemma: the post-attention norm applies to the attention's output, and the MLP sits between two more
        self.pre_feedforward_layernorm = rms_norm(getattr(hf_layer, "pre_feedforward_layernorm", None))
        self.post_feedforward_layernorm = rms_norm(getattr(hf_layer, "post_feedforward_layernorm", None))

    def forward(self, h: torch.Tensor, rotation: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                keep: torch.Tensor, slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, keys, values = self.self_attn(self.input_layernorm(h), rotation, past_k, past_v, keep, slots)
        if self.pre_feedforward_layernorm is None:
            h = h + a
            return h + self.mlp(self.post_attention_layernorm(h)), keys, values
        h = h + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), keys, values


class StepModule(nn.Module):
    """forward(input_ids, position_ids, attention_mask, *past) -> (logits, *present).

    input_ids, position_ids: [B, T] int64; attention_mask: [B, P+T] int64 (1 = real token) over the
    past and the new tokens; past: key_0, value_0, key_1, ... each [B, Hkv, P, D]. Outputs logits
    [B, 1, V] (or [B, T, V] with all_logits) in fp32 and the presents [B, Hkv, P+T, D].

    static=True: forward(input_ids, position_ids, cache_position, *past) with cache_position [T] int64,
    the slots the new tokens fill, and past and presents [B, Hkv, R, D] (see the module docstring).

    contexts: per model layer, its NectarHeads or None (a hybrid model's sliding layers always None); dead: per
    layer, how many leading past slots it never attends to (see the module docstring; default none).
    """

    def __init__(self, hf_model: nn.Module, contexts: Sequence[NectarHeads | None] | None = None,
                 all_logits: bool = False, static: bool = False, dead: Sequence[int] | None = None):
        super().__init__()
        config = hf_model.config
        body = hf_model.model
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        contexts = list(contexts) if contexts is not None else [None] * len(body.layers)
        if len(contexts) != len(body.layers):
            raise ValueError(f"got {len(contexts)} contexts for {len(body.layers)} layers")
        self.embed_tokens, self.norm, self.lm_head = body.embed_tokens, rms_norm(body.norm), hf_model.lm_head
        self.layers = nn.ModuleList(
            Layer(layer, Attention(layer.self_attn, heads, kv_heads, head_dim, ctx))
            for layer, ctx in zip(body.layers, contexts))
        kinds = list(getattr(config, "layer_types", None) or ["full_attention"] * len(body.layers))
        window = getattr(config, "sliding_window", None)
        self.windows = [int(window) if kind == "sliding_attention" and window else None for kind in kinds]
        self.kinds = kinds
        self.dead = [int(d) for d in dead] if dead is not None else [0] * len(body.layers)
        rotary = body.rotary_emb
        if hasattr(rotary, "inv_freq"):
            self.rotary = nn.ModuleDict({kind: Rotary(rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
                                         for kind in set(kinds)})
        else:                                # Gemma 3: one rotary base per layer kind
            self.rotary = nn.ModuleDict({kind: Rotary(getattr(rotary, f"{kind}_inv_freq"),
                                                      float(getattr(rotary, f"{kind}_attention_scaling", 1.0)))
                                         for kind in set(kinds)})
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.all_logits, self.static = all_logits, static

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask_or_slots: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embed_tokens(input_ids)                                          # [B, T, hidden] (Gemma: scaled)
        T = input_ids.shape[1]
        rotations = {kind: rotary(position_ids).to(h.dtype) for kind, rotary in self.rotary.items()}   # [B, T, D, D]
        if self.static:
            slots = mask_or_slots
            keep = slot_keep(slots, past[0].shape[2])                             # [1, T, 1, 1, R]
        else:
            slots, keep = None, causal_keep(mask_or_slots, T)                     # [B, T, 1, 1, P+T]
        masks: dict[tuple[int | None, int], torch.Tensor] = {}                    # one per (window, dead) in use
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            shape = (self.windows[i], self.dead[i])
            if shape not in masks:
                masks[shape] = layer_keep(keep, slots, T, *shape)
            h, keys, values = layer(h, rotations[self.kinds[i]], past[2 * i], past[2 * i + 1], masks[shape], slots)
            presents += [keys, values]
        if not self.all_logits:
            h = h[:, -1:]
        h = self.norm(h)
        # a 2-D product with the (possibly tied) weight exports as Gemm(transB=1) on the embedding table
        # itself; a 3-D one gets a folded transposed copy: 113 MB more for SmolLM2's tied head
        logits = F.linear(h.reshape(-1, h.shape[-1]), self.lm_head.weight).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return (logits.reshape(h.shape[0], h.shape[1], -1), *presents)


def causal_keep(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T, 1, 1, S] keep-mask: new token i sees key j <= P + i where the attention mask is 1."""
    S = attention_mask.shape[1]
    i = torch.arange(T, device=attention_mask.device).unsqueeze(1)
    j = torch.arange(S, device=attention_mask.device).unsqueeze(0)
    causal = (j <= i + (S - T)).view(1, T, 1, 1, S)
    return causal & (attention_mask > 0).view(-1, 1, 1, 1, S)


def layer_keep(keep: torch.Tensor, slots: torch.Tensor | None, T: int, window: int | None,
               dead: int) -> torch.Tensor:
    """One layer's keep-mask from the shared one: key slot j also needs j > (the query's slot) - window for a
    sliding layer, and j >= dead (see the module docstring). keep [B or 1, T, 1, 1, S]."""
    if window is None and dead == 0:
        return keep
    S = keep.shape[-1]
    j = torch.arange(S, device=keep.device).unsqueeze(0)                                    # [1, S]
    if slots is not None:
        query = slots.unsqueeze(1)                                                          # [T, 1]
    else:
        query = torch.arange(T, device=keep.device).unsqueeze(1) + (S - T)                  # [T, 1]
    extra = j >= dead
    if window is not None:
        extra = extra & (j > query - window)
    return keep & extra.view(1, -1, 1, 1, S)


def slot_keep(slots: torch.Tensor, R: int) -> torch.Tensor:
    """[1, T, 1, 1, R] keep-mask of a static cache: new token t sees slot s <= slots[t]."""
    s = torch.arange(R, device=slots.device).unsqueeze(0)
    return (s <= slots.unsqueeze(1)).view(1, -1, 1, 1, R)


def nectar_contexts(pairs: Sequence[Pair]) -> list[NectarHeads]:
    """Per-layer NectarHeads from fitted pairs; a pair that offers `joint_weights()` (an MLP pair) runs as a
    JointPair."""
    def graph_pair(pair: Pair) -> nn.Module:
        return JointPair(*pair.joint_weights()) if hasattr(pair, "joint_weights") else pair
    return [NectarHeads(graph_pair(p)) for p in pairs]
