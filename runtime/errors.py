"""Every exception the project raises on purpose, rooted in two types (the torch-free runtime is the lowest package,
so the roots live here and `nectar_export.errors` re-exports them).

- `NectarError`: what a user can cause and fix (a bad path, a damaged bundle, a model that does not match, a
  prompt past the window). Its message says what was expected, what was found and what to do; the CLIs print
  it as one `error:` line and exit 2, without a traceback, and catch nothing else.
- `NectarInternalError`: an invariant of the code itself was broken; a bug, never the user's input.

The subclasses say which stage refused; code that only reports the error catches `NectarError`.
"""

from __future__ import annotations


class NectarError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


class NectarInternalError(RuntimeError):
    """An invariant of the code itself was broken: a bug, never the user's input."""


class BundleError(NectarError):
    """A bundle that is missing, damaged or of another format."""


class BackendError(NectarError):
    """A backend that cannot run here (package absent, no device) or a request it cannot serve."""


class GenerationError(NectarError):
    """A generation request the bundle cannot serve (empty prompt, prompt past the new-token window, bad settings)."""


__all__ = ["BackendError", "BundleError", "GenerationError", "NectarError", "NectarInternalError"]
