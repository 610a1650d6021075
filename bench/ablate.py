"""Ablation of fastntk's special paths and thresholds: each one ON (as shipped) and OFF.

For every switch below, the library is monkeypatched *in the worker process only* (no
file under src/ changes) and every workload it reaches runs with the path ON and with each
OFF variant, each in a fresh subprocess: ``fastntk.ntk_fn(model, mode=..., method=...)``,
a first call (building the function included) and ``--repeats`` steady calls, and the
max relative error against a float64 reference (the benchmark cache ``bench/.cache/``;
the workloads defined here get ``bench/.cache/ablate-<name>.ref.npy``, computed once).

Noise on shared machines: per workload, the ON run and every OFF variant run once per
round, in a rotated order, for ``--rounds`` rounds (A/B interleaved in one time window);
steady figures pool the steady calls of all rounds. The gain of a path on a workload is
median(OFF) / median(ON) of the steady calls (> 1: the path saves time), with the min-max
of the per-round ratios, and the same ratio of first calls.

Which workloads a switch reaches is learned first: one probe process per workload runs it
with counting wrappers on every path (behaviour unchanged); a switch's OFF variants run
only on workloads whose probe saw the path taken (or the threshold evaluated).

Usage (from the repository root)::

    python bench/ablate.py                               # everything (about 30-50 min)
    python bench/ablate.py --workloads mlp-full --switches chain oneDNN --rounds 3
    python bench/ablate.py --list                        # switches, variants, workloads
    python bench/ablate.py --fuzz-coverage               # which switches the fuzzer reaches
    python bench/ablate.py --report bench/results/ablate-<date>.json   # re-print the tables

Writes ``bench/results/ablate-<UTC date-time>.json`` (``--out``) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
MARKER = "ABLATE_RESULT "


# --------------------------------------------------------------------------
# switches: how to turn each path OFF, and how to see that it is taken
# --------------------------------------------------------------------------
def _mods() -> dict[str, Any]:
    import fastntk._engine as engine
    import fastntk._gemm as gemm
    import fastntk.methods.base as base
    import fastntk.methods.jacobian as jacobian
    import fastntk.methods.structured.capture as capture
    import fastntk.methods.structured.chain as chain
    import fastntk.methods.structured.factors as factors
    import fastntk.methods.structured.method as method
    import fastntk.methods.structured.rules.conv as conv
    import fastntk.plan as plan

    return dict(engine=engine, gemm=gemm, base=base, jacobian=jacobian, capture=capture, chain=chain,
                factors=factors, method=method, conv=conv, plan=plan)


def off_gram_stream(m: dict) -> None:
    """K(x, x) of one block from its kept/recomputed factors, contracted at the end."""
    sm = m["method"].StructuredMethod
    sm.gram = m["base"].KernelMethod.gram
    sm.gram_stream = lambda self, observed, fallback: None


def off_joint_pass(m: dict) -> None:
    m["method"].StructuredMethod.left_and_right = m["base"].KernelMethod.left_and_right


def off_compact_rows(m: dict) -> None:
    """compact_rows -> False: no RowsPairFactor and no sample-major chain cotangents."""
    m["method"].StructuredMethod.compact_rows = property(lambda self: False)


def off_rows_only(m: dict) -> None:
    """Only the RowsPairFactor (keep_rows=False), the chain's cotangents still sample-major."""
    orig = m["method"].chain_cotangent_chunks
    m["method"].chain_cotangent_chunks = lambda *a, **k: orig(*a, **{**k, "keep_rows": False})


def off_sample_major(m: dict) -> None:
    orig = m["method"].chain_cotangent_chunks
    m["method"].chain_cotangent_chunks = lambda *a, **k: orig(*a, **{**k, "sample_major": False})


def off_chain(m: dict) -> None:
    """No chain detected: cotangents by autograd (vmapped backward) for every model."""
    m["capture"].chain_of = lambda *a, **k: None


def off_graph_free(m: dict) -> None:
    """Chains still detected, but every forward pass records an autograd graph."""
    orig = m["method"].capture
    m["method"].capture = lambda f, x, clone_outputs=False, graph=True: orig(f, x, clone_outputs, graph=True)


def off_im2col(m: dict) -> None:
    """Convolution weight Jacobians always by the grouped convolution_backward."""
    m["conv"].uses_patches = lambda saved: False


def set_small_patch(value: int) -> Callable[[dict], None]:
    return lambda m: setattr(m["conv"], "SMALL_PATCH", value)


def off_onednn(m: dict) -> None:
    """PyTorch's own kernels (MKL) everywhere: as FASTNTK_ONEDNN=0."""
    m["gemm"].onednn_available = lambda: False


def off_dispatch_mode(m: dict) -> None:
    """oneDNN for the library's own products (_gemm.mm) but no dispatch mode around the model's passes."""
    m["gemm"]._active = lambda: True


def set_attr(mod: str, name: str, value: Any) -> Callable[[dict], None]:
    return lambda m: setattr(m[mod], name, value)


def one_output(m: dict) -> None:
    m["method"].output_chunk = lambda *a, **k: 1


def off_symmetric_split(m: dict) -> None:
    """A Gram matrix's blocks sized by the budget alone (no split into block rows)."""
    engine = m["engine"]
    new = lambda method, budget, n, symmetric: engine.block_size_for(method, budget)  # noqa: E731
    engine.default_block = new
    m["plan"].default_block = new


def off_keep_first(m: dict) -> None:
    """Calibration's factors (or Gram kernel) of the first block are not kept for its first use."""
    engine = m["engine"]
    engine.calibrate_on_first_block = functools.partial(engine.calibrate_on_first_block, keep=False)


@dataclass
class Switch:
    name: str
    what: str
    where: str
    variants: dict[str, Callable[[dict], None]]
    probe: str
    """Counter (see install_probes) that shows the path taken / threshold evaluated."""


SWITCHES: list[Switch] = [
    Switch("gram-stream", "one-block Gram K(x,x) in trace/diagonal contracted output chunk by chunk as factors come (GramStream)",
           "methods/structured/method.py: GramStream, StructuredMethod.gram/gram_stream/gram_from",
           {"off": off_gram_stream}, "gram_stream"),
    Switch("joint-pass", "one forward pass over x1 and x2 together for a one-block-pair kernel of a chain",
           "methods/structured/method.py: StructuredMethod.left_and_right", {"off": off_joint_pass}, "joint_pass"),
    Switch("compact-rows", "trace mode: RowsPairFactor + sample-major chain cotangents (StructuredMethod.compact_rows)",
           "methods/structured/method.py: compact_rows; factors.py: RowsPairFactor; chain.py: RowsCotangents, compact_uses",
           {"off": off_compact_rows, "rows-only-off": off_rows_only}, "rows"),
    Switch("chain", "hand-written reverse pass of chain models (no autograd)",
           "methods/structured/chain.py (348 lines); capture.py: chain_of call", {"off": off_chain}, "chain"),
    Switch("sample-major", "chain cotangents laid out (N, k, ...) instead of (k, N, ...) (trace mode)",
           "methods/structured/chain.py: chain_cotangents(sample_major=)", {"off": off_sample_major}, "sample_major"),
    Switch("graph-free", "chain models: forward passes record no autograd graph (layer outputs shed)",
           "methods/structured/method.py: capture_for; capture.py: graph=False, shed_layer_outputs",
           {"off": off_graph_free}, "chain"),
    Switch("im2col", "conv weight Jacobians by patches + bmm when C_in/groups*k <= SMALL_PATCH (else grouped convolution_backward)",
           "methods/structured/rules/conv.py: uses_patches, input_patches, patch_weight_jacobian, SMALL_PATCH=32",
           {"off": off_im2col, "SMALL_PATCH=288": set_small_patch(288)}, "conv"),
    Switch("oneDNN", "float32 CPU GEMMs through torch.ops.mkldnn._linear_pointwise (library mm + dispatch mode on model passes)",
           "_gemm.py (fast_matmuls, mm, _OneDNNMatmuls); callers in method.py, base.py, vp.py",
           {"off": off_onednn, "no-dispatch-mode": off_dispatch_mode, "MIN_FLOPS=0": set_attr("gemm", "MIN_FLOPS", 0)},
           "onednn"),
    Switch("CHUNK_BYTES", "outputs per vmapped/chain backward pass bounded by 16 MiB of cotangents",
           "methods/structured/method.py: CHUNK_BYTES, output_chunk",
           {"1-output": one_output, "4MiB": set_attr("method", "CHUNK_BYTES", 4 * 2**20),
            "64MiB": set_attr("method", "CHUNK_BYTES", 64 * 2**20)}, "output_chunk"),
    Switch("SMALL_PASSES", "non-matmul-heavy (conv) blocks below 2**26 forward FLOPs still get several outputs per pass",
           "methods/structured/method.py: SMALL_PASSES, output_chunk",
           {"0": set_attr("method", "SMALL_PASSES", 0), "inf": set_attr("method", "SMALL_PASSES", math.inf)}, "small_passes"),
    Switch("PER_OUTPUT_GEMM_FLOPS", "trace contraction of output-major Jacobians: one GEMM per output above 2**20 FLOPs, else a copy + one GEMM",
           "methods/jacobian.py: PER_OUTPUT_GEMM_FLOPS, summed_over_outputs",
           {"0": set_attr("jacobian", "PER_OUTPUT_GEMM_FLOPS", 0), "inf": set_attr("jacobian", "PER_OUTPUT_GEMM_FLOPS", math.inf)},
           "per_output"),
    Switch("MIN_SYMMETRIC_BLOCK", "a Gram matrix split into >= 4 block rows down to 64 samples (upper triangle only)",
           "_engine.py: MIN_SYMMETRIC_BLOCK, default_block",
           {"16": set_attr("engine", "MIN_SYMMETRIC_BLOCK", 16), "32": set_attr("engine", "MIN_SYMMETRIC_BLOCK", 32),
            "128": set_attr("engine", "MIN_SYMMETRIC_BLOCK", 128), "none": off_symmetric_split}, "symmetric"),
    Switch("keep-first-block", "calibration's factors (or one-block Gram) of the first block kept for its first use",
           "_engine.py: calibrate_on_first_block(keep=); method.py: kept, take_kept", {"off": off_keep_first}, "kept"),
]
BY_NAME = {s.name: s for s in SWITCHES}


def install_probes() -> collections.Counter:
    """Counting wrappers on every path (behaviour unchanged); returns the live counter."""
    m = _mods()
    count: collections.Counter = collections.Counter()
    sm = m["method"].StructuredMethod

    orig_gs = sm.gram_stream

    def gram_stream(self, observed, fallback):  # noqa: ANN001, ANN202
        s = orig_gs(self, observed, fallback)
        if s is not None and s.streamable:
            count["gram_stream"] += 1
        return s
    sm.gram_stream = gram_stream

    orig_lr = sm.left_and_right

    def left_and_right(self, x1, x2):  # noqa: ANN001, ANN202
        if self.kept is None and self.calibration is not None and self.calibration.chain:
            count["joint_pass"] += 1
        return orig_lr(self, x1, x2)
    sm.left_and_right = left_and_right

    rc = m["chain"].RowsCotangents
    orig_rc_init = rc.__init__

    def rc_init(self, *a, **k):  # noqa: ANN001, ANN202
        count["rows"] += 1
        orig_rc_init(self, *a, **k)
    rc.__init__ = rc_init

    orig_chain_of = m["capture"].chain_of

    def chain_of(*a, **k):  # noqa: ANN002, ANN003, ANN202
        steps = orig_chain_of(*a, **k)
        if steps is not None:
            count["chain"] += 1
        return steps
    m["capture"].chain_of = chain_of

    orig_ccc = m["method"].chain_cotangent_chunks

    def ccc(*a, **k):  # noqa: ANN002, ANN003, ANN202
        if k.get("sample_major"):
            count["sample_major"] += 1
        return orig_ccc(*a, **k)
    m["method"].chain_cotangent_chunks = ccc

    conv = m["conv"]
    orig_cwj = conv.conv_weight_jacobian

    def cwj(saved, g):  # noqa: ANN001, ANN202
        count["conv"] += 1
        count["conv_patches" if conv.uses_patches(saved) else "conv_grouped"] += 1
        return orig_cwj(saved, g)
    conv.conv_weight_jacobian = cwj

    gemm = m["gemm"]
    orig_linear = gemm._linear

    def linear(a, b_t, bias):  # noqa: ANN001, ANN202
        count["onednn"] += 1
        return orig_linear(a, b_t, bias)
    gemm._linear = linear
    orig_el = gemm._eligible

    def eligible(a, b):  # noqa: ANN001, ANN202
        if a.dim() == 2 and b.dim() == 2 and 2 * a.shape[0] * a.shape[1] * b.shape[1] < gemm.MIN_FLOPS:
            count["min_flops_small"] += 1
        return orig_el(a, b)
    gemm._eligible = eligible

    meth = m["method"]
    orig_oc = meth.output_chunk

    def output_chunk(n, num_outputs, per_direction, matmul_heavy, block_flops):  # noqa: ANN001, ANN202
        k = orig_oc(n, num_outputs, per_direction, matmul_heavy, block_flops)
        count["output_chunk"] += 1
        count[f"output_chunk={k}/{num_outputs}"] += 1
        if not matmul_heavy:
            count["small_passes"] += 1
            count["small_passes_below" if block_flops < meth.SMALL_PASSES else "small_passes_above"] += 1
        return k
    meth.output_chunk = output_chunk

    jac = m["jacobian"]
    orig_so = jac.summed_over_outputs

    def summed(a, b):  # noqa: ANN001, ANN202
        if jac.is_output_major(a) or jac.is_output_major(b):
            count["per_output"] += 1
            big = 2 * a.shape[0] * b.shape[0] * a.shape[2] >= jac.PER_OUTPUT_GEMM_FLOPS
            count["per_output_gemms" if big else "per_output_copy"] += 1
        return orig_so(a, b)
    jac.summed_over_outputs = summed
    m["factors"].summed_over_outputs = summed

    engine = m["engine"]
    orig_db = engine.default_block

    def default_block(method, budget, n, symmetric):  # noqa: ANN001, ANN202
        b = orig_db(method, budget, n, symmetric)
        if symmetric:
            count["symmetric"] += 1
            count["symmetric_split" if b < n else "symmetric_whole"] += 1
        return b
    engine.default_block = default_block
    m["plan"].default_block = default_block

    orig_tk = sm.take_kept

    def take_kept(self, x, kernel):  # noqa: ANN001, ANN202
        got = orig_tk(self, x, kernel)
        if got is not None:
            count["kept"] += 1
        return got
    sm.take_kept = take_kept
    return count


# --------------------------------------------------------------------------
# workloads: the benchmark's (bench/workloads.py) and some it was not tuned on
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Extra:
    name: str
    build_model: Callable[[], Any]
    x1_shape: tuple[int, ...]
    x2_shape: tuple[int, ...] | None
    mode: str


def _gelu_mlp():  # noqa: ANN202
    from torch import nn
    layers: list = [nn.Linear(64, 256), nn.GELU()]
    for _ in range(4):
        layers += [nn.Linear(256, 256), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


def _strided_cnn():  # noqa: ANN202
    from torch import nn
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def _encoder():  # noqa: ANN202
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(12, 32)
            self.layers = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(2))
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x)
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(dim=1))
    return Encoder()


def _lstm():  # noqa: ANN202
    import torch
    from torch import nn

    class LSTMClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])
    return LSTMClassifier()


def _tanh_mlp():  # noqa: ANN202
    from torch import nn
    return nn.Sequential(nn.Linear(100, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 20))


EXTRAS: dict[str, Extra] = {e.name: e for e in [
    Extra("gelu-mlp-gram-trace", _gelu_mlp, (128, 64), None, "trace"),
    Extra("strided-cnn-full", _strided_cnn, (32, 3, 16, 16), (16, 3, 16, 16), "full"),
    Extra("strided-cnn-gram-diag", _strided_cnn, (48, 3, 16, 16), None, "diagonal"),
    Extra("encoder-trace", _encoder, (16, 8, 12), (8, 8, 12), "trace"),
    Extra("lstm-full", _lstm, (16, 10, 8), (8, 10, 8), "full"),
    Extra("tanh-mlp-trace", _tanh_mlp, (96, 100), (48, 100), "trace"),
]}


def all_workloads() -> list[str]:
    from workloads import WORKLOADS
    return [*WORKLOADS, *EXTRAS]


def build(name: str):  # noqa: ANN201
    """(model, x1, x2, mode, reference path)."""
    import torch
    base, _, method = name.partition("@")
    if base in EXTRAS:
        e = EXTRAS[base]
        torch.manual_seed(0)
        model = e.build_model().float().eval()
        gen = torch.Generator().manual_seed(1)
        x1 = torch.randn(e.x1_shape, generator=gen)
        x2 = None if e.x2_shape is None else torch.randn(e.x2_shape, generator=torch.Generator().manual_seed(2))
        return model, x1, x2, e.mode, BENCH / ".cache" / f"ablate-{base}.ref.npy"
    from protocol import ref_path
    from workloads import WORKLOADS
    wl = WORKLOADS[base]
    model, x1, x2 = wl.build()
    return model, x1, x2, wl.mode, ref_path(base)


def ensure_reference(name: str) -> None:
    """The float64 reference of an ablation-only workload (blocked jacrev, bench/reference.py)."""
    import numpy as np
    import torch
    from reference import contract, jacobians
    base = name.partition("@")[0]
    if base not in EXTRAS:
        return
    model, x1, x2, mode, path = build(base)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.double()

    def jac(x):  # noqa: ANN001, ANN202
        try:
            return jacobians(model, x)
        except RuntimeError:  # a model vmap cannot batch (an LSTM): sample by sample
            per = [jacobians(model, x[i:i + 1]) for i in range(x.shape[0])]
            return [torch.cat(parts) for parts in zip(*per)]
    j1 = jac(x1.double())
    j2 = j1 if x2 is None else jac(x2.double())
    k = contract(j1, j2, mode)
    np.save(path, k.numpy())
    print(f"reference {path.name}: {tuple(k.shape)}", flush=True)


# --------------------------------------------------------------------------
# worker: one (workload, method, switch variant) in this process
# --------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import fastntk
    record: dict[str, Any] = {"workload": args.workload, "switch": args.switch, "variant": args.variant}
    try:
        model, x1, x2, mode, ref = build(args.workload)
        rss_setup = _rss_mib()
        method = args.workload.partition("@")[2] or "auto"
        mods = _mods()
        if args.switch != "on":
            BY_NAME[args.switch].variants[args.variant](mods)
        count = install_probes() if args.probe else None
        t0, c0 = time.perf_counter(), time.process_time()
        fn = fastntk.ntk_fn(model, mode=mode, method=method)
        k = fn(x1, x2)
        first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
        steady, steady_cpu = [], []
        for _ in range(args.repeats):
            del k
            t0, c0 = time.perf_counter(), time.process_time()
            k = fn(x1, x2)
            steady.append(time.perf_counter() - t0)
            steady_cpu.append(time.process_time() - c0)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record.update(status="ok", first_s=first, steady_s=steady, first_cpu_s=first_cpu, steady_cpu_s=steady_cpu,
                      peak_rss_mib=peak, growth_mib=peak - rss_setup)
        if ref.exists():
            r = np.load(ref)
            record["max_rel_error"] = float(np.abs(k.double().numpy() - r).max() / np.abs(r).max())
        if count is not None:
            record["probes"] = dict(count)
            record["chosen"] = fn.plan(x1, x2).chosen if method == "auto" else method
    except Exception as exc:  # noqa: BLE001 - every failure is a cell
        record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
    print(MARKER + json.dumps(record), flush=True)


THREADS = 2
"""torch threads of each worker (--threads; the benchmark protocol's 2 by default)."""


def run_worker(workload: str, switch: str, variant: str, repeats: int, timeout: float, probe: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__)), "--worker", workload, switch, variant, "--repeats", str(repeats), "--threads", str(THREADS)]
    if probe:
        cmd.append("--probe")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"workload": workload, "switch": switch, "variant": variant, "status": "timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        return {"workload": workload, "switch": switch, "variant": variant, "status": "crash", "error": done.stderr[-500:]}
    return json.loads(lines[-1][len(MARKER):])


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------
def reached(switch: Switch, probes: dict[str, int]) -> bool:
    return probes.get(switch.probe, 0) > 0


STEADY, FIRST = "steady_cpu_s", "first_cpu_s"
"""The figures gains are computed from: the worker's CPU time (time.process_time; one torch
thread), far less disturbed than wall time by other jobs on a shared machine."""


def summarize(runs: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (workload, switch, variant): pooled steady median/min/max, first-call median, ratios to ON."""
    by: dict[tuple[str, str, str], list[dict]] = collections.defaultdict(list)
    for r in runs:
        by[(r["workload"], r["switch"], r["variant"])].append(r)
    out: dict[tuple[str, str, str], dict] = {}
    for key, rs in by.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        s: dict[str, Any] = {"n_runs": len(rs), "n_ok": len(ok), "statuses": sorted({r.get("status") for r in rs})}
        if ok:
            steady = [t for r in ok for t in r[STEADY]]
            wall = [t for r in ok for t in r["steady_s"]]
            s.update(steady_median_s=statistics.median(steady), steady_min_s=min(steady), steady_max_s=max(steady),
                     first_median_s=statistics.median(r[FIRST] for r in ok),
                     wall_steady_median_s=statistics.median(wall), wall_first_median_s=statistics.median(r["first_s"] for r in ok),
                     max_rel_error=max((r.get("max_rel_error", float("nan")) for r in ok), default=None),
                     rounds={r["round"]: (statistics.median(r[STEADY]), r[FIRST]) for r in ok})
        else:
            s["error"] = rs[0].get("error", rs[0].get("status"))
        out[key] = s
    for (wl, sw, var), s in out.items():
        on = out.get((wl, "on", "on"))
        if sw == "on" or not on or "steady_median_s" not in s or "steady_median_s" not in on:
            continue
        s["steady_ratio"] = s["steady_median_s"] / on["steady_median_s"]
        s["first_ratio"] = s["first_median_s"] / on["first_median_s"]
        s["wall_steady_ratio"] = s["wall_steady_median_s"] / on["wall_steady_median_s"]
        s["min_ratio"] = s["steady_min_s"] / on["steady_min_s"]
        per_round = [s["rounds"][rd][0] / on["rounds"][rd][0] for rd in s["rounds"] if rd in on["rounds"]]
        s["steady_ratio_min"], s["steady_ratio_max"] = (min(per_round), max(per_round)) if per_round else (None, None)
    return out


def fmt_cell(s: dict) -> str:
    if "steady_ratio" not in s:
        return s.get("error", "—")[:60] if "steady_median_s" not in s else "(no ON)"
    err = s.get("max_rel_error")
    bad = " ⚠err %.1e" % err if err is not None and err == err and err > 1e-4 else ""
    return (f"{s['steady_ratio']:.2f} ({s['steady_ratio_min']:.2f}–{s['steady_ratio_max']:.2f}) min {s['min_ratio']:.2f} "
            f"[first {s['first_ratio']:.2f}]{bad}")


def tables(result: dict) -> str:
    summary = {tuple(k.split("|")): v for k, v in result["summary"].items()}
    workloads = result["workloads"]
    lines = ["Gain = OFF / ON of the steady calls' median CPU time (> 1: the path saves time), (min–max of the per-round "
             "ratios), min = ratio of the fastest steady calls, [first call OFF / ON]; ⚠err: max relative error > 1e-4.", ""]
    lines.append("| switch | variant | " + " | ".join(workloads) + " |")
    lines.append("|---|---|" + "---|" * len(workloads))
    for sw in result["switches"]:
        for var in BY_NAME[sw].variants:
            cells = [fmt_cell(summary[(wl, sw, var)]) if (wl, sw, var) in summary else "not reached" for wl in workloads]
            lines.append(f"| {sw} | {var} | " + " | ".join(cells) + " |")
    lines += ["", "ON (as shipped): steady median CPU s (min–max) [first call CPU s], max rel error, method chosen", "",
              "| workload | ON | error | method | probes |", "|---|---|---|---|---|"]
    for wl in workloads:
        s = summary.get((wl, "on", "on"), {})
        probe = result["probes"].get(wl, {})
        cell = (f"{s['steady_median_s']:.4f} ({s['steady_min_s']:.4f}–{s['steady_max_s']:.4f}) [{s['first_median_s']:.3f}]"
                if "steady_median_s" in s else s.get("error", "—"))
        err = s.get("max_rel_error")
        counts = ", ".join(f"{k}:{v}" for k, v in sorted(probe.get("probes", {}).items()))
        lines.append(f"| {wl} | {cell} | {err if err is None else f'{err:.1e}'} | {probe.get('chosen')} | {counts} |")
    return "\n".join(lines)


def merged(results: list[dict]) -> dict:
    """Runs over disjoint or overlapping workloads as one result: each workload from the first
    run that has its ON measured (a run cut short gives the variants it reached)."""
    out: dict[str, Any] = {"workloads": [], "switches": [], "probes": {}, "summary": {}, "runs": []}
    for r in results:
        done = {run["workload"] for run in r["runs"] if run["switch"] == "on" and run.get("status") == "ok"}
        for wl in r["workloads"]:
            if wl in done and wl not in out["workloads"]:
                out["workloads"].append(wl)
                out["probes"][wl] = r["probes"][wl]
                out["summary"].update({k: v for k, v in r["summary"].items() if k.split("|")[0] == wl})
                out["runs"] += [run for run in r["runs"] if run["workload"] == wl]
        out["switches"] += [s for s in r["switches"] if s not in out["switches"]]
    out["sources"] = [{k: r.get(k) for k in ("date", "command", "git_commit", "repeats", "rounds", "threads", "wall_s")} for r in results]
    return out


def by_switch(result: dict) -> str:
    """One line per switch variant: its gain on every workload it reaches (for docs/special-paths.md)."""
    summary = {tuple(k.split("|")): v for k, v in result["summary"].items()}
    lines = []
    for sw in result["switches"]:
        for var in BY_NAME[sw].variants:
            cells = [f"{wl} {fmt_cell(summary[(wl, sw, var)])}" for wl in result["workloads"] if (wl, sw, var) in summary]
            best = max((summary[(wl, sw, var)].get("steady_ratio", 0) for wl in result["workloads"] if (wl, sw, var) in summary), default=None)
            lines.append(f"- **{sw} = {var}** (best steady gain {best if best is None else f'{best:.2f}'}): " + "; ".join(cells))
    return "\n".join(lines)


def snapshot(args: argparse.Namespace, workloads: list[str], plan: dict, switches: list[str], probes: dict, runs: list[dict], t_start: float) -> dict:
    summary = summarize(runs)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(), "command": " ".join(sys.argv),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip(),
        "repeats": args.repeats, "rounds": args.rounds, "threads": args.threads, "workloads": [w for w in workloads if w in plan],
        "switches": switches, "probes": probes, "runs": runs,
        "summary": {"|".join(k): {kk: vv for kk, vv in v.items() if kk != "rounds"} | {"rounds": {str(a): b for a, b in v.get("rounds", {}).items()}}
                    for k, v in summary.items()},
        "wall_s": time.time() - t_start,
    }


def drive(args: argparse.Namespace) -> None:
    workloads = args.workloads or all_workloads()
    switches = args.switches or [s.name for s in SWITCHES]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = Path(args.out or BENCH / "results" / f"ablate-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for wl in workloads:
        try:
            ensure_reference(wl)
        except Exception as exc:  # noqa: BLE001 - then no error column for it
            print(f"no reference for {wl}: {exc}", flush=True)
    probes: dict[str, dict] = {}
    for wl in list(workloads):
        p = run_worker(wl, "on", "on", 1, args.timeout, probe=True)
        probes[wl] = p
        print(f"probe {wl}: {p.get('status')} chosen={p.get('chosen')} {p.get('probes', p.get('error'))}", flush=True)
        if args.structured and p.get("chosen") not in (None, "structured") and "@" not in wl:
            alt = f"{wl}@structured"
            q = run_worker(alt, "on", "on", 1, args.timeout, probe=True)
            if q.get("status") == "ok":
                probes[alt] = q
                workloads.insert(workloads.index(wl) + 1, alt)
                print(f"probe {alt}: {q.get('probes')}", flush=True)
    plan: dict[str, list[tuple[str, str]]] = {}
    for wl in workloads:
        seen = probes[wl].get("probes", {})
        plan[wl] = [("on", "on")] + [(sw, var) for sw in switches for var in BY_NAME[sw].variants
                                     if reached(BY_NAME[sw], seen) and f"{sw}={var}" not in args.skip]
    total = sum(len(v) + (args.rounds == 1) for v in plan.values()) * args.rounds
    print(f"{total} runs planned", flush=True)
    runs: list[dict] = []
    done = 0
    result: dict[str, Any] = {}
    for wl in workloads:
        todo = plan[wl]
        for rd in range(args.rounds):
            shift = rd * max(1, len(todo) // args.rounds)
            order = todo[shift:] + todo[:shift]
            if rd % 2:
                order = order[::-1]
            if args.rounds == 1:  # ON at both ends: a drift over the round shows in its spread
                order = order + [("on", "on")]
            for sw, var in order:
                r = run_worker(wl, sw, var, args.repeats, args.timeout)
                r["round"] = rd
                runs.append(r)
                done += 1
                med = statistics.median(r["steady_s"]) if r.get("status") == "ok" else r.get("status")
                print(f"[{done}/{total} {time.time() - t_start:.0f}s] {wl} {sw}={var} r{rd}: {med}", flush=True)
                result = snapshot(args, workloads, plan, switches, probes, runs, t_start)
                out.write_text(json.dumps(result, indent=1))  # after every run: a partial run is kept
    print(tables(result))
    out.with_suffix(".md").write_text(tables(result) + "\n")
    print(f"\nJSON: {out}")


def fuzz_coverage(args: argparse.Namespace) -> None:
    """Run the fuzzer (pytest tests/fuzz) in this process with the probes installed."""
    import pytest
    sys.path.insert(0, str(REPO / "src"))
    count = install_probes()
    rc = pytest.main(["-q", "-p", "no:cacheprovider", *(args.pytest_args or [str(REPO / "tests" / "fuzz")])])
    print(json.dumps({"pytest_rc": int(rc), "probes": dict(sorted(count.items()))}, indent=1))
    for s in SWITCHES:
        print(f"{s.name}: {'reached' if count.get(s.probe) else 'NOT reached'} ({s.probe}={count.get(s.probe, 0)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=3, metavar=("WORKLOAD", "SWITCH", "VARIANT"))
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--workloads", nargs="*")
    ap.add_argument("--switches", nargs="*", choices=[s.name for s in SWITCHES])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per worker (2: the benchmark protocol)")
    ap.add_argument("--no-structured", dest="structured", action="store_false",
                    help="do not add <workload>@structured where auto chooses another method")
    ap.add_argument("--skip", nargs="*", default=[], metavar="SWITCH=VARIANT", help="variants not to run")
    ap.add_argument("--out")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report", nargs="+", metavar="JSON", help="re-print the tables of one run, or of runs merged (workload by workload)")
    ap.add_argument("--fuzz-coverage", action="store_true")
    ap.add_argument("pytest_args", nargs="*")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.worker:
        args.workload, args.switch, args.variant = args.worker
        worker(args)
    elif args.list:
        for s in SWITCHES:
            print(f"{s.name}: {', '.join(s.variants)} — {s.what} [{s.where}]")
        print("workloads:", ", ".join(all_workloads()))
    elif args.report:
        result = merged([json.loads(Path(f).read_text()) for f in args.report])
        print(tables(result) + "\n\n" + by_switch(result))
    elif args.fuzz_coverage:
        fuzz_coverage(args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
