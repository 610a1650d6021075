"""Tiny models and inputs for the tests of fastntk.gram, and a runner for subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An MLP 5-16-3 (tanh), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


class TwoInputs(nn.Module):
    """model(x, y): two inputs, for tuple and dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(x) + self.b(y))


def inputs(n: int, seed: int, dim: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def save(path: Path, x: torch.Tensor) -> Path:
    np.save(path, x.numpy())
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The environment for subprocesses: fastntk importable, quiet warnings."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(Path(__file__).parent), e.get("PYTHONPATH", "")])
    e.setdefault("PYTHONWARNINGS", "ignore")
    return e


def python(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env(), cwd=cwd)
