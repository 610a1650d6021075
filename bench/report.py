"""Markdown tables from benchmark records (pure Python, no torch/jax).

Usage: ``python bench/report.py bench/results/<file>.json`` re-prints the
tables of a finished run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

Record = dict[str, Any]

#: BENCHMARKS.md anchors (2 cores, AVX-512, 24 GiB; 2026-11-26):
#: steady median s, peak RSS MiB; None = OOM.
ANCHORS: dict[str, dict[str, tuple[float, float] | None]] = {
    "seed-cnn-full": {"tutorial-jac": (0.207, 646), "tutorial-vp": (1.18, 1576),
                      "nt-jac": (0.275, 538), "nt-vp": (0.62, 586), "nt-sd": (0.136, 271)},
    "seed-cnn-trace": {"tutorial-jac": (0.185, 645), "tutorial-vp": (1.12, 1589),
                       "nt-jac": (0.236, 538), "nt-vp": (0.599, 589), "nt-sd": (0.117, 272)},
    "seed-cnn-gram": {"tutorial-jac": (1.16, 1846), "tutorial-vp": None,
                      "nt-jac": (0.92, 1791), "nt-vp": None, "nt-sd": (0.398, 418)},
    "mlp-full": {"tutorial-jac": (11.3, 9474), "tutorial-vp": None,
                 "nt-jac": (23.0, 7885), "nt-vp": (1.6, 3080), "nt-sd": (0.0216, 213)},
    "mlp-gram-trace": {"tutorial-jac": None, "tutorial-vp": None,
                       "nt-jac": None, "nt-vp": None, "nt-sd": (0.167, 266)},
}
#: nt-sd first call (s) and growth (MiB) anchors
NT_SD_FIRST = {"seed-cnn-full": 0.78, "seed-cnn-trace": 0.72, "seed-cnn-gram": 0.86,
               "mlp-full": 0.31, "mlp-gram-trace": 0.45}
NT_SD_GROWTH = {"seed-cnn-full": 160, "seed-cnn-trace": 161, "seed-cnn-gram": 307,
                "mlp-full": 87, "mlp-gram-trace": 140}

#: fastntk targets (BENCHMARKS.md): ratio vs nt-sd, or absolute error
TARGETS = {"steady": 0.7, "first": 0.25, "growth": 1.0, "error": 1e-5}

STATUS_LABEL = {"oom": "OOM", "timeout": "timeout", "not installed": "not installed"}


def fmt_s(x: float) -> str:
    """Seconds with 3 significant digits."""
    return f"{x:.3g}"


def failed(rec: Record) -> str:
    """Short label of a record that is not ok."""
    status = rec.get("status", "error")
    if status in STATUS_LABEL:
        return STATUS_LABEL[status]
    msg = (rec.get("error") or "").split("\n")[0]
    return f"error: {msg[:60]}".replace("|", "/")


def time_cell(rec: Record) -> str:
    """'median (min–max) [first]' in seconds."""
    if rec.get("status") != "ok":
        return failed(rec)
    return (f"{fmt_s(rec['steady_median_s'])} ({fmt_s(rec['steady_min_s'])}–"
            f"{fmt_s(rec['steady_max_s'])}) [{fmt_s(rec['first_s'])}]")


def memory_cell(rec: Record) -> str:
    """'growth MiB (peak MiB)'."""
    if rec.get("status") != "ok":
        return failed(rec)
    return f"{rec['growth_mib']:.0f} ({rec['peak_rss_mib']:.0f})"


def error_cell(rec: Record) -> str:
    """Max relative error against the float64 reference."""
    if rec.get("status") != "ok":
        return failed(rec)
    return f"{rec['max_rel_error']:.1e}"


def anchor_cell(rec: Record | None, anchor: tuple[float, float] | None) -> str:
    """'this run / anchor' for steady median and peak RSS."""
    now = "—" if rec is None else (
        f"{fmt_s(rec['steady_median_s'])} s / {rec['peak_rss_mib']:.0f} MiB"
        if rec.get("status") == "ok" else failed(rec))
    then = "OOM" if anchor is None else f"{fmt_s(anchor[0])} s / {anchor[1]:.0f} MiB"
    return f"{now} (anchor {then})"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def grid(records: list[Record]) -> tuple[list[str], list[str], dict[tuple[str, str], Record]]:
    """Workloads and methods in first-seen order, and records by pair."""
    workloads: list[str] = []
    methods: list[str] = []
    by_pair = {}
    for rec in records:
        w, m = rec["workload"], rec["method"]
        workloads += [w] if w not in workloads else []
        methods += [m] if m not in methods else []
        by_pair[w, m] = rec
    return workloads, methods, by_pair


def pair_table(records: list[Record], cell: Any) -> str:
    """Rows = workloads, columns = methods, cells by ``cell(record)``."""
    workloads, methods, by_pair = grid(records)
    rows = [[w] + [cell(by_pair[w, m]) if (w, m) in by_pair else "—" for m in methods]
            for w in workloads]
    return table(["workload"] + methods, rows)


def ratio(a: Record | None, b: Record | None, key: str) -> float | None:
    """a[key] / b[key] when both records are ok."""
    if not a or not b or a.get("status") != "ok" or b.get("status") != "ok":
        return None
    return a[key] / b[key] if b[key] > 0 else None


def ratio_cell(value: float | None, target: float) -> str:
    """'0.52 ✓' / '1.3 ✗' against a target (lower is better)."""
    if value is None:
        return "—"
    return f"{value:.2f} {'✓' if value <= target else '✗'}"


def ratio_table(records: list[Record], method: str = "fastntk-auto", anchor: str = "nt-sd") -> str:
    """fastntk-auto vs nt-sd measured in the same run, against the targets."""
    workloads, _, by_pair = grid(records)
    rows = []
    for w in workloads:
        a, b = by_pair.get((w, method)), by_pair.get((w, anchor))
        err = a.get("max_rel_error") if a and a.get("status") == "ok" else None
        rows.append([
            w,
            ratio_cell(ratio(a, b, "steady_median_s"), TARGETS["steady"]),
            ratio_cell(ratio(a, b, "first_s"), TARGETS["first"]),
            ratio_cell(ratio(a, b, "growth_mib"), TARGETS["growth"]),
            "—" if err is None else f"{err:.1e} {'✓' if err <= TARGETS['error'] else '✗'}",
        ])
    header = ["workload", f"steady {method}/{anchor} (≤{TARGETS['steady']})",
              f"first call (≤{TARGETS['first']})", f"memory growth (≤{TARGETS['growth']})",
              f"max rel err (≤{TARGETS['error']:.0e})"]
    return table(header, rows)


def anchor_table(records: list[Record]) -> str:
    """The anchor columns of BENCHMARKS.md next to this run's figures."""
    _, _, by_pair = grid(records)
    cols = ["tutorial-jac", "tutorial-vp", "nt-jac", "nt-vp", "nt-sd"]
    rows = []
    for w, anchors in ANCHORS.items():
        if not any((w, m) in by_pair for m in cols):
            continue
        cells = [anchor_cell(by_pair.get((w, m)), anchors[m]) for m in cols]
        sd = by_pair.get((w, "nt-sd"))
        if sd and sd.get("status") == "ok":
            cells[-1] += (f"; first {fmt_s(sd['first_s'])} s (anchor {NT_SD_FIRST[w]}),"
                          f" growth {sd['growth_mib']:.0f} MiB (anchor {NT_SD_GROWTH[w]})")
        rows.append([w] + cells)
    return table(["workload"] + cols, rows)


EXACT = ("fastntk-jacobian", "fastntk-vp", "fastntk-structured")


def plan_table(records: list[Record]) -> tuple[str, int, int]:
    """Per workload: auto's choice vs the fastest measured exact method; (table, hits, total)."""
    rows, hits, total = [], 0, 0
    workloads, _, by_pair = grid(records)
    for w in workloads:
        auto = by_pair.get((w, "fastntk-auto"))
        if not auto or "plan" not in auto:
            continue
        times = {m.removeprefix("fastntk-"): by_pair[(w, m)]["steady_median_s"]
                 for m in EXACT if (w, m) in by_pair and by_pair[(w, m)].get("status") == "ok"}
        if not times:
            continue
        fastest = min(times, key=times.get)
        chosen = auto["plan"]["chosen"]
        total += 1
        hits += chosen == fastest
        estimates = ", ".join(f"{m} {f / 1e9:.3g}" for m, f in sorted(auto["plan"]["estimated_flops"].items(), key=lambda kv: kv[1]))
        measured = ", ".join(f"{m} {fmt_s(t)}" for m, t in sorted(times.items(), key=lambda kv: kv[1]))
        rows.append([w, chosen, fastest, "✓" if chosen == fastest else "✗", estimates, measured])
    header = ["workload", "auto chose", "fastest measured", "", "estimated GFLOP", "measured s (timeouts/OOM left out)"]
    return table(header, rows), hits, total


def render(records: list[Record]) -> str:
    """All tables as one markdown document."""
    parts = [
        "### Steady time: median s (min–max) [first call s]", pair_table(records, time_cell),
        "### Memory: growth MiB = peak RSS − RSS after set-up (peak RSS MiB)",
        pair_table(records, memory_cell),
        "### Max relative error vs float64 reference", pair_table(records, error_cell),
    ]
    _, methods, _ = grid(records)
    if "fastntk-auto" in methods and "nt-sd" in methods:
        parts += ["### fastntk-auto / nt-sd (same run) against the targets", ratio_table(records)]
    plans, hits, total = plan_table(records)
    if total:
        parts += [f"### The cost model: auto's choice vs the fastest exact method ({hits}/{total} workloads)", plans]
    anchors = anchor_table(records)
    if anchors.count("\n") > 1:
        parts += ["### This run vs the BENCHMARKS.md anchors (steady median / peak RSS)", anchors]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    """Re-print the tables of a results JSON."""
    with open(argv[0], encoding="utf-8") as fh:
        print(render(json.load(fh)["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
