"""tmpq.allocator: keeping freed memory removes the page faults of re-allocating a large tensor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tmpq import allocator

_CHILD = """
import json, resource, sys
import torch
from tmpq.allocator import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(16 << 20).fill_(1.0)  # 64 MB, above glibc's largest default mmap threshold (32 MB)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 << 20).fill_(1.0)
print(json.dumps({"ok": ok, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0}))
"""


def _faults(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, setting], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator.platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_keeping_freed_memory_removes_the_page_faults_of_reallocation():
    default, kept = _faults("default"), _faults("keep")
    assert kept["ok"] is True
    pages = (64 << 20) // 4096  # one 64 MB tensor is 16,384 small pages (fewer faults where huge pages are on)
    assert kept["faults"] * 4 < default["faults"]  # glibc maps and zero-fills every re-allocation again
    assert kept["faults"] <= 2 * pages  # kept memory is reused: at most a heap extension or two, not ten tensors


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_DONE", {})
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert allocator.keep_freed_memory() is False
