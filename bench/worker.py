"""Measure ONE (workload, method) pair in this process (torch environment).

Usage: ``python bench/worker.py WORKLOAD METHOD [--repeats 5]``, with METHOD
one of ``fastntk-auto``, ``fastntk-jacobian``, ``fastntk-vp``,
``fastntk-structured``, ``tutorial-jac``, ``tutorial-vp``.

The cached data and reference (``python bench/reference.py WORKLOAD``) must
exist.  Prints one ``BENCH_RESULT <json>`` line (see bench/protocol.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from protocol import data_path, guarded, ref_path, rss_mib, run_protocol  # noqa: E402
from workloads import WORKLOADS, Workload  # noqa: E402

FASTNTK_METHODS = {
    "fastntk-auto": "auto",
    "fastntk-jacobian": "jacobian",
    "fastntk-vp": "vp",
    "fastntk-structured": "structured",
}
TUTORIAL_METHODS = ("tutorial-jac", "tutorial-vp")
METHODS = (*FASTNTK_METHODS, *TUTORIAL_METHODS)

NtkCallable = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def make_ntk_fn(method: str, model: torch.nn.Module, mode: str) -> NtkCallable:
    """Build the method's callable ``(x1, x2=None) -> K`` (its set-up cost is
    part of the first-call time)."""
    if method in FASTNTK_METHODS:
        import fastntk

        return fastntk.ntk_fn(model, mode=mode, method=FASTNTK_METHODS[method])
    if method in TUTORIAL_METHODS:
        from tutorial import tutorial_ntk_fn

        return tutorial_ntk_fn(model, method, mode)
    raise ValueError(f"unknown method {method!r}; known: {METHODS}")


def check_cache(wl: Workload) -> None:
    """Fail early, with the command to run, if the cache is missing or stale."""
    path = data_path(wl.name)
    if not path.exists() or not ref_path(wl.name).exists():
        raise FileNotFoundError(f"no cache for {wl.name}: run python bench/reference.py {wl.name}")
    with np.load(path) as data:
        if json.loads(str(data["meta"]))["fingerprint"] != wl.fingerprint():
            raise RuntimeError(f"stale cache for {wl.name}: run python bench/reference.py --force {wl.name}")


def measure(workload: str, method: str, repeats: int) -> dict[str, Any]:
    """The protocol for one pair; returns the JSON record's figures."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    wl = WORKLOADS[workload]
    check_cache(wl)
    torch.set_num_threads(2)
    if method in FASTNTK_METHODS:
        import fastntk  # an import is set-up, not the first call

    model, x1, x2 = wl.build()
    rss_setup = rss_mib()

    def start() -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
        fn = make_ntk_fn(method, model, wl.mode)
        return (lambda: fn(x1, x2)), fn(x1, x2)

    record = run_protocol(
        rss_after_setup=rss_setup,
        start=start,
        sync=lambda k: k,  # CPU torch is synchronous
        to_numpy=lambda k: k.detach().cpu().numpy(),
        reference=ref_path(wl.name),
        repeats=repeats,
    )
    if method == "fastntk-auto":  # after the measurements: what the cost model chose, and why
        plan = fastntk.ntk_fn(model, mode=wl.mode).plan(x1, x2)
        record["plan"] = {"chosen": plan.chosen, "estimated_flops": plan.flops}
    return record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="one (workload, method) measurement")
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    context = {"workload": args.workload, "method": args.method,
               "torch_threads": 2, "repeats": args.repeats}
    return guarded(lambda: measure(args.workload, args.method, args.repeats), context)


if __name__ == "__main__":
    sys.exit(main())
