"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with a seeded numpy Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nectar_runtime.errors import GenerationError


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy (top_k, top_p and seed are then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0              # 0: no top-k cut
    top_p: float = 1.0          # 1.0: no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):        # NaN fails this too
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed < 0:
            raise GenerationError(f"seed must be >= 0, got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def filtered_logits(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Temperature-scaled logits [B, V] float64 with everything outside top-k and top-p set to -inf."""
    z = np.asarray(logits, dtype=np.float64) / sampling.temperature                 # [B, V]
    if 0 < sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]   # [B, 1]
        z = np.where(z < kth, -np.inf, z)
    if sampling.top_p < 1.0:
        order = np.argsort(-z, axis=-1, kind="stable")                               # [B, V] descending
        ordered = np.take_along_axis(z, order, axis=-1)
        probs = softmax(ordered)
        drop = np.cumsum(probs, axis=-1) - probs > sampling.top_p   # keep the token that crosses top_p
        np.put_along_axis(z, order, np.where(drop, -np.inf, ordered), axis=-1)
    return z


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (rows of -inf except one are fine)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The distribution [B, V] that sampling draws from (one-hot at the argmax when greedy)."""
    logits = np.atleast_2d(logits)
    if sampling.greedy:
        return np.eye(logits.shape[-1], dtype=np.float64)[logits.argmax(-1)]
    return softmax(filtered_logits(logits, sampling))


def pick_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """Next token per row [B] int64 from last-position logits [B, V]."""
    logits = np.atleast_2d(logits)
    if sampling.greedy:
        return logits.argmax(-1).astype(np.int64)
    cdf = np.cumsum(probabilities(logits, sampling), axis=-1)                        # [B, V]
    u = rng.random(cdf.shape[0]) * cdf[:, -1]                                        # [B]
    picks = [np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)]
    return np.minimum(np.array(picks, dtype=np.int64), cdf.shape[-1] - 1)
