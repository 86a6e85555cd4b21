"""`fit --target-agreement A`: the smallest budget whose measured score reaches A, in as few fits as the curve allows.

The search works in log2(budget), where the measured quality curve is roughly linear. It measures a start point,
steps by factors of 2 (one unit of log2) until one end of the bracket reaches A and the other does not, then
bisects the bracket until its ends are within `tolerance` of each other or `max_fits` fits were spent. The answer
is the smallest *measured* budget whose score reaches A; nothing between measured points is assumed.

The curve is noisy and not always monotone, so this is a search over measurements, not over a model of the
curve: a budget below the bracket's low end is never measured once the bracket stands (a lucky spike there stays
unseen), and a budget above the chosen one may score below A. Every measurement is recorded so a reader can see
what the choice rests on.

`measure(budget)` returns the score, or None where the budget cannot be fitted at all (too small for the networks
after the exact tokens): such a budget counts as not reaching A and costs no fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from nectar_export.errors import NectarError

DEFAULT_LOW, DEFAULT_HIGH, DEFAULT_START = 1 / 64, 1 / 2, 1 / 8
DEFAULT_TOLERANCE = 2 ** 0.25      # stop once the bracket's ends are within this factor
DEFAULT_MAX_FITS = 8               # the default range never needs more than 6


@dataclass(frozen=True)
class BudgetSearch:
    """What `fit --target-agreement` searches for and within which bounds."""

    target: float                  # A: the validation top-1 the chosen budget must reach, in (0, 1)
    low: float = DEFAULT_LOW       # budget bounds, fractions of the 2*n*d KV entries
    high: float = DEFAULT_HIGH
    start: float = DEFAULT_START   # the first budget measured (moved inside [low, high])
    tolerance: float = DEFAULT_TOLERANCE
    max_fits: int = DEFAULT_MAX_FITS

    def __post_init__(self) -> None:
        if not 0 < self.target < 1:
            raise NectarError(f"--target-agreement must be a top-1 agreement in (0, 1), got {self.target}")
        if not 0 < self.low <= self.high < 1:
            raise NectarError(f"--budget-range LOW HIGH must satisfy 0 < LOW <= HIGH < 1, got {self.low} {self.high}")
        if self.tolerance <= 1:
            raise NectarError(f"the budget search's tolerance is a factor above 1, got {self.tolerance}")
        if self.max_fits < 1:
            raise NectarError(f"--max-fits must be at least 1, got {self.max_fits}")

    def to_json(self) -> dict[str, float | int]:
        return {"target_agreement": self.target, "range": [self.low, self.high], "start": self.start,
                "tolerance": self.tolerance, "max_fits": self.max_fits}


@dataclass
class SearchResult:
    """Every measured (budget, score) in the order measured, the choice, and why the search stopped."""

    target: float
    trials: list[tuple[float, float | None]] = field(default_factory=list)
    stop: str = ""
    bracket: tuple[float | None, float | None] = (None, None)     # (highest budget below A, lowest reaching it)

    def reaches(self, score: float | None) -> bool:
        return score is not None and score >= self.target

    @property
    def fits(self) -> int:
        """Measurements that needed a fit (an unfittable budget costs none)."""
        return sum(score is not None for _, score in self.trials)

    @property
    def chosen(self) -> float | None:
        """The smallest measured budget whose score reaches the target; None when none does."""
        reaching = [budget for budget, score in self.trials if self.reaches(score)]
        return min(reaching) if reaching else None


def search_budget(measure: Callable[[float], float | None], settings: BudgetSearch) -> SearchResult:
    """Bracket the target between budgets a factor of 2 apart, then bisect in log2(budget) (module docstring)."""
    low, high = math.log2(settings.low), math.log2(settings.high)
    result = SearchResult(settings.target)
    seen: dict[float, float | None] = {}

    def reaches(x: float) -> bool:
        key = round(x, 9)
        if key not in seen:
            seen[key] = measure(2.0 ** x)
            result.trials.append((2.0 ** x, seen[key]))
        return result.reaches(seen[key])

    def spent() -> bool:
        return result.fits >= settings.max_fits

    x = min(max(math.log2(settings.start), low), high)
    below, above = (None, x) if reaches(x) else (x, None)
    while above is not None and below is None and above > low and not spent():    # reached: step down
        y = max(above - 1.0, low)
        below, above = (None, y) if reaches(y) else (y, above)
    while below is not None and above is None and below < high and not spent():   # not reached: step up
        y = min(below + 1.0, high)
        below, above = (below, y) if reaches(y) else (y, None)
    width = math.log2(settings.tolerance) + 1e-9
    while below is not None and above is not None and above - below > width and not spent():
        middle = (below + above) / 2
        below, above = (below, middle) if reaches(middle) else (middle, above)
    result.bracket = tuple(None if x is None else 2.0 ** x for x in (below, above))      # type: ignore[assignment]
    result.stop = _why_stopped(below, above, low, high, width)
    return result


def _why_stopped(below: float | None, above: float | None, low: float, high: float, width: float) -> str:
    """The search's end, in the words nectar.json records."""
    if above is None:
        return "max_fits" if below is not None and below < high else "upper_bound_below_target"
    if below is None:
        return "max_fits" if above > low else "lower_bound_reaches_target"
    return "bracket_within_tolerance" if above - below <= width else "max_fits"
