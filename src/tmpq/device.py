"""Device facts that decide code paths (no global state: each is a pure query)."""

from __future__ import annotations

import platform
from pathlib import Path

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


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (or what platform knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str = "cpu") -> str:
    """The machine a figure was measured on, to print beside it: the GPU's name, or the CPU model and its ISA."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
