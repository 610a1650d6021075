"""Run in a subprocess by test_gram_memory: peak RSS growth of a Gram matrix written to disk.

usage: gram_memory_script.py FOLDER N BUDGET_BYTES [--limit-heap]; prints one JSON line.
--limit-heap fixes glibc's mmap threshold as ``fastntk gram`` does (budget.limit_heap_retention).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch

import fastntk
from fastntk import zoo


def rss_now() -> int:
    """Current resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak() -> int:
    """Peak RSS of this process's memory in bytes: VmHWM (Linux).

    Not getrusage's ru_maxrss: that also keeps the RSS of the parent at fork (a large pytest
    process), and clear_refs cannot lower it.
    """
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


folder, n, budget = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
limited = fastntk.blocks.budget.limit_heap_retention() if "--limit-heap" in sys.argv else False
model = zoo.mlp((32, 64, 64, 4)).eval()
x = torch.randn(n, 32, generator=torch.Generator().manual_seed(0))
np.save(folder / "x.npy", x.numpy())
np.save(folder / "warm.npy", x[:900].numpy())
del x
# Touch every code path first, with the blocks of the run measured (750 samples for 24 MB): the
# first use of a kernel maps library pages (MKL, oneDNN) that count in RSS but are not the budget's.
fastntk.gram(model, folder / "warm.npy", out=folder / "warm_k.npy", max_memory=budget, block_size=750, progress=False, overwrite=True, mode="trace")
try:  # reset the high-water mark (VmHWM) to the current RSS: only the run below is measured
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
before = rss_now()
seen = []
fastntk.gram(model, folder / "x.npy", out=folder / "k.npy", max_memory=budget, progress=False, on_block=seen.append, overwrite=True, mode="trace")
print(json.dumps({
    "before": before, "peak": peak(), "growth": peak() - before, "blocks": len(seen),
    "block": seen[0].rows[1] - seen[0].rows[0], "result_bytes": n * n * 4, "limited": limited, "reset": reset,
}))
