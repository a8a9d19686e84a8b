"""Uniform-precision PTQ (Q-Diffusion-style calibration) on the built-in model: the first peer rows.

Calibrates the super-network once (every candidate width), then evaluates FP and each uniform setting
at each step count, with the same seeds and sample count for every row. Rows are written to OUT/rows/
as they finish, so an interrupted run resumes; the calibration set and super-network are reused too. Each quantized
row is also compared with the FP row's images from the same seeds (`fidelity`: FID to FP and PSNR to FP), the FP
images being kept with the FP row (in OUT, or in the `--fp-from` folder of another run on the same model).

    .venv/bin/python bench/ptq.py --num-samples 1000 --out runs/ptq
    .venv/bin/python bench/ptq.py --format8 fp8_e4m3 --configs W8A8 --out runs/ptq_fp8   # float8 8-bit candidates
    .venv/bin/python bench/ptq.py --no-bias-correction --out runs/ptq_nearest              # nearest rounding
    .venv/bin/python bench/ptq.py --configs W8A8 --fp-from runs/ptq --out runs/ptq_w8      # FP images of runs/ptq
    .venv/bin/python bench/ptq.py --configs W4A8 --narrow --reconstruction brecq --out runs/ptq_w4a8   # W4/A8 only
"""

from __future__ import annotations

import json
import re
import resource
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import torch
import typer

from tmpq.errors import TmpqError
from tmpq.evaluate import IMAGES, EvalConfig, evaluate, reference_metric, saved_images
from tmpq.fileio import write_json_atomic
from tmpq.models.loading import load_model
from tmpq.quant import CalibConfig, QuantSpec, SuperNet, quantize_
from tmpq.quant.prepare import prepare_supernet


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parse(label: str) -> tuple[int, int] | None:
    if label.upper() == "FP":
        return None
    m = re.fullmatch(r"W(\d)A(\d)", label.upper())
    if not m:
        raise TmpqError(f"config {label!r} is not FP or WxAy (e.g. W6A6)")
    return int(m.group(1)), int(m.group(2))


def calibrate_once(loaded, out: Path, calib_cfg: CalibConfig, spec: QuantSpec) -> tuple[SuperNet, dict]:
    """prepare_supernet (reuses OUT's calibration set and super-network when they match); when it had to
    calibrate, also time one uniform config calibrated alone and record the costs in OUT/calibration.json."""
    stats_path = out / "calibration.json"
    rss0 = _rss_mb()
    sn, calib, info = prepare_supernet(loaded, out, calib_cfg, spec)
    if info["reused"] and stats_path.is_file():
        return sn, json.loads(stats_path.read_text())  # the costs measured when it was built
    t0 = time.perf_counter()
    single = len(spec.w_bits) > 1 or len(spec.a_bits) > 1  # else the super-network is that one config already
    if single:  # Q-Diffusion's way: one uniform config, calibrated alone
        quantize_(load_model(loaded.spec).denoiser, sn.uniform_config(max(spec.w_bits), max(spec.a_bits)), calib, spec)
    calibrate_s = info["calibrate_s"]
    if info["reused"]:  # made by a run killed before it recorded its costs: the super-network's own record
        d = sn.calibration_info
        parts = [d["weights_s"], d["activations_s"], d.get("bias_correction", {}).get("s", 0.0)]
        calibrate_s = round(sum(parts) + (d.get("reconstruction") or {}).get("seconds", 0.0), 2)
    stats = {
        "collect_s": info["calib_collect_s"],
        "supernet_calibrate_s": calibrate_s,
        "reused_supernet": info["reused"],  # peak RSS then is the single-config calibration's, not the super-network's
        "supernet_detail": sn.calibration_info,
        "single_config_calibrate_s": round(time.perf_counter() - t0, 1) if single else calibrate_s,
        "rss_before_mb": round(rss0, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "calib_rows": len(calib),
        "candidates": {"w": list(spec.w_bits), "a": list(spec.a_bits)},
    }
    write_json_atomic(stats_path, stats)
    return sn, stats


def main(
    configs: Annotated[str, typer.Option(help="comma-separated: FP and/or WxAy")] = "FP,W8A8,W6A6,W5A5,W4A8",
    steps: Annotated[str, typer.Option(help="comma-separated step counts")] = "100,20,10",
    schedule: str = "quad",
    num_samples: int = 1000,
    seed: int = 0,
    calib_samples: int = 128,
    calib_steps: int = 20,
    model: str = "builtin:fashion",
    reconstruction: Annotated[str, typer.Option(help="none | adaround (per layer) | brecq (per block)")] = "none",
    recon_preset: Annotated[str, typer.Option(help="demo | paper")] = "demo",
    recon_iters: Annotated[int | None, typer.Option(help="override the preset's iterations")] = None,
    recon_inputs: Annotated[str, typer.Option(help="BRECQ's block inputs: fp | quantized | mixed")] = "fp",
    format8: Annotated[str, typer.Option(help="8-bit candidates: int8 | fp8_e4m3")] = "int8",
    bias_correction: Annotated[
        bool, typer.Option("--bias-correction/--no-bias-correction", help="bias-corrected rounding (QuantSpec)")
    ] = True,
    out: Path = Path("runs/ptq"),
    fp_from: Annotated[
        list[Path] | None, typer.Option(help="other bench/ptq.py folders whose FP rows' images to compare against")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    narrow: Annotated[
        bool, typer.Option(help="calibrate only the widths --configs use (each width is calibrated on its own)")
    ] = False,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model)
    spec = QuantSpec(format8=format8, bias_correction=bias_correction, reconstruction=None)
    if reconstruction != "none":
        spec = spec.with_reconstruction(reconstruction, recon_preset)
        spec = spec if recon_iters is None else replace(spec, recon_iters=recon_iters)
    spec = replace(spec, recon_inputs=recon_inputs)  # refused by QuantSpec without BRECQ, never silently dropped
    if narrow:
        widths = [wa for wa in map(_parse, configs.split(",")) if wa is not None]
        spec = spec.narrowed({w for w, _ in widths}, {a for _, a in widths})
    sn, cal = calibrate_once(loaded, out, CalibConfig(num_samples=calib_samples, num_steps=calib_steps), spec)
    qloaded = replace(loaded, denoiser=sn)
    metric = reference_metric("fashion-mnist")
    fp100 = sn.cost.bitops(None, 100)
    rows = []
    fp_row_wanted = "FP" in configs.upper().split(",")  # FP is always made (for fidelity); listed only when asked
    for n in (int(s) for s in steps.split(",")):
        fp_images = None
        for label in ["FP"] + [c for c in configs.split(",") if c.upper() != "FP"]:
            wa = _parse(label)
            cfg = EvalConfig(model=model, steps=n, schedule=schedule, num_samples=num_samples, seed=seed)
            name = f"{label}_{schedule}{n}_{num_samples}_{seed}"
            path = out / "rows" / f"{name}.json"
            if wa is None:  # FP: its images are what every quantized row is compared with
                fp_row = next(
                    (d / "rows" / name for d in [out, *(fp_from or [])] if (d / "rows" / name / IMAGES).is_file()), None
                )
                if fp_row is not None:
                    fp_images = saved_images(fp_row)
                    if fp_row == path.with_suffix("") and path.is_file() and fp_row_wanted:
                        rows.append(json.loads(path.read_text()))
                    continue
            elif path.is_file():  # reuse a row only if it was made with this spec and sampling config
                row = json.loads(path.read_text())
                if QuantSpec.from_dict(row["quant_spec"]) == spec and row["config"] == json.loads(
                    json.dumps(asdict(cfg))
                ):
                    rows.append(row)
                    continue
            qc = None if wa is None else sn.uniform_config(*wa)
            sn.set_fp() if qc is None else sn.set_config(qc)
            with torch.no_grad():
                res = evaluate(
                    cfg,
                    path.with_suffix(""),
                    loaded=qloaded,
                    metric=metric,
                    compare_to=fp_images,
                    save_images=wa is None,
                ).to_json()
            if wa is None:
                fp_images = saved_images(path.with_suffix(""))
            res |= {
                "label": label,
                "quant_config": None if qc is None else json.loads(qc.to_json()),
                "quant_spec": spec.to_dict(),
                "bitops": sn.cost.bitops(qc, n),
                "bitops_vs_fp100": sn.cost.bitops(qc, n) / fp100,
                "size_mb": sn.cost.size_bits(qc) / 8 / 1e6,
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2))
            if wa is not None or fp_row_wanted:
                rows.append(res)
            to_fp = f"  FID to FP {res['fidelity']['fid']:.2f}" if res["fidelity"] else ""
            typer.echo(
                f"{label:5s} {n:4d} steps: FID {res['fid']:.2f}  IS {res['inception_score']:.3f}{to_fp}", err=True
            )
    lines = [
        "| precision | steps | FID ↓ | FID to FP ↓ | PSNR to FP dB ↑ | IS ↑ | GBitOPs / image | vs FP-100 | size (MB) "
        "| sampling s / 1k images |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, fid_fp = r["config"], r.get("fidelity")
        to_fp = f"{fid_fp['fid']:.2f} | {fid_fp['psnr_db']:.1f}" if fid_fp else "— | —"
        lines.append(
            f"| {r['label']} | {c['steps']} | {r['fid']:.2f} | {to_fp} | {r['inception_score']:.3f} "
            f"| {r['bitops'] / 1e9:.1f} "
            f"| {r['bitops_vs_fp100']:.4f} | {r['size_mb']:.3f} "
            f"| {r['sample_wall_s'] / c['num_samples'] * 1000:.1f} |"
        )
    recon = cal["supernet_detail"].get("reconstruction")
    how = (
        (
            f"range-only, bias-corrected rounding of {list(spec.bias_correction)}"
            if spec.bias_correction
            else "range-only, nearest rounding"
        )
        if recon is None
        else (
            f"{recon['method']} ({recon['iters']} iterations x batch {recon['batch']} per unit and width, on "
            f"{recon['rows']} calibration inputs; {recon['seconds']} s)"
        )
    )
    note = (
        f"\n\nWeights: {how}. {num_samples} samples per row (seeds {seed}..{seed + num_samples - 1}), "
        f"{schedule} schedule, FID/IS in "
        "the shipped classifier's feature space vs the 60,000 training images. Calibration: "
        f"{cal['calib_rows']} denoiser inputs ({calib_samples} FP DDIM trajectories x {calib_steps} steps), "
        f"collected in {cal['collect_s']} s; the super-network (W {cal['candidates']['w']} x A "
        f"{cal['candidates']['a']}) calibrated in {cal['supernet_calibrate_s']} s, a single uniform config alone in "
        f"{cal['single_config_calibrate_s']} s; peak RSS {cal['peak_rss_mb']} MB (process before calibration: "
        f"{cal['rss_before_mb']} MB). This run took {time.time() - start:.0f} s (rows on disk are reused).\n"
    )
    (out / "ptq.md").write_text("\n".join(lines) + note)
    typer.echo("\n".join(lines) + note)


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
