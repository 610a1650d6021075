"""Kernel regression two ways on one problem: forming Θ (fastntk.ntk + predict.kernel_ridge)
vs matrix-free (NTKOperator + conjugate gradients); time, peak memory and agreement.

Usage (from the repository root)::

    .venv/bin/python bench/matrix_free.py [--n 500] [--threads 2] [--out bench/results/matrix_free.json]

Each way runs in its own child process (so peak RSS is its own: ``ru_maxrss``), on a seeded
MLP 20-256-256-10 in float64 (N·O unknowns), ridge 1e-2, CG to rtol 1e-8. Prints a table,
writes JSON (and the predictions' largest relative difference between the two ways).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RIDGE, RTOL, N_TEST = 1e-2, 1e-8, 50


def problem(n: int):  # noqa: ANN201 - torch is imported in the workers only
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)).double()
    g = torch.Generator().manual_seed(1)
    x, x_test = torch.randn(n, 20, generator=g, dtype=torch.float64), torch.randn(N_TEST, 20, generator=g, dtype=torch.float64)
    y = torch.randn(n, 10, generator=g, dtype=torch.float64)
    return net, x, x_test, y


def worker(way: str, n: int, threads: int, out: Path) -> None:
    import torch

    import fastntk
    from fastntk.operator import NTKOperator, solve

    torch.set_num_threads(threads)
    net, x, x_test, y = problem(n)
    fastntk.ntk(net, x[:4])  # warm-up: imports and first-call set-up are not what is measured
    (NTKOperator(net, x[:4]) @ torch.ones(40, dtype=torch.float64))
    start = time.perf_counter()
    extra = {}
    if way == "formed":
        k, k_test = fastntk.ntk(net, x), fastntk.ntk(net, x_test, x)
        predictions = fastntk.predict.kernel_ridge(k, y, k_test, ridge=RIDGE)
    else:
        solution = solve(NTKOperator(net, x), y, ridge=RIDGE, rtol=RTOL)
        predictions = (NTKOperator(net, x_test, x) @ solution.alpha.reshape(-1)).reshape(N_TEST, 10)
        extra = {"iterations": solution.iterations, "residual": solution.residual}
    seconds = time.perf_counter() - start
    torch.save(predictions, out.with_suffix(".pt"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out.write_text(json.dumps({"way": way, "seconds": seconds, "peak_rss_bytes": peak, **extra}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "matrix_free.json")
    parser.add_argument("--worker", choices=("formed", "operator"))
    parser.add_argument("--result", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n, args.threads, args.result)
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("formed", "operator"):
            result = Path(tmp) / f"{way}.json"
            env = {"PYTHONPATH": str(ROOT / "src")}
            subprocess.run([sys.executable, __file__, "--worker", way, "--n", str(args.n), "--threads", str(args.threads), "--result", str(result)],
                           check=True, env={**__import__("os").environ, **env})
            rows.append(json.loads(result.read_text()))
        a, b = (torch.load(Path(tmp) / f"{way}.pt") for way in ("formed", "operator"))
        difference = ((a - b).abs().max() / a.abs().max()).item()
    n, o = args.n, 10
    print(f"kernel regression, MLP 20-256-256-10 float64, N={n} (N·O={n * o}), {N_TEST} test points, ridge {RIDGE}, threads {args.threads}")
    print(f"{'way':<10} {'seconds':>9} {'peak RSS':>10}  notes")
    for row in rows:
        notes = f"CG {row['iterations']} iterations, residual {row['residual']:.2g}" if row["way"] == "operator" else f"Θ formed: {(n * o) ** 2 * 8 / 1e6:.0f} MB float64"
        print(f"{row['way']:<10} {row['seconds']:>9.2f} {row['peak_rss_bytes'] / 2**20:>8.0f} MiB  {notes}")
    print(f"predictions agree to {difference:.2g} (max relative difference)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"n": n, "outputs": o, "ridge": RIDGE, "rtol": RTOL, "threads": args.threads, "rows": rows, "max_relative_difference": difference}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
