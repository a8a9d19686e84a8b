"""The `tmpq` command: parses options, calls the library, prints. No logic lives here."""

from __future__ import annotations

import errno
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from tmpq.allocator import keep_freed_memory
from tmpq.device import resolve_device
from tmpq.errors import TmpqError
from tmpq.evaluate import EvalConfig
from tmpq.models.train_config import TrainConfig
from tmpq.quant.calibration import CalibConfig
from tmpq.quant.config import QuantSpec
from tmpq.search.config import AUTO, SearchConfig, precision_label
from tmpq.search.fitness import FitnessConfig

# Every option's default is the config class's own (one default per setting); these spell the tuple ones.
_W_BITS = ",".join(map(str, QuantSpec.w_bits))
_A_BITS = ",".join(map(str, QuantSpec.a_bits))
_RECONSTRUCTION = QuantSpec.reconstruction or "none"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Joint timestep + mixed-precision compression of diffusion models (TMPQ-DM and beyond).",
)


_DEBUG = {"on": False}  # set by --debug (the app callback); read only by the error boundary


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="on an error, show the full traceback")] = False) -> None:
    _DEBUG["on"] = debug
    keep_freed_memory()  # every command samples or searches: ~1.5x faster on glibc (tmpq.allocator)


_OS_FIXES = {
    errno.ENOENT: "check that the path exists",
    errno.EISDIR: "give a file path, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory; pick another path",
    errno.EACCES: "pick a location you can write to, or fix its permissions",
    errno.EPERM: "pick a location you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only; pick a writable location (e.g. another --run-dir or --out)",
    errno.ENOSPC: "free some disk space, or write elsewhere",
    errno.EEXIST: "pick another path",
}


def describe_error(exc: BaseException) -> str:
    """One line naming the problem and the fix, for any exception that reaches the command line."""
    if isinstance(exc, TmpqError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        fix = _OS_FIXES.get(exc.errno, "check the path and the disk")
        return f"{exc.strerror or exc}{where}; {fix}"
    if isinstance(exc, json.JSONDecodeError):
        return f"a JSON file is damaged ({exc}); delete it (or use --fresh) to have it remade"
    if type(exc).__name__ == "SafetensorError":
        return f"a .safetensors file is damaged ({exc}); delete it to have it remade, or re-export it"
    return (
        f"unexpected {type(exc).__name__}: {exc}. This is an unsupported input or a bug in tmpq; "
        "re-run with `tmpq --debug ...` for the traceback and report it"
    )


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's one error boundary: any exception becomes one line naming the problem and the fix (exit 2 for
    bad input, 1 for an unexpected error), never a traceback unless --debug asks for it."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            typer.secho("interrupted; completed checkpoints are kept, run the same command to resume", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if _DEBUG["on"]:
                raise
            typer.secho(f"error: {describe_error(exc)}", fg=typer.colors.RED, err=True)
            known = isinstance(exc, TmpqError | OSError | json.JSONDecodeError) or "Safetensor" in type(exc).__name__
            raise typer.Exit(2 if known else 1) from None

    return wrapper


def _threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise TmpqError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


MODEL_HELP = (
    "builtin:fashion, a .safetensors from `tmpq train`, a diffusers pipeline/model (dir or hub id), module:factory"
)
ThreadsOpt = Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice)")]
DeviceOpt = Annotated[str, typer.Option(help="where the model runs: auto (CUDA when available) | cpu | cuda | cuda:N")]
PromptsOpt = Annotated[
    Path | None, typer.Option(help="text-to-image: prompt file, one per line (default: the shipped list)")
]
ClassesOpt = Annotated[
    str | None, typer.Option(help="class-conditional (DiT): label ids, e.g. 207,360 (default: every class)")
]
GuidanceOpt = Annotated[float | None, typer.Option(help="text-to-image: classifier-free guidance scale (7.5)")]
TrueCfgOpt = Annotated[
    float | None,
    typer.Option(help='FLUX: FluxPipeline\'s true classifier-free guidance against the negative prompt "" [1: off]'),
]
ImageSizeOpt = Annotated[
    str | None, typer.Option(help="FLUX: the image size to compress for, in pixels: 512 or HEIGHTxWIDTH [1024]")
]
ReconOpt = Annotated[
    str,
    typer.Option(
        help="none (nearest rounding in calibrated ranges) | adaround (learned rounding per layer and width) | brecq "
        "(learned rounding per block and width, and learned activation steps per width)"
    ),
]
ReconPresetOpt = Annotated[str, typer.Option(help="reconstruction cost: demo (2 CPU cores) | paper (20k iterations)")]
BiasCorrectionOpt = Annotated[
    bool,
    typer.Option(
        "--bias-correction/--no-bias-correction",
        help="bias-correct the output layer's rounding (its offset is eps-hat's own); off: nearest everywhere",
    ),
]
ReconItersOpt = Annotated[int | None, typer.Option(help="override the preset's iterations per unit and width")]
ReconInputsOpt = Annotated[
    str,
    typer.Option(
        help="what BRECQ blocks learn from: fp (the FP model's block inputs) | quantized (earlier blocks at the width "
        "being learned, the FP output as target: BRECQ's asymmetric reconstruction) | mixed (each input element from "
        "either, at even odds: QDrop)"
    ),
]
Format8Opt = Annotated[
    str,
    typer.Option(
        help="what every 8-bit candidate is: int8 (integer codes: x86 CPUs) | fp8_e4m3 (float8: Hopper/Ada GPUs, "
        "run with --backend fp8)"
    ),
]
BackendOpt = Annotated[
    str | None,
    typer.Option(
        help="with --compressed: run on int8 kernels (int8), float8 kernels (fp8: a --format8 fp8_e4m3 sampler), "
        "bit-packed weights (packed), lean fake-quant (fake), or the device's kernel for the sampler's format (auto)"
    ),
]
DtypeOpt = Annotated[str, typer.Option(help="with --backend: float arithmetic float32|bfloat16|float16")]


def _image_size(text: str | None) -> tuple[int, int] | None:
    """--image-size: one side (a square) or HEIGHTxWIDTH, in pixels."""
    if text is None:
        return None
    sides = text.lower().split("x")
    if len(sides) > 2 or not all(v.strip().isdigit() for v in sides):
        raise TmpqError(f"--image-size takes pixels as 512 or HEIGHTxWIDTH (e.g. 768x1024), got {text!r}")
    h = int(sides[0])
    return (h, int(sides[-1]))


def _load(
    model: str,
    prompts: Path | None,
    guidance_scale: float | None,
    classes: str | None = None,
    image_size: str | None = None,
    true_cfg_scale: float | None = None,
):
    """load_model with the conditional options, only when given (other models refuse them)."""
    from tmpq.models.loading import load_model
    from tmpq.models.parts import read_prompts

    kw = _model_options(guidance_scale, classes, image_size, true_cfg_scale)
    return load_model(model, **kw, **({"prompts": read_prompts(prompts)} if prompts is not None else {}))


def _model_options(
    guidance_scale: float | None, classes: str | None, image_size: str | None, true_cfg_scale: float | None
) -> dict[str, Any]:
    """load_model's conditional keyword arguments from their command-line values, only those given."""
    kw: dict[str, Any] = {"guidance_scale": guidance_scale} if guidance_scale is not None else {}
    if classes is not None:
        kw["classes"] = parse_ints(classes, "--classes", distinct=False)
    if image_size is not None:
        kw["image_size"] = _image_size(image_size)
    if true_cfg_scale is not None:
        kw["true_cfg_scale"] = true_cfg_scale
    return kw


@app.command()
@_friendly
def train(
    run_dir: Annotated[Path, typer.Option(help="checkpoints and logs; re-run to resume")] = Path("runs/train"),
    out: Annotated[Path | None, typer.Option(help="also copy the EMA weights here (+ a model card)")] = None,
    arch: Annotated[
        str | None,
        typer.Option(help=f"unet | dit (class-conditional DiTTransformer2DModel) [{TrainConfig.architecture}]"),
    ] = None,
    steps: Annotated[int | None, typer.Option(help=f"optimizer steps [{TrainConfig.steps}]")] = None,
    batch_size: Annotated[int | None, typer.Option(help=f"[{TrainConfig.batch_size}]")] = None,
    lr: Annotated[float | None, typer.Option(help=f"AdamW peak learning rate, cosine decay [{TrainConfig.lr}]")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help=f"[{TrainConfig.warmup_steps}]")] = None,
    ema_decay: Annotated[float | None, typer.Option(help=f"[{TrainConfig.ema_decay}]")] = None,
    channels: Annotated[
        str | None, typer.Option(help=f"UNet block widths, comma-separated {list(TrainConfig.block_out_channels)}")
    ] = None,
    layers_per_block: Annotated[
        int | None, typer.Option(help=f"ResNet layers per UNet block [{TrainConfig.layers_per_block}]")
    ] = None,
    patch_size: Annotated[int | None, typer.Option(help=f"DiT patch side [{TrainConfig.patch_size}]")] = None,
    transformer_layers: Annotated[
        int | None, typer.Option(help=f"DiT transformer blocks [{TrainConfig.transformer_layers}]")
    ] = None,
    attention_heads: Annotated[int | None, typer.Option(help=f"DiT heads [{TrainConfig.attention_heads}]")] = None,
    head_dim: Annotated[int | None, typer.Option(help=f"DiT head width [{TrainConfig.head_dim}]")] = None,
    class_dropout: Annotated[
        float | None,
        typer.Option(
            help=f"DiT: share of labels trained as the null class, for guidance [{TrainConfig.class_dropout}]"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help=f"[{TrainConfig.seed}]")] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(help="start from these weights (a `tmpq train` .safetensors, same architecture), not a seed"),
    ] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help=f"[{TrainConfig.checkpoint_every}]")] = None,
    log_every: Annotated[
        int | None, typer.Option(help=f"read the loss back (a device sync) every N steps [{TrainConfig.log_every}]")
    ] = None,
    max_minutes: Annotated[float | None, typer.Option(help="stop (checkpointed) after this long")] = None,
    autocast: Annotated[
        str | None, typer.Option(help=f"auto|bf16|off; auto: bf16 only where faster [{TrainConfig.autocast}]")
    ] = None,
    device: str = "cpu",
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (faster on GPUs)")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Train a Fashion-MNIST DDPM like the built-in ones, a UNet or (--arch dit) a class-conditional DiT (EMA,
    checkpoints, exact resume). Unset options take TrainConfig's defaults (in brackets)."""
    _threads(threads)
    from tmpq.data import load_fashion_mnist
    from tmpq.models.train import check_weights_target, train_ddpm, write_model_card

    if out is not None:
        check_weights_target(out)  # before hours of training, not after

    given = {
        "architecture": arch,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "ema_decay": ema_decay,
        "block_out_channels": None if channels is None else parse_ints(channels, "--channels", distinct=False),
        "layers_per_block": layers_per_block,
        "patch_size": patch_size,
        "transformer_layers": transformer_layers,
        "attention_heads": attention_heads,
        "head_dim": head_dim,
        "class_dropout": class_dropout,
        "seed": seed,
        "init_from": None if init_from is None else str(init_from),
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
        "autocast": autocast,
    }
    cfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    images, labels = load_fashion_mnist("train")
    path = train_ddpm(images, run_dir, cfg, max_minutes=max_minutes, device=device, compile=compile, labels=labels)
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
    model: Annotated[
        str,
        typer.Option(help=MODEL_HELP),
    ] = "builtin:fashion",
    steps: Annotated[int | None, typer.Option(help="FP sampling steps [10]")] = None,
    schedule: Annotated[str | None, typer.Option(help="uniform|quad [quad]")] = None,
    timesteps: Annotated[str | None, typer.Option(help="explicit decreasing list, e.g. 999,600,300,0")] = None,
    num_samples: int = EvalConfig.num_samples,
    seed: int = EvalConfig.seed,
    eta: float = EvalConfig.eta,
    batch_size: int = EvalConfig.batch_size,
    reference: Annotated[str, typer.Option(help="fashion-mnist or a folder of real images")] = EvalConfig.reference,
    compressed: Annotated[Path | None, typer.Option(help="score an exported sampler instead of --model")] = None,
    backend: BackendOpt = None,
    dtype: DtypeOpt = "float32",
    out: Annotated[Path, typer.Option(help="directory for eval.json and samples.png")] = Path("runs/eval"),
    save_images: Annotated[
        bool, typer.Option(help="keep the scored images in OUT/images.safetensors, for a later --compare-to OUT")
    ] = False,
    compare_to: Annotated[
        Path | None,
        typer.Option(
            help="an earlier `tmpq eval --save-images` folder (e.g. the FP model's) on the same seeds: also report "
            "FID and PSNR to its images (how far this sampler is from that one)"
        ),
    ] = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Sample the FP model on a schedule (or an exported compressed sampler) and report FID/IS (JSON + grid)."""
    _threads(threads)
    target = resolve_device(device)
    from tmpq.evaluate import EvalConfig, evaluate, saved_images

    _schedule_options(compressed, backend, steps, schedule, timesteps)
    if out.exists() and not out.is_dir():
        raise TmpqError(f"--out {out} is a file; give a directory for eval.json and samples.png")
    reference_images = None
    if compare_to is not None:
        if compare_to.resolve() == out.resolve():
            raise TmpqError(f"--out {out} is the --compare-to folder; write this evaluation to another --out")
        reference_images = saved_images(compare_to)
        try:
            earlier = json.loads((compare_to / "eval.json").read_text())["config"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise TmpqError(f"{compare_to} holds no eval.json from `tmpq eval`; give an evaluation's --out") from None
        if (earlier.get("seed"), earlier.get("num_samples")) != (seed, num_samples):
            seed0, n0 = earlier.get("seed"), earlier.get("num_samples")
            raise TmpqError(
                f"{compare_to} was sampled from seeds {seed0}.. ({n0} samples); pass --seed {seed0} --num-samples "
                f"{n0} to compare on the same seeds"
            )
    ts = _parse_timesteps(timesteps)
    cfg = EvalConfig(
        model=model,
        steps=len(ts) if ts is not None else steps if steps is not None else EvalConfig.steps,
        schedule=schedule or EvalConfig.schedule,
        timesteps=ts,
        num_samples=num_samples,
        seed=seed,
        eta=eta,
        batch_size=batch_size,
        reference=reference,
        compressed=None if compressed is None else str(compressed),
        backend=backend,
        dtype=dtype,
    )
    res = evaluate(cfg, out, device=str(target), compare_to=reference_images, save_images=save_images)
    typer.echo(
        f"FID {res.fid:.3f}  IS {res.inception_score:.3f} ± {res.inception_score_std:.3f}  "
        f"({cfg.num_samples} samples, {len(res.timesteps)} steps, {res.sample_wall_s:.1f} s sampling)"
    )
    if res.fidelity is not None:
        typer.echo(f"to {compare_to}: FID {res.fidelity['fid']:.3f}  PSNR {res.fidelity['psnr_db']:.2f} dB")
    typer.echo(f"wrote {out / 'eval.json'} and {out / 'samples.png'}")


@app.command()
@_friendly
def sample(
    out: Annotated[Path, typer.Option(help="PNG grid to write")] = Path("runs/samples.png"),
    model: str = "builtin:fashion",
    compressed: Annotated[
        Path | None, typer.Option(help="an exported sampler (`tmpq export`) instead of --model")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="FP sampling steps [10]")] = None,
    schedule: Annotated[str | None, typer.Option(help="uniform|quad [quad]")] = None,
    timesteps: str | None = None,
    num_samples: int = 64,
    seed: int = 0,
    eta: float = 0.0,
    save_tensor: Annotated[Path | None, typer.Option(help="also save the raw samples (safetensors)")] = None,
    prompt: Annotated[
        list[str] | None, typer.Option(help="text-to-image: a prompt (repeatable; sample i gets prompt i mod n)")
    ] = None,
    guidance_scale: GuidanceOpt = None,
    classes: ClassesOpt = None,
    image_size: ImageSizeOpt = None,
    true_cfg_scale: TrueCfgOpt = None,
    backend: BackendOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Write a grid of samples from the FP model, or from an exported compressed sampler."""
    _threads(threads)
    target = resolve_device(device)
    from tmpq.images import save_grid

    _schedule_options(compressed, backend, steps, schedule, timesteps)
    _check_out_file(out, IMAGE_SUFFIXES, "--out")  # before sampling, not after
    if save_tensor is not None:
        _check_out_file(save_tensor, (".safetensors",), "--save-tensor")
    if num_samples < 1:
        raise TmpqError(f"--num-samples must be >= 1, got {num_samples}")
    if compressed is not None:
        from tmpq.export import load
        from tmpq.runtime import Backend

        s = load(compressed)
        if backend is not None:
            s = s.lower(Backend(mode=backend, dtype=dtype, device=str(target)), inplace=True)
        else:
            s.to(target)
        t0 = time.perf_counter()
        labels = None if classes is None else list(parse_ints(classes, "--classes", distinct=False))
        images = s.sample(num_samples, seed=seed, prompts=prompt or None, classes=labels)
        wall = time.perf_counter() - t0
        what = f"compressed sampler ({len(s.timesteps)} steps, {s.bitops() / 1e9:.2f} GBitOPs"
        if backend is not None:
            runs = s.summary()["mac_share"]
            what += f"; {backend}/{dtype}: " + ", ".join(f"{v:.0%} of MACs on {k}" for k, v in runs.items())
            what += f"; {s.memory_bytes() / 1024:.0f} KB resident"
        what += f"; {wall * 1000 / num_samples:.1f} ms/image)"
    else:
        from tmpq.models.loading import load_model
        from tmpq.sampling.ddim import DDIMSampler, generate

        kw = _model_options(guidance_scale, classes, image_size, true_cfg_scale)
        loaded = load_model(model, **kw, **({"prompts": tuple(prompt)} if prompt else {})).to(target)
        ts = _parse_timesteps(timesteps) or loaded.schedule.timesteps(
            schedule or "quad", 10 if steps is None else steps
        )
        images = generate(
            loaded.denoiser,
            DDIMSampler(loaded.schedule, ts, eta=eta),
            num_samples,
            loaded.sample_shape,
            seed,
            cond=loaded.conditioning(num_samples),
        )
        images = loaded.decode(images)  # latent models: through their FP autoencoder
        what = f"FP model ({len(ts)} steps)"
    if save_tensor is not None:
        from safetensors.torch import save_file

        save_tensor.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous()}, str(save_tensor), metadata={"seed": str(seed)})
    typer.echo(f"wrote {save_grid(images, out)}: {num_samples} samples of the {what}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _check_out_file(path: Path, suffixes: tuple[str, ...], option: str) -> None:
    """A file the command will write: refused now if it cannot be written as asked, before any compute."""
    if path.is_dir():
        raise TmpqError(f"{option} {path} is a directory; give a file path such as {path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        raise TmpqError(f"{option} {path} must end in {' or '.join(suffixes)}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TmpqError(f"{option} {path}: {parent} is a file, not a directory; pick another path")
            break


def _schedule_options(compressed, backend, steps, schedule, timesteps) -> None:
    """An exported sampler brings its own schedule and bits: the FP model's schedule options and --backend
    must not be mixed with the wrong mode, or they would be silently ignored."""
    if compressed is not None:
        given = [
            o for o, v in (("--steps", steps), ("--schedule", schedule), ("--timesteps", timesteps)) if v is not None
        ]
        if given:
            raise TmpqError(f"--compressed samples on its own timesteps; drop {', '.join(given)}")
    elif backend is not None:
        raise TmpqError("--backend runs an exported sampler: give --compressed DIR with it, or drop --backend")


def _parse_timesteps(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise TmpqError(f"--timesteps must be comma-separated integers, got {text!r}") from None


def parse_ints(text: str, what: str, distinct: bool = True) -> tuple[int, ...]:
    """`8,10,12` or a range `8-12`, as --steps, --phases, --w-bits, --a-bits and --channels take them (`what` names
    the option in the error). `distinct`: a repeated value is an error (not for --channels, where 32,32,64 is a
    valid architecture)."""
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(v) for v in text.split("-"))
            values = tuple(range(lo, hi + 1))
        else:
            values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise TmpqError(f"{what} must be comma-separated integers or a range like 8-12, got {text!r}") from None
    if not values:
        raise TmpqError(f"{what} {text!r} names no value; give e.g. 8,10,12 or a rising range like 8-12")
    if distinct and len(set(values)) != len(values):
        raise TmpqError(f"{what} {text!r} repeats a value; give each once")
    return values


@app.command()
@_friendly
def calibrate(
    model: Annotated[
        str,
        typer.Option(help=MODEL_HELP),
    ] = "builtin:fashion",
    run_dir: Annotated[Path, typer.Option(help="writes calib.safetensors and supernet/ here")] = Path("runs/run"),
    calib_samples: Annotated[int, typer.Option(help="FP DDIM trajectories")] = CalibConfig.num_samples,
    calib_steps: Annotated[int, typer.Option(help="steps per trajectory; every step's input is kept")] = (
        CalibConfig.num_steps
    ),
    w_bits: Annotated[str, typer.Option(help="weight bit-width candidates")] = _W_BITS,
    a_bits: Annotated[str, typer.Option(help="activation bit-width candidates")] = _A_BITS,
    reconstruction: ReconOpt = _RECONSTRUCTION,
    recon_preset: ReconPresetOpt = "demo",
    recon_iters: ReconItersOpt = None,
    recon_inputs: ReconInputsOpt = QuantSpec.recon_inputs,
    bias_correction: BiasCorrectionOpt = True,
    format8: Format8Opt = "int8",
    prompts: PromptsOpt = None,
    classes: ClassesOpt = None,
    guidance_scale: GuidanceOpt = None,
    image_size: ImageSizeOpt = None,
    true_cfg_scale: TrueCfgOpt = None,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Calibrate the quantization super-network once for every candidate bit-width (reused by search)."""
    from tmpq.quant import CalibConfig
    from tmpq.quant.prepare import prepare_supernet

    _threads(threads)
    spec = _quant_spec(
        w_bits, a_bits, reconstruction, recon_preset, recon_iters, format8, bias_correction, recon_inputs
    )
    loaded = _load(model, prompts, guidance_scale, classes, image_size, true_cfg_scale).to(resolve_device(device))
    sn, calib, info = prepare_supernet(loaded, run_dir, CalibConfig(calib_samples, calib_steps), spec)
    what = "reused" if info["reused"] else f"calibrated in {info['calib_collect_s'] + info['calibrate_s']:.1f} s"
    typer.echo(f"super-network: {len(sn.units)} quantizable units, {len(calib)} calibration inputs, {what}")
    typer.echo(f"  W {list(spec.w_bits)} x A {list(spec.a_bits)}; pinned: {sn.pinned}")
    typer.echo(f"  FP: {sn.cost.macs / 1e6:.1f} MMACs per forward; saved in {run_dir / 'supernet'}")


def _quant_spec(
    w_bits: str,
    a_bits: str,
    reconstruction: str,
    preset: str,
    iters: int | None,
    format8: str,
    bias_correction: bool,
    recon_inputs: str,
):
    if reconstruction not in ("none", "adaround", "brecq"):
        raise TmpqError(f"--reconstruction must be none, adaround or brecq, got {reconstruction!r}")
    w, a = parse_ints(w_bits, "--w-bits"), parse_ints(a_bits, "--a-bits")
    spec = QuantSpec(w_bits=w, a_bits=a, format8=format8, bias_correction=bias_correction)
    if reconstruction == "none":
        return replace(spec, reconstruction=None, recon_inputs=recon_inputs)
    spec = spec.with_reconstruction(reconstruction, preset)
    return replace(spec, recon_inputs=recon_inputs, **({} if iters is None else {"recon_iters": iters}))


def _search_command(full: bool) -> Callable[..., None]:
    """`tmpq search` (full=False) and `tmpq run` (full=True: also export the best sampler and write the report)
    share one set of options, defined once here."""

    def command(
        model: Annotated[
            str,
            typer.Option(help=MODEL_HELP),
        ] = "builtin:fashion",
        run_dir: Annotated[Path, typer.Option(help="all artefacts; re-run the same command to resume")] = Path(
            "runs/run" if full else "runs/search"
        ),
        like: Annotated[
            str | None, typer.Option(help="budget: uniform WxAy at --budget-steps steps [W6A6 when no budget given]")
        ] = None,
        budget_steps: Annotated[int, typer.Option(help="steps of the --like budget")] = SearchConfig.budget.steps,
        bitops: Annotated[float | None, typer.Option(help="budget: fraction of FP BitOPs at 100 steps")] = None,
        gbitops: Annotated[float | None, typer.Option(help="budget: absolute GBitOPs per image")] = None,
        steps: Annotated[str, typer.Option(help="sampling steps K, or a range to search, e.g. 8-12")] = "10",
        grouping: Annotated[
            str,
            typer.Option(
                help="timestep groups: quad | uniform | change | auto (the one on whose default schedule the search's "
                "start, uniform PTQ at the budget's precision, scores best under the fitness)"
            ),
        ] = SearchConfig.grouping,
        phases: Annotated[str, typer.Option(help="timestep bounds of bit phases, e.g. 500 (none: one set)")] = "",
        lever: Annotated[
            str,
            typer.Option(
                help="joint | bits (schedule fixed) | timesteps (bits fixed) | auto (timesteps at a --like budget's "
                "precision, else joint)"
            ),
        ] = SearchConfig.lever,
        fixed_precision: Annotated[
            str | None, typer.Option(help="precision of a timesteps-only search [the --like budget's]")
        ] = SearchConfig.fixed_precision,
        preset: Annotated[str, typer.Option(help="tmpq (frugal, repair) | reference (TMPQ-DM settings)")] = "tmpq",
        fitness: Annotated[
            str,
            typer.Option(
                help="fid (against the data) | kid (KID against the data) | fid_to_fp (against FP samples) | "
                "proxy (distance to FP samples, sample by sample, same noise)"
            ),
        ] = (FitnessConfig.kind),
        fitness_samples: int = FitnessConfig.num_samples,
        proxy_space: Annotated[str, typer.Option(help="proxy distance in: features (classifier) | pixels")] = (
            FitnessConfig.proxy_space
        ),
        proxy_stat: Annotated[str, typer.Option(help="pool per-sample proxy distances: mean | median")] = (
            FitnessConfig.proxy_stat
        ),
        proxy_reference_steps: Annotated[
            int | None,
            typer.Option(
                help="the target of --fitness proxy / fid_to_fp: the FP model at this many uniform DDIM steps "
                "[auto: where the FP model scores best on the fitness seeds, measured first]"
            ),
        ] = FitnessConfig.reference_steps,
        staged: Annotated[
            bool, typer.Option(help="bits-only and timesteps-only searches first, then the joint one seeded by both")
        ] = SearchConfig.staged,
        seed_from: Annotated[
            list[Path] | None,
            typer.Option(help="a finished search whose best seeds this one (repeatable; e.g. the single-lever runs)"),
        ] = None,
        final_samples: Annotated[int, typer.Option(help="re-score peers + top candidates (0: skip)")] = (
            SearchConfig.final_samples
        ),
        final_top: Annotated[int, typer.Option(help="how many top candidates the final re-scoring takes")] = (
            SearchConfig.final_top
        ),
        final_pool: Annotated[
            int,
            typer.Option(
                help="re-rank the search's best N on fresh seeds (its fitness, as many samples) before the final "
                "re-scoring takes its top (0: off)"
            ),
        ] = SearchConfig.final_pool,
        generations: Annotated[int | None, typer.Option(help="override the preset")] = None,
        population: Annotated[int | None, typer.Option(help="override the preset (children scale with it)")] = None,
        pareto: Annotated[bool, typer.Option(help="NSGA-II over (quality, BitOPs)")] = False,
        calib_samples: Annotated[int, typer.Option(help="FP DDIM trajectories for calibration")] = (
            CalibConfig.num_samples
        ),
        calib_steps: Annotated[int, typer.Option(help="steps per calibration trajectory")] = CalibConfig.num_steps,
        w_bits: Annotated[str, typer.Option(help="weight bit-width candidates")] = _W_BITS,
        a_bits: Annotated[str, typer.Option(help="activation bit-width candidates")] = _A_BITS,
        reconstruction: ReconOpt = _RECONSTRUCTION,
        recon_preset: ReconPresetOpt = "demo",
        recon_iters: ReconItersOpt = None,
        recon_inputs: ReconInputsOpt = QuantSpec.recon_inputs,
        bias_correction: BiasCorrectionOpt = True,
        format8: Format8Opt = "int8",
        seed: int = 0,
        fresh: Annotated[bool, typer.Option(help="ignore a saved search state and start over")] = False,
        workers: Annotated[int, typer.Option(help="evaluate candidates in N local worker processes (0: here)")] = 0,
        ray: Annotated[str | None, typer.Option(help="evaluate on a Ray cluster: ADDRESS, auto, or local")] = None,
        worker_threads: Annotated[int, typer.Option(help="torch threads per worker")] = 1,
        candidate_timeout: Annotated[float | None, typer.Option(help="re-queue a candidate after S seconds")] = None,
        prompts: PromptsOpt = None,
        classes: ClassesOpt = None,
        guidance_scale: GuidanceOpt = None,
        image_size: ImageSizeOpt = None,
        true_cfg_scale: TrueCfgOpt = None,
        fid_reference: Annotated[
            str, typer.Option(help="FID against: fashion-mnist or a folder of your images (1x32x32 features)")
        ] = SearchConfig.fid_reference,
        threads: ThreadsOpt = None,
        device: DeviceOpt = "auto",
    ) -> None:
        from tmpq.api import compress
        from tmpq.quant import CalibConfig
        from tmpq.search import Budget
        from tmpq.search.parallel import Execution

        _threads(threads)
        if sum(x is not None for x in (like, bitops, gbitops)) > 1:
            raise TmpqError("give one budget: --like, --bitops or --gbitops (they were given together)")
        budget = (
            Budget.fraction(bitops)
            if bitops is not None
            else Budget.gbitops(gbitops)
            if gbitops is not None
            else Budget.like(like or precision_label(SearchConfig.budget.w, SearchConfig.budget.a), budget_steps)
        )
        cfg = SearchConfig(
            budget=budget,
            steps=parse_ints(steps, "--steps"),
            phase_bounds=parse_ints(phases, "--phases") if phases else (),
            # the reference preset is the reference's joint search unless another lever is named
            lever=("joint" if preset == "reference" and lever == AUTO else lever),
            fixed_precision=fixed_precision,
            evolution=_evolution(preset, seed, population, generations, pareto),
            # the reference preset keeps the reference's quad rule unless another grouping is named
            grouping=("quad" if preset == "reference" and grouping == AUTO else grouping),
            fitness=FitnessConfig(
                kind=fitness,
                num_samples=fitness_samples,
                seed=seed,
                proxy_space=proxy_space,
                proxy_stat=proxy_stat,
                reference_steps=proxy_reference_steps,
            ),
            calib=CalibConfig(calib_samples, calib_steps),
            quant=_quant_spec(
                w_bits, a_bits, reconstruction, recon_preset, recon_iters, format8, bias_correction, recon_inputs
            ),
            final_samples=final_samples,
            final_top=final_top,
            final_pool=final_pool,
            fid_reference=fid_reference,
            seed_from=tuple(str(p) for p in seed_from or ()),
            staged=staged,
        )
        loaded = _load(model, prompts, guidance_scale, classes, image_size, true_cfg_scale)
        for note in loaded.notes:
            typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)
        execution = Execution(workers, ray, worker_threads, candidate_timeout)
        # the same path as the Python API: compress() with this config, then the result's own export and report
        res = compress(loaded, run_dir=run_dir, config=cfg, resume=not fresh, execution=execution, device=device)
        _print_search(run_dir, res.search, budget, fitness)
        if full:
            out = res.export(run_dir / "export", overwrite=True)
            typer.echo(f"  exported the best sampler to {out}  (load with tmpq.load('{out}'))")
            from tmpq.runtime.measure import SPEED_FILE, measure_speed, speed_lines

            speed = measure_speed(out, run_dir / SPEED_FILE, device=loaded.device.type)
            typer.echo("\n".join(["measured speed:", *speed_lines(speed)]))
            html_path, md_path = res.report()
            typer.echo(f"report: {html_path}  (Markdown: {md_path})")

    command.__doc__ = (
        "Calibrate, search timesteps and per-layer bits jointly under a BitOPs budget, re-score, export the best "
        "sampler and write the report: the whole job."
        if full
        else "Search timesteps and per-layer bits jointly under a BitOPs budget; writes RUN/search.json."
    )
    return command


def _evolution(preset: str, seed: int, population: int | None, generations: int | None, pareto: bool):
    from tmpq.search import EvolutionConfig

    if preset not in ("tmpq", "reference"):
        raise TmpqError(f"--preset must be 'tmpq' or 'reference', got {preset!r}")
    evo = EvolutionConfig(seed=seed) if preset == "tmpq" else EvolutionConfig.reference(seed=seed)
    if population is not None:
        if population < 1:
            raise TmpqError(f"--population must be >= 1, got {population}")
        scale = population / evo.population
        evo = replace(
            evo,
            population=population,
            parents=max(1, round(evo.parents * scale)),
            mutations=round(evo.mutations * scale),
            crossovers=round(evo.crossovers * scale),
            randoms=round(evo.randoms * scale),
        )
    return replace(evo, multi_objective=pareto, **({"generations": generations} if generations is not None else {}))


def _print_search(run_dir: Path, res, budget, fitness: str) -> None:
    best = res.best
    from tmpq.search.summary import RunSummary

    summary = RunSummary.read(run_dir)
    fp100 = summary.fp_bitops_full_100
    typer.echo(
        f"best ({fitness}): {best.value:.4f}  at {best.bitops / 1e9:.2f} GBitOPs "
        f"({best.bitops / fp100:.4f} of FP-100; budget {res.budget / 1e9:.2f}, {budget.describe()})"
    )
    typer.echo(f"  timesteps: {list(best.candidate.timesteps)}")
    for p, phase in enumerate(best.candidate.bits):
        ws = [w for w, _ in phase if w is not None]
        as_ = [a for _, a in phase if a is not None]
        typer.echo(f"  bits (phase {p}): mean W {sum(ws) / len(ws):.2f}, mean A {sum(as_) / len(as_):.2f}")
    c = summary.search_cost
    typer.echo(
        f"  search: {c.evaluations} candidates, {c.fitness_forwards:,} image-forwards "
        f"(+{c.overhead_forwards:,} calibration/sensitivity/reference), {c.search_wall_s:.0f} s"
    )
    seeds = [s.search_cost for s in summary.seed_searches]
    if seeds:
        typer.echo(
            f"  seeded by {len(seeds)} earlier search{'es' if len(seeds) > 1 else ''}: "
            f"{sum(s.evaluations for s in seeds)} candidates, "
            f"{sum(s.fitness_forwards for s in seeds):,} image-forwards, "
            f"{sum(s.search_wall_s for s in seeds):.0f} s"
        )
    final = summary.final
    if final:
        typer.echo(f"  final rows ranked by {final.criterion_label} (the best quantized one ships)")
        for r in final.rows:
            typer.echo(
                f"  final ({final.samples} samples, same seeds): {r.label:<24s} FID {r.fid:8.2f}  "
                f"{r.bitops / 1e9:10.2f} GBitOPs"
                + ("" if r.fid_to_fp is None else f"  FID to FP-100 {r.fid_to_fp:8.2f}")
            )
        verdict = final.verdict()
        if verdict:
            typer.echo(f"  verdict: {verdict}")
    typer.echo(f"  wrote {run_dir / 'search.json'}")


app.command("search")(_friendly(_search_command(full=False)))
app.command("run")(_friendly(_search_command(full=True)))


@app.command()
@_friendly
def export(
    run_dir: Annotated[Path, typer.Option(help="a finished `tmpq search` / `tmpq run` directory")] = Path("runs/run"),
    out: Annotated[Path, typer.Option(help="directory to write the compressed sampler to")] = Path("runs/export"),
    which: Annotated[
        str, typer.Option(help="best | search | search:K (K-th by search fitness) | baseline | top2 | ... (final rows)")
    ] = "best",
    overwrite: Annotated[bool, typer.Option(help="replace an existing export in --out")] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Write a run's compressed sampler: timesteps, per-layer bits, integer weight codes + scales, card."""
    from tmpq.api import CompressionResult

    _threads(threads)
    s = CompressionResult.open(run_dir).sampler(which)
    path = s.export(out, info=s.info, overwrite=overwrite)
    typer.echo(f"exported {s.info['label']} ({len(s.timesteps)} steps, {s.bitops() / 1e9:.2f} GBitOPs) to {path}")


@app.command()
@_friendly
def speed(
    compressed: Annotated[Path, typer.Option(help="an exported sampler (`tmpq export`)")],
    out: Annotated[Path | None, typer.Option(help="also write the measurements to this JSON file")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    full_steps: Annotated[int, typer.Option(help="the FP reference's step count")] = 100,
    threads: ThreadsOpt = None,
) -> None:
    """Measure an exported sampler against FP32 on this device: which part of its BitOPs saving is real speed."""
    _threads(threads)
    from tmpq.runtime.measure import measure_speed, speed_lines

    typer.echo("\n".join(speed_lines(measure_speed(compressed, out, full_steps=full_steps, device=device))))


@app.command()
@_friendly
def report(
    run_dir: Annotated[Path, typer.Option(help="a finished `tmpq search` / `tmpq run` directory")] = Path("runs/run"),
    out: Annotated[Path | None, typer.Option(help="report directory (default RUN/report)")] = None,
    peer: Annotated[list[str] | None, typer.Option(help="LABEL=RUN_DIR of another run to compare; repeatable")] = None,
) -> None:
    """Write report.html + report.md with the peers table, Pareto plot, bit map, timesteps and sample grids."""
    from tmpq.report import write_report

    peers = {}
    for item in peer or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise TmpqError(f"--peer takes LABEL=RUN_DIR, got {item!r}")
        peers[label] = Path(path)
    html_path, md_path = write_report(run_dir, out, peers)
    typer.echo(f"report: {html_path}  (Markdown: {md_path})")


if __name__ == "__main__":
    app()
