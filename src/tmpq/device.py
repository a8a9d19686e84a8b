"""Device facts that decide code paths (no global state: each is a pure query)."""

from __future__ import annotations

import torch

from tmpq.errors import TmpqError
from tmpq.provenance import cpu_model


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


def device_name(device: torch.device | str = "cpu") -> str:
    """The machine a figure was measured on, to print beside it: the GPU's name, or the CPU model and its ISA."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a command runs the model on: `auto` is CUDA when one is available, else the CPU. A CUDA device
    that this machine lacks is refused with one message (never a silent fall back to the CPU)."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TmpqError(f"--device {name!r} is not a device; use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise TmpqError(f"--device {name!r}: tmpq runs on {DEVICE_CHOICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TmpqError(f"--device {name}: this machine has no CUDA device (or this torch has no CUDA); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TmpqError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def module_device(module: object) -> torch.device:
    """Where a model's parameters (or, failing those, buffers) live; the CPU for a model without either."""
    for get in ("parameters", "buffers"):
        tensors = getattr(module, get, None)
        if tensors is not None:
            for t in tensors():
                return t.device
    return torch.device("cpu")


def default_batch_size(device: torch.device | str) -> int:
    """Images per denoiser call when the caller does not say: small on a CPU (cache-sized), large on a GPU, where
    each call's kernel launches cost the same at 64 images as at 512 (measured on an H200: 18x the FP time at 64)."""
    return 512 if torch.device(device).type == "cuda" else 64
