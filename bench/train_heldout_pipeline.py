"""Train the held-out diffusers pipeline that defaults are checked on: a pixel DDPMPipeline on Fashion-MNIST with
v-prediction and the cosine noise schedule (squaredcos_cap_v2), a UNet2DModel unlike the built-in one (channels 32,
64, 64, attention at 8×8, 1.1 M parameters). tmpq never trains or ships it; it is what a user would bring.

Diffusers does the model and the noising (`DDPMScheduler.add_noise`, `get_velocity`); this script only loops. It
checkpoints every --checkpoint-every steps and resumes exactly (same draws) when run again with the same options;
--max-minutes stops it cleanly at a checkpoint. At the end it writes the EMA weights as a pipeline folder, which
`tmpq run --model DIR` loads. Its result is shipped as bench/assets/heldout_pipeline (with a card), so it need not
be trained again.

    OMP_NUM_THREADS=1 .venv/bin/python bench/train_heldout_pipeline.py --run-dir runs/heldout_train \
        --out runs/heldout_pipeline --steps 4000
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from tmpq.data import load_fashion_mnist
from tmpq.device import bf16_autocast_helps


def build_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=32,
    )


def main(
    run_dir: Path = Path("runs/heldout_train"),
    out: Path = Path("runs/heldout_pipeline"),
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup_steps: int = 200,
    ema_decay: float = 0.999,
    seed: int = 0,
    checkpoint_every: int = 250,
    max_minutes: float | None = None,
    bf16: bool | None = typer.Option(
        None, help="bf16 autocast for the forward (speed only; not part of the recipe); default: where it is faster"
    ),
) -> None:
    config = dict(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay, seed=seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = run_dir / "config.json", run_dir / "checkpoint.pt"
    if cfg_path.is_file() and json.loads(cfg_path.read_text()) != config:
        raise typer.BadParameter(f"{run_dir} holds a run with other options ({cfg_path}); use a new --run-dir")
    cfg_path.write_text(json.dumps(config, indent=1))
    torch.manual_seed(seed)
    unet = build_unet().train()
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    step, elapsed = 0, 0.0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        ema.load_state_dict(state["ema"])
        step, elapsed = int(state["step"]), float(state["elapsed_s"])
    if bf16 is None:  # on an AVX2-only CPU bf16 is emulated: 2.0 s/it in fp32 against 35 s/it in bf16 (AMD EPYC)
        bf16 = bf16_autocast_helps("cpu")
    images, _ = load_fashion_mnist("train")
    gen = torch.Generator()
    start = time.time()
    bar = tqdm(total=steps, initial=step, desc="train", unit="it", dynamic_ncols=True)
    while step < steps:
        gen.manual_seed(seed * 1_000_003 + step)  # each step's draws depend on the step only: exact resume
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), sched.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % checkpoint_every == 0 or step == steps:
            state = {
                "model": unet.state_dict(),
                "optimizer": opt.state_dict(),
                "lr_scheduler": lr_sched.state_dict(),
                "ema": ema.state_dict(),
                "step": step,
                "elapsed_s": elapsed + time.time() - start,
            }
            torch.save(state, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
            if max_minutes is not None and time.time() - start > max_minutes * 60 and step < steps:
                typer.echo(f"stopped at step {step}; run the same command to resume", err=True)
                return
    bar.close()
    ema.copy_to(unet.parameters())
    DDPMPipeline(unet=unet.eval(), scheduler=sched).save_pretrained(out)
    total = elapsed + time.time() - start
    (out / "training.json").write_text(json.dumps({**config, "wall_s": round(total, 1)}, indent=1))
    typer.echo(f"wrote {out} ({sum(p.numel() for p in unet.parameters()):,} parameters, {total / 60:.1f} min)")


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
