"""Figures for ``fastntk.gram``: large trace Gram matrices on this machine, 1 and 2 ranks.

Usage (from the repository root, with the library's environment)::

    .venv/bin/python bench/gram_figures.py [--figures a b c] [--limit-s 900]
        [--workdir /tmp/fastntk-gram-figures] [--out bench/results/gram-<date>.json]

Figures (inputs: fixed-seed standard normal, float32, in .npy files read by row ranges):

* (a) the MLP 784-1024-1024-10 (``fastntk.zoo.mlp()``), trace Gram of N = 20,000, max_memory=2GB;
* (b) the tutorial CNN (``fastntk.zoo.tutorial_cnn()``), trace Gram of N = 5,000, max_memory=4GB;
* (c) the MLP, trace Gram of N = 5,000: 1 rank (2 threads) against 2 ranks under torchrun (gloo,
  1 thread each, torchrun's default), on the same 2 cores.

Each run is a fresh process (``--worker``) writing the kernel to disk. For (a) and (b) a pilot at
a tenth of N is timed first and extrapolated by N² (the pairs of a Gram matrix); if the full N
would take longer than ``--limit-s``, the largest N that fits is run instead and both the
measurement and the extrapolation are reported. Peak RSS is the worker's VmHWM, reset after its
set-up (imports, model), so "growth" is what the Gram computation itself added.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

FIGURES = {
    "a": {"model": "mlp", "n": 20_000, "max_memory": "2GB"},
    "b": {"model": "cnn", "n": 5_000, "max_memory": "4GB"},
    "c": {"model": "mlp", "n": 5_000, "max_memory": "2GB"},
}


# ---------------------------------------------------------------------------- worker


def vm(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def worker(args: argparse.Namespace) -> None:
    """One Gram computation in this process (one rank under torchrun); prints a JSON line per rank."""
    import logging

    import torch

    import fastntk
    from fastntk import zoo
    from fastntk.blocks.budget import limit_heap_retention

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    limit_heap_retention()  # as `fastntk gram` does
    model = (zoo.mlp() if args.model == "mlp" else zoo.tutorial_cnn()).eval()
    path = Path(args.data)
    rank = int(os.environ.get("RANK", "0"))
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS: measure the computation, not the imports
    except OSError:
        pass
    before = vm("VmRSS")
    blocks = []
    start = time.perf_counter()
    kernel = fastntk.gram(model, path, mode="trace", out=args.out, max_memory=args.max_memory, overwrite=rank == 0 and not args.resume,
                          resume=args.resume, on_block=blocks.append)
    elapsed = time.perf_counter() - start
    meta = json.loads((Path(args.out + ".blocks") / "meta.json").read_text())
    mirror = float(abs(kernel[0, -1] - kernel[-1, 0]))  # a block above the diagonal and its mirror: 0
    print("RESULT " + json.dumps({
        "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads(),
        "n": int(kernel.shape[0]), "seconds": elapsed, "rss_before_mib": before / 2**20, "peak_rss_mib": vm("VmHWM") / 2**20,
        "growth_mib": (vm("VmHWM") - before) / 2**20, "blocks_this_rank": len(blocks), "block": meta["plan"]["block"],
        "method": meta["plan"]["method"], "mirror_difference": mirror,
    }), flush=True)


# ---------------------------------------------------------------------------- driver


def make_data(model: str, n: int, folder: Path) -> Path:
    """n fixed-seed standard-normal inputs of the model, as a .npy file (written in chunks)."""
    import numpy as np

    shape = (784,) if model == "mlp" else (3, 32, 32)
    path = folder / f"{model}-{n}.npy"
    if not path.exists():
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, *shape))
        rng = np.random.default_rng(0)
        for start in range(0, n, 1000):
            stop = min(n, start + 1000)
            array[start:stop] = rng.standard_normal((stop - start, *shape), dtype=np.float32)
        array.flush()
        del array
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, n: int, max_memory: str, folder: Path, ranks: int = 1, timeout: float = 3600) -> dict[str, Any]:
    """One worker process (or ``ranks`` under torchrun); returns its measurements and the wall time."""
    data = make_data(model, n, folder)
    out = folder / f"k-{model}-{n}-{ranks}.npy"
    worker_args = ["--worker", "--model", model, "--data", str(data), "--out", str(out), "--max-memory", max_memory]
    if ranks == 1:
        command = [sys.executable, str(Path(__file__).resolve()), *worker_args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port()),
                   str(Path(__file__).resolve()), *worker_args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    per_rank = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return {"model": model, "n": n, "max_memory": max_memory, "ranks": ranks, "wall_s": wall, "out": str(out),
            "per_rank": sorted(per_rank, key=lambda r: r["rank"]), "command": " ".join(command)}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    ranks = result["per_rank"]
    return {
        "seconds": max(r["seconds"] for r in ranks), "wall_s": result["wall_s"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "growth_mib": max(r["growth_mib"] for r in ranks),
        "block": ranks[0]["block"], "method": ranks[0]["method"], "blocks": [r["blocks_this_rank"] for r in ranks],
    }


def scaled_figure(name: str, folder: Path, limit_s: float) -> dict[str, Any]:
    """Pilot at N/10, extrapolate by N², then the full N or the largest N that fits ``limit_s``."""
    spec = FIGURES[name]
    pilot_n = spec["n"] // 10
    pilot = run(spec["model"], pilot_n, spec["max_memory"], folder)
    t = summary(pilot)["seconds"]
    predicted = t * (spec["n"] / pilot_n) ** 2
    n = spec["n"] if predicted <= limit_s else max(pilot_n, int(pilot_n * math.sqrt(limit_s / t)) // 500 * 500)
    print(f"({name}) pilot N={pilot_n}: {t:.1f} s -> N={spec['n']} predicted {predicted:.0f} s; running N={n}", flush=True)
    main = pilot if n == pilot_n else run(spec["model"], n, spec["max_memory"], folder, timeout=max(3 * limit_s, 600))
    measured = summary(main)
    return {
        "figure": name, "target_n": spec["n"], "pilot": {"n": pilot_n, **summary(pilot)}, "n": n, **measured,
        "predicted_target_s_from_pilot": predicted,
        "predicted_target_s_from_run": measured["seconds"] * (spec["n"] / n) ** 2,
        "commands": [pilot["command"], main["command"]],
    }


def ranks_figure(folder: Path) -> dict[str, Any]:
    spec = FIGURES["c"]
    one = run(spec["model"], spec["n"], spec["max_memory"], folder, ranks=1)
    two = run(spec["model"], spec["n"], spec["max_memory"], folder, ranks=2)
    import numpy as np

    identical = bool(np.array_equal(np.load(one["out"], mmap_mode="r"), np.load(two["out"], mmap_mode="r")))
    return {"figure": "c", "n": spec["n"], "one_rank": summary(one), "two_ranks": summary(two), "bit_identical": identical,
            "commands": [one["command"], two["command"]]}


def table(results: dict[str, Any]) -> str:
    lines = ["| figure | model | N | max_memory | method | block | ranks | compute s | wall s | peak RSS MiB | growth MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("a", "b"):
        if name in results:
            r, spec = results[name], FIGURES[name]
            for label, row, n in (("pilot", r["pilot"], r["pilot"]["n"]), ("run", r, r["n"])):
                lines.append(f"| ({name}) {label} | {spec['model']} | {n:,} | {spec['max_memory']} | {row['method']} | {row['block']} | 1 | "
                             f"{row['seconds']:.1f} | {row['wall_s']:.1f} | {row['peak_rss_mib']:.0f} | {row['growth_mib']:.0f} |")
            lines.append(f"| ({name}) N={r['target_n']:,} | | | | | | | predicted {r['predicted_target_s_from_run']:.0f} s "
                         f"(from the pilot {r['predicted_target_s_from_pilot']:.0f} s) | | | |")
    if "c" in results:
        r = results["c"]
        for label, row, ranks in (("1 rank", r["one_rank"], 1), ("2 ranks", r["two_ranks"], 2)):
            lines.append(f"| (c) {label} | mlp | {r['n']:,} | {FIGURES['c']['max_memory']} | {row['method']} | {row['block']} | {ranks} | "
                         f"{row['seconds']:.1f} | {row['wall_s']:.1f} | {row['peak_rss_mib']:.0f} (per rank) | {row['growth_mib']:.0f} |")
        lines.append(f"| (c) 2 ranks vs 1 | | | | | | | x{r['one_rank']['seconds'] / r['two_ranks']['seconds']:.2f} speed-up, "
                     f"bit-identical: {r['bit_identical']} | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--out")
    parser.add_argument("--max-memory"), parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--figures", nargs="+", default=["a", "b", "c"], choices=sorted(FIGURES))
    parser.add_argument("--limit-s", type=float, default=900, help="longest run allowed per figure (default 900 s)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "fastntk-gram-figures"))
    parser.add_argument("--json", default=str(BENCH / "results" / f"gram-{dt.date.today()}.json"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every N by this (a quick smoke run: 0.05)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for spec in FIGURES.values():
        spec["n"] = max(100, int(spec["n"] * args.scale))
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()}}
    import torch

    results["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in args.figures:
        started = time.perf_counter()
        results[name] = ranks_figure(folder) if name == "c" else scaled_figure(name, folder, args.limit_s)
        results[name]["load_after"] = os.getloadavg()
        print(f"({name}) done in {time.perf_counter() - started:.0f} s", flush=True)
        print(table(results), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    print(json.dumps(results, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
