"""One exception type for every user-facing problem.

The CLI prints a `TmpqError` as one line (the problem and the fix) instead of a traceback,
so every check on user input raises this and nothing else.
"""

from __future__ import annotations


class TmpqError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
