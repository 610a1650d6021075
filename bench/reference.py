"""Float64 reference kernels and the per-workload cache (bench/.cache/).

Per BENCHMARKS.md the reference is: per-sample Jacobians by
``torch.func.jacrev`` in float64, then contraction.  When the float64
Jacobians of all samples do not fit in memory (mlp-gram-trace: 512 x 10 x
1.86M x 8 B = 76 GB) they are computed in blocks of samples: K is
accumulated block pair by block pair, holding at most two Jacobian blocks.

For each workload the cache holds

* ``<name>.npz``: float32 weights (every parameter and buffer under its
  ``state_dict`` key, prefixed ``w:``), ``x1``, ``x2`` (if any), the torch
  float32 model outputs ``out1`` on x1, and ``meta`` (a JSON string: arch,
  mode, output size, fingerprint, parameter names);
* ``<name>.ref.npy``: the float64 reference kernel.

Usage: ``python bench/reference.py [workload ...] [--force] [--budget-gib G]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

# Transparent huge pages for torch's large CPU allocations: first-touch page
# faults otherwise dominate the multi-GB float64 Jacobian blocks (about 10x
# slower on this kind of machine).  Only this reference process sets it; the
# measured workers run with the user's defaults.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, jacrev, vmap  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import CACHE_DIR, data_path, ref_path  # noqa: E402
from workloads import Workload, selected  # noqa: E402

#: einsum per mode over per-parameter Jacobians (n, a, f) x (m, b, f)
CONTRACTIONS = {
    "full": "naf,mbf->nmab",
    "trace": "naf,maf->nm",
    "diagonal": "naf,maf->nma",
}
#: how to get K(x_j, x_i) from K(x_i, x_j) for each mode
TRANSPOSES = {"full": (1, 0, 3, 2), "trace": (1, 0), "diagonal": (1, 0, 2)}

Jacobian = list[torch.Tensor]  # per parameter tensor: (n, O, p)


def jacobians(model: nn.Module, x: torch.Tensor) -> Jacobian:
    """Per-sample float64 Jacobians, one (n, O, p) tensor per parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(fnet_single), (None, 0))(params, x)
    return [j.flatten(2) for j in jac.values()]


def contract(j1: Jacobian, j2: Jacobian, mode: str) -> torch.Tensor:
    """Sum over parameter tensors of the per-mode contraction."""
    expr = CONTRACTIONS[mode]
    out = torch.einsum(expr, j1[0], j2[0])
    for a, b in zip(j1[1:], j2[1:]):
        out += torch.einsum(expr, a, b)
    return out


def block_slices(n: int, block: int) -> list[slice]:
    """Consecutive slices of at most ``block`` samples covering range(n)."""
    return [slice(i, min(i + block, n)) for i in range(0, n, block)]


def block_pairs(
    n1: int, n2: int | None, block: int
) -> Iterator[tuple[slice, slice, bool]]:
    """(rows, cols, mirror) block pairs; for a Gram matrix (n2 None) only
    the upper triangle, with ``mirror`` set off the diagonal."""
    rows = block_slices(n1, block)
    for i, r in enumerate(rows):
        if n2 is None:
            for c in rows[i:]:
                yield r, c, c != r
        else:
            for c in block_slices(n2, block):
                yield r, c, False


def kernel_shape(n1: int, n2: int, out: int, mode: str) -> tuple[int, ...]:
    """Shape of the kernel for a mode."""
    return {"full": (n1, n2, out, out), "trace": (n1, n2), "diagonal": (n1, n2, out)}[mode]


def reference_ntk(
    model: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    mode: str,
    budget_bytes: float,
    verbose: bool = False,
) -> np.ndarray:
    """The float64 eNTK of ``model`` by blocked jacrev + contraction.

    The block size is chosen so that two float64 Jacobian blocks take at
    most ``budget_bytes``.
    """
    model64 = copy.deepcopy(model).double().eval()
    cast = (lambda t: t.double()) if x1.is_floating_point() else (lambda t: t)
    xa = cast(x1)
    xb = xa if x2 is None else cast(x2)
    n_params = sum(p.numel() for p in model64.parameters())
    with torch.no_grad():
        n_out = model64(xa[:1]).shape[-1]
    per_sample = n_out * n_params * 8
    block = max(1, int(budget_bytes // (2 * per_sample)))
    n2 = xb.shape[0]
    k = torch.zeros(kernel_shape(xa.shape[0], n2, n_out, mode), dtype=torch.float64)
    if verbose:
        print(f"  P={n_params} O={n_out} block={block}", flush=True)

    held: tuple[slice, Jacobian] | None = None
    for rows, cols, mirror in block_pairs(xa.shape[0], None if x2 is None else n2, block):
        if held is None or held[0] != rows:
            held = None  # free the old block before computing the new one
            held = (rows, jacobians(model64, xa[rows]))
        j1 = held[1]
        j2 = j1 if (x2 is None and cols == rows) else jacobians(model64, xb[cols])
        kb = contract(j1, j2, mode)
        k[rows, cols] = kb
        if mirror:
            k[cols, rows] = kb.permute(*TRANSPOSES[mode])
        if verbose and cols.stop == (xa if x2 is None else xb).shape[0]:
            print(f"  rows {rows.start}-{rows.stop} of {xa.shape[0]} done", flush=True)
        del j1, j2, kb
    return k.numpy()


def write_cache(wl: Workload, budget_bytes: float) -> None:
    """Compute and store the data .npz and the float64 reference of a workload."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    model, x1, x2 = wl.build()
    with torch.no_grad():
        out1 = model(x1)
    meta = {
        "workload": wl.name,
        "arch": wl.arch,
        "mode": wl.mode,
        "n_out": int(out1.shape[-1]),
        "gram": x2 is None,
        "fingerprint": wl.fingerprint(),
        "params": [k for k, _ in model.named_parameters()],
    }
    arrays = {f"w:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    arrays["x1"] = x1.numpy()
    if x2 is not None:
        arrays["x2"] = x2.numpy()
    arrays["out1"] = out1.numpy()
    t0 = time.perf_counter()
    ref = reference_ntk(model, x1, x2, wl.mode, budget_bytes, verbose=True)
    print(f"  reference {ref.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    np.save(ref_path(wl.name), ref)  # reference first: the npz marks completion
    np.savez(data_path(wl.name), meta=np.array(json.dumps(meta)), **arrays)


def cache_is_fresh(wl: Workload) -> bool:
    """Whether both cache files exist and match the workload's fingerprint."""
    if not (data_path(wl.name).exists() and ref_path(wl.name).exists()):
        return False
    with np.load(data_path(wl.name)) as data:
        meta = json.loads(str(data["meta"]))
    return meta.get("fingerprint") == wl.fingerprint()


def main(argv: list[str] | None = None) -> int:
    """Build missing (or, with --force, all) caches of the given workloads."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workloads", nargs="*", help="default: all, extras included")
    ap.add_argument("--force", action="store_true", help="recompute even if cached")
    ap.add_argument("--budget-gib", type=float, default=8.0,
                    help="memory for two float64 Jacobian blocks (default 8)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for wl in selected(args.workloads or None, extra=True):
        if not args.force and cache_is_fresh(wl):
            continue
        print(f"reference for {wl.name}", flush=True)
        write_cache(wl, args.budget_gib * 2**30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
