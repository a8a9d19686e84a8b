"""Seed a search with the winners of earlier searches (e.g. the joint search with the single-lever winners).

With a fixed evaluation budget the joint space (10 timestep genes + one bit gene pair per layer) is explored far
more thinly than either single-lever space, so a joint search that starts from the single-lever winners, and from
their combination (the timesteps-only schedule with the bits-only allocation), begins where the cheaper searches
ended instead of at the plain default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tmpq.errors import TmpqError
from tmpq.sampling.schedules import phase_of
from tmpq.search.space import Bits, Candidate, SearchSpace
from tmpq.search.summary import RunSummary, SeedSearch

T = TypeVar("T")


def _load_search(source: str | Path) -> RunSummary:
    """The summary of a finished seed search, checked to be one."""
    return RunSummary.read(source, "finish it or drop it from --seed-from")


def seed_costs(sources: Sequence[str | Path]) -> list[dict]:
    """Each seed search's directory and `search_cost` (checking that each holds a finished search)."""
    return [SeedSearch(str(s), _load_search(s).search_cost).to_dict() for s in sources]


def _phase_lows(bounds: Sequence[int]) -> list[int]:
    """The lowest timestep of each bit phase (phase 0 holds the noisiest steps)."""
    b = sorted(set(bounds), reverse=True)
    return [*b, 0]


def _allocation(summary: RunSummary, space: SearchSpace, source: str | Path) -> tuple[tuple[Bits, ...], ...]:
    """The seed's per-phase allocation mapped onto this space's units and phases: each phase of this space takes
    the seed's phase that holds its lowest timestep (a one-phase seed fills every phase)."""
    bounds = summary.config.phase_bounds
    seed_phases = [qc.as_dict() for qc in summary.quant_configs]
    out = []
    for low in _phase_lows(space.phase_bounds):
        bits = seed_phases[phase_of(low, bounds)] if len(seed_phases) > 1 else seed_phases[0]
        missing = [n for n in space.unit_names if n not in bits]
        if missing:
            raise TmpqError(
                f"seed search {source} quantized another model (no unit {missing[0]!r}); seed only from searches "
                "of the same model"
            )
        out.append(tuple((bits[n][0], bits[n][1]) for n in space.unit_names))
    return tuple(out)


def _passes(check: Callable[[T], None], value: T) -> bool:
    """Whether `check` (one of the space's validators) accepts `value`."""
    try:
        check(value)
    except TmpqError:
        return False
    return True


def seed_candidates(
    sources: Sequence[str | Path], space: SearchSpace, default_bits: tuple[Bits, ...] | None
) -> list[Candidate]:
    """Every schedule × every allocation among the seeds' best candidates and the space's defaults (the default
    schedule per step count, `default_bits`), seeds first. A seed's schedule is used when it fits this space's
    groups and the space searches timesteps; its allocation when the space searches bits. Candidates may be over
    budget: the search repairs or drops them like any other. A seed that contributes nothing is an error."""
    schedules: list[tuple[int, ...]] = []
    allocations: list[tuple[tuple[Bits, ...], ...]] = []
    defaults = (default_bits,) * space.num_phases if default_bits is not None else None
    for source in sources:
        summary = _load_search(source)
        timesteps = summary.best.candidate.timesteps
        alloc = _allocation(summary, space, source)
        used = False
        if space.search_timesteps and _passes(space.validate_timesteps, timesteps):
            schedules.append(timesteps)
            used = True
        probe_ts = space.default_timesteps(space.steps[0])
        if space.search_bits and _passes(space.validate, Candidate(probe_ts, alloc)):
            allocations.append(alloc)
            used = True
        if not used:
            raise TmpqError(
                f"seed search {source}'s best (timesteps {list(timesteps)}) fits neither this space's "
                f"{space.grouping} groups for {list(space.steps)} steps nor its bit choices; seed from a search with "
                "the same --grouping and --steps, or drop it"
            )
    schedules += [space.default_timesteps(k) for k in space.steps]
    if not space.search_bits:
        allocations = [(space.fixed_bits,) * space.num_phases]
    elif defaults is not None:
        allocations.append(defaults)
    out: list[Candidate] = []
    seen: set[str] = set()
    for ts in schedules:
        for bits in allocations:
            c = Candidate(ts, bits)
            if c.key not in seen and _passes(space.validate, c):
                seen.add(c.key)
                out.append(c)
    return out
