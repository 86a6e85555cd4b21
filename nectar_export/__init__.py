"""nectar-export: fit Nectar heads that replace a fixed document's KV cache, and measure them."""

from __future__ import annotations

__version__ = "0.1.0"
