"""float32 matrix products on this CPU: PyTorch's default (MKL) against oneDNN, as fastntk routes them.

Usage: ``.venv/bin/python bench/gemm.py [--threads 2] [--repeats 20] [--out bench/results/gemm.json]``.
Prints GFLOP/s (median of the repeats) and the relative error against float64 for the
shapes the benchmark workloads multiply, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from fastntk._gemm import _linear, onednn_available

SHAPES = {  # (M, K, N): what a @ b computes, a (M, K), b (K, N)
    "MLP backward, 64 samples x 10 outputs": (640, 1024, 1024),
    "MLP cotangent Gram": (640, 1024, 640),
    "MLP forward, 64 samples": (64, 784, 1024),
    "trace Gram, one output of 128 samples": (128, 1024, 128),
    "big square": (2048, 2048, 2048),
}


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not onednn_available():
        raise SystemExit("this PyTorch has no oneDNN linear op (or FASTNTK_ONEDNN=0): nothing to compare")
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':<42}{'M x K x N':>16}{'MKL GFLOP/s':>13}{'oneDNN GFLOP/s':>16}{'ratio':>7}{'rel err MKL / oneDNN':>22}")
    for name, (m, k, n) in SHAPES.items():
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        flops = 2.0 * m * k * n
        mkl = flops / median_seconds(lambda: a @ b, args.repeats) / 1e9
        onednn = flops / median_seconds(lambda: _linear(a, b.T, None), args.repeats) / 1e9
        exact = a.double() @ b.double()
        errors = [((c.double() - exact).abs().max() / exact.abs().max()).item() for c in (a @ b, _linear(a, b.T, None))]
        rows.append({"shape": name, "mkn": [m, k, n], "mkl_gflops": mkl, "onednn_gflops": onednn, "mkl_rel_error": errors[0], "onednn_rel_error": errors[1]})
        print(f"{name:<42}{f'{m}x{k}x{n}':>16}{mkl:>13.0f}{onednn:>16.0f}{onednn / mkl:>7.2f}{f'{errors[0]:.1e} / {errors[1]:.1e}':>22}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
