"""The one-call Python API: `tmpq.compress(model, budget=...)` → a result with `.best`, `.pareto`,
`.sampler()`, `.export()`, `.report()`; `CompressionResult.open(run_dir)` is the same result in a new process.

Everything is written to one run directory, so an interrupted `compress` resumes where it stopped.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from tmpq.allocator import keep_freed_memory
from tmpq.compressed import CompressedSampler
from tmpq.device import resolve_device
from tmpq.errors import TmpqError
from tmpq.models.loading import LoadedModel, load_model
from tmpq.quant.calibration import CalibConfig
from tmpq.quant.config import QuantConfig, QuantSpec
from tmpq.quant.prepare import prepare_supernet
from tmpq.quant.supernet import SuperNet
from tmpq.search.budget import Budget
from tmpq.search.config import SearchConfig
from tmpq.search.evolution import EvolutionConfig, SearchResult
from tmpq.search.fitness import FitnessConfig
from tmpq.search.parallel import Execution
from tmpq.search.run import run_search
from tmpq.search.space import Candidate
from tmpq.search.summary import RunSummary


def parse_budget(budget: Budget | str | float, steps: int = 10) -> Budget:
    """Deprecated alias of `Budget.parse` (the one budget reader); kept for one release."""
    warnings.warn("tmpq.parse_budget is deprecated; use tmpq.Budget.parse", DeprecationWarning, stacklevel=2)
    return Budget.parse(budget, steps)


@dataclass(frozen=True)
class Choice:
    """A chosen setting: its candidate, cost, and quality (final FID and FID to FP-100 when re-scored, else search
    fitness)."""

    label: str
    candidate: Candidate
    bitops: int
    fid: float | None
    fitness: float | None
    fid_to_fp: float | None = None


def _choice(summary: RunSummary, which: str = "best") -> Choice:
    """`best`: the final re-scoring's best (the search's best when there was none); `baseline`, `top2`, …:
    that final row; `search`: the search's own best by its fitness; `search:K`: its K-th best (K ≤ 10)."""
    final = summary.final
    if which == "search" or (which == "best" and not (final and final.best)):
        b = summary.best
        return Choice("search", b.candidate, b.bitops, None, b.value)
    if which.startswith("search:"):
        top = summary.top
        k = which.partition(":")[2]
        if not k.isdigit() or not 1 <= int(k) <= len(top):
            raise TmpqError(f"{which!r}: the search kept its {len(top)} best; use search:1 … search:{len(top)}")
        b = top[int(k) - 1]
        return Choice(which, b.candidate, b.bitops, None, b.value)
    if not final:
        raise TmpqError(f"the run has no final re-scoring, so no row {which!r}; use 'best' or 'search'")
    row = final.best if which == "best" else final.row(which)
    if row is None or row.candidate is None:
        labels = [r.label for r in final.rows if r.quantized]
        raise TmpqError(f"no quantized row {which!r} in the final re-scoring; choose one of {labels}")
    return Choice(row.label, row.candidate, row.bitops, row.fid, None, row.fid_to_fp)


def _sampler(sn, loaded: LoadedModel, phase_bounds: tuple[int, ...], choice: Choice) -> CompressedSampler:
    names = list(sn.units)
    configs = [QuantConfig(tuple((n, w, a) for n, (w, a) in zip(names, phase))) for phase in choice.candidate.bits]
    s = CompressedSampler(
        sn,
        loaded.schedule,
        choice.candidate.timesteps,
        configs,
        phase_bounds,
        loaded.sample_shape,
        parts=loaded.parts,
    )
    s.info = {
        "label": choice.label,
        "fid": choice.fid,
        "fid_to_fp": choice.fid_to_fp,
        "search_fitness": choice.fitness,
        "bitops": choice.bitops,
    }
    return s


def sampler_from_run(run_dir: str | Path, which: str = "best", model: str | None = None) -> CompressedSampler:
    """Deprecated: `CompressionResult.open(run_dir, model).sampler(which)`; kept for one release."""
    warnings.warn(
        "tmpq.sampler_from_run is deprecated; use tmpq.CompressionResult.open(run_dir).sampler(which)",
        DeprecationWarning,
        stacklevel=2,
    )
    return CompressionResult.open(run_dir, model).sampler(which)


def _run_info(run_dir: Path, summary: RunSummary) -> dict:
    """What an export records of the run that chose it: config, seeds, the source model's checksum."""
    return {
        "run_dir": str(run_dir),
        "model": summary.model,
        "budget": summary.budget,
        "fid_samples": summary.final.samples if summary.final else None,
        "search_config": summary.config.to_dict(),
        "model_sha256": summary.model_sha256,
    }


class CompressionResult:
    """What `compress` returns: the search result plus the objects to sample, export and report with.

    `search` (the in-memory `SearchResult`) is None for a result opened from its run directory; everything
    else is the same either way, read from RUN/search.json."""

    def __init__(
        self,
        run_dir: Path,
        loaded: LoadedModel,
        config: SearchConfig,
        result: SearchResult | None,
        supernet: SuperNet | None = None,
    ) -> None:
        self.run_dir, self.loaded, self.config, self.search = Path(run_dir), loaded, config, result
        self.supernet = supernet if supernet is not None else result.supernet
        self.summary = RunSummary.read(run_dir)

    @classmethod
    def open(
        cls, run_dir: str | Path, model: str | LoadedModel | None = None, device: str = "cpu"
    ) -> CompressionResult:
        """A finished run in a new process: its config from search.json, its model (the recorded one unless
        `model` is given) on `device`, and its saved super-network (checked against the weights, not recalibrated)."""
        run_dir = Path(run_dir)
        summary = RunSummary.read(run_dir)
        config = summary.config
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            loaded = load_model(model or summary.model, **summary.model_options)
        loaded.to(resolve_device(device))
        sn, _, _ = prepare_supernet(loaded, run_dir, config.calib, config.quant, progress=False)
        return cls(run_dir, loaded, config, None, supernet=sn)

    @property
    def best(self) -> Choice:
        return _choice(self.summary, "best")

    @property
    def pareto(self) -> list:
        """Non-dominated (search fitness, BitOPs) records within the budget, cheapest first."""
        if self.search is not None:
            return self.search.pareto
        return list(self.summary.pareto)

    def sampler(self, which: str = "best") -> CompressedSampler:
        s = _sampler(self.supernet, self.loaded, self.config.phase_bounds, _choice(self.summary, which))
        s.info |= _run_info(self.run_dir, self.summary)
        return s

    def export(self, directory: str | Path, which: str = "best", overwrite: bool = False) -> Path:
        s = self.sampler(which)
        return s.export(directory, info=s.info, overwrite=overwrite)

    def report(self, out_dir: str | Path | None = None, peers: dict | None = None) -> tuple[Path, Path]:
        from tmpq.report import write_report

        return write_report(self.run_dir, out_dir, peers)


def compress(
    model: str | LoadedModel = "builtin:fashion",
    budget: Budget | str | float = SearchConfig.budget,
    *,
    prompts: list[str] | None = None,
    guidance_scale: float | None = None,
    steps: int | tuple[int, ...] = 10,
    run_dir: str | Path | None = None,
    fitness: str = FitnessConfig.kind,
    fitness_samples: int = FitnessConfig.num_samples,
    final_samples: int = SearchConfig.final_samples,
    lever: str = SearchConfig.lever,
    generations: int | None = None,
    seed: int = 0,
    calib: CalibConfig = CalibConfig(),
    quant: QuantSpec = QuantSpec(),
    config: SearchConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    execution: Execution = Execution(),
    device: str = "auto",
) -> CompressionResult:
    """Search timesteps and per-layer bits jointly under `budget`; calibration, search and the final
    re-scoring all live in `run_dir` (a temporary directory when None) and resume after an interruption.

    `prompts` and `guidance_scale` (text-to-image pipelines) condition calibration, search and the sampler; for the
    other model options (`classes`, `image_size`, `true_cfg_scale`) pass `load_model(spec, ...)` as `model`.
    `config` overrides everything but `model`, `run_dir`, `resume`, `progress` and `execution` (where candidates
    are evaluated: `Execution(workers=4)` for local processes, `Execution(ray_address="auto")` for Ray).
    `device`: where the model runs — calibration, search, final scoring (`auto`: CUDA when available); a loaded model
    is moved there. Sets glibc to keep freed memory for reuse (`tmpq.allocator`: ~1.5x faster CPU sampling).
    """
    keep_freed_memory()
    target = resolve_device(device)
    if isinstance(model, str):
        loaded = load_model(model, prompts=prompts, guidance_scale=guidance_scale)
    elif prompts is not None or guidance_scale is not None:
        raise TmpqError("pass prompts / guidance_scale to load_model when giving a loaded model")
    else:
        loaded = model
    loaded.to(target)
    if config is None:
        ks = (steps,) if isinstance(steps, int) else tuple(steps)
        evo = EvolutionConfig(seed=seed)
        if generations is not None:
            evo = replace(evo, generations=generations)
        config = SearchConfig(
            budget=Budget.parse(budget, min(ks)),
            steps=ks,
            lever=lever,
            evolution=evo,
            fitness=FitnessConfig(kind=fitness, num_samples=fitness_samples, seed=seed),
            calib=calib,
            quant=quant,
            final_samples=final_samples,
        )
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="tmpq-"))
    result = run_search(loaded, config, run_dir, resume=resume, progress=progress, execution=execution)
    return CompressionResult(run_dir, loaded, config, result)
