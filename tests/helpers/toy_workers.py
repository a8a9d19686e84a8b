"""Worker-side fitness factories for the parallel-evaluation tests (imported by spawned workers and Ray actors).

Not a test module: pyproject's `pythonpath` puts tests/helpers on sys.path, spawned workers inherit it, and the
Ray test passes it to its workers through PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tmpq.search.evolution import FitnessValue
from tmpq.search.space import Candidate

TARGET = (50, 25, 8, 1)
MACS = (100, 400, 200, 50)


def toy_value(c: Candidate) -> float:
    dist = sum(abs(a - b) for a, b in zip(c.timesteps, TARGET))
    return dist + sum(m * (1 / w + 1 / a) for m, (w, a) in zip(MACS, c.bits[0])) / 1000


def make_toy(fault: str | None = None, marker: str | None = None, log: str | None = None):
    """A deterministic fitness. fault='die' / 'hang': the first candidate any worker sees (claimed through the
    `marker` file) kills its worker or hangs it. `log` gets one line per evaluation that completed."""

    def fitness(c: Candidate) -> FitnessValue:
        if fault and marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one worker claims it
                os.close(fd)
                if fault == "die":
                    os._exit(7)
                time.sleep(600)
            except FileExistsError:
                pass
        value = toy_value(c)
        if log:
            with Path(log).open("a") as fh:
                fh.write(c.key + "\n")
        return FitnessValue(value, forwards=10)

    return fitness
