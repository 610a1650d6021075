"""Run by torchrun in tests: one rank of a fastntk.gram call.

usage: gram_rank_script.py X.npy OUT [--memory] [--die-after K] [--x2 X2.npy]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import fastntk
from gram_helpers import mlp

parser = argparse.ArgumentParser()
parser.add_argument("x")
parser.add_argument("out")
parser.add_argument("--x2")
parser.add_argument("--memory", action="store_true", help="in-memory result, gathered to rank 0 (saved to OUT)")
parser.add_argument("--die-after", type=int, help="rank 1 exits abruptly after this many blocks (first attempt only)")
args = parser.parse_args()
rank = int(os.environ["RANK"])
count = [0]


def hook(block) -> None:
    count[0] += 1
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if rank == 1 and first_attempt and args.die_after is not None and count[0] == args.die_after:
        os._exit(17)  # a crash: no cleanup, no exception


result = fastntk.gram(
    mlp(), args.x, args.x2, block_size=5, progress=False, out=None if args.memory else args.out,
    resume=not args.memory, on_block=hook, mode="trace")
if args.memory:
    if rank == 0:
        np.save(args.out, result.numpy())
    else:
        assert result is None
restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
print(f"rank {rank} computed {count[0]} blocks (restart {restart})", flush=True)
