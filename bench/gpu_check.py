"""One short, prepared device check: does tmpq run on this device, does it agree with the CPU, and how fast is each
way of running a sampler? Meant for a lent GPU (≤ 5 minutes there, installs nothing), runs on a CPU too (smaller).

For the built-in model and a wider random UNet (the shape of `bench/random_unet.py`), it builds a super-network on
the device, then prints

- correctness: the denoiser's output on the device against the CPU (FP32 and fake-quantized W8A8), and each runtime
  backend against the fake-quantized sampler on the same device;
- speed: ms per image of a 10-step sampler at the device's batch size for FP32, bf16, fake-quant (W6A6 and W8A8),
  int8 and packed, and for an fp8 super-network (`format8="fp8_e4m3"`) its fake-quant W8A8 and the fp8 kernels
  (`torch._scaled_mm`), each with its relative error against fake-quant;
- one demo-sized search (`tmpq.compress`, W6A6@10) on the device, end to end, with its wall time.

    .venv/bin/python bench/gpu_check.py --device cuda --out $OUT          # on the GPU machine
    .venv/bin/python bench/gpu_check.py --device cpu --images 64 --skip-search   # a quick look on a CPU
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from tmpq.device import default_batch_size, device_name, resolve_device
from tmpq.models.loading import LoadedModel, load_model
from tmpq.provenance import provenance
from tmpq.quant import CalibConfig, QuantSpec, build_supernet, collect_calibration
from tmpq.sampling.schedules import make_timesteps

STEPS = 10
SPEC = QuantSpec(w_bits=(4, 6, 8), a_bits=(6, 8), reconstruction=None)
CALIB = CalibConfig(num_samples=32, num_steps=10)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 2) -> tuple[torch.Tensor, float]:
    """(output, best wall seconds of `repeats` runs after one warm-up)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


def _wide_unet() -> LoadedModel:
    from diffusers import UNet2DModel

    from tmpq.models.denoiser import UNetDenoiser
    from tmpq.sampling.schedules import NoiseSchedule

    torch.manual_seed(0)
    ch = [64, 128, 256]
    unet = UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=ch,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        norm_num_groups=32,
    )
    return LoadedModel(UNetDenoiser(unet), NoiseSchedule(), (1, 32, 32), "random-unet-64-128-256", None)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def check_model(name: str, loaded: LoadedModel, device: torch.device, images: int, batch: int) -> list[dict]:
    from tmpq.compressed import CompressedSampler
    from tmpq.runtime import Backend

    rows: list[dict] = []
    cpu_model = loaded.denoiser
    calib = collect_calibration(cpu_model, loaded.schedule, loaded.sample_shape, CALIB, progress=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *loaded.sample_shape, generator=g)
    t = torch.linspace(999, 0, 8).long()

    # the same super-network calibrated on the CPU and on the device: outputs agree to float rounding
    import copy

    cpu_sn = build_supernet(copy.deepcopy(cpu_model), calib, SPEC, progress=False)
    t0 = time.perf_counter()
    dev_sn = build_supernet(copy.deepcopy(cpu_model).to(device), calib, SPEC, progress=False)
    _sync(device)
    calib_s = time.perf_counter() - t0
    with torch.no_grad():
        for label, cfg in (("FP32", None), ("W8A8 fake-quant", "w8a8")):
            for sn in (cpu_sn, dev_sn):
                sn.set_fp() if cfg is None else sn.set_config(sn.uniform_config(8, 8))
            ref = cpu_sn(x, t)
            got = dev_sn(x.to(device), t.to(device)).cpu()
            rows.append({"model": name, "check": f"{label}: device vs CPU", "rel_err": _rel(got, ref)})
    rows.append({"model": name, "check": "super-network calibration on the device", "s": round(calib_s, 2)})

    ts = make_timesteps("uniform", STEPS, loaded.schedule.num_train_timesteps)

    def sampler(w: int, a: int) -> CompressedSampler:
        return CompressedSampler(dev_sn, loaded.schedule, ts, [dev_sn.uniform_config(w, a)], (), loaded.sample_shape)

    def speed(label: str, fn, ref: torch.Tensor | None) -> torch.Tensor:
        out, wall = _timed(fn, device)
        row = {"model": name, "check": label, "ms_per_image": round(wall * 1000 / images, 3)}
        if ref is not None:
            row["rel_err_vs_fake"] = _rel(out, ref)
        rows.append(row)
        return out

    # FP32 and bf16: the plain model
    fp = copy.deepcopy(cpu_model).to(device)
    fp_loaded = replace(loaded, denoiser=fp)
    from tmpq.sampling.ddim import DDIMSampler, generate

    ddim = DDIMSampler(loaded.schedule, ts)
    speed("FP32 sampler", lambda: generate(fp, ddim, images, loaded.sample_shape, 0, batch, progress=False), None)
    bf = copy.deepcopy(cpu_model).to(device=device, dtype=torch.bfloat16)

    class _Bf16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = bf

        def forward(self, x, t, cond=None):
            return self.m(x.to(torch.bfloat16), t).float()

    bf16 = _Bf16()
    speed("bf16 sampler", lambda: generate(bf16, ddim, images, loaded.sample_shape, 0, batch, progress=False), None)
    del fp_loaded
    for w, a in ((6, 6), (8, 8)):
        s = sampler(w, a)
        fake = speed(f"W{w}A{a} fake-quant", lambda s=s: s.sample(images, 0, batch_size=batch), None)
        for mode in ("int8", "packed"):  # the fp8 kernels run the fp8 super-network below
            try:
                lowered = s.lower(Backend(mode=mode, device=str(device)))
            except Exception as e:  # a backend that cannot run here is a finding, not a crash of the check
                rows.append({"model": name, "check": f"W{w}A{a} {mode}", "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            try:
                speed(f"W{w}A{a} {mode}", lambda r=lowered: r.sample(images, 0, batch_size=batch), fake)
            except Exception as e:
                rows.append({"model": name, "check": f"W{w}A{a} {mode}", "error": f"{type(e).__name__}: {e}"[:200]})
    # float8 e4m3 as the 8-bit format (QuantSpec.format8): its fake-quant sampler and the fp8 kernels
    fp8_sn = build_supernet(
        copy.deepcopy(cpu_model).to(device), calib, replace(SPEC, format8="fp8_e4m3"), progress=False
    )
    s = CompressedSampler(fp8_sn, loaded.schedule, ts, [fp8_sn.uniform_config(8, 8)], (), loaded.sample_shape)
    fake = speed("W8A8 fp8 fake-quant", lambda: s.sample(images, 0, batch_size=batch), None)
    try:
        lowered = s.lower(Backend(mode="fp8", device=str(device)))
        speed("W8A8 fp8 kernels", lambda: lowered.sample(images, 0, batch_size=batch), fake)
    except Exception as e:
        rows.append({"model": name, "check": "W8A8 fp8 kernels", "error": f"{type(e).__name__}: {e}"[:200]})
    return rows


def check_search(device: torch.device, out: Path) -> dict:
    from tmpq import compress

    t0 = time.perf_counter()
    res = compress(
        "builtin:fashion",
        "W6A6",
        steps=10,
        run_dir=out / "search",
        generations=2,
        final_samples=0,
        resume=False,
        progress=False,
        device=str(device),
    )
    return {
        "check": "demo-sized search (W6A6@10, 2 generations, no final scoring)",
        "s": round(time.perf_counter() - t0, 1),
        "best_fitness": res.best.fitness,
        "evaluations": len(res.search.records),
    }


def main(
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    images: Annotated[int | None, typer.Option(help="images per timed sampler [the device's batch size]")] = None,
    skip_search: bool = False,
    wide: Annotated[bool, typer.Option(help="also the wider random UNet")] = True,
    out: Path = Path("runs/gpu_check"),
) -> None:
    dev = resolve_device(device)
    batch = default_batch_size(dev)
    images = images or batch
    out.mkdir(parents=True, exist_ok=True)
    rows = check_model("built-in", load_model("builtin:fashion"), dev, images, batch)
    if wide:
        rows += check_model("wide random UNet", _wide_unet(), dev, images, batch)
    search = None if skip_search else check_search(dev, out)
    lines = [f"device: {device_name(dev)}; batch {batch}, {images} images per timed run, {STEPS} steps", ""]
    lines += ["| model | check | ms / image | error |", "|:---|:---|---:|:---|"]
    for r in rows:
        ms = r.get("ms_per_image", r.get("s", ""))
        ms = f"{ms} s" if "s" in r else ms
        err = r.get("error") or (
            f"rel {r['rel_err']:.2e}" if "rel_err" in r else
            f"rel {r['rel_err_vs_fake']:.2e} vs fake" if "rel_err_vs_fake" in r else ""
        )  # fmt: skip
        lines.append(f"| {r['model']} | {r['check']} | {ms} | {err} |")
    if search:
        lines += ["", f"{search['check']}: {search['s']} s, {search['evaluations']} candidates"]
    text = "\n".join(lines)
    typer.echo(text)
    (out / "gpu_check.md").write_text(text + "\n")
    (out / "gpu_check.json").write_text(
        json.dumps({"rows": rows, "search": search, "device": device_name(dev), "provenance": provenance()}, indent=1)
    )


if __name__ == "__main__":
    typer.run(main)
