"""The two exception types of the project: one for what a user can cause, one for broken invariants."""

from __future__ import annotations


class NectarError(Exception):
    """A problem the user can fix (bad path, wrong model, context too long); printed without a traceback."""


class NectarInternalError(RuntimeError):
    """An invariant of the code itself was broken: a bug, never the user's input."""
