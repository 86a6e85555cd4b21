"""nectar_export/config.py: what --head-params and --budget mean per head, and the network budget fit.py
takes from them."""

from __future__ import annotations


def test_head_params_fix_the_head_size_at_every_n():
    from nectar_export.config import FitConfig
    from nectar_export.fit import layer_budget

    fixed, fraction = FitConfig(head_params=32768), FitConfig(budget=0.125)
    assert fixed.head_budget(512, 64) == fixed.head_budget(8000, 64) == 32768
    assert fixed.window_tokens(512, 64) == fixed.window_tokens(8000, 64) == 32       # P / (2 d) / 8
    assert layer_budget(fixed, 512, 64) == layer_budget(fixed, 8000, 64) == 32768 - 2 * (4 + 32) * 64
    assert fraction.head_budget(2048, 64) == 32768 and fraction.head_budget(8000, 64) == 128000
    assert fraction.window_tokens(8000, 64) == 125                                   # grows with n
