"""Forward time of the built-in UNet at batch 64: fp32 vs bf16 autocast, on this CPU.

.venv/bin/python bench/forward_speed.py
"""

from __future__ import annotations

import time

import torch

from tmpq.models.loading import load_model


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    den = load_model("builtin:fashion").denoiser
    x, t = torch.randn(64, 1, 32, 32), torch.randint(0, 1000, (64,))
    with torch.no_grad():
        fp32 = _time(lambda: den(x, t), 5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = _time(lambda: den(x, t), 1)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print("| precision | ms / batch of 64 | ms / image |\n|---|---:|---:|")
    for name, s in (("fp32", fp32), ("bf16 autocast", bf16)):
        print(f"| {name} | {s * 1000:.0f} | {s * 1000 / 64:.2f} |")


if __name__ == "__main__":
    main()
