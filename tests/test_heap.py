"""keep_freed_memory: on glibc, after it a 16 MiB tensor comes from the reusable heap, not a
fresh mapping that free() would give back. Library calls never do it unless asked
(FASTNTK_KEEP_HEAP=1): it changes the allocator for the rest of the process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastntk
from fastntk import _api, cli

SCRIPT = """
import ctypes, sys, torch
import fastntk
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert fastntk.keep_freed_memory()
elif sys.argv[1] == "calls":  # every public call, on a model whose tensors stay far below 16 MiB
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(8, 6)
    for method in ("jacobian", "vp", "structured", "auto"):
        fastntk.ntk(model, x, x[:3], method=method)
    fastntk.ntk_fn(model, mode="trace")(x)
    fastntk.plan(model, x)
mapped = libc.mallinfo2().hblkhd
tensor = torch.empty(4 * 2**20)  # 16 MiB
print(libc.mallinfo2().hblkhd - mapped)
"""

TENSOR_BYTES = 16 * 2**20


def newly_mapped(what: str, keep_heap: str | None = None) -> int:
    """Bytes glibc mapped afresh for a 16 MiB tensor after ``what`` ("nothing", "keep", "calls")."""
    env = {k: v for k, v in os.environ.items() if k != "FASTNTK_KEEP_HEAP"}
    if keep_heap is not None:
        env["FASTNTK_KEEP_HEAP"] = keep_heap
    out = subprocess.run([sys.executable, "-c", SCRIPT, what], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def glibc_with_mallinfo2() -> bool:
    """glibc 2.33 or later (mallinfo2 reports the bytes in mapped blocks)."""
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 33)


needs_glibc = pytest.mark.skipif(not glibc_with_mallinfo2(), reason="the adaptation is glibc's (elsewhere nothing is done); mallinfo2 needs 2.33")


@needs_glibc
def test_keep_freed_memory_serves_tensors_from_the_heap() -> None:
    assert newly_mapped("nothing") >= TENSOR_BYTES  # glibc alone: a fresh mapping, unmapped on free
    assert newly_mapped("keep") < TENSOR_BYTES  # from the heap, reused once freed


@needs_glibc
def test_library_calls_leave_the_allocator_alone() -> None:
    """Regression: every ntk/ntk_fn/plan call raised glibc's thresholds for the rest of the process."""
    assert newly_mapped("calls") >= TENSOR_BYTES
    assert newly_mapped("calls", keep_heap="1") < TENSOR_BYTES  # the documented opt-in


def test_kernels_keep_memory_only_when_asked_and_the_budgeted_gram_never(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(_api, "keep_freed_memory", lambda: calls.append("kept"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    monkeypatch.delenv("FASTNTK_KEEP_HEAP", raising=False)
    fastntk.ntk(model, x)
    fastntk.plan(model, x)
    assert calls == []
    monkeypatch.setenv("FASTNTK_KEEP_HEAP", "1")
    fastntk.gram(model, x, max_memory="64MB", progress=False, mode="trace")
    assert calls == []
    fastntk.ntk(model, x)
    assert calls


def test_cli_compute_keeps_freed_memory_in_its_own_process(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(fastntk, "keep_freed_memory", lambda: calls.append("kept"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compute", "--quiet", "--no-spectrum"]) == 0
    assert calls == ["kept"]
