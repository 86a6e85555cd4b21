"""nectar_export/capacity.py: per-layer difficulty (linear probe) and the budget allocation it drives."""

from __future__ import annotations

from nectar_export.capacity import allocate, linear_probe_error
from tests.helpers import collected_layers


def test_allocation_keeps_the_budget_and_follows_difficulty():
    budgets = allocate([0.01, 0.04, 0.16, 0.64, 0.0001], 1000)
    assert abs(sum(budgets) - 5000) <= 5
    assert budgets == sorted(budgets[:4]) + [budgets[4]]
    assert min(budgets) >= 250 and max(budgets) <= 4000
    assert allocate([0.3] * 4, 1000) == [1000] * 4


def test_linear_probe_error_is_a_relative_error():
    _, _, train, val = collected_layers()
    errors = [linear_probe_error(t, v) for t, v in zip(train, val)]
    assert all(0.0 < e < 1.0 for e in errors)
