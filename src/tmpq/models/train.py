"""Train the built-in DDPM (epsilon prediction) with EMA, checkpoints and exact resume.

A run directory holds `checkpoint.pt` (model, EMA, optimizer, scheduler, step; loaded with
weights_only=True) and `train_config.json`. Killing and re-running the same command continues
from the last checkpoint with the same data order, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tmpq.device import bf16_autocast_helps
from tmpq.errors import TmpqError
from tmpq.models.builtin import BUILTIN_SCHEDULE, build_unet, builtin_unet_config
from tmpq.sampling.schedules import NoiseSchedule


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; stored beside its checkpoints."""

    steps: int = 8000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 250
    ema_decay: float = 0.999
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    seed: int = 0
    checkpoint_every: int = 250
    autocast: str = "auto"  # "auto" | "bf16" | "off"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise TmpqError("steps and batch_size must be positive")
        if self.autocast not in ("auto", "bf16", "off"):
            raise TmpqError(f"autocast must be auto, bf16 or off, got {self.autocast!r}")


def _autocast_ctx(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use = cfg.autocast == "bf16" or (cfg.autocast == "auto" and bf16_autocast_helps(device))
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch at `step`: a fresh seeded permutation each epoch, so resume is exact."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def train_ddpm(
    images: torch.Tensor,
    run_dir: Path | str,
    cfg: TrainConfig = TrainConfig(),
    schedule: NoiseSchedule = BUILTIN_SCHEDULE,
    max_minutes: float | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> Path:
    """Train (or resume) a DDPM on `images` in [-1, 1]; returns the path of the EMA safetensors."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    cfg_path, ckpt_path = run_dir / "train_config.json", run_dir / "checkpoint.pt"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())
        if saved != json.loads(json.dumps(asdict(cfg))):
            raise TmpqError(
                f"{run_dir} holds a run with a different config ({cfg_path}); use a new --run-dir "
                "or the same options to resume"
            )
    else:
        cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    if images.shape[0] < cfg.batch_size:
        raise TmpqError(f"only {images.shape[0]} images for batch size {cfg.batch_size}; lower --batch-size")

    torch.manual_seed(cfg.seed)
    unet_config = builtin_unet_config(cfg.block_out_channels)
    model = build_unet(unet_config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(),
                "ema": ema.state_dict(),
                "step": step,
                "elapsed_s": elapsed,
            },
            tmp,
        )
        tmp.replace(ckpt_path)  # atomic: a kill mid-save never leaves a broken checkpoint

    images = images.to(dev)
    alphas = schedule.alphas_cumprod.to(dev)
    start, last_loss = time.time() - elapsed, float("nan")
    session_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress, dynamic_ncols=True)
    while step < cfg.steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x0 = images[_batch_indices(images.shape[0], cfg.batch_size, step, cfg.seed)]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=g).to(dev)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast_ctx(cfg, dev):
            pred = model(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        if not math.isfinite(loss.item()):
            raise TmpqError(f"training loss became {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        step += 1
        last_loss = 0.98 * last_loss + 0.02 * loss.item() if math.isfinite(last_loss) else loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        elapsed = time.time() - start
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
            if max_minutes is not None and time.time() - session_start > max_minutes * 60 and step < cfg.steps:
                break
    bar.close()
    save_checkpoint()
    return export_ema(model, ema, unet_config, run_dir / "unet_ema.safetensors", cfg, step, elapsed, last_loss)


def export_ema(
    model: torch.nn.Module,
    ema: EMAModel,
    unet_config: dict,
    out: Path,
    cfg: TrainConfig,
    step: int,
    elapsed: float,
    loss: float,
) -> Path:
    """Write the EMA weights as safetensors; the UNet config and training facts go in its metadata."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ema.restore(model.parameters())
    meta = {
        "unet_config": json.dumps(unet_config),
        "train_config": json.dumps(asdict(cfg)),
        "steps_done": str(step),
        "train_wall_s": f"{elapsed:.0f}",
        "final_loss": f"{loss:.5f}",
        "noise_schedule": json.dumps(BUILTIN_SCHEDULE.to_dict()),
    }
    save_file(state, str(out), metadata=meta)
    return out


def write_model_card(weights: Path | str, command: str, note: str = "") -> Path:
    """A Markdown card beside the weights: the command, data, steps and wall time, read from its metadata."""
    from safetensors import safe_open

    weights = Path(weights)
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata() or {}
        n_params = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118 (safe_open is not a dict)
    cfg = json.loads(meta.get("train_config", "{}"))
    wall = float(meta.get("train_wall_s", "nan"))
    card = weights.with_suffix(".md")
    card.write_text(
        f"# {weights.name}\n\n"
        "DDPM (epsilon prediction, T = 1000, linear betas 1e-4..0.02) on a diffusers `UNet2DModel`, "
        "EMA weights.\n\n"
        f"- Data: Fashion-MNIST train split (60,000 images) from the Debian package `dataset-fashion-mnist`, "
        "zero-padded to 32x32 (background -1), scaled to [-1, 1].\n"
        f"- Architecture: `{meta.get('unet_config', '?')}` ({n_params:,} parameters).\n"
        f"- Training: {meta.get('steps_done', '?')} steps of {cfg.get('steps', '?')} planned, "
        f"batch {cfg.get('batch_size', '?')}, AdamW lr {cfg.get('lr', '?')} (cosine, "
        f"{cfg.get('warmup_steps', '?')} warm-up), EMA {cfg.get('ema_decay', '?')}, seed {cfg.get('seed', '?')}, "
        f"autocast {cfg.get('autocast', '?')}; final smoothed loss {meta.get('final_loss', '?')}.\n"
        f"- Wall time: {wall / 60:.1f} min on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}).\n"
        f"- Command: `{command}`\n" + (f"- Note: {note}\n" if note else "")
    )
    return card
