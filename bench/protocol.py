"""The measurement protocol of BENCHMARKS.md, shared by both worker environments.

This module imports neither torch nor jax: ``bench/worker.py`` (torch env,
``.venv``) and ``bench/nt_worker.py`` (JAX env, ``.venv-nt``) both use it.
Only the standard library and numpy are allowed here.

A worker process measures exactly one (workload, method) pair:

1. set-up: imports, model, inputs; then the RSS "after set-up" is read;
2. first call: building the method's callable *and* calling it once (for
   JAX this includes tracing and XLA compilation);
3. ``repeats`` steady calls of the same callable (median/min/max);
4. peak RSS of the process (``getrusage`` maxrss) read before anything else
   is allocated; growth = peak - RSS after set-up;
5. max relative error ``max|K - K_ref| / max|K_ref|`` against the cached
   float64 reference.

The worker prints one line ``BENCH_RESULT <json>`` on stdout; ``run.py``
parses the last such line.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
RESULT_MARKER = "BENCH_RESULT "

#: Substrings (lower-cased) of error messages that mean "out of memory".
OOM_MARKERS = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
    "resource_exhausted",
    "std::bad_alloc",
    "memoryerror",
)


# --------------------------------------------------------------------------
# cache layout (written by bench/reference.py, read by both workers)
# --------------------------------------------------------------------------
def data_path(workload: str) -> Path:
    """The .npz with weights, inputs, torch outputs and metadata."""
    return CACHE_DIR / f"{workload}.npz"


def ref_path(workload: str) -> Path:
    """The .npy with the float64 reference kernel."""
    return CACHE_DIR / f"{workload}.ref.npy"


# --------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------
def rss_mib() -> float:
    """Current resident set size of this process (VmRSS), in MiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def is_oom_message(text: str) -> bool:
    """Whether an error message or a stderr tail reports memory exhaustion."""
    low = text.lower()
    return any(marker in low for marker in OOM_MARKERS)


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------
@dataclass
class Timings:
    """First-call and steady-state wall times, in seconds."""

    first_s: float
    steady_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The figures that go into the JSON record."""
        steady = self.steady_s
        return {
            "first_s": self.first_s,
            "steady_median_s": statistics.median(steady) if steady else None,
            "steady_min_s": min(steady) if steady else None,
            "steady_max_s": max(steady) if steady else None,
            "steady_all_s": steady,
        }


def time_calls(
    start: Callable[[], tuple[Callable[[], Any], Any]],
    sync: Callable[[Any], Any],
    repeats: int,
) -> tuple[Timings, Any]:
    """Time the first call (``start``: build the callable, call it once) and
    ``repeats`` steady calls of the callable it returns.

    ``sync`` blocks until a result is computed (``block_until_ready`` for
    JAX, identity for torch on CPU) and is included in every timing.
    Returns the timings and the last result.
    """
    t0 = time.perf_counter()
    call, out = start()
    sync(out)
    timings = Timings(first_s=time.perf_counter() - t0)
    for _ in range(repeats):
        del out  # let the previous result go before the next call
        t0 = time.perf_counter()
        out = call()
        sync(out)
        timings.steady_s.append(time.perf_counter() - t0)
    return timings, out


# --------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------
def max_rel_error(k: np.ndarray, k_ref: np.ndarray) -> float:
    """max|K - K_ref| / max|K_ref|, computed in float64."""
    k = np.asarray(k, dtype=np.float64)
    if k.shape != k_ref.shape:
        raise ValueError(f"result shape {k.shape} != reference shape {k_ref.shape}")
    denom = float(np.max(np.abs(k_ref)))
    return float(np.max(np.abs(k - k_ref))) / (denom if denom > 0 else 1.0)


# --------------------------------------------------------------------------
# the whole protocol
# --------------------------------------------------------------------------
def run_protocol(
    rss_after_setup: float,
    start: Callable[[], tuple[Callable[[], Any], Any]],
    sync: Callable[[Any], Any],
    to_numpy: Callable[[Any], np.ndarray],
    reference: Path,
    repeats: int,
) -> dict[str, Any]:
    """Steps 2-5 of the protocol; returns the figures for the JSON record."""
    timings, out = time_calls(start, sync, repeats)
    peak = peak_rss_mib()  # before the error computation allocates anything
    record: dict[str, Any] = {
        "status": "ok",
        **timings.summary(),
        "rss_after_setup_mib": rss_after_setup,
        "peak_rss_mib": peak,
        "growth_mib": peak - rss_after_setup,
        "result_shape": list(np.shape(out)),
    }
    record["max_rel_error"] = max_rel_error(to_numpy(out), np.load(reference))
    return record


def error_record(exc: BaseException) -> dict[str, Any]:
    """A JSON record for an exception: status 'oom' or 'error'."""
    text = f"{type(exc).__name__}: {exc}"
    oom = isinstance(exc, MemoryError) or is_oom_message(text)
    return {
        "status": "oom" if oom else "error",
        "error": text[:2000],
        "traceback": traceback.format_exc()[-4000:],
        "peak_rss_mib": peak_rss_mib(),
    }


def emit(record: dict[str, Any]) -> None:
    """Print the record as the worker's single result line."""
    sys.stdout.write(RESULT_MARKER + json.dumps(record) + "\n")
    sys.stdout.flush()


def guarded(body: Callable[[], dict[str, Any]], context: dict[str, Any]) -> int:
    """Run a worker body, emit its record (or an error record), return rc.

    ``context`` (workload, method, ...) is merged into the record.
    """
    try:
        record = body()
    except BaseException as exc:  # noqa: BLE001 - every failure is a cell
        if isinstance(exc, KeyboardInterrupt):
            raise
        record = error_record(exc)
    emit({**context, **record, "pid": os.getpid()})
    return 0
