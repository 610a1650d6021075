"""keep_freed_memory: a freed 16 MiB tensor's pages serve the next one (glibc), off by the switch."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import resource, torch
from fastntk._heap import keep_freed_memory
kept = keep_freed_memory()
def faults_of_fresh_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(4 * 2**20).fill_(1.0)  # 16 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_fresh_tensor()
print(kept, faults_of_fresh_tensor())
"""

PAGES = 16 * 2**20 // 4096


def run_script(keep_heap: str) -> tuple[bool, int]:
    env = {**os.environ, "FASTNTK_KEEP_HEAP": keep_heap}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the adaptation is glibc's; elsewhere nothing is done")
def test_freed_pages_are_reused_on_glibc() -> None:
    kept, faults = run_script("1")
    assert kept
    assert faults < PAGES // 10  # the second tensor reuses the first one's pages
    kept, faults = run_script("0")
    assert not kept
    assert faults > PAGES // 2  # glibc alone: the second tensor gets fresh pages


def test_switch_leaves_the_allocator_alone() -> None:
    kept, _ = run_script("0")
    assert not kept
