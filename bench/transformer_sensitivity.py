"""How sensitive each unit type of a trained transformer denoiser is to quantization, and what holding a type at
8 bits buys end to end: the measurement behind the default pins of transformer units (issue 22).

1. Per unit (range-only super-network, no pins): the denoiser output's MSE against FP, relative to the output's power,
   when that unit alone has its weights at W bits, or its input at A bits, on calibration inputs spread over every
   timestep (`tmpq.search.sensitivity.layer_sensitivity`); summed per unit type (`transformer_macs.unit_type`) beside
   the type's share of the MACs.
2. End to end: uniform WxAy at `--steps` uniform DDIM steps on `--num-samples` class-cycled samples, with each small
   unit type in turn held at 8 bits, against the FP sampler's images from the same seeds (FID and PSNR to FP) and
   against the data (FID), with the BitOPs each hold costs.

    .venv/bin/python bench/transformer_sensitivity.py --out runs/dit_sensitivity          # builtin:fashion-dit
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from transformer_macs import unit_type

from tmpq.device import device_name
from tmpq.evaluate import fidelity_to, reference_metric
from tmpq.fileio import write_json_atomic
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantConfig, QuantSpec
from tmpq.quant.prepare import prepare_supernet
from tmpq.sampling.ddim import DDIMSampler, generate
from tmpq.sampling.schedules import uniform_timesteps
from tmpq.search.sensitivity import layer_sensitivity

PATCH = "patch embedding"
HELD = ("adaLN + embedders", PATCH, "final projection", "attention matmuls")
"""The unit types held at 8 bits one at a time (the small ones the literature pins, and the attention matmuls)."""


def _parse(label: str) -> tuple[int, int]:
    w, a = label.upper().removeprefix("W").split("A")
    return int(w), int(a)


def main(
    model: str = "builtin:fashion-dit",
    setting: Annotated[str, typer.Option(help="the low width measured, WxAy")] = "W4A6",
    inputs: Annotated[int, typer.Option(help="calibration inputs of the per-unit sensitivity")] = 64,
    steps: int = 10,
    num_samples: int = 500,
    out: Path = Path("runs/dit_sensitivity"),
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    w, a = _parse(setting)
    loaded = load_model(model)
    spec = QuantSpec(w_bits=tuple(sorted({w, 8})), a_bits=tuple(sorted({a, 8})), pin=(), reconstruction=None)
    sn, calib, _ = prepare_supernet(loaded, out / "supernet", CalibConfig(), spec)
    kinds = {name: unit_type(name) for name in sn.units}
    macs = {name: sn.cost.units[name].macs for name in sn.units}
    total = sum(macs.values())

    with torch.no_grad():
        idx = torch.linspace(0, len(calib) - 1, min(inputs, len(calib))).round().long()
        x, t, c = calib.rows(idx)
        sn.set_fp()
        power = float(sn(x, t, c).pow(2).mean())
        sens = layer_sensitivity(sn, calib, inputs, progress=False)
    rel = {n: {k: {b: v / power for b, v in d.items()} for k, d in e.items()} for n, e in sens.items()}

    print(
        f"\nPer unit type: Σ over its units of the output's relative MSE with that unit alone quantized ({model}, "
        f"{len(idx)} calibration inputs over all timesteps, range-only, {device_name()})\n"
    )
    print(f"| unit type | units | MAC share | weights at W{w} | inputs at A{a} | inputs at A8 |")
    print("|---|---:|---:|---:|---:|---:|")
    types = sorted(set(kinds.values()), key=lambda k: -sum(m for n, m in macs.items() if kinds[n] == k))
    per_type = {}
    for k in types:
        names = [n for n in sn.units if kinds[n] == k]
        row = {
            "units": len(names),
            "mac_share": sum(macs[n] for n in names) / total,
            "w_low": sum(rel[n]["w"][w] for n in names) if all(rel[n]["w"] for n in names) else None,
            "a_low": sum(rel[n]["a"][a] for n in names),
            "a8": sum(rel[n]["a"][8] for n in names),
        }
        per_type[k] = row
        print(
            f"| {k} | {row['units']} | {100 * row['mac_share']:.2f} % "
            f"| {'—' if row['w_low'] is None else format(row['w_low'], '.2e')} | {row['a_low']:.2e} "
            f"| {row['a8']:.2e} |"
        )
    print(f"\nThe most sensitive units (relative MSE, weights at W{w} / inputs at A{a}):\n")
    print(f"| unit | type | MAC share | weights at W{w} | inputs at A{a} |")
    print("|---|---|---:|---:|---:|")
    worst = sorted(rel, key=lambda n: -max(rel[n]["w"].get(w, 0.0), rel[n]["a"][a]))[:10]
    for n in worst:
        print(
            f"| `{n.removeprefix('unet.')}` | {kinds[n]} | {100 * macs[n] / total:.3f} % "
            f"| {rel[n]['w'].get(w, float('nan')):.2e} | {rel[n]['a'][a]:.2e} |"
        )

    metric = reference_metric("fashion-mnist")
    ddim = DDIMSampler(loaded.schedule, uniform_timesteps(steps, loaded.schedule.num_train_timesteps))
    cond = loaded.conditioning(num_samples)

    def sample(config: QuantConfig | None) -> torch.Tensor:
        sn.set_fp() if config is None else sn.set_config(config)
        with torch.no_grad():
            return generate(sn, ddim, num_samples, loaded.sample_shape, 0, progress=False, cond=cond)

    fp = sample(None)
    base = sn.resolve(QuantConfig.uniform(w, a))
    variants: dict[str, QuantConfig] = {f"uniform {setting}": base}
    for k in HELD:
        held = {n: (None if u.kind == "matmul" else 8, 8) for n, u in sn.units.items() if kinds[n] == k}
        if held:
            variants[f"{k} at 8 bits"] = QuantConfig.uniform(w, a, **held)
    patch = [n for n in sn.units if kinds[n] == PATCH]
    variants["patch embedding at W8, FP input"] = QuantConfig.uniform(w, a, **dict.fromkeys(patch, (8, None)))
    small = {n: (8, 8) for n in sn.units if kinds[n] in HELD[:3]} | dict.fromkeys(patch, (8, None))
    variants["adaLN + embedders, final projection W8A8; patch embedding W8, FP input"] = QuantConfig.uniform(
        w, a, **small
    )
    base_bitops = sn.cost.bitops(base, steps)
    rows = {"FP": {"fid": metric.fid(fp), "bitops": sn.cost.bitops(None, steps)}}
    for label, config in variants.items():
        images = sample(config)
        to_fp = fidelity_to(images, fp, metric)
        bitops = sn.cost.bitops(sn.resolve(config), steps)
        rows[label] = {
            "fid": metric.fid(images),
            "fid_to_fp": to_fp["fid"],
            "psnr_db": to_fp["psnr_db"],
            "bitops": bitops,
            "extra_bitops": bitops / base_bitops - 1,
        }
    sn.set_fp()
    print(
        f"\nEnd to end: {num_samples} samples (seed i, class i mod {len(loaded.class_labels or [0])}), {steps} uniform "
        f"DDIM steps, {device_name()}\n"
    )
    print("| sampler | FID ↓ | FID to FP ↓ | PSNR to FP dB ↑ | GBitOPs / image | BitOPs vs uniform |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        if label == "FP":
            print(f"| FP | {r['fid']:.2f} | — | — | {r['bitops'] / 1e9:.2f} | — |")
            continue
        print(
            f"| {label} | {r['fid']:.2f} | {r['fid_to_fp']:.2f} | {r['psnr_db']:.1f} | {r['bitops'] / 1e9:.2f} "
            f"| {100 * r['extra_bitops']:+.2f} % |"
        )
    write_json_atomic(
        out / "sensitivity.json",
        {
            "model": model,
            "setting": setting,
            "inputs": len(idx),
            "steps": steps,
            "num_samples": num_samples,
            "per_unit": rel,
            "unit_types": kinds,
            "per_type": per_type,
            "end_to_end": rows,
            "device": device_name(),
            "wall_s": round(time.time() - start, 1),
        },
        indent=2,
    )
    print(f"\nwrote {out / 'sensitivity.json'} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    typer.run(main)
