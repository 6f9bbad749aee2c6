"""Errors raised for user mistakes.

Every error a user can cause (a bad schedule, a model dsm-export does not support, a missing or
mismatched weights file, an unreadable ONNX file, an empty image folder) is a :class:`DSMError`.
The CLI prints its message on one line and exits with status 2; anything else is a bug.
"""


class DSMError(ValueError):
    """A user mistake, reported as a one-line message (CLI exit status 2)."""


class ScheduleError(DSMError):
    """A merge schedule that cannot be parsed or that a model cannot follow."""


class UnsupportedModelError(DSMError):
    """A model whose architecture dsm-export cannot merge tokens in."""
