"""What glibc's freed-memory setting (tmpq.allocator.keep_freed_memory) does to sampling on this CPU.

Each setting runs in a fresh process (the setting is process-wide and cannot be undone): 10-step DDIM sampling of
the built-in model at batch 128, in FP32 and, with a calibrated super-network, fake-quantized uniform W6A6, timed
after a warm-up batch, with the process's system time and minor page faults over the timed part.

    .venv/bin/python bench/allocator.py --supernet runs/demo/supernet      # after `make demo`
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import typer


def _child(setting: str, supernet: str | None, n: int) -> None:
    if setting == "keep":
        from tmpq.allocator import keep_freed_memory

        assert keep_freed_memory()
    import torch

    from tmpq.models.loading import load_model
    from tmpq.quant import SuperNet
    from tmpq.sampling.ddim import DDIMSampler, generate
    from tmpq.sampling.schedules import make_timesteps

    loaded = load_model("builtin:fashion")
    ddim = DDIMSampler(loaded.schedule, make_timesteps("uniform", 10, loaded.schedule.num_train_timesteps))
    denoisers = {"FP32": loaded.denoiser}
    if supernet:
        sn = SuperNet.load(supernet, load_model("builtin:fashion").denoiser)
        sn.set_config(sn.uniform_config(6, 6))
        denoisers["fake-quant W6A6"] = sn
    rows = {}
    with torch.no_grad():
        for name, den in denoisers.items():
            generate(den, ddim, 128, loaded.sample_shape, 0, 128)  # warm-up
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            generate(den, ddim, n, loaded.sample_shape, 0, 128)
            wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            rows[name] = {"s": wall, "sys_s": r1.ru_stime - r0.ru_stime, "faults": r1.ru_minflt - r0.ru_minflt}
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


def main(
    supernet: str = typer.Option(
        None, help="a calibrated super-network of the built-in model, e.g. runs/demo/supernet"
    ),
    num_samples: int = 512,
    child: str = typer.Option(None, hidden=True),
) -> None:
    if child:
        return _child(child, supernet, num_samples)
    import torch

    from tmpq.provenance import cpu_model

    results = {}
    for setting in ("glibc default", "keep"):
        cmd = [sys.executable, __file__, "--child", setting, "--num-samples", str(num_samples)]
        out = subprocess.run(cmd + (["--supernet", supernet] if supernet else []), check=True, capture_output=True)
        results[setting] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    threads = results["keep"]["threads"]
    print(f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {threads} threads, {num_samples} images")
    print("| sampler, 10 steps | malloc | s | system s | minor page faults |\n|---|---|---:|---:|---:|")
    for name in results["keep"]["rows"]:
        for setting, label in (("glibc default", "glibc default"), ("keep", "keep_freed_memory()")):
            r = results[setting]["rows"][name]
            print(f"| {name} | {label} | {r['s']:.1f} | {r['sys_s']:.1f} | {r['faults']:,} |")


if __name__ == "__main__":
    typer.run(main)
