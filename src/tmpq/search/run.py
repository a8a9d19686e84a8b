"""One search, end to end, in a run directory: calibrate (or reuse), build the space, search, write search.json.

Every artefact lives in the run directory and is reused when its inputs match, so a re-run with the same
settings resumes instead of starting over; search.json records the full config, seeds, versions and
checksums, and the cost of the search in denoiser image-forwards and wall time.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from tmpq.device import device_name, resolve_device
from tmpq.errors import TmpqError
from tmpq.evaluate import reference_metric
from tmpq.fileio import read_images, save_images_atomic, write_json_atomic
from tmpq.images import save_grid
from tmpq.metrics.fid import QualityMetric
from tmpq.models.loading import LoadedModel
from tmpq.provenance import provenance
from tmpq.quant.prepare import prepare_supernet
from tmpq.quant.supernet import SuperNet, model_fingerprint
from tmpq.search.budget import Budget, CandidateCost, Repairer
from tmpq.search.config import AUTO, SearchConfig, precision_label, precision_of
from tmpq.search.evolution import EvolutionarySearch, Record, SearchResult
from tmpq.search.fitness import FULL_STEPS, PAIRED_KINDS, FitnessConfig, SampleFitness
from tmpq.search.parallel import Execution, WorkerSpec, check_ray_address, make_evaluator
from tmpq.search.profile import change_profile
from tmpq.search.seeds import seed_candidates, seed_costs
from tmpq.search.sensitivity import layer_sensitivity
from tmpq.search.space import GROUPINGS, Candidate, SearchSpace
from tmpq.search.summary import FinalRow, FinalScores, FpSteps, GroupingChoice, RunSummary, SearchCost, SeedSearch

GROUPING_FILE = "grouping.json"


FEATURE_SHAPE = (1, 32, 32)
"""What the shipped FID classifier scores: Fashion-MNIST-like single-channel 32×32 images."""


def _uses_classifier(cfg: SearchConfig) -> bool:
    return cfg.fitness.kind != "proxy" or cfg.fitness.proxy_space == "features" or cfg.final_samples > 0


def _metric(cfg: SearchConfig):
    """The classifier metric against Fashion-MNIST or the user's folder (`fid_reference`), only when the search
    scores with it (a pixel-proxy search of a user's model needs neither the classifier nor the dataset)."""
    return reference_metric(cfg.fid_reference) if _uses_classifier(cfg) else None


def _check_metric_fits(loaded: LoadedModel, cfg: SearchConfig) -> None:
    """The classifier feature space only fits 1×32×32 images: other models need the pixel proxy and no FID.
    (Latent models are judged on decoded images, so it is their decoded shape that must fit.)"""
    if tuple(loaded.image_shape) == FEATURE_SHAPE:
        return
    if _uses_classifier(cfg):
        raise TmpqError(
            f"this model makes {tuple(loaded.image_shape)} images, but the built-in FID classifier scores "
            f"{FEATURE_SHAPE} ones; search it with --fitness proxy --proxy-space pixels --final-samples 0 "
            "(distance to the FP model's own samples from the same noise)"
        )


def _seed_bits(space: SearchSpace, cfg: SearchConfig):
    """The uniform precision a search starts from: the budget's own (a 'like' budget), else the widest
    uniform setting among --fixed-precision and the calibrated widths that the space offers."""
    start = _start_precision(space, cfg)
    return None if start is None else start[1]


def _start_precision(space: SearchSpace, cfg: SearchConfig) -> tuple[str, tuple] | None:
    """("WxAy", bits) of the uniform setting a search of `space` starts from (see `_seed_bits`); a timesteps-only
    search's fixed bits. None when the space offers no uniform setting."""
    if not space.search_bits:
        return cfg.timesteps_precision, space.fixed_bits
    if cfg.budget.kind == "like":
        return precision_label(cfg.budget.w, cfg.budget.a), space.uniform_bits(cfg.budget.w, cfg.budget.a)
    w_all = sorted({w for wc in space.w_choices for w in wc if w is not None}, reverse=True)
    a_all = sorted({a for ac in space.a_choices for a in ac if a is not None}, reverse=True)
    named = [precision_of(cfg.fixed_precision)] if cfg.fixed_precision is not None else []
    for w, a in [*named, *((w, a) for w in w_all for a in a_all if w == a)]:
        try:
            return precision_label(w, a), space.uniform_bits(w, a)
        except TmpqError:
            continue
    return None


@dataclass(frozen=True)
class SearchContext:
    """What the steps of one search share, passed as one argument: the model, the config (its grouping resolved),
    the run directory, the calibrated super-network, the metric (None when the search does not score with the
    classifier) and whether to print progress."""

    loaded: LoadedModel
    cfg: SearchConfig
    run_dir: Path
    sn: SuperNet
    metric: QualityMetric | None
    progress: bool = True

    def fitness(self, fcfg: FitnessConfig, space: SearchSpace | None = None) -> SampleFitness:
        """A fitness of this model: its prompts (one per sample, cycled) and its decoder go with it."""
        cond = self.loaded.conditioning(fcfg.num_samples)
        decode = self.loaded.decode if self.loaded.decoder is not None else None
        return SampleFitness(
            self.sn, space, self.loaded.schedule, self.loaded.sample_shape, self.metric, fcfg, cond=cond, decode=decode
        )


def _build_space(ctx: SearchContext) -> tuple[SearchSpace, int]:
    """The search space of `ctx.cfg` (and the image-forwards a fresh change profile cost; 0 when cached)."""
    sn, loaded, cfg, run_dir = ctx.sn, ctx.loaded, ctx.cfg, ctx.run_dir
    change, forwards = None, 0
    if cfg.grouping == "change":
        key = {"fingerprint": sn.fingerprint, "what": "change_profile", "samples": 32, "steps": 100}
        cond = loaded.conditioning(32)
        key |= {"conditioning": cond.digest()} if cond is not None else {}

        def measure() -> tuple[float, ...]:
            sn.set_fp()  # a final table builds this after the search, which leaves its last candidate switched on
            return change_profile(sn, loaded.schedule, loaded.sample_shape, cond=cond)

        prof, fresh = _cached_json(run_dir / "change_profile.json", key, measure)
        change = tuple(prof)
        forwards = 32 * 100 if fresh else 0
    kw = dict(
        num_train_timesteps=loaded.schedule.num_train_timesteps,
        steps=cfg.steps,
        grouping=cfg.grouping,
        phase_bounds=cfg.phase_bounds,
        change=change,
        flow=loaded.schedule.prediction_type == "flow",
    )
    base = SearchSpace.from_supernet(sn, **kw)
    if cfg.lever == "bits":
        return SearchSpace.from_supernet(sn, **kw, search_timesteps=False), forwards
    if cfg.lever == "timesteps":
        fixed = base.uniform_bits(*precision_of(cfg.timesteps_precision))
        return SearchSpace.from_supernet(sn, **kw, search_bits=False, fixed_bits=fixed), forwards
    return base, forwards


def _build_fitness(ctx: SearchContext, space: SearchSpace | None) -> tuple[SampleFitness, int]:
    """The fitness, with the FP reference samples of a paired kind loaded from RUN (or made and saved there)."""
    sn, cfg, run_dir = ctx.sn, ctx.cfg, ctx.run_dir
    fitness = ctx.fitness(cfg.fitness, space)
    forwards = 0
    if cfg.fitness.kind in PAIRED_KINDS:
        ref_path = run_dir / "proxy_reference.safetensors"
        meta = {"fitness": json.dumps(asdict(cfg.fitness)), "fingerprint": sn.fingerprint}
        if fitness.cond is not None:
            meta["conditioning"] = fitness.cond.digest()
        if ref_path.is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(ref_path), framework="pt") as fh:
                    if fh.metadata() == meta:
                        fitness.reference = fh.get_tensor("images")
            except Exception:  # a damaged file (safetensors raises several types) is remade, like a stale one
                fitness.reference = None
        if fitness.reference is None:
            save_file({"images": fitness.fp_reference().contiguous()}, str(ref_path), metadata=meta)
            forwards = fitness.reference_forwards
    return fitness, forwards


def _grouping_spaces(ctx: SearchContext) -> tuple[dict[str, SearchSpace], dict[str, int]]:
    """The search space of each grouping, and {"change_profile:<grouping>": image-forwards} for a change profile
    made now (0 when RUN holds it)."""
    spaces, spent = {}, {}
    for g in GROUPINGS:
        spaces[g], spent[f"change_profile:{g}"] = _build_space(replace(ctx, cfg=replace(ctx.cfg, grouping=g)))
    return spaces, spent


def _grouping_schedules(ctx: SearchContext, k: int) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Each grouping's default schedule at K steps (the plain step reductions a user could pick instead of searching),
    and the image-forwards of change profiles made now."""
    spaces, spent = _grouping_spaces(ctx)
    return {g: tuple(space.default_timesteps(k)) for g, space in spaces.items()}, spent


GROUPING_BASIS = "start"
"""What --grouping auto compares (part of RUN/grouping.json's key): the search's starting point on each grouping's
default schedule — uniform PTQ at the budget's precision — with the FP model's scores recorded beside it. Scoring FP
alone chose the `change` grouping under the fidelity fitness on the built-in model, where uniform W6A6 on it is far
less faithful than on the uniform schedule (docs/results.md, 'What tmpq run ships')."""


def resolve_grouping(ctx: SearchContext) -> tuple[SearchContext, GroupingChoice | None, dict]:
    """`ctx` with a concrete grouping. For --grouping auto, the search's starting point (uniform PTQ at the budget's
    precision, or a timesteps-only search's fixed one) samples each grouping's default schedule at the search's
    smallest step count, from the fitness seeds, and is scored by the search's own fitness; the best grouping wins
    (ties keep the reference's quad). The FP model's scores on the same schedules are recorded beside them (and
    decide when the space offers no uniform setting). The scores are kept in RUN/grouping.json, so a resumed search
    and its workers reuse the choice. Returns (the context with that config, the choice with its scores or None when
    not auto, {what: image-forwards spent now})."""
    sn, cfg, run_dir = ctx.sn, ctx.cfg, ctx.run_dir
    if cfg.grouping != AUTO:
        return ctx, None, {}
    k = min(cfg.steps)
    spent: dict[str, int] = {}

    def score() -> dict:
        fitness, spent["proxy_reference"] = _build_fitness(ctx, None)
        spaces, profiles = _grouping_spaces(ctx)
        spent.update(profiles)
        start_scores, fp_scores, schedules, precision = {}, {}, {}, None
        for g, space in spaces.items():
            ts = tuple(space.default_timesteps(k))
            schedules[g] = list(ts)
            fp_scores[g] = fitness.score(fitness.fp_samples(ts))
            spent["grouping_choice"] = spent.get("grouping_choice", 0) + cfg.fitness.num_samples * len(ts)
            start = _start_precision(space, cfg)
            if start is not None:
                precision, bits = start
                images = fitness.samples(space.candidate(ts, bits), space=space)
                start_scores[g] = fitness.score(images)
                spent["grouping_choice"] += cfg.fitness.num_samples * len(ts)
        scores = start_scores if len(start_scores) == len(spaces) else fp_scores
        best = min(GROUPINGS, key=lambda g: (scores[g], GROUPINGS.index(g)))
        return {
            "chosen": best,
            "scores": scores,
            "timesteps": schedules,
            "steps": k,
            "fitness": cfg.fitness.kind,
            "basis": precision if scores is start_scores else "FP",
            "fp_scores": fp_scores,
        }

    key = {"fingerprint": sn.fingerprint, "what": "grouping", "basis": GROUPING_BASIS, "steps": k}
    key |= {"fitness": asdict(cfg.fitness), "budget": cfg.budget.to_dict(), "lever": cfg.lever}
    key |= {"fixed_precision": cfg.fixed_precision, "phases": list(cfg.phase_bounds)}
    stored, _ = _cached_json(run_dir / GROUPING_FILE, key, score)
    choice = GroupingChoice.from_dict(stored)
    chosen = replace(ctx, cfg=replace(cfg, grouping=choice.chosen))
    return chosen, choice, {what: n for what, n in spent.items() if n}


FP_STEPS_FILE = "fp_steps.json"
FP_STEPS_TOLERANCE = 0.10
"""How much worse (relative FID) FP at the proxy's target may be than FP at its best step count before tmpq warns."""


def fp_steps_advice(fids: dict[int, float], target: int) -> str | None:
    """A warning when the FP model is clearly worse at the proxy's target step count than at fewer steps: the
    proxy then rewards candidates for copying a worse sampler (measured on the first built-in model)."""
    best = min(fids, key=lambda n: (fids[n], -n))
    if target not in fids or fids[target] <= (1 + FP_STEPS_TOLERANCE) * fids[best]:
        return None
    shown = ", ".join(f"{n} steps {f:.1f}" for n, f in sorted(fids.items()))
    return (
        f"the FP model gets worse with more steps here (FID on the fitness seeds: {shown}), so the proxy's target, "
        f"FP at {target} steps, is a poor one; consider --proxy-reference-steps {best}"
    )


def proxy_target(fids: dict[int, float]) -> int:
    """The proxy's automatic target: the most steps among the counts whose FP FID is within FP_STEPS_TOLERANCE of the
    best (a sound model: full steps; one that degrades with steps: where it peaks)."""
    best = min(fids.values())
    return max(n for n, f in fids.items() if f <= (1 + FP_STEPS_TOLERANCE) * best)


def check_fp_steps(ctx: SearchContext) -> tuple[SearchContext, FpSteps | None, int]:
    """FID of the FP model at a few uniform step counts on the fitness seeds (kept in RUN/fp_steps.json); with the
    proxy's target left to the search (`reference_steps` None), the target is chosen from it (`proxy_target`),
    otherwise the advice above. Only where the classifier metric scores this model's images; elsewhere an automatic
    target is FP at full steps. Returns (the context with a concrete target, the record, forwards spent now)."""
    sn, loaded, cfg, run_dir, metric = ctx.sn, ctx.loaded, ctx.cfg, ctx.run_dir, ctx.metric
    T = loaded.schedule.num_train_timesteps
    auto = cfg.fitness.reference_steps is None

    def with_target(n: int) -> SearchContext:
        return replace(ctx, cfg=replace(cfg, fitness=replace(cfg.fitness, reference_steps=n)))

    if metric is None or cfg.fitness.kind not in PAIRED_KINDS:
        return (with_target(min(FULL_STEPS, T)) if auto else ctx), None, 0
    target = FULL_STEPS if auto else cfg.fitness.reference_steps
    counts = sorted({n for n in (min(cfg.steps), 20, 50, target) if 1 <= n <= T})
    spent = {"n": 0}

    def measure() -> dict:
        fitness = ctx.fitness(cfg.fitness)
        fids = {}
        for n in counts:
            images = fitness.fp_samples(loaded.schedule.timesteps("uniform", n))
            fids[str(n)] = float(metric.score(images, seed=cfg.fitness.seed).fid)
            spent["n"] += cfg.fitness.num_samples * n
        return {"fid": fids, "samples": cfg.fitness.num_samples}

    key = {"fingerprint": sn.fingerprint, "what": "fp_steps", "steps": counts, "fitness": asdict(cfg.fitness)}
    record, _ = _cached_json(run_dir / FP_STEPS_FILE, key, measure)
    fids = {int(n): f for n, f in record["fid"].items()}
    if auto:
        chosen = proxy_target(fids)
        return with_target(chosen), FpSteps(fids, record["samples"], None, chosen), spent["n"]
    advice = fp_steps_advice(fids, cfg.fitness.reference_steps)
    return ctx, FpSteps(fids, record["samples"], advice, cfg.fitness.reference_steps), spent["n"]


def worker_fitness(
    model: str, run_dir: str, config: SearchConfig, model_options: dict | None = None, device: str = "cpu"
) -> SampleFitness:
    """A search worker's fitness, rebuilt from the run directory the main process has prepared (calibrated
    super-network, change profile, proxy reference): nothing is recomputed, so every worker scores alike. `device`:
    the main process's device type (a local worker's own GPU is chosen by `parallel.lane_spec`)."""
    from tmpq.models.loading import load_model

    loaded = load_model(model, **(model_options or {})).to(resolve_device(device))
    run_dir = Path(run_dir)
    sn, _, prep = prepare_supernet(loaded, run_dir, config.calib, config.quant, progress=False)
    if not prep["reused"]:
        raise TmpqError(f"worker found no calibrated super-network in {run_dir}; the main process prepares it first")
    ctx = SearchContext(loaded, config, run_dir, sn, _metric(config), progress=False)
    ctx, _, _ = check_fp_steps(ctx)  # both cached by the main process
    ctx, _, _ = resolve_grouping(ctx)
    space, _ = _build_space(ctx)
    fitness, _ = _build_fitness(ctx, space)
    return fitness


def _cached_json(path: Path, key: dict, make) -> tuple[object, bool]:
    """(value, computed): the value stored under `key` in `path`, or made now and stored."""
    key = json.loads(json.dumps(key))  # tuples become lists, as they will be when read back
    if path.is_file():
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            d = {}  # a damaged cache is remade, like a stale one
        if isinstance(d, dict) and d.get("key") == key and "value" in d:
            return d["value"], False
    value = json.loads(json.dumps(make()))  # the same types whether fresh or reloaded
    write_json_atomic(path, {"key": key, "value": value}, indent=None)
    return value, True


def run_search(
    loaded: LoadedModel,
    cfg: SearchConfig,
    run_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    execution: Execution = Execution(),
) -> SearchResult:
    """Calibrate (or reuse), search, and write RUN/search.json. Interrupt any time; re-run to resume.

    `execution` says where candidates are evaluated (this process, local worker processes, a Ray cluster);
    it never changes the result, so it is not part of the config a resumed search must match.
    With `cfg.staged`, the two single-lever searches run first (see `_run_stages`)."""
    run_dir = Path(run_dir)
    _check_metric_fits(loaded, cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise TmpqError(f"--run-dir {run_dir} is a file, not a directory; pick a directory path")
    state_path = run_dir / "search_state.json"
    resuming = resume and state_path.is_file()  # a resumed search already holds its first generation
    seeding = bool(cfg.seed_from) and not resuming and not cfg.staged
    seeds = seed_costs(cfg.seed_from) if seeding else None  # a bad seed fails now, before the run directory is made
    if execution.ray_address is not None:
        check_ray_address(execution.ray_address)  # now, not after calibration
    if resuming:  # before anything in the directory is remade under other settings
        check_resumable(state_path, cfg, model_fingerprint(loaded.denoiser))
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.staged:
        if not resuming:
            _run_stages(loaded, cfg, run_dir, resume, progress, execution)
        cfg = replace(cfg, seed_from=(*cfg.seed_from, *(str(run_dir / "stages" / n) for n in STAGES)))
    t_start = time.perf_counter()
    seeding = bool(cfg.seed_from) and not resuming
    if seeding:  # what the seeds cost is kept with this run
        write_json_atomic(run_dir / SEEDS_FILE, seeds if seeds is not None else seed_costs(cfg.seed_from))
    user_cfg, cfg = cfg, cfg.resolved()  # the lever chosen (--lever auto) and the widths it needs calibrated
    if progress and user_cfg.lever == AUTO:
        print(f"lever auto: {_describe_lever(cfg)}")
    sn, calib, prep = prepare_supernet(loaded, run_dir, cfg.calib, cfg.quant, progress=progress)
    ledger = OverheadLedger(run_dir / OVERHEAD_FILE)
    ledger.record("calibration_inputs", prep["collect_forwards"])
    ledger.record("calibration", prep["calibrate_forwards"])
    fp_key = {"fingerprint": sn.fingerprint}
    ctx, fp_steps, forwards = check_fp_steps(SearchContext(loaded, cfg, run_dir, sn, _metric(cfg), progress))
    ledger.record("fp_steps", forwards)
    if fp_steps is not None and progress:
        shown = ", ".join(f"{n} steps {f:.1f}" for n, f in sorted(fp_steps.fid.items()))
        if fp_steps.advice:
            print(f"warning: {fp_steps.advice}")
        elif user_cfg.fitness.reference_steps is None:
            print(f"{cfg.fitness.kind} target: FP at {fp_steps.target} steps (FP FID on the fitness seeds: {shown})")

    ctx, choice, spent = resolve_grouping(ctx)
    cfg = ctx.cfg
    for what, forwards in spent.items():
        ledger.record(what, forwards)
    if choice is not None and progress:
        print(f"grouping auto: {choice.describe()}")

    space, overhead = _build_space(ctx)
    ledger.record("change_profile", overhead)
    cost = CandidateCost(space, sn.cost)
    budget = cfg.budget.resolve(cost)
    cost.require_within(budget, cfg.budget.describe())  # before sensitivity and reference samples are paid for

    repairer = None
    if cfg.evolution.repair and space.search_bits:
        key = fp_key | {"what": "sensitivity", "inputs": cfg.sensitivity_inputs, "spec": cfg.quant.to_dict()}
        sens, fresh = _cached_json(
            run_dir / "sensitivity.json", key, lambda: layer_sensitivity(sn, calib, cfg.sensitivity_inputs, progress)
        )
        sens = {n: {g: {int(b): v for b, v in d.items()} for g, d in e.items()} for n, e in sens.items()}
        repairer = Repairer(cost, sens)
        if fresh:
            ledger.record(
                "sensitivity", sum(cfg.sensitivity_inputs * (len(e["w"]) + len(e["a"]) + 1) for e in sens.values())
            )

    fitness, overhead = _build_fitness(ctx, space)
    ledger.record("proxy_reference", overhead)
    evaluator = None
    if execution.workers or execution.ray_address is not None:
        spec = WorkerSpec(
            "tmpq.search.run:worker_fitness",
            {
                "model": loaded.spec,
                "run_dir": str(run_dir),
                "config": cfg,
                "model_options": loaded.options,
                "device": loaded.device.type,
            },
            threads=execution.threads,
        )
        evaluator = make_evaluator(None, spec, execution.workers, execution.ray_address, execution.timeout_s)

    initial: list[Candidate] = []
    default_bits = None
    if cfg.seed_candidates:
        default_bits = _seed_bits(space, cfg)
        if default_bits is not None:
            initial = [space.candidate(space.default_timesteps(k), default_bits) for k in space.steps]
    baseline = initial[0] if initial else None
    if seeding:  # (a resumed search does not read its seeds: they need not exist any more)
        initial = seed_candidates(cfg.seed_from, space, default_bits)
        write_json_atomic(run_dir / SEEDED_FILE, [c.key for c in initial])

    search = EvolutionarySearch(
        space,
        fitness,
        cost,
        budget,
        cfg.evolution,
        state_path,
        repairer=repairer,
        initial=initial,
        progress=progress,
        run_info={"search_config": user_cfg.to_dict(), "model_fingerprint": sn.fingerprint},
        evaluator=evaluator,
    )
    result = search.run(resume=resume)
    final = None
    if cfg.final_samples > 0:
        peers, profiles = _grouping_schedules(ctx, min(space.steps))
        for what, forwards in profiles.items():
            ledger.record(what, forwards)
        excluded = {baseline.key} if baseline is not None else set()
        seeded = _seeded_keys(run_dir, cfg, space, default_bits) - excluded
        top, forwards = race_top(ctx, space, result, exclude=excluded, include=seeded)
        ledger.record("race", forwards)
        final = _final_eval(ctx, space, cost, top, baseline, peers)
    wall = time.perf_counter() - t_start
    _write_result(
        ctx,
        user_cfg,
        space,
        cost,
        result,
        overhead_forwards=ledger.total,
        wall_s=wall,
        final=final,
        fp_steps=fp_steps,
        choice=choice,
    )
    result.supernet = sn
    return result


RESUME_FREE = ("final_samples", "final_top", "final_pool", "seed_from", "extra")
"""Settings a resumed search may change: the final re-scoring is keyed on its own (final.json), and a resumed
search no longer reads its seeds. Every other setting decides the run directory's files and its result."""


def _differences(old: object, new: object, path: str = "") -> list[str]:
    """Dotted paths (with old -> new values) where two JSON trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            if k in old and k in new:
                out += _differences(old[k], new[k], f"{path}.{k}" if path else k)
            elif k in new:  # a setting the stored run predates: it ran at that setting's default
                continue
            else:
                out.append(f"{path}.{k}" if path else k)
        return out
    return [] if old == new else [f"{path} ({json.dumps(old)} -> {json.dumps(new)})"]


def check_resumable(state_path: Path, cfg: SearchConfig, fingerprint: str) -> None:
    """Refuse to resume a search under settings (or weights) other than the ones it was started with.

    Its calibration set, super-network, proxy reference and best candidate were all made under the stored
    settings; resuming under others would remake some of them and keep a result scored under the old ones."""
    try:
        info = json.loads(state_path.read_text()).get("run_info", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        raise TmpqError(f"search state {state_path} is damaged; start over with --fresh or a new --run-dir") from None
    old_fp = info.get("model_fingerprint")
    if old_fp is not None and old_fp != fingerprint:
        raise TmpqError(
            f"{state_path.parent} holds a search of another model (other weights); its files are left untouched: "
            "pick another --run-dir for this model"
        )
    stored = {k: v for k, v in info.get("search_config", {}).items() if k not in RESUME_FREE}
    current = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    diff = _differences(stored, current)
    if diff:
        raise TmpqError(
            f"{state_path.parent} holds a search made with other settings: {'; '.join(diff)}. Its files are left "
            "untouched: resume with the same options, start over with --fresh, or use a new --run-dir"
        )


OVERHEAD_FILE = "overhead.json"


class OverheadLedger:
    """Image-forwards spent making each prepared file of a run directory (calibration, profile, sensitivity, proxy
    reference), kept on disk when made: a resumed run reuses the files and still reports what they cost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, int] = {}
        if path.is_file():
            try:
                self.entries = {k: int(v) for k, v in json.loads(path.read_text()).items()}
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                self.entries = {}  # a damaged ledger only loses the record of past cost, never a result

    def record(self, what: str, forwards: int) -> None:
        """`forwards` > 0: `what` was (re)made now at that cost; 0: it was reused, its recorded cost stands."""
        if forwards > 0:
            self.entries[what] = int(forwards)
            write_json_atomic(self.path, self.entries)

    @property
    def total(self) -> int:
        return sum(self.entries.values())


SEEDS_FILE = "seeds.json"
"""What the searches that seeded this one cost (their `search_cost`), kept in case they are deleted later."""

SEEDED_FILE = "seeded.json"
"""The keys of the candidates the seed searches gave this one (always raced: see `race_top`)."""


def _seeded_keys(run_dir: Path, cfg: SearchConfig, space: SearchSpace, default_bits) -> set[str]:
    """The seeded candidates' keys: from RUN/seeded.json, or, for a run seeded before tmpq kept that file, from the
    seed searches if they are still there."""
    if not cfg.seed_from:
        return set()
    path = run_dir / SEEDED_FILE
    if path.is_file():
        return set(json.loads(path.read_text()))
    try:
        return {c.key for c in seed_candidates(cfg.seed_from, space, default_bits)}
    except TmpqError:  # a seed search since deleted: nothing is raced beyond the pool
        return set()


PREPARED_FILES = (
    "model.json",
    "calib.safetensors",
    "supernet",
    "sensitivity.json",
    "change_profile.json",
    "proxy_reference.safetensors",
    GROUPING_FILE,
    FP_STEPS_FILE,
    "final_fp",
)
"""What one run directory can lend another of the same model: each is keyed by its inputs and checked on reuse,
so a file made under other settings is remade, never misused."""


def share_prepared(src: Path, dst: Path) -> None:
    """Copy `src`'s prepared files (calibration, super-network, sensitivity, profile, proxy reference) into `dst`
    where it lacks them: the stages of a staged search, or benchmark runs that share one calibration."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in PREPARED_FILES:
        if (src / name).exists() and not (dst / name).exists():
            (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dst / name)


STAGES = ("bits", "timesteps")
"""The single-lever searches a staged search runs first, each in RUN/stages/<lever>."""


def _run_stages(loaded: LoadedModel, cfg: SearchConfig, run_dir: Path, resume, progress, execution) -> None:
    """The single-lever searches of a staged search, in RUN/stages/bits and RUN/stages/timesteps, on the same
    budget, fitness and evolution settings; the joint search then starts from both winners and their
    combination. Measured on the built-in model (README: 'Every search option'): with the proxy aimed at FP-20,
    joint alone 207.8, timesteps-only 206.0, bits-only 213.6, staged joint 188.0 (FID, 5,000 samples).
    Each stage resumes like any search; the calibration is made once and shared."""
    fixed = precision_label(cfg.budget.w, cfg.budget.a) if cfg.budget.kind == "like" else cfg.timesteps_precision
    single = replace(cfg, staged=False, seed_from=(), final_samples=0)
    for name in STAGES:  # bits first: it calibrates every width, which the timesteps stage then reuses
        stage_cfg = replace(single, lever=name, fixed_precision=fixed)
        stage_dir = run_dir / "stages" / name
        share_prepared(run_dir, stage_dir)
        if progress:
            print(f"stage {name}: {stage_dir}")
        res = run_search(loaded, stage_cfg, stage_dir, resume=resume, progress=progress, execution=execution)
        res.supernet.unwrap()  # the next stage wraps the same model again
        share_prepared(stage_dir, run_dir)


class FpRowCache:
    """The final table's FP rows, kept in RUN/final_fp/ apart from final.json: they depend only on the model, the
    steps, the samples and seeds and the FID reference (not on the search, its fitness or its top candidates), so a
    search with other flags, or a run that borrowed the folder (`share_prepared`), reuses them instead of sampling
    FP at 100 steps again. Each row is stored under the JSON of everything it depends on."""

    def __init__(self, ctx: SearchContext, fit: SampleFitness) -> None:
        self.run_dir = ctx.run_dir
        self.dir, self.path = ctx.run_dir / "final_fp", ctx.run_dir / "final_fp" / "rows.json"
        loaded, fcfg = ctx.loaded, fit.config
        self.base = {
            "model": ctx.sn.fingerprint,
            "options": json.loads(json.dumps(loaded.options, default=str)),  # guidance scale, image size, ...
            "schedule": repr(loaded.schedule),
            "shape": list(loaded.sample_shape),
            "samples": fcfg.num_samples,
            "seed": fcfg.seed,
            "fid_reference": ctx.cfg.fid_reference,
            "conditioning": fit.cond.digest() if fit.cond is not None else None,
        }
        self.rows: dict = {}
        self._images: dict[tuple, torch.Tensor] = {}
        if self.path.is_file():
            try:
                self.rows = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.rows = {}  # a damaged cache is remade, like a stale one

    def _key(self, timesteps) -> str:
        return json.dumps(self.base | {"timesteps": [int(t) for t in timesteps]}, sort_keys=True)

    def get(self, timesteps) -> dict | None:
        row = self.rows.get(self._key(timesteps))
        if row is None or not (self.run_dir / row.get("grid", "")).is_file():
            return None
        return row

    def grid_path(self, timesteps, name: str) -> Path:
        digest = hashlib.sha256(self._key(timesteps).encode()).hexdigest()[:10]
        return self.dir / f"{name}_{digest}.png"

    def images(self, timesteps, make) -> torch.Tensor:
        """The FP samples on `timesteps` (what every row's FID to FP is measured against): held once read, from
        RUN/final_fp/, or `make()`-d once and kept there."""
        key = tuple(timesteps)
        if key not in self._images:
            path = self.grid_path(timesteps, "images").with_suffix(".safetensors")
            try:
                self._images[key] = read_images(path)
            except (OSError, KeyError, SafetensorError):  # not made yet, or damaged: made (again) now
                self._images[key] = make()
                save_images_atomic(path, self._images[key])
        return self._images[key]

    def put(self, timesteps, row: dict) -> None:
        self.rows[self._key(timesteps)] = row
        write_json_atomic(self.path, self.rows)


RACE_FILE = "race.json"


def race_top(
    ctx: SearchContext,
    space: SearchSpace,
    result: SearchResult,
    exclude: set[str] = frozenset(),
    include: set[str] = frozenset(),
) -> tuple[list[Record], int]:
    """The candidates the final table re-scores, best first, and the image-forwards spent now; candidates keyed in
    `exclude` (the uniform baseline, a row of its own) are passed over before anything is scored, so every top row and
    every raced candidate is a search result. Without a pool: the search's top `final_top` by its fitness. With
    `final_pool` > `final_top`: the search's best `final_pool`, scored again by the same fitness on as many fresh seeds
    (after the final table's, so no seed is shared with the search or the table) and re-ranked by that score alone.
    Among many candidates the best by a noisy fitness is mostly the one whose noise suits the fitness seeds
    (docs/results.md, 'Which fitness ranks candidates'); a score on seeds the search never saw carries no such selection
    bias. Candidates keyed in `include` (the winners of the searches that seeded this one, e.g. a staged search's
    single-lever winners) join the pool whatever their rank: the joint search's mutations of them chase the same seeds
    and can crowd them out of the best `final_pool`, though they come from smaller spaces, where that selection bias
    is weaker. Scores are kept in RUN/race.json, candidate by candidate, so a killed race resumes."""
    cfg = ctx.cfg
    raced = cfg.final_pool > cfg.final_top and cfg.final_samples > 0
    n = cfg.final_pool if raced else cfg.final_top
    pool = [r for r in result.top(n + len(exclude)) if r.candidate.key not in exclude][:n]
    if not raced:
        return pool, 0
    joining = include - exclude - {r.candidate.key for r in pool}
    pool += [r for r in result.top(len(result.records)) if r.candidate.key in joining]
    fcfg = replace(cfg.fitness, seed=cfg.fitness.seed + cfg.final_samples)
    key = json.loads(json.dumps({"fingerprint": ctx.sn.fingerprint, "fitness": asdict(fcfg)}))
    path = ctx.run_dir / RACE_FILE
    scores: dict[str, float] = {}
    if path.is_file():
        d = json.loads(path.read_text())
        scores = d["scores"] if d.get("key") == key else {}
    fit, forwards = ctx.fitness(fcfg, space), 0
    for i, r in enumerate(pool):
        k = r.candidate.key
        if k not in scores:
            with torch.no_grad():
                scores[k] = fit.score(fit.samples(r.candidate))
            forwards += fcfg.num_samples * len(r.candidate.timesteps)
            write_json_atomic(path, {"key": key, "scores": scores})
        if ctx.progress:
            print(f"race {i + 1}/{len(pool)}: {r.value:.4g} on the search's seeds, {scores[k]:.4g} on fresh ones")
    forwards += fit.reference_forwards
    ranked = sorted(pool, key=lambda r: (scores[r.candidate.key], r.bitops))
    return ranked[: cfg.final_top], forwards


def _final_eval(
    ctx: SearchContext,
    space: SearchSpace,
    cost: CandidateCost,
    top: list[Record],
    baseline,
    peer_schedules: dict[str, tuple[int, ...]],
) -> FinalScores:
    """Re-score, on more samples and the same seeds for all: the FP model at full steps and at the search's
    step count on every rule-based schedule (plain step reduction), uniform precision on the default schedule and
    on the schedule where FP scored best (plain PTQ), and the search's top candidates. The search fitness used few
    samples; the final ranking should not. A 64-image grid of every row is kept in RUN/final/ (same noise in every
    grid; the FP rows' in RUN/final_fp/)."""
    sn, loaded, cfg, run_dir, metric, progress = ctx.sn, ctx.loaded, ctx.cfg, ctx.run_dir, ctx.metric, ctx.progress
    path = run_dir / "final.json"
    key = {"samples": cfg.final_samples, "top": cfg.final_top, "fitness": asdict(cfg.fitness), "model": sn.fingerprint}
    if cfg.final_pool:  # older runs' keys stay valid
        key["pool"] = cfg.final_pool
    if cfg.fid_reference != "fashion-mnist":  # older runs' keys stay valid
        key["fid_reference"] = cfg.fid_reference
    key = json.loads(json.dumps(key))
    done = {}
    if path.is_file():
        d = json.loads(path.read_text())
        if d.get("key") == key:
            done = d["rows"]
    fcfg = FitnessConfig(
        kind="fid", num_samples=cfg.final_samples, seed=cfg.fitness.seed, batch_size=cfg.fitness.batch_size
    )
    fit = ctx.fitness(fcfg, space)
    k = min(space.steps)
    grids = run_dir / "final"
    fp_rows = FpRowCache(ctx, fit)
    full = tuple(loaded.schedule.timesteps("uniform", FULL_STEPS))
    fp_stats: dict = {}  # FP-100's FID statistics, extracted once for every row

    used: list[str] = []  # this table's rows: a resumed run whose race now ranks others keeps the old ones in `done`

    def score(row_key: str, label: str, cand: Candidate | None, timesteps: tuple[int, ...]) -> None:
        if row_key in used:  # a candidate that is two rows at once (e.g. a top row that is PTQ on another schedule)
            return
        used.append(row_key)
        if row_key in done:
            done[row_key]["label"] = label
            return
        if cand is None and (row := fp_rows.get(timesteps)) is not None:
            done[row_key] = {**row, "label": label}  # the FP model on these steps, scored by an earlier search
            write_json_atomic(path, {"key": key, "rows": done})
            return
        t0 = time.perf_counter()
        if cand is None:
            images = fit.fp_samples(timesteps)
            bitops = cost.fp_bitops(len(timesteps))
        else:
            images = fit.samples(cand)
            bitops = cost.bitops(cand)
        scores = metric.score(images, seed=cfg.fitness.seed)
        to_fp = None
        if timesteps == full and cand is None:
            fp_rows.images(full, lambda: images)  # the reference: kept for every later row and run
        else:
            if not fp_stats:
                fp_stats.update(metric.stats(fp_rows.images(full, lambda: fit.fp_samples(full))))
            to_fp = metric.fid_between(images, reference_stats=fp_stats)
        name = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
        grid_path = fp_rows.grid_path(timesteps, name) if cand is None else grids / f"{name}.png"
        grid = save_grid(images[:64], grid_path, nrow=8)
        done[row_key] = FinalRow(
            label=label,
            kind="fp" if cand is None else "quantized",
            candidate=cand,
            timesteps=tuple(timesteps),
            fid=scores.fid,
            inception_score=scores.inception_score,
            bitops=bitops,
            forwards=cfg.final_samples * len(timesteps),
            wall_s=round(time.perf_counter() - t0, 2),
            grid=str(grid.relative_to(run_dir)),
            fid_to_fp=to_fp,
        ).to_dict()
        if cand is None:
            fp_rows.put(timesteps, done[row_key])
        write_json_atomic(path, {"key": key, "rows": done})
        if progress:
            print(f"final {label}: FID {scores.fid:.2f} ({cfg.final_samples} samples)")

    score(f"fp:{FULL_STEPS}", f"FP, {FULL_STEPS} steps", None, full)
    # plain step reduction on the search's grouping and on every other rule-based schedule, so the table shows the
    # strongest FP peer at K steps whatever grouping the search was given
    fp_k = {space.grouping: (f"fp:{k}", tuple(space.default_timesteps(k)))}  # grouping: (row key, schedule)
    for g, ts in peer_schedules.items():
        if g != space.grouping and ts not in [s for _, s in fp_k.values()]:
            fp_k[g] = (f"fp:{k}:{g}", ts)
    for g, (row_key, ts) in fp_k.items():
        score(row_key, f"FP, {k} steps ({g})", None, ts)
    if baseline is not None:
        score(baseline.key, "baseline", baseline, baseline.timesteps)
        # uniform PTQ on the schedule where FP scored best, when that is not the search's own default schedule: the
        # obvious alternative a user would try, so it is measured (and shipped if it wins)
        best_g = min(fp_k, key=lambda g: (done[fp_k[g][0]]["fid"], g != space.grouping))
        if fp_k[best_g][1] != tuple(baseline.timesteps):
            other = Candidate(fp_k[best_g][1], baseline.bits)
            score(other.key, f"baseline ({best_g} schedule)", other, other.timesteps)
    for i, r in enumerate(top):
        score(r.candidate.key, f"top{i + 1}", r.candidate, r.candidate.timesteps)
    criterion = "fid_to_fp" if cfg.fitness.kind == "fid_to_fp" else "fid"  # ship by what the search optimised
    return FinalScores(cfg.final_samples, tuple(FinalRow.from_dict(done[k]) for k in used), criterion)


def _describe_lever(cfg: SearchConfig) -> str:
    """What --lever auto chose, and why (printed before the search)."""
    if cfg.lever == "timesteps":
        return (
            f"timesteps at {cfg.fixed_precision}, the budget's precision (the search with the fewest genes, least "
            "prone to chasing its seeds' noise; --lever joint searches the bits too)"
        )
    why = "a staged search ends in one" if cfg.staged else "the budget names no precision to keep"
    return f"joint ({why})"


def _write_result(
    ctx: SearchContext,
    cfg: SearchConfig,
    space: SearchSpace,
    cost: CandidateCost,
    result: SearchResult,
    *,
    overhead_forwards: int,
    wall_s: float,
    final: FinalScores | None,
    fp_steps: FpSteps | None,
    choice: GroupingChoice | None,
) -> None:
    """RUN/search.json: the result, its cost and everything that produced it (`cfg` as the user gave it)."""
    loaded, best = ctx.loaded, result.best
    RunSummary(
        best=best,
        quant_configs=tuple(space.quant_configs(best.candidate)),
        budget_bitops=result.budget,
        budget=cfg.budget.describe(),
        fp_bitops_full_100=cost.fp_bitops(100),
        config=cfg,
        model=loaded.spec,
        pareto=tuple(result.pareto),
        top=tuple(result.top(10)),
        history=tuple(result.history),
        final=final,
        search_cost=SearchCost(
            fitness_forwards=result.forwards,
            overhead_forwards=overhead_forwards,
            final_forwards=sum(r.forwards for r in final.rows) if final else 0,
            evaluations=len(result.records),
            search_wall_s=result.wall_s,
            this_call_wall_s=round(wall_s, 2),
        ),
        seed_searches=_seed_searches(ctx.run_dir, cfg),
        grouping=space.grouping,
        grouping_choice=choice,
        lever=ctx.cfg.lever,
        fp_steps=fp_steps,
        model_options=dict(loaded.options),
        noise_schedule=loaded.schedule,
        provenance=provenance({"model": loaded.weights_path} if loaded.weights_path else {})
        | {"device": device_name(loaded.device)},  # results are per device (float rounding differs)
    ).write(ctx.run_dir)


def _seed_searches(run_dir: Path, cfg: SearchConfig) -> tuple[SeedSearch, ...]:
    path = run_dir / SEEDS_FILE
    if not (cfg.seed_from and path.is_file()):
        return ()
    return tuple(
        SeedSearch(s["run_dir"], SearchCost.from_dict(s.get("search_cost", {}))) for s in json.loads(path.read_text())
    )


__all__ = ["Budget", "SearchConfig", "run_search", "share_prepared"]
