"""Train the built-in DDPMs (epsilon prediction: a UNet, or a class-conditional DiT) with EMA, checkpoints and exact
resume.

A run directory holds `checkpoint.pt` (model, EMA, optimizer, scheduler, step; loaded with
weights_only=True) and `train_config.json`. Killing and re-running the same command continues
from the last checkpoint with the same data order, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tmpq.device import bf16_autocast_helps, device_name
from tmpq.errors import TmpqError
from tmpq.models.builtin import (
    BUILTIN_SCHEDULE,
    FASHION_NUM_CLASSES,
    NETWORKS,
    SCHEDULES,
    build_network,
    builtin_dit_config,
    builtin_unet_config,
    load_trained,
    trained_metadata,
)
from tmpq.models.train_config import TrainConfig
from tmpq.provenance import file_sha256
from tmpq.sampling.schedules import NoiseSchedule


def _autocast_ctx(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use = cfg.autocast == "bf16" or (cfg.autocast == "auto" and bf16_autocast_helps(device))
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


def network_config(cfg: TrainConfig) -> tuple[str, dict]:
    """The metadata key and diffusers config of the network `cfg` trains (see `builtin.NETWORKS`)."""
    if cfg.architecture == "dit":
        return "dit_config", builtin_dit_config(
            cfg.patch_size, cfg.transformer_layers, cfg.attention_heads, cfg.head_dim
        )
    return "unet_config", builtin_unet_config(cfg.block_out_channels, cfg.layers_per_block)


class _BatchDraws:
    """Seeded draws made on the training device: batch indices, noise and timesteps.

    Every draw is a pure function of (seed, step), so a resumed run draws exactly what an uninterrupted one
    would, with no generator state to checkpoint; nothing is drawn on the host and copied each step.
    """

    def __init__(self, n: int, cfg: TrainConfig, num_train_timesteps: int, device: torch.device) -> None:
        self.n, self.cfg, self.T, self.device = n, cfg, num_train_timesteps, device
        self.per_epoch = n // cfg.batch_size
        self.gen = torch.Generator(device=device)
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:  # a fresh seeded permutation each epoch
            self.gen.manual_seed(self.cfg.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.n, generator=self.gen, device=self.device)
            self._epoch = epoch
        return self._perm[pos * self.cfg.batch_size : (pos + 1) * self.cfg.batch_size]

    def noise_and_t(self, step: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        self.gen.manual_seed(self.cfg.seed * 1_000_003 + step)
        noise = torch.randn(shape, generator=self.gen, device=self.device)
        t = torch.randint(0, self.T, (shape[0],), generator=self.gen, device=self.device)
        return noise, t

    def labels(self, step: int, labels: torch.Tensor) -> torch.Tensor:
        """The batch's class labels, each replaced by the null class (id = number of classes) with probability
        `class_dropout`: the unconditional model classifier-free guidance needs, drawn once for all blocks."""
        self.gen.manual_seed(self.cfg.seed * 7_000_003 + step)
        drop = torch.rand(labels.shape, generator=self.gen, device=self.device) < self.cfg.class_dropout
        return torch.where(drop, torch.full_like(labels, FASHION_NUM_CLASSES), labels)


def train_ddpm(
    images: torch.Tensor,
    run_dir: Path | str,
    cfg: TrainConfig = TrainConfig(),
    schedule: NoiseSchedule = BUILTIN_SCHEDULE,
    max_minutes: float | None = None,
    device: str = "cpu",
    progress: bool = True,
    compile: bool = False,
    labels: torch.Tensor | None = None,
) -> Path:
    """Train (or resume) a DDPM on `images` in [-1, 1]; returns the path of the EMA safetensors. A DiT
    (`cfg.architecture == "dit"`) is class-conditional and needs `labels` (int64 ids, one per image).

    The data set, the draws and the loss all stay on `device`; the host waits for it only every
    `cfg.log_every` steps (loss readout and NaN check) and at checkpoints.
    """
    run_dir = Path(run_dir)
    dev = torch.device(device)
    cfg_path, ckpt_path = run_dir / "train_config.json", run_dir / "checkpoint.pt"
    if cfg_path.exists():
        try:
            saved = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise TmpqError(f"{cfg_path} is not a readable training config ({exc}); use a new --run-dir") from exc
        if saved != cfg:
            raise TmpqError(
                f"{run_dir} holds a run with a different config ({cfg_path}); use a new --run-dir "
                "or the same options to resume"
            )
    if images.shape[0] < cfg.batch_size:
        raise TmpqError(f"only {images.shape[0]} images for batch size {cfg.batch_size}; lower --batch-size")
    dit = cfg.architecture == "dit"
    if dit and (labels is None or labels.shape != images.shape[:1]):
        raise TmpqError("a class-conditional DiT needs one class label per training image")
    torch.manual_seed(cfg.seed)
    key, net_config = network_config(cfg)
    model = build_network(key, net_config).to(dev)  # a bad architecture fails before the run directory is made
    # A DiT trains in eval mode: its only train-mode behaviour is diffusers' label dropout, drawn from the global RNG
    # by every block on its own; the trainer drops labels itself, seeded per step and the same for all blocks.
    model.train(not dit)
    init: dict[str, str] = {}  # what the run started from, recorded in its weights (TrainConfig.init_from)
    if cfg.init_from and not ckpt_path.exists():  # a resumed run restores the model from its checkpoint instead
        init = load_init_weights(model, Path(cfg.init_from), key, net_config)
    if not cfg_path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, foreach=True)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    step, elapsed, last_loss, last_it_s = 0, 0.0, float("nan"), float("nan")
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
        last_loss = float(state.get("loss", float("nan")))
        last_it_s = float(state.get("it_per_s", float("nan")))  # the speed of the last session that trained
        init = dict(state.get("init", {}))
    forward = torch.compile(model) if compile else model

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
                "loss": last_loss,
                "it_per_s": session_it_s(),
                "init": init,
            },
            tmp,
        )
        tmp.replace(ckpt_path)  # atomic: a kill mid-save never leaves a broken checkpoint

    images = images.to(dev)
    labels = labels.to(dev) if dit else None
    draws = _BatchDraws(images.shape[0], cfg, schedule.num_train_timesteps, dev)
    sqrt_a = schedule.alphas_cumprod.to(dev).sqrt()
    sqrt_1ma = (1 - schedule.alphas_cumprod).to(dev).sqrt()
    loss_sum, since_log = torch.zeros((), device=dev), 0
    start_step, session_start = step, time.time()

    def session_it_s() -> float:
        """Steps per second of this session, or of the last one that trained (a finished run re-exported)."""
        session_s = time.time() - session_start
        return (step - start_step) / session_s if step > start_step and session_s > 0 else last_it_s

    start = session_start - elapsed
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="it", disable=not progress, dynamic_ncols=True)

    def read_loss() -> None:
        """The one host sync: the mean loss since the last readout, smoothed for the bar."""
        nonlocal loss_sum, since_log, last_loss
        if since_log == 0:
            return
        value = (loss_sum / since_log).item()
        if not math.isfinite(value):
            raise TmpqError(
                f"training loss became {value} between steps {step - since_log} and {step}; lower --lr "
                "(the last checkpoint is intact)"
            )
        last_loss = 0.9 * last_loss + 0.1 * value if math.isfinite(last_loss) else value
        loss_sum, since_log = torch.zeros((), device=dev), 0
        bar.set_postfix(loss=f"{last_loss:.4f}")

    while step < cfg.steps:
        idx = draws.indices(step)
        x0 = images[idx]
        noise, t = draws.noise_and_t(step, x0.shape)
        xt = sqrt_a[t].view(-1, 1, 1, 1) * x0 + sqrt_1ma[t].view(-1, 1, 1, 1) * noise
        with _autocast_ctx(cfg, dev):
            if dit:
                pred = forward(xt, timestep=t, class_labels=draws.labels(step, labels[idx])).sample
            else:
                pred = forward(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        sched.step()
        ema.step(model.parameters())
        loss_sum += loss.detach()
        since_log += 1
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps:
            read_loss()
        elapsed = time.time() - start
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint()
            if max_minutes is not None and time.time() - session_start > max_minutes * 60 and step < cfg.steps:
                break
    bar.close()
    read_loss()
    save_checkpoint()
    out = run_dir / f"{cfg.architecture}_ema.safetensors"
    return export_ema(model, ema, out, cfg, step, elapsed, last_loss, session_it_s(), init)


def load_init_weights(model: torch.nn.Module, path: Path, key: str, net_config: dict) -> dict[str, str]:
    """Load the weights a run starts from (`TrainConfig.init_from`) into `model`, after checking they are of the same
    network; returns the facts the new weights record about them (checksum, their steps and wall time)."""
    try:
        trained = load_trained(path)  # the same checks as loading a model: missing, damaged, not from `tmpq train`
    except TmpqError as exc:
        raise TmpqError(f"--init-from: {exc}") from None
    meta = trained_metadata(path)
    their_key = next(k for k in NETWORKS if k in meta)  # load_trained found one
    theirs = json.loads(meta[their_key])
    if (their_key, theirs) != (key, json.loads(json.dumps(net_config))):
        raise TmpqError(
            f"--init-from {path} is not the network this run trains (its {their_key}: {json.dumps(theirs)}; this "
            f"run's {key}: {json.dumps(net_config)}); give the architecture options it was trained with"
        )
    model.load_state_dict(trained.state_dict())
    return {
        "init_sha256": file_sha256(path),
        "init_steps_done": meta.get("steps_done", "?"),
        "init_train_wall_s": meta.get("train_wall_s", "nan"),
    }


def export_ema(
    model: torch.nn.Module,
    ema: EMAModel,
    out: Path,
    cfg: TrainConfig,
    step: int,
    elapsed: float,
    loss: float,
    it_per_s: float = float("nan"),
    init: dict[str, str] | None = None,
) -> Path:
    """Write the EMA weights as safetensors; the network's config and training facts go in its metadata."""
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ema.restore(model.parameters())
    key, net_config = network_config(cfg)
    meta = {
        key: json.dumps(net_config),
        "train_config": json.dumps(asdict(cfg)),
        "steps_done": str(step),
        "train_wall_s": f"{elapsed:.0f}",
        "final_loss": f"{loss:.5f}",
        "train_it_per_s": f"{it_per_s:.2f}",
        "train_device": _device_name(model),
        "noise_schedule": json.dumps(SCHEDULES[key].to_dict()),
    }
    meta.update(init or {})
    save_file(state, str(out), metadata=meta)
    return out


def _speed(it_per_s: str | None) -> str:
    """The card's speed line: the last training session's it/s, when it was recorded."""
    try:
        value = float(it_per_s)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    return f"{value:.2f} it/s in the last session that trained" if math.isfinite(value) else "speed not recorded"


def snapshot_ema(run_dir: Path | str, out: Path | str) -> Path:
    """The EMA weights of a run's last checkpoint as a loadable safetensors file, without touching the run: a
    training still in progress (in another process) can be sampled and scored at any point."""
    run_dir = Path(run_dir)
    cfg_path, ckpt_path = run_dir / "train_config.json", run_dir / "checkpoint.pt"
    if not cfg_path.is_file() or not ckpt_path.is_file():
        raise TmpqError(f"{run_dir} holds no training checkpoint yet (train_config.json + checkpoint.pt)")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text()))
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # replaced atomically by the trainer
    model = build_network(*network_config(cfg))
    model.load_state_dict(state["model"])
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=True)
    ema.load_state_dict(state["ema"])
    loss = float(state.get("loss", float("nan")))
    step, elapsed = int(state["step"]), float(state["elapsed_s"])
    return export_ema(model, ema, Path(out), cfg, step, elapsed, loss, init=dict(state.get("init", {})))


def _device_name(model: torch.nn.Module) -> str:
    """The machine that trained the weights, named for the card."""
    dev = next(model.parameters()).device
    return device_name(dev) + ("" if dev.type == "cuda" else f", {torch.get_num_threads()} torch threads")


def _init_line(cfg: dict, meta: dict[str, str]) -> str:
    """The card's line on the weights a continued run started from (`--init-from`), with their own training."""
    if not cfg.get("init_from"):
        return ""
    wall = float(meta.get("init_train_wall_s", "nan"))
    return (
        f"- Started from: `{cfg['init_from']}` (sha256 {meta.get('init_sha256', '?')[:16]}…; "
        f"{meta.get('init_steps_done', '?')} steps, {wall / 60:.1f} min), not a seeded initialization; the steps and "
        "wall time above are this run's only.\n"
    )


def _card_intro(weights: Path) -> str:
    return f"# {weights.name}\n\nDDPM"


def check_weights_target(out: Path | str) -> None:
    """Before training: `--out` must be a .safetensors path, and neither it nor its card (same name, .md) may be a
    file that `tmpq train` did not write, so a user's README or weights are never replaced."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise TmpqError(f"--out {out} must end in .safetensors (its model card is written beside it as .md)")
    if out.exists():
        meta = {}
        if out.is_file():
            with contextlib.suppress(Exception):  # unreadable: not ours
                meta = trained_metadata(out)
        if "train_config" not in meta:
            raise TmpqError(
                f"--out {out} exists and was not written by `tmpq train`; it is left untouched: pick another path"
            )
    card = out.with_suffix(".md")
    if card.exists() and not (card.is_file() and card.read_text(errors="replace").startswith(_card_intro(out))):
        raise TmpqError(f"{card} exists and is not this model's card; it is left untouched: pick another --out")


def write_model_card(weights: Path | str, command: str, note: str = "") -> Path:
    """A Markdown card beside the weights: the command, data, steps and wall time, read from its metadata."""
    weights = Path(weights)
    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata() or {}
        n_params = sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())  # noqa: SIM118 (safe_open is not a dict)
    cfg = json.loads(meta.get("train_config", "{}"))
    wall = float(meta.get("train_wall_s", "nan"))
    key = next((k for k in NETWORKS if k in meta), "unet_config")
    conditioning = (
        f"; class-conditional, {float(cfg.get('class_dropout', 0)):.0%} of labels dropped to the null class for "
        "classifier-free guidance"
        if key == "dit_config"
        else ""
    )
    card = weights.with_suffix(".md")
    card.write_text(
        f"{_card_intro(weights)} (epsilon prediction, T = 1000, linear betas 1e-4..0.02) on a diffusers "
        f"`{NETWORKS[key].__name__}`, EMA weights{conditioning}.\n\n"
        f"- Data: Fashion-MNIST train split (60,000 images) from the Debian package `dataset-fashion-mnist`, "
        "zero-padded to 32x32 (background -1), scaled to [-1, 1].\n"
        f"- Architecture: `{meta.get(key, '?')}` ({n_params:,} parameters).\n"
        f"- Training: {meta.get('steps_done', '?')} steps of {cfg.get('steps', '?')} planned, "
        f"batch {cfg.get('batch_size', '?')}, AdamW lr {cfg.get('lr', '?')} (cosine, "
        f"{cfg.get('warmup_steps', '?')} warm-up), EMA {cfg.get('ema_decay', '?')}, seed {cfg.get('seed', '?')}, "
        f"autocast {cfg.get('autocast', '?')}; final smoothed loss {meta.get('final_loss', '?')}.\n"
        f"- Wall time: {wall / 60:.1f} min on {meta.get('train_device', 'an unrecorded machine')}; "
        f"{_speed(meta.get('train_it_per_s'))}.\n"
        f"- Command: `{command}`\n" + _init_line(cfg, meta) + (f"- Note: {note}\n" if note else "")
    )
    return card
