"""Which side of each size threshold and special path the fuzzer reaches: counting spies and
the thresholds the fuzzer sets.

The library keeps a few special paths chosen by size thresholds that the fuzzer's tiny
models never cross (``docs/special-paths.md``). :data:`THRESHOLDS` names, per setting, values
of those module constants that put every model on one side; :func:`thresholds` sets them for
a block of code (and restores them). :func:`counting` wraps the functions each side runs in
counting spies (behaviour unchanged) and yields the live counter; the side names are in
:data:`SIDES`.

Run as a script, it runs the CI-size fuzzer (``tests/fuzz``, CI=true, 40 examples per family
unless FASTNTK_FUZZ_EXAMPLES says otherwise) in this process with the spies installed and
prints how often each side ran::

    CI=true PYTHONPATH=src python tests/fuzz/special_paths.py [pytest args]
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import sys
from types import ModuleType
from typing import Any, Iterator
from unittest import mock



def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:  # moved or removed by a redesign: its constants and spies are skipped
        return None


def modules() -> dict[str, ModuleType | None]:
    """The modules holding the thresholds and paths (None where one no longer exists)."""
    return {
        "method": _module("fastntk.methods.structured.method"),
        "conv": _module("fastntk.methods.structured.rules.conv"),
        "factors": _module("fastntk.methods.structured.factors"),
        "gemm": _module("fastntk._gemm"),
        "budget": _module("fastntk.blocks.budget"),
    }


THRESHOLDS: dict[str, dict[tuple[str, str], int | None]] = {
    "shipped": {},
    # one output per backward pass (CHUNK_BYTES binds; conv blocks above SMALL_PASSES), every
    # conv weight Jacobian by the grouped convolution_backward, every eligible product on oneDNN
    "low": {("method", "CHUNK_BYTES"): 1, ("method", "SMALL_PASSES"): 0, ("conv", "SMALL_PATCH"): 0, ("budget", "GRAM_HALVES_MIN"): 1},
    # every output in one pass, every 1d/2d conv by patches, no product on oneDNN by mm
    "high": {("method", "CHUNK_BYTES"): 2**40, ("method", "SMALL_PASSES"): 2**62, ("conv", "SMALL_PATCH"): 10**9, ("budget", "GRAM_HALVES_MIN"): 10**9},
}
"""Module constants per threshold setting; a constant the library no longer has is left alone."""


@contextlib.contextmanager
def thresholds(setting: str) -> Iterator[None]:
    """Set the constants of ``setting`` (:data:`THRESHOLDS`) inside the block, restored after it."""
    mods = modules()
    with contextlib.ExitStack() as stack:
        for (mod, name), value in THRESHOLDS[setting].items():
            module = mods[mod]
            if module is not None and hasattr(module, name):
                stack.enter_context(mock.patch.object(module, name, value))
        yield


SIDES = {
    "compact-rows": ("rows_trace", "rows_materialized"),
    "conv weight Jacobian (SMALL_PATCH)": ("conv_patches", "conv_grouped"),
    "CHUNK_BYTES": ("chunk_bound", "chunk_all_outputs"),
    "SMALL_PASSES": ("small_passes_below", "small_passes_above"),
    "library products (_gemm.mm)": ("mm_onednn", "mm_pytorch"),
}
"""Each path or threshold and the counters of its two sides (the first: the special path)."""


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter]:
    """Counting spies on each side of :data:`SIDES` inside the block; yields the live counter."""
    count: collections.Counter = collections.Counter()
    mods = modules()
    with contextlib.ExitStack() as stack:

        def spy(module: Any, name: str, wrapper: Any) -> None:
            if module is not None and hasattr(module, name):
                stack.enter_context(mock.patch.object(module, name, wrapper(getattr(module, name))))

        def rows_contract(orig: Any) -> Any:
            def contract(self: Any, other: Any, mode: str) -> Any:
                compact = mode == "trace" and isinstance(other, type(self))
                count["rows_trace" if compact else "rows_materialized"] += 1
                return orig(self, other, mode)
            return contract

        if mods["factors"] is not None:
            spy(getattr(mods["factors"], "RowsPairFactor", None), "contract", rows_contract)

        def counted(key: str) -> Any:
            def wrapper(orig: Any) -> Any:
                def run(*args: Any, **kwargs: Any) -> Any:
                    count[key] += 1
                    return orig(*args, **kwargs)
                return run
            return wrapper

        spy(mods["conv"], "patch_weight_jacobian", counted("conv_patches"))
        spy(mods["conv"], "grouped_weight_jacobian", counted("conv_grouped"))

        method = mods["method"]

        def output_chunk(orig: Any) -> Any:
            def chunk(n: int, num_outputs: int, per_direction: int, matmul_heavy: bool, block_flops: float) -> int:
                k = orig(n, num_outputs, per_direction, matmul_heavy, block_flops)
                above = not matmul_heavy and block_flops >= getattr(method, "SMALL_PASSES", float("inf"))
                if not matmul_heavy:
                    count["small_passes_above" if above else "small_passes_below"] += 1
                if not above and num_outputs > 1:  # CHUNK_BYTES decides (one output: nothing to bound)
                    count["chunk_bound" if k < num_outputs else "chunk_all_outputs"] += 1
                return k
            return chunk

        spy(method, "output_chunk", output_chunk)

        gemm = mods["gemm"]

        def linear(orig: Any) -> Any:
            def run(a: Any, b_t: Any, bias: Any) -> Any:
                count["mm_onednn" if sys._getframe(1).f_code.co_name == "mm" else "mode_onednn"] += 1
                return orig(a, b_t, bias)
            return run

        def eligible(orig: Any) -> Any:
            def run(a: Any, b: Any) -> bool:
                ok = orig(a, b)
                if not ok and sys._getframe(1).f_code.co_name == "mm":
                    count["mm_pytorch"] += 1  # inside fast_matmuls, not float32 2-D on the CPU: PyTorch's product
                return ok
            return run

        spy(gemm, "_linear", linear)
        spy(gemm, "_eligible", eligible)
        yield count


def report(count: collections.Counter) -> str:
    lines = []
    for path, (special, other) in SIDES.items():
        lines.append(f"{path:38s} {special}={count.get(special, 0):<6d} {other}={count.get(other, 0)}")
    extra = {k: v for k, v in count.items() if not any(k in s for s in SIDES.values())}
    if extra:
        lines.append(f"{'other counters':38s} " + " ".join(f"{k}={v}" for k, v in sorted(extra.items())))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import os
    import pathlib

    import pytest

    here = pathlib.Path(__file__).resolve().parent
    os.environ.setdefault("CI", "true")
    os.environ.setdefault("FASTNTK_FUZZ_EXAMPLES", "40")
    with counting() as count:
        rc = pytest.main(["-q", "-p", "no:cacheprovider", *(argv or [str(here)])])
    print(report(count))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
