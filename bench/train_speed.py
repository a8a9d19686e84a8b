"""Training throughput (optimizer steps per second) of `tmpq train` on this machine, per architecture.

Runs `train_ddpm` for a few steps on the real Fashion-MNIST set in a scratch directory and prints a table. To
compare code versions, run the same command with another checkout's `src` first on PYTHONPATH.

.venv/bin/python bench/train_speed.py [--steps 30] [--batch-size 64] [--device cpu] [--compile] [--arch 32,32,64:1 ...]
"""

from __future__ import annotations

import argparse
import inspect
import platform
import tempfile
import time
from pathlib import Path

import torch

from tmpq.data import load_fashion_mnist
from tmpq.models.train import TrainConfig, train_ddpm

try:
    from tmpq.provenance import cpu_model
except ImportError:  # a checkout from before tmpq had it (the "before" side of a comparison)
    cpu_model = platform.processor


def _config(arch: str, steps: int, batch_size: int) -> TrainConfig:
    channels, _, layers = arch.partition(":")
    kw = {
        "steps": steps,
        "batch_size": batch_size,
        "block_out_channels": tuple(int(c) for c in channels.split(",")),
        "checkpoint_every": steps,
        "warmup_steps": 1,
    }
    if layers:
        kw["layers_per_block"] = int(layers)  # a checkout without the option only runs the default depth
    return TrainConfig(**kw)


def measure(arch: str, steps: int, batch_size: int, device: str, compile: bool, images: torch.Tensor) -> float:
    """Steps per second over `steps` steps, after a 3-step warm-up run (first-call and compile costs excluded)."""
    extra = {"device": device, "progress": False}
    if compile:
        if "compile" not in inspect.signature(train_ddpm).parameters:
            raise SystemExit("this checkout's train_ddpm has no compile option")
        extra["compile"] = True
    with tempfile.TemporaryDirectory() as tmp:
        warm = _config(arch, 3, batch_size)
        train_ddpm(images, Path(tmp) / "warm", warm, **extra)
        start = time.perf_counter()
        train_ddpm(images, Path(tmp) / "run", _config(arch, steps, batch_size), **extra)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    default_arch = ",".join(str(c) for c in TrainConfig.block_out_channels)  # the built-in model's
    ap.add_argument("--arch", nargs="+", default=[default_arch], help="channels[:layers_per_block]")
    args = ap.parse_args()
    images, _ = load_fashion_mnist("train")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else cpu_model()
    print(
        f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}; batch {args.batch_size}, {args.steps} steps, "
        f"compile={args.compile}"
    )
    print("| architecture | it/s | images/s |\n|---|---:|---:|")
    for arch in args.arch:
        its = measure(arch, args.steps, args.batch_size, args.device, args.compile, images)
        print(f"| {arch} | {its:.2f} | {its * args.batch_size:.0f} |")


if __name__ == "__main__":
    main()
