"""The project's two exception roots (defined in `nectar_runtime.errors`, the lowest package): `NectarError` for what
a user can cause, `NectarInternalError` for broken invariants."""

from __future__ import annotations

from nectar_runtime.errors import NectarError, NectarInternalError

__all__ = ["NectarError", "NectarInternalError"]
