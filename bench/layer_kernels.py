"""Per-layer kernels in one pass (``fastntk.layer_ntk``) against G separate ``fastntk.ntk(params=group)`` calls.

Usage: ``.venv/bin/python bench/layer_kernels.py [--threads 2] [--repeats 3] [--out JSON (default bench/results/layer_kernels.json)]``.
Prints, per workload (an MLP and a CNN, float32, one group per layer, or per parameter tensor), the best
of the repeats' seconds (the calls interleaved) of: one ``ntk`` (the whole kernel), ``layer_ntk`` (G kernels in one pass),
``weighted_ntk`` (J Λ Jᵀ in one pass), and G separate ``ntk(params=...)`` calls; the ratio
separate / one pass; and checks that the one-pass kernels equal the separate ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import fastntk


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, str]] = {
    # name: (model, sample shape, N, mode)
    "mlp-trace": (mlp, (64,), 512, "trace"),
    "mlp-full": (mlp, (64,), 256, "full"),
    "cnn-trace": (cnn, (3, 16, 16), 256, "trace"),
    "cnn-full": (cnn, (3, 16, 16), 128, "full"),
}


def best_seconds(calls: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """The fastest of ``repeats`` timed runs of each call (after one warm-up each), the calls
    interleaved so that a busy spell of a shared machine slows all of them alike; and their results."""
    results = {name: call() for name, call in calls.items()}  # warm-up (calibration, oneDNN primitives)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name] = call()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--groups", nargs="*", default=["module", "parameter"], help="groupings to run (G = 4 or 8 here)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "layer_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    header = f"{'workload':<11}{'groups':>10}{'G':>3}{'method':>12}{'ntk s':>9}{'layer_ntk s':>13}{'weighted s':>12}{'G x ntk(params) s':>19}{'separate/one pass':>19}{'max rel diff':>14}"
    print(header)
    for name, grouping in [(w, g) for w in args.workloads for g in args.groups]:
        build, shape, n, mode = WORKLOADS[name]
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build().eval()
            x = torch.randn(n, *shape)
        groups = fastntk.parameter_groups(model, grouping)
        weights = dict.fromkeys(groups, 1.0)
        method = fastntk.plan(model, x, mode=mode).chosen
        method = method if method in ("structured", "jacobian") else "structured"
        options: dict[str, Any] = dict(mode=mode, method=method)
        seconds, results = best_seconds({
            "ntk": lambda: fastntk.ntk(model, x, **options),
            "layer_ntk": lambda: fastntk.layer_ntk(model, x, groups=grouping, **options),
            "weighted_ntk": lambda: fastntk.weighted_ntk(model, x, weights=weights, groups=grouping, **options),
            "separate": lambda: {g: fastntk.ntk(model, x, params=p, **options) for g, p in groups.items()},
        }, args.repeats)
        whole, one_pass, weighted, separate = (seconds[k] for k in ("ntk", "layer_ntk", "weighted_ntk", "separate"))
        kernels, apart = results["layer_ntk"], results["separate"]
        diff = max(((kernels[g].double() - apart[g].double()).abs().max() / apart[g].abs().max()).item() for g in groups)
        row = {
            "workload": name, "grouping": grouping, "groups": len(groups), "method": method, "n": n, "mode": mode, "ntk_s": whole,
            "layer_ntk_s": one_pass, "weighted_ntk_s": weighted, "separate_s": separate, "ratio": separate / one_pass, "max_rel_diff": diff,
        }
        rows.append(row)
        print(f"{name:<11}{grouping:>10}{len(groups):>3}{method:>12}{whole:>9.3f}{one_pass:>13.3f}{weighted:>12.3f}{separate:>19.3f}{separate / one_pass:>19.2f}{diff:>14.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "fastntk": fastntk.__version__}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
