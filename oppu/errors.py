"""The base class of every error oppu raises to its users.

A user-facing error is bad input or an unusable environment, not a bug: the CLI prints its message on one line
and exits with status 2, the dashboard shows it as a warning. Each error class keeps its builtin base too
(`class DataError(OppuError, ValueError)`), so code that catches ValueError or KeyError still works.
"""

from __future__ import annotations


class OppuError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""
