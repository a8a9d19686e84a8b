"""Keep freed memory in the process: the glibc malloc setting that halves tmpq's CPU sampling time.

PyTorch's CPU tensors come from glibc malloc. By default glibc returns every block above its mmap threshold (at most
32 MB) to the kernel when it is freed, and trims the heap top, so the next denoiser call maps the same memory again
and the kernel zero-fills it page by page. A sampler allocates and frees its activations on every call: measured on
512 images of the built-in model at 10 steps, batch 128 (AMD EPYC, AVX512, 2 threads; `bench/allocator.py
--supernet runs/demo/supernet`), keeping freed memory took FP32 sampling from 25.1 s to 17.5 s and fake-quantized
W6A6 from 29.4 s to 19.0 s, the system time from 16.4 s to 0.1 s and the page faults from 6.9 M to none. PyTorch's
CPU tuning guide reaches the same speed with jemalloc or tcmalloc through LD_PRELOAD; this is the same effect with
no extra library, set from inside the process.

The cost is memory kept: up to 1 GiB of freed heap stays mapped for reuse instead of going back to the kernel.
tmpq's command line, its worker processes and `tmpq.compress` call `keep_freed_memory()`; other Python users may call
it themselves (it is process-wide, so tmpq does not do it on import).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30
_DONE: dict[str, bool] = {}


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Let glibc keep up to `keep_bytes` of freed memory for reuse. True when set (or already set in this
    process); False where the C library is not glibc, which has no such setting (nothing is changed)."""
    if _DONE.get("set"):
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(keep_bytes)) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, int(keep_bytes)) == 1 and ok
    except (OSError, AttributeError):
        return False
    _DONE["set"] = ok
    return ok
