"""The runtime's user-facing exception types in one place (each is defined beside the code that raises it most)."""

from __future__ import annotations

from nectar_runtime.backends.base import BackendError
from nectar_runtime.bundle import BundleError


class GenerationError(Exception):
    """A generation request the bundle cannot serve (empty prompt, prompt past the new-token window, bad settings)."""


RUNTIME_ERRORS = (BundleError, BackendError, GenerationError)

__all__ = ["BackendError", "BundleError", "GenerationError", "RUNTIME_ERRORS"]
