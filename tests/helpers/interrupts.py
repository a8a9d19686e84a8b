"""A kill part-way through a long job, for the resume tests."""

from __future__ import annotations

from collections.abc import Callable


def dies_after(fn: Callable, calls: int) -> Callable:
    """`fn`, until it has been called `calls` times; then every call raises KeyboardInterrupt, as a kill would."""
    count = {"n": 0}

    def wrapped(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped
