"""nectar_export/budget_search.py: the bracketing and bisection in log2(budget) over hand-made curves."""

from __future__ import annotations

import math

import pytest


def run(curve, target, **settings):
    from nectar_export.budget_search import BudgetSearch, search_budget

    calls = []

    def measure(budget):
        calls.append(budget)
        return curve(math.log2(budget))
    result = search_budget(measure, BudgetSearch(target, **settings))
    assert len(calls) == len(set(calls)) == len(result.trials)            # no budget is fitted twice
    return result, [math.log2(b) for b in calls]


def linear(x):
    return 1.0 + 0.02 * x                      # 1/64: 0.88, 1/8: 0.94, 1/2: 0.98


def test_monotone_curve_steps_then_bisects_to_the_tolerance():
    result, xs = run(linear, 0.965)             # crosses at log2 = -1.75
    assert xs == [-3, -2, -1, -1.5, -1.75]      # start, step up twice, bisect twice
    assert math.log2(result.chosen) == -1.75 and result.stop == "bracket_within_tolerance"
    below, above = map(math.log2, result.bracket)
    assert above - below <= 0.25 and linear(below) < 0.965 <= linear(above)


def test_stepping_down_and_the_lower_bound():
    result, xs = run(linear, 0.931)             # crosses at -3.45
    assert xs == [-3, -4, -3.5, -3.25] and math.log2(result.chosen) == -3.25
    result, xs = run(linear, 0.5)               # every budget reaches it
    assert xs == [-3, -4, -5, -6] and result.stop == "lower_bound_reaches_target" and result.chosen == 1 / 64


def test_non_monotone_curve_picks_the_smallest_measured_budget_that_reaches():
    # measured RESULTS 1.1 shape: flat, a bump at 1/8, a dip at 1/4, then up
    points = {-5: 0.938, -4: 0.938, -3: 0.947, -2: 0.937, -1: 0.96, -3.5: 0.936, -3.25: 0.941, -1.5: 0.944,
              -1.25: 0.95}
    result, xs = run(lambda x: points[x], 0.94)
    assert xs == [-3, -4, -3.5, -3.25] and math.log2(result.chosen) == -3.25
    # only the measured points count: every measured budget below the choice is below the target
    assert all(s < 0.94 for b, s in result.trials if b < result.chosen)
    # started in the dip, it steps up and never sees that 1/8 (0.947) reaches 0.945 too: a limit, on record
    result, xs = run(lambda x: points[x], 0.945, start=1 / 4)
    assert xs == [-2, -1, -1.5, -1.25] and math.log2(result.chosen) == -1.25


def test_unreachable_target_and_the_fit_limit():
    result, xs = run(linear, 0.99)
    assert xs == [-3, -2, -1] and result.chosen is None and result.stop == "upper_bound_below_target"
    result, xs = run(linear, 0.965, max_fits=3)
    assert xs == [-3, -2, -1] and math.log2(result.chosen) == -1 and result.stop == "max_fits"
    result, xs = run(linear, 0.99, max_fits=2)
    assert xs == [-3, -2] and result.chosen is None and result.stop == "max_fits"


def test_unfittable_budgets_count_as_below_and_cost_no_fit():
    result, xs = run(lambda x: None if x < -4.6 else linear(x), 0.5, max_fits=3)
    assert xs[:4] == [-3, -4, -5, -4.5] and result.fits == 3 and math.log2(result.chosen) == -4.5
    assert result.stop == "max_fits"          # bracket [-5, -4.5] is twice the tolerance


@pytest.mark.parametrize("settings, message", [
    ({"target": 1.0}, "--target-agreement must be"), ({"target": 0.0}, "--target-agreement must be"),
    ({"target": float("nan")}, "--target-agreement must be"),
    ({"target": 0.9, "low": 0.5, "high": 0.25}, "--budget-range"), ({"target": 0.9, "high": 1.0}, "--budget-range"),
    ({"target": 0.9, "max_fits": 0}, "--max-fits")])
def test_bad_settings_are_refused(settings, message):
    from nectar_export.budget_search import BudgetSearch
    from nectar_export.errors import NectarError

    with pytest.raises(NectarError, match=message):
        BudgetSearch(**settings)
