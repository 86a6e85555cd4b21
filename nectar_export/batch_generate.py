"""Batched greedy and sampled generation after the context, with any per-layer context attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.attention import ContextAttention, forward, nectar_mode


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def pick_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: greedy, or temperature/top-k/top-p sampling."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, -1) > sampling.top_p   # keep the token that crosses top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def _generate_batch(model: Any, prompts: Sequence[Sequence[int]], start: int, sampling: Sampling,
                    stop_ids: set[int], pad_id: int, generator: torch.Generator) -> list[list[int]]:
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = start + (mask.cumsum(-1) - 1).clamp(min=0)                   # left padding keeps positions exact
    cache = DynamicCache(config=model.config)
    logits = forward(model, ids, positions, cache, attention_mask=mask, logits_to_keep=1)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(sampling.max_new_tokens):
        token = pick_next(logits[:, -1].float().cpu(), sampling, generator)    # the generator lives on the CPU
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                outputs[row].append(t)
                done[row] = t in stop_ids
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        positions = positions[:, -1:] + 1
        logits = forward(model, token.unsqueeze(1), positions, cache, attention_mask=mask)
    return outputs


def generate(model: Any, prompts: Sequence[Sequence[int]], contexts: Sequence[ContextAttention | None],
             start: int, sampling: Sampling, stop_ids: set[int], pad_id: int, batch_size: int = 64,
             desc: str | None = None) -> list[list[int]]:
    """Continue each prompt (placed at positions start, start+1, ...) with the given context attention.

    Returns the new tokens of each prompt, ending at the first stop token (included) or at max_new_tokens.
    """
    generator = torch.Generator().manual_seed(sampling.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))    # similar lengths share a batch
    results: dict[int, list[int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with nectar_mode(model, contexts):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=desc is None):
            outs = _generate_batch(model, [prompts[i] for i in batch], start, sampling, stop_ids, pad_id, generator)
            results.update(zip(batch, outs))
    return [results[i] for i in range(len(prompts))]
