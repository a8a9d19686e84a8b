"""Device facts that decide code paths (no global state: each is a pure query)."""

from __future__ import annotations

import torch


def bf16_autocast_helps(device: torch.device | str = "cpu") -> bool:
    """True where bf16 autocast is faster than fp32.

    On CPUs without AVX-512 (e.g. AVX2-only EPYC) PyTorch's bf16 kernels are emulated and
    measured ~30x slower than fp32 here, so autocast must be opt-in by capability, not by default.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return "AVX512" in torch.backends.cpu.get_cpu_capability()
    return False
