"""Forward time of the built-in UNet at batch 64: fp32 vs bf16 autocast (and fake-quantized W8A8 / W6A6 through a
calibrated super-network, when one is given), on this CPU.

.venv/bin/python bench/forward_speed.py [--supernet runs/ptq/supernet]
"""

from __future__ import annotations

import time

import torch

from tmpq.models.loading import load_model
from tmpq.quant import SuperNet


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(supernet: str | None = None, bf16: bool = True) -> None:
    den = load_model("builtin:fashion").denoiser
    x, t = torch.randn(64, 1, 32, 32), torch.randint(0, 1000, (64,))
    rows = []
    with torch.no_grad():
        rows.append(("fp32", _time(lambda: den(x, t), 5)))
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rows.append(("bf16 autocast", _time(lambda: den(x, t), 1)))
        if supernet:
            sn = SuperNet.load(supernet, den)
            for w, a in ((8, 8), (6, 6)):
                sn.set_config(sn.uniform_config(w, a))
                rows.append((f"fake-quantized W{w}A{a}", _time(lambda: sn(x, t), 5)))
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print("| precision | ms / batch of 64 | ms / image |\n|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s * 1000:.0f} | {s * 1000 / 64:.2f} |")


if __name__ == "__main__":
    import typer

    from tmpq.allocator import keep_freed_memory

    keep_freed_memory()  # as the tmpq command line does (docs/usage.md#speed-on-the-cpu)

    typer.run(main)
