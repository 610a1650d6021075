"""Kernels over datasets: blocks sized by a memory budget, written to disk as they finish,
resumable after a crash, shared between ranks.

    data ──► Source (data.py: tensors, arrays, memmaps, .npy paths, Datasets)
         ──► plan: method and block size (gram.py, budget.py)
         ──► schedule: blocks per rank, factor cache (schedule.py, distributed.py)
         ──► .npy file + checked journal, locked, fingerprinted (store.py, fingerprint.py)

The entry point is :func:`gram` (``fastntk.gram``).
"""

from ..blocks.budget import parse_memory
from .gram import gram
from ..blocks.schedule import Block
from .store import LockedError, ResumeError

__all__ = ["gram", "Block", "LockedError", "ResumeError", "parse_memory"]
