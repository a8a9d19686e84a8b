"""Measured speed, memory and size of a model's samplers (the built-in one by default): FP32, bf16, W8A8
(fake-quantized as the search sees it, and on real int8 kernels), and a searched configuration (an export), each at
full and reduced steps.

Each row runs in its own process, so its peak RSS is its own. Latency is the wall time of a whole sampling run
(every denoiser step plus the DDIM updates) divided by the images it made, at batch 1 and batch 64.

    .venv/bin/python bench/speed.py --compressed runs/demo/export --out runs/speed
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from tmpq.provenance import cpu_model

ROWS = {
    # name: (weights, backend mode or None for the plain model, float dtype)
    "FP32": ("fp", None, "float32"),
    "bf16": ("fp", None, "bfloat16"),
    "W8A8 fake-quant": ("w8a8", "fake", "float32"),
    "W8A8 int8": ("w8a8", "int8", "float32"),
    "W8A8 int8 + bf16": ("w8a8", "int8", "bfloat16"),
    "searched fake-quant": ("searched", "fake", "float32"),
    "searched packed": ("searched", "packed", "float32"),
    "searched int8": ("searched", "int8", "float32"),
    "searched int8 + bf16": ("searched", "int8", "bfloat16"),
}


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it is not inherited from the parent across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _FPSampler:
    """The plain (unquantized) model in a float dtype, sampled like the others."""

    def __init__(self, loaded, dtype: torch.dtype, timesteps, device: str) -> None:
        from tmpq.sampling.ddim import DDIMSampler

        self.den = loaded.denoiser.to(device=device, dtype=dtype)
        self.dtype, self.device = dtype, device
        self._ddim = DDIMSampler(loaded.schedule, timesteps)
        self.shape = loaded.sample_shape

    def ddim(self):
        return self._ddim

    def __call__(self, x, t):
        return self.den(x.to(self.dtype), t).float()

    def sample(self, n: int, seed: int, batch_size: int):
        from tmpq.sampling.ddim import generate

        with torch.no_grad():
            return generate(self, self._ddim, n, self.shape, seed, batch_size, self.device, progress=False)

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.den.parameters(), *self.den.buffers()])


def _sampler(row: str, steps: str, run_dir: Path, compressed: Path | None, device: str):
    """The row's sampler at 'full' (uniform, `full_steps`) or 'searched' steps."""
    from tmpq.compressed import CompressedSampler
    from tmpq.export import load
    from tmpq.models.loading import load_model
    from tmpq.quant.prepare import prepare_supernet
    from tmpq.runtime import Backend, lower
    from tmpq.sampling.schedules import make_timesteps

    weights, mode, dtype = ROWS[row]
    full = json.loads(os.environ["TMPQ_SPEED_FULL"])
    loaded = load_model(full["model"])
    timesteps = full["searched_timesteps"] if steps == "searched" else make_timesteps("uniform", full["steps"], 1000)
    if weights == "fp":
        return _FPSampler(loaded, getattr(torch, dtype), timesteps, device)
    if weights == "searched":
        src = load(compressed)
    else:
        sn, _, _ = prepare_supernet(loaded, run_dir, progress=False)
        src = CompressedSampler(sn, loaded.schedule, timesteps, [sn.uniform_config(8, 8)])
    src = CompressedSampler(
        src.supernet, src.schedule, timesteps, src.phase_configs, src.phase_bounds, src.sample_shape, src.eta
    )
    return lower(src, Backend(mode=mode, dtype=dtype, device=device), inplace=True)


def _measure(row: str, run_dir: Path, compressed: Path | None, device: str, batch: int) -> dict:
    out = {}
    for steps in ("full", "searched"):
        s = _sampler(row, steps, run_dir, compressed, device)
        s.sample(1, seed=0, batch_size=1)  # warm-up: kernels' first-call set-up is not what a server pays
        b1 = []
        for i in range(3):
            t0 = time.perf_counter()
            s.sample(1, seed=i, batch_size=1)
            b1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        s.sample(batch, seed=0, batch_size=batch)
        out[steps] = {
            "steps": len(s.ddim().timesteps),
            "ms_per_image_b1": min(b1) * 1000,
            f"ms_per_image_b{batch}": (time.perf_counter() - t0) * 1000 / batch,
        }
        out["memory_bytes"] = s.memory_bytes()
        if hasattr(s, "summary"):
            out["mac_share"] = s.summary()["mac_share"]
            out["bitops_fraction"] = s.summary()["bitops_fraction_of_fp_same_steps"]
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def main(
    compressed: Annotated[Path | None, typer.Option(help="an export of a searched sampler (tmpq export)")] = None,
    model: Annotated[str, typer.Option(help="model spec for the FP and W8A8 rows")] = "builtin:fashion",
    run_dir: Path = Path("runs/speed"),
    out: Path = Path("runs/speed"),
    full_steps: int = 100,
    batch: int = 64,
    device: str = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    row: Annotated[str | None, typer.Option(help="internal: measure one row in this process")] = None,
) -> None:
    if threads:
        torch.set_num_threads(threads)
    if row is not None:
        res = _measure(row, run_dir, compressed, device, batch)
        print("ROW " + json.dumps(res))
        return
    from tmpq.export import MANIFEST, TENSORS, load
    from tmpq.models.loading import load_model
    from tmpq.quant.prepare import prepare_supernet

    out.mkdir(parents=True, exist_ok=True)
    searched_ts = json.loads((compressed / MANIFEST).read_text())["timesteps"] if compressed else None
    loaded = load_model(model)
    sn, _, _ = prepare_supernet(loaded, run_dir)  # calibrated once here; every row process reuses it from disk
    from tmpq.compressed import CompressedSampler
    from tmpq.sampling.schedules import make_timesteps

    ts = searched_ts or make_timesteps("quad", 10, 1000)
    w8 = CompressedSampler(sn, loaded.schedule, ts, [sn.uniform_config(8, 8)])
    w8_dir = w8.export(out / "w8a8_export", overwrite=True)
    sizes = {
        "fp": loaded.weights_path.stat().st_size
        if loaded.weights_path
        else 4 * sum(p.numel() for p in loaded.denoiser.parameters()),
        "w8a8": (w8_dir / TENSORS).stat().st_size,
        "searched": (compressed / TENSORS).stat().st_size if compressed else None,
    }
    if compressed:
        load(compressed)  # fail now, with tmpq's message, if the export is damaged
    full = {"model": model, "steps": full_steps, "searched_timesteps": list(ts)}
    env = {**os.environ, "TMPQ_SPEED_FULL": json.dumps(full)}
    results = {}
    for name, (weights, _, _) in ROWS.items():
        if weights == "searched" and not compressed:
            continue
        cmd = [sys.executable, __file__, "--row", name, "--run-dir", str(run_dir), "--batch", str(batch),
               "--device", device] + (["--compressed", str(compressed)] if compressed else []) + (
            ["--threads", str(threads)] if threads else [])  # fmt: skip
        typer.echo(f"measuring {name} ...", err=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode != 0 or not line:
            typer.echo(f"  {name} failed:\n{proc.stderr[-2000:]}", err=True)
            continue
        results[name] = json.loads(line[-1][4:])
    fp_b64 = results.get("FP32", {}).get("full", {}).get(f"ms_per_image_b{batch}")
    lines = [
        f"| sampler | steps | ms / image, batch 1 | ms / image, batch {batch} | × vs FP32-{full_steps} (b{batch}) | "
        "resident model (KB) | peak RSS (MB) | file (KB) | MACs on int8 kernels |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        weights, mode, dtype = ROWS[name]
        size = sizes[weights]
        if weights == "fp" and dtype == "bfloat16":
            size = size // 2  # the same tensors stored in bf16
        int_share = sum(v for k, v in r.get("mac_share", {}).items() if "int8 kernel" in k)
        for steps in ("full", "searched"):
            m = r[steps]
            speedup = fp_b64 / m[f"ms_per_image_b{batch}"] if fp_b64 else float("nan")
            lines.append(
                f"| {name} | {m['steps']} | {m['ms_per_image_b1']:.1f} | {m[f'ms_per_image_b{batch}']:.1f} | "
                f"{speedup:.1f} | {r['memory_bytes'] / 1024:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{'' if size is None else f'{size / 1024:.0f}'} | {int_share:.0%} |"
            )
    head = (
        f"CPU: {cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {threads or torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, device {device}; searched steps {list(ts)}"
    )
    table = head + "\n\n" + "\n".join(lines) + "\n"
    (out / "speed.md").write_text(table)
    config = {"model": model, "compressed": str(compressed) if compressed else None, "full_steps": full_steps,
              "batch": batch, "device": device, "threads": threads, "cpu": cpu_model()}  # fmt: skip
    (out / "speed.json").write_text(json.dumps({"config": config, "sizes": sizes, "rows": results}, indent=2))
    typer.echo(table)


if __name__ == "__main__":
    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)
    typer.run(main)
