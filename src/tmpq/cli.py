"""The `tmpq` command: parses options, calls the library, prints. No logic lives here."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tmpq.errors import TmpqError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Joint timestep + mixed-precision compression of diffusion models (TMPQ-DM and beyond).",
)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a TmpqError as one line naming the problem and the fix, exit 2; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TmpqError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted; completed checkpoints are kept, run the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")]


@app.command()
@_friendly
def train(
    run_dir: Annotated[Path, typer.Option(help="checkpoints and logs; re-run to resume")] = Path("runs/train"),
    out: Annotated[Path | None, typer.Option(help="also copy the EMA weights here (+ a model card)")] = None,
    steps: int = 8000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    max_minutes: Annotated[float | None, typer.Option(help="stop (checkpointed) after this long")] = None,
    autocast: Annotated[str, typer.Option(help="auto|bf16|off; auto uses bf16 only where it is faster")] = "auto",
    device: str = "cpu",
    threads: ThreadsOpt = None,
) -> None:
    """Train the built-in Fashion-MNIST DDPM (EMA, checkpoints, exact resume)."""
    _threads(threads)
    from tmpq.data import load_fashion_mnist
    from tmpq.models.train import TrainConfig, train_ddpm, write_model_card

    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, autocast=autocast)
    images, _ = load_fashion_mnist("train")
    path = train_ddpm(images, run_dir, cfg, max_minutes=max_minutes, device=device)
    typer.echo(f"EMA weights: {path}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        card = write_model_card(out, " ".join(["tmpq", *sys.argv[1:]]))
        typer.echo(f"copied to {out}; model card {card}")


@app.command("train-classifier")
@_friendly
def train_classifier_cmd(
    out: Annotated[Path, typer.Option(help="where to write the classifier safetensors")],
    epochs: int = 5,
    seed: int = 0,
    threads: ThreadsOpt = None,
) -> None:
    """Train the Fashion-MNIST classifier whose features define the default FID/IS."""
    _threads(threads)
    from tmpq.data import load_fashion_mnist
    from tmpq.metrics.classifier import accuracy, save_classifier, train_classifier

    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    model, info = train_classifier(x, y, epochs=epochs, seed=seed)
    info["test_accuracy"] = accuracy(model, xt, yt)
    info["command"] = " ".join(["tmpq", *sys.argv[1:]])
    save_classifier(model, out, info)
    typer.echo(json.dumps(info, indent=2))


@app.command("eval")
@_friendly
def eval_cmd(
    model: Annotated[str, typer.Option(help="builtin:fashion or a .safetensors from `tmpq train`")] = "builtin:fashion",
    steps: int = 10,
    schedule: Annotated[str, typer.Option(help="uniform|quad")] = "quad",
    timesteps: Annotated[str | None, typer.Option(help="explicit decreasing list, e.g. 999,600,300,0")] = None,
    num_samples: int = 1000,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 100,
    reference: Annotated[str, typer.Option(help="fashion-mnist or a folder of real images")] = "fashion-mnist",
    out: Annotated[Path, typer.Option(help="directory for eval.json and samples.png")] = Path("runs/eval"),
    threads: ThreadsOpt = None,
) -> None:
    """Sample the FP model on a schedule and report FID/IS (JSON + sample grid)."""
    _threads(threads)
    from tmpq.evaluate import EvalConfig, evaluate

    ts = _parse_timesteps(timesteps)
    cfg = EvalConfig(
        model=model,
        steps=steps if ts is None else len(ts),
        schedule=schedule,
        timesteps=ts,
        num_samples=num_samples,
        seed=seed,
        eta=eta,
        batch_size=batch_size,
        reference=reference,
    )
    res = evaluate(cfg, out)
    typer.echo(
        f"FID {res.fid:.3f}  IS {res.inception_score:.3f} ± {res.inception_score_std:.3f}  "
        f"({cfg.num_samples} samples, {len(res.timesteps)} steps, {res.sample_wall_s:.1f} s sampling)"
    )
    typer.echo(f"wrote {out / 'eval.json'} and {out / 'samples.png'}")


@app.command()
@_friendly
def sample(
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("runs/samples.png"),
    model: str = "builtin:fashion",
    steps: int = 10,
    schedule: str = "quad",
    timesteps: str | None = None,
    num_samples: int = 64,
    seed: int = 0,
    eta: float = 0.0,
    threads: ThreadsOpt = None,
) -> None:
    """Write a grid of samples from the FP model."""
    _threads(threads)
    from tmpq.images import save_grid
    from tmpq.models.loading import load_model
    from tmpq.sampling.ddim import DDIMSampler, generate
    from tmpq.sampling.schedules import make_timesteps

    loaded = load_model(model)
    ts = _parse_timesteps(timesteps) or make_timesteps(schedule, steps, loaded.schedule.num_train_timesteps)
    images = generate(
        loaded.denoiser, DDIMSampler(loaded.schedule, ts, eta=eta), num_samples, loaded.sample_shape, seed
    )
    typer.echo(f"wrote {save_grid(images, out)}")


def _parse_timesteps(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise TmpqError(f"--timesteps must be comma-separated integers, got {text!r}") from None


if __name__ == "__main__":
    app()


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-"))
            return tuple(range(lo, hi + 1))
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise TmpqError(f"{what} must be comma-separated integers or a range like 8-12, got {text!r}") from None


@app.command()
@_friendly
def calibrate(
    model: Annotated[str, typer.Option(help="builtin:fashion or a .safetensors UNet")] = "builtin:fashion",
    run_dir: Annotated[Path, typer.Option(help="writes calib.safetensors and supernet/ here")] = Path("runs/run"),
    calib_samples: Annotated[int, typer.Option(help="FP DDIM trajectories")] = 128,
    calib_steps: Annotated[int, typer.Option(help="steps per trajectory; every step's input is kept")] = 20,
    w_bits: Annotated[str, typer.Option(help="weight bit-width candidates")] = "2,3,4,5,6,8",
    a_bits: Annotated[str, typer.Option(help="activation bit-width candidates")] = "4,5,6,8",
    threads: ThreadsOpt = None,
) -> None:
    """Calibrate the quantization super-network once for every candidate bit-width (reused by search)."""
    from tmpq.models.loading import load_model
    from tmpq.quant import CalibConfig, QuantSpec
    from tmpq.quant.prepare import prepare_supernet

    _threads(threads)
    spec = QuantSpec(w_bits=_int_list(w_bits, "--w-bits"), a_bits=_int_list(a_bits, "--a-bits"))
    loaded = load_model(model)
    sn, calib, info = prepare_supernet(loaded, run_dir, CalibConfig(calib_samples, calib_steps), spec)
    what = "reused" if info["reused"] else f"calibrated in {info['calib_collect_s'] + info['calibrate_s']:.1f} s"
    typer.echo(f"super-network: {len(sn.units)} quantizable units, {len(calib)} calibration inputs, {what}")
    typer.echo(f"  W {list(spec.w_bits)} x A {list(spec.a_bits)}; pinned: {sn.pinned}")
    typer.echo(f"  FP: {sn.cost.macs / 1e6:.1f} MMACs per forward; saved in {run_dir / 'supernet'}")


@app.command()
@_friendly
def search(
    model: Annotated[str, typer.Option(help="builtin:fashion or a .safetensors UNet")] = "builtin:fashion",
    run_dir: Annotated[Path, typer.Option(help="all artefacts; re-run the same command to resume")] = Path(
        "runs/search"
    ),
    like: Annotated[str | None, typer.Option(help="budget: uniform WxAy at --budget-steps steps")] = "W6A6",
    budget_steps: Annotated[int, typer.Option(help="steps of the --like budget")] = 10,
    bitops: Annotated[float | None, typer.Option(help="budget: fraction of FP BitOPs at 100 steps")] = None,
    gbitops: Annotated[float | None, typer.Option(help="budget: absolute GBitOPs per image")] = None,
    steps: Annotated[str, typer.Option(help="sampling steps K, or a range to search, e.g. 8-12")] = "10",
    grouping: Annotated[str, typer.Option(help="timestep groups: quad | uniform | change")] = "quad",
    phases: Annotated[str, typer.Option(help="timestep bounds of bit phases, e.g. 500 (none: one allocation)")] = "",
    lever: Annotated[str, typer.Option(help="joint | bits (schedule fixed) | timesteps (precision fixed)")] = "joint",
    fixed_precision: Annotated[str, typer.Option(help="precision of a timesteps-only search")] = "W6A6",
    preset: Annotated[str, typer.Option(help="tmpq (frugal, repair) | reference (TMPQ-DM settings)")] = "tmpq",
    fitness: Annotated[str, typer.Option(help="fid | proxy (distance to FP-100 samples, same noise)")] = "fid",
    fitness_samples: int = 256,
    final_samples: Annotated[int, typer.Option(help="re-score top candidates + uniform baseline (0: skip)")] = 1000,
    final_top: Annotated[int, typer.Option(help="how many top candidates the final re-scoring takes")] = 3,
    generations: Annotated[int | None, typer.Option(help="override the preset")] = None,
    population: Annotated[int | None, typer.Option(help="override the preset (children scale with it)")] = None,
    pareto: Annotated[bool, typer.Option(help="NSGA-II over (quality, BitOPs)")] = False,
    seed: int = 0,
    fresh: Annotated[bool, typer.Option(help="ignore a saved search state and start over")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Search timesteps and per-layer bits jointly under a BitOPs budget; writes RUN/search.json."""
    from tmpq.models.loading import load_model
    from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig, run_search

    _threads(threads)
    if sum(x is not None for x in (bitops, gbitops)) > 1:
        raise TmpqError("give one budget: --like, --bitops or --gbitops")
    budget = (
        Budget.fraction(bitops)
        if bitops is not None
        else Budget.gbitops(gbitops)
        if gbitops is not None
        else Budget.like(like or "W6A6", budget_steps)
    )
    if preset not in ("tmpq", "reference"):
        raise TmpqError(f"--preset must be 'tmpq' or 'reference', got {preset!r}")
    evo = EvolutionConfig.tmpq(seed=seed) if preset == "tmpq" else EvolutionConfig.reference(seed=seed)
    if population is not None:
        scale = population / evo.population
        evo = EvolutionConfig(
            **{
                **evo.__dict__,
                "population": population,
                "parents": max(1, round(evo.parents * scale)),
                "mutations": round(evo.mutations * scale),
                "crossovers": round(evo.crossovers * scale),
                "randoms": round(evo.randoms * scale),
            }
        )
    overrides = {"multi_objective": pareto} | ({"generations": generations} if generations else {})
    evo = EvolutionConfig(**{**evo.__dict__, **overrides})
    cfg = SearchConfig(
        budget=budget,
        steps=_int_list(steps, "--steps"),
        grouping=grouping,
        phase_bounds=_int_list(phases, "--phases") if phases else (),
        lever=lever,
        fixed_precision=fixed_precision,
        evolution=evo,
        fitness=FitnessConfig(kind=fitness, num_samples=fitness_samples, seed=seed),
        final_samples=final_samples,
        final_top=final_top,
    )
    loaded = load_model(model)
    res = run_search(loaded, cfg, run_dir, resume=not fresh)
    best = res.best
    summary = json.loads((run_dir / "search.json").read_text())
    fp100 = summary["fp_bitops_full_100"]
    typer.echo(
        f"best ({fitness}): {best.value:.4f}  at {best.bitops / 1e9:.2f} GBitOPs "
        f"({best.bitops / fp100:.4f} of FP-100; budget {res.budget / 1e9:.2f}, {budget.describe()})"
    )
    typer.echo(f"  timesteps: {list(best.candidate.timesteps)}")
    for p, phase in enumerate(best.candidate.bits):
        ws = [w for w, _ in phase if w is not None]
        as_ = [a for _, a in phase if a is not None]
        typer.echo(f"  bits (phase {p}): mean W {sum(ws) / len(ws):.2f}, mean A {sum(as_) / len(as_):.2f}")
    c = summary["search_cost"]
    typer.echo(
        f"  search: {c['evaluations']} candidates, {c['fitness_forwards']:,} image-forwards "
        f"(+{c['overhead_forwards']:,} calibration/sensitivity/reference), {c['search_wall_s']:.0f} s"
    )
    final = summary.get("final")
    if final and final["best"]:
        b, base = final["best"], final["baseline"]
        typer.echo(
            f"  final ({final['samples']} samples, same seeds): best FID {b['fid']:.2f} ({b['label']}) "
            f"at {b['bitops'] / 1e9:.2f} GBitOPs"
        )
        if base:
            typer.echo(
                f"  vs uniform baseline (default schedule, {budget.describe()}): FID {base['fid']:.2f} "
                f"at {base['bitops'] / 1e9:.2f} GBitOPs"
            )
    typer.echo(f"  wrote {run_dir / 'search.json'}")
