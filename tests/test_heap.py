"""keep_freed_memory: on glibc a 16 MiB tensor comes from the reusable heap, not a fresh
mapping that free() would give back; FASTNTK_KEEP_HEAP=0 leaves glibc alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fastntk._heap import keep_freed_memory

SCRIPT = """
import ctypes, torch
from fastntk._heap import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
tensor = torch.empty(4 * 2**20)  # 16 MiB
print(kept, libc.mallinfo2().hblkhd - mapped)
"""

TENSOR_BYTES = 16 * 2**20


def newly_mapped(keep_heap: str) -> tuple[bool, int]:
    """(whether fastntk raised glibc's threshold, bytes glibc mapped afresh for a 16 MiB tensor)."""
    env = {**os.environ, "FASTNTK_KEEP_HEAP": keep_heap}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    kept, mapped = out.stdout.split()
    return kept == "True", int(mapped)


def glibc_with_mallinfo2() -> bool:
    """glibc 2.33 or later (mallinfo2 reports the bytes in mapped blocks)."""
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not glibc_with_mallinfo2(), reason="the adaptation is glibc's (elsewhere nothing is done); mallinfo2 needs 2.33")
def test_tensors_come_from_the_heap_on_glibc() -> None:
    kept, mapped = newly_mapped("1")
    assert kept and mapped < TENSOR_BYTES  # from the heap, reused once freed
    kept, mapped = newly_mapped("0")
    assert not kept and mapped >= TENSOR_BYTES  # glibc alone: a fresh mapping, unmapped on free


def test_switch_leaves_the_allocator_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTNTK_KEEP_HEAP", "0")
    assert keep_freed_memory.__wrapped__() is False  # the uncached function: nothing allocated


def test_ntk_keeps_memory_and_the_budgeted_gram_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """fastntk.ntk asks for the adaptation; fastntk.gram, which keeps its process near a budget, does not."""
    import torch
    from torch import nn

    import fastntk
    from fastntk import _api

    calls: list[str] = []
    monkeypatch.setattr(_api, "keep_freed_memory", lambda: calls.append("kept"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    fastntk.gram(model, x, max_memory="64MB", progress=False)
    assert calls == []
    fastntk.ntk(model, x)
    assert calls
