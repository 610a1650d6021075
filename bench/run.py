"""Run the benchmark: every (workload, method) pair in a fresh subprocess.

Usage (from the repository root, with the library's environment)::

    .venv/bin/python bench/run.py [--workloads W ...] [--methods M ...]
        [--extra] [--repeats 5] [--timeout 600] [--mem-limit-gb 20]
        [--out bench/results/<date>.json]

Caches the float64 references first (``bench/reference.py``), then runs
``bench/worker.py`` (fastntk-*, tutorial-*) or, when ``.venv-nt`` exists,
``.venv-nt/bin/python bench/nt_worker.py`` (nt-*) for each pair.  A timeout,
out-of-memory or error is a cell of the table, never fatal.  Writes the JSON
(machine, versions, every figure) and a markdown copy of the tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from protocol import REPO_ROOT, RESULT_MARKER, is_oom_message  # noqa: E402
from report import render  # noqa: E402

TORCH_METHODS = ("fastntk-auto", "fastntk-jacobian", "fastntk-vp", "fastntk-structured",
                 "tutorial-jac", "tutorial-vp")
NT_METHODS = ("nt-jac", "nt-vp", "nt-sd")
ALL_METHODS = TORCH_METHODS + NT_METHODS
NT_PYTHON = REPO_ROOT / ".venv-nt" / "bin" / "python"
#: kill a worker when the machine's available memory falls below this
MIN_AVAILABLE_MIB = 768


# --------------------------------------------------------------------------
# machine and versions
# --------------------------------------------------------------------------
def meminfo_mib(field: str) -> float:
    """A /proc/meminfo field in MiB."""
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(field)


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM and ISA flags of this machine."""
    model, flags = "unknown", set()
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(meminfo_mib("MemTotal") / 1024, 1),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "platform": platform.platform(),
        "hostname": platform.node(),
    }


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the repository."""
    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        return res.stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def torch_env_versions() -> dict[str, str]:
    """Versions of the library's environment (this interpreter)."""
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    probe = subprocess.run(
        [sys.executable, "-c", "import fastntk; print(getattr(fastntk, '__version__', 'unknown'))"],
        capture_output=True, text=True, env=worker_env(), cwd=REPO_ROOT,
    )
    out["fastntk"] = probe.stdout.strip() if probe.returncode == 0 else "not importable"
    return out


# --------------------------------------------------------------------------
# subprocesses
# --------------------------------------------------------------------------
def worker_env() -> dict[str, str]:
    """Environment for workers: src/ on PYTHONPATH so that fastntk imports
    even before it is installed (the same source once installed editable)."""
    env = dict(os.environ)
    src = str(REPO_ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def limiter(mem_limit_gb: float) -> Callable[[], None]:
    """preexec_fn capping the child's address space (and disabling cores)."""
    limit = int(mem_limit_gb * 2**30)

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_capped(cmd: list[str], timeout: float, mem_limit_gb: float) -> dict[str, Any]:
    """Run a command with a timeout, an address-space cap and a watchdog on
    the machine's available memory.  Returns rc, stdout, stderr, wall time
    and ``killed`` ('timeout' / 'oom' / None)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=worker_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=limiter(mem_limit_gb))
    killed = None
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - t0 > timeout:
                killed = "timeout"
            elif meminfo_mib("MemAvailable") < MIN_AVAILABLE_MIB:
                killed = "oom"
            if killed:
                proc.kill()
                stdout, stderr = proc.communicate()
                break
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr,
            "wall_s": time.monotonic() - t0, "killed": killed}


def parse_result(run: dict[str, Any]) -> dict[str, Any]:
    """The worker's record, or one describing how it failed."""
    for line in reversed(run["stdout"].splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    tail = run["stderr"][-3000:]
    if run["killed"] == "timeout":
        return {"status": "timeout", "error": "timeout"}
    if run["killed"] == "oom":
        return {"status": "oom", "error": f"killed: machine below {MIN_AVAILABLE_MIB} MiB available"}
    rc = run["rc"]
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc).name
        oom = sig == "SIGKILL" or is_oom_message(tail)
        return {"status": "oom" if oom else "error", "error": f"killed by {sig}", "stderr_tail": tail}
    status = "oom" if is_oom_message(tail) else "error"
    return {"status": status, "error": f"exit {rc}: " + (tail.strip().splitlines() or [""])[-1],
            "stderr_tail": tail}


def worker_command(workload: str, method: str, repeats: int) -> list[str] | None:
    """The command measuring one pair, or None if its environment is missing."""
    if method in NT_METHODS:
        if not NT_PYTHON.exists():
            return None
        return [str(NT_PYTHON), str(BENCH / "nt_worker.py"), workload, method, "--repeats", str(repeats)]
    return [sys.executable, str(BENCH / "worker.py"), workload, method, "--repeats", str(repeats)]


def measure_pair(workload: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One cell: run the worker, parse its record."""
    cmd = worker_command(workload, method, args.repeats)
    if cmd is None:
        return {"workload": workload, "method": method, "status": "not installed",
                "error": "no .venv-nt: run bash bench/setup_nt_env.sh"}
    load_before = os.getloadavg()[0]
    run = run_capped(cmd, args.timeout, args.mem_limit_gb)
    record = parse_result(run)
    record.update(workload=workload, method=method, rc=run["rc"], process_wall_s=run["wall_s"],
                  loadavg_1m_before=load_before, loadavg_1m_after=os.getloadavg()[0])
    return record


def ensure_references(names: list[str], args: argparse.Namespace) -> None:
    """Compute missing float64 references (in a capped subprocess)."""
    cmd = [sys.executable, str(BENCH / "reference.py"), *names, "--budget-gib", str(args.ref_budget_gib)]
    run = run_capped(cmd, timeout=3600, mem_limit_gb=args.mem_limit_gb)
    sys.stderr.write(run["stdout"])
    if run["rc"] != 0:
        sys.stderr.write(run["stderr"][-3000:])
        raise SystemExit(f"reference computation failed (rc {run['rc']}, {run['killed'] or 'error'})")


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    from workloads import WORKLOADS

    ap = argparse.ArgumentParser(description="fastntk benchmark (see bench/README.md)")
    ap.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), metavar="W",
                    help=f"default: the five of BENCHMARKS.md (+ extras with --extra); any of {sorted(WORKLOADS)}")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS), metavar="M",
                    help=f"default: all of {list(ALL_METHODS)}")
    ap.add_argument("--extra", action="store_true", help="also run our extra workloads")
    ap.add_argument("--repeats", type=int, default=5, help="steady calls after the first (default 5)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per pair (default 600)")
    ap.add_argument("--mem-limit-gb", type=float, default=20, help="address-space cap per worker, GiB (default 20)")
    ap.add_argument("--ref-budget-gib", type=float, default=8,
                    help="memory for float64 Jacobian blocks when computing references (default 8)")
    ap.add_argument("--out", type=Path, help="JSON output (default bench/results/<date>.json)")
    return ap.parse_args(argv)


def default_out() -> Path:
    """bench/results/<date>.json, or <date>-<time>.json if that exists."""
    now = dt.datetime.now()
    out = BENCH / "results" / f"{now:%Y-%m-%d}.json"
    return out if not out.exists() else out.with_name(f"{now:%Y-%m-%d-%H%M%S}.json")


def main(argv: list[str] | None = None) -> int:
    """Run the selected pairs, print the tables, write JSON and markdown."""
    args = parse_args(argv)
    from workloads import selected

    workloads = [w.name for w in selected(args.workloads, args.extra)]
    out = args.out or default_out()
    ensure_references(workloads, args)

    started = dt.datetime.now().astimezone()
    records = []
    for w in workloads:
        for m in args.methods:
            sys.stderr.write(f"{w:24s} {m:20s} ... ")
            sys.stderr.flush()
            rec = measure_pair(w, m, args)
            records.append(rec)
            sys.stderr.write(f"{rec['status']} ({rec.get('process_wall_s', 0):.1f} s, "
                             f"load {rec.get('loadavg_1m_before', 0):.1f})\n")

    nt_versions = next((r["versions"] for r in records if "versions" in r), None)
    doc = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {**torch_env_versions(), "nt_env": nt_versions},
        "git": git_state(),
        "config": {"workloads": workloads, "methods": args.methods, "repeats": args.repeats,
                   "timeout_s": args.timeout, "mem_limit_gib": args.mem_limit_gb,
                   "torch_threads": 2, "xla": "defaults"},
        "results": records,
    }
    tables = render(records)
    print(tables)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(
        f"# fastntk benchmark {doc['date']}\n\n{doc['machine']['cpu']}, {doc['machine']['cores']} cores, "
        f"{doc['machine']['ram_gib']} GiB; versions {json.dumps(doc['versions'])}\n\n{tables}",
        encoding="utf-8")
    sys.stderr.write(f"wrote {out} and {out.with_suffix('.md')}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
