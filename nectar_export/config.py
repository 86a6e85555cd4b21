"""The fitting configuration: one frozen dataclass, built once from CLI flags and stored in the artifact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from nectar_export.errors import NectarError

FAMILIES = ("mlp", "quadrature")
ALLOCATIONS = ("adaptive", "uniform")
# Named recipes: the fields each one changes from the measured defaults.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # `fit --quick`: fewer samples and epochs; a demo in minutes, lower quality
    "quick": {"continuation": (24, 4, 12), "repeat": (8, 2, 4), "self_study": (24, 4, 20), "epochs": 12},
    # heads of the right shape and nothing more: for decode-speed benchmarks, whose timing ignores the weights
    "shape": {"continuation": (16, 4, 2), "repeat": (4, 1, 1), "self_study": (4, 1, 1), "answer_tokens": 16,
              "epochs": 1, "ablations": False},
}


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides what `fit` produces; the defaults are the measured recipe."""

    model: str = "default"
    context: str = "default"
    context_tokens: int | None = 4096
    prompts: str | None = None
    budget: float = 0.125             # parameters per (layer, KV-head) / its 2*n*d KV entries, sinks included
    head_params: int | None = None    # absolute parameters per (layer, KV-head), exact tokens included; beats budget
    allocation: str = "adaptive"
    family: str = "mlp"
    sinks: int = 4                    # first context tokens kept as exact KV
    window: int | None = None         # last context tokens kept exact; None: an eighth of the budget
    salient: float = 0.0              # share of each head's budget spent on salient exact tokens: the context
                                      # tokens the training queries attend to most, per (layer, KV-head)
    reserve: int = 512                # new-token positions that must fit after the context
    seed: int = 0
    passage_tokens: int = 64
    coverage: bool = True             # whole document: every passage gets training queries (samples.py says how)
    continuation: tuple[int, int, int] = (128, 16, 32)   # (train, validation, test) samples per source
    repeat: tuple[int, int, int] = (24, 4, 12)
    self_study: tuple[int, int, int] = (64, 8, 24)
    answer_tokens: int = 64
    epochs: int = 24
    batch_size: int = 2048
    lr: float = 3e-3
    patience: int = 4
    ablations: bool = True

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise NectarError(f"unknown family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        if self.allocation not in ALLOCATIONS:
            raise NectarError(f"unknown allocation {self.allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
        if not 0 < self.budget < 1:
            raise NectarError(f"--budget must be a fraction in (0, 1), got {self.budget}")
        if self.head_params is not None and self.head_params < 1:
            raise NectarError(f"--head-params must be a positive parameter count, got {self.head_params}")
        if self.reserve < 1:
            raise NectarError(f"--reserve must be at least 1 new-token position, got {self.reserve}")
        if not 0 <= self.salient < 1:
            raise NectarError(f"--salient must be a share of the budget in [0, 1), got {self.salient}")
        if self.context_tokens is not None and self.context_tokens < 16:
            raise NectarError(f"--context-tokens must be at least 16, got {self.context_tokens}")

    @classmethod
    def recipe(cls, name: str, **fields: Any) -> "FitConfig":
        """The named recipe (RECIPES) with `fields` on top."""
        if name not in RECIPES:
            raise NectarError(f"unknown recipe {name!r}; expected one of {', '.join(RECIPES)}")
        return cls(**{**RECIPES[name], **fields})

    def head_budget(self, n: int, dim: int) -> int:
        """Parameters per (layer, KV-head), exact tokens included: --head-params, or the fraction of 2*n*d."""
        return self.head_params if self.head_params is not None else int(self.budget * 2 * n * dim)

    def window_tokens(self, n: int, dim: int) -> int:
        """The exact recent window: as given, or by default 1/8 of the head budget in token equivalents."""
        return self.window if self.window is not None else round(self.head_budget(n, dim) / (2 * dim) / 8)

    def salient_tokens(self, n: int, dim: int) -> int:
        """Salient exact tokens per (layer, KV-head): the --salient share of the head budget, in tokens."""
        return round(self.salient * self.head_budget(n, dim) / (2 * dim))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FitConfig":
        names = {f.name for f in fields(cls)}
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**clean)
