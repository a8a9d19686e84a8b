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
