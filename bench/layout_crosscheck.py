"""Check fastntk.layout's reading of neural-tangents' kernels against neural-tangents itself.

Usage (from the repository root; needs .venv-nt, see bench/setup_nt_env.sh)::

    .venv/bin/python bench/layout_crosscheck.py     # NT_PYTHON=/path/to/python: another neural-tangents env

``.venv-nt/bin/python`` runs this same file with ``--nt FILE``: for a dense stax network (outputs
(N, 3)) and a convolutional one (outputs (N, 4, 5, 2)) it writes neural-tangents' empirical NTKs
(``trace_axes=()``; the default ``trace_axes=(-1,)``; ``diagonal_axes=(-1,)``) and the per-sample
Jacobians J (N, *S, P) of the same parameters. This environment then builds fastntk's kernels from
those Jacobians by their definition (full: J J^T over the outputs flattened in C order, (N1, N2, O, O);
trace_mean: the mean of its diagonal over outputs; diagonal: its diagonal) and compares them with
``fastntk.layout.from_neural_tangents`` of neural-tangents' kernels (and back with
``to_neural_tangents``). Prints a table; writes bench/results/layout_crosscheck.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def theirs(path: Path) -> None:
    from predict_crosscheck import import_neural_tangents

    nt = import_neural_tangents()
    import jax
    from jax.flatten_util import ravel_pytree
    from neural_tangents import stax

    key = jax.random.PRNGKey(0)
    nets = {
        "dense": (stax.serial(stax.Dense(16), stax.Erf(), stax.Dense(3)), (6,)),
        "conv": (stax.serial(stax.Conv(3, (2, 2), padding="SAME"), stax.Relu(), stax.Conv(2, (2, 2), padding="SAME")), (4, 5, 1)),
    }
    out = {}
    for name, ((init, apply, _), shape) in nets.items():
        x1 = jax.random.normal(jax.random.PRNGKey(1), (4, *shape), dtype="float64")
        x2 = jax.random.normal(jax.random.PRNGKey(2), (3, *shape), dtype="float64")
        _, params = init(key, x1.shape)
        flat, unravel = ravel_pytree(params)
        for tag, x in (("1", x1), ("2", x2)):
            out[f"{name}_j{tag}"] = np.asarray(jax.jacrev(lambda p, x=x: apply(unravel(p), x))(flat))
        out[f"{name}_full"] = np.asarray(nt.empirical_ntk_fn(apply, trace_axes=())(x1, x2, params))
        if name == "dense":
            out[f"{name}_default"] = np.asarray(nt.empirical_ntk_fn(apply)(x1, x2, params))
            out[f"{name}_diagonal"] = np.asarray(nt.empirical_ntk_fn(apply, trace_axes=(), diagonal_axes=(-1,))(x1, x2, params))
    np.savez(path, **out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--nt":
        theirs(Path(sys.argv[2]))
        return
    import torch

    from fastntk import layout

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "nt.npz"
        nt_python = os.environ.get("NT_PYTHON", str(BENCH.parent / ".venv-nt" / "bin" / "python"))
        subprocess.run([nt_python, __file__, "--nt", str(path)], check=True)
        a = {name: torch.from_numpy(value) for name, value in np.load(path).items()}
    rows = []

    def compare(what: str, converted: torch.Tensor, expected: torch.Tensor, nt_shape: tuple[int, ...], fastntk_shape: tuple[int, ...]) -> None:
        error = float((converted - expected).abs().max() / expected.abs().max())
        rows.append({"check": what, "neural_tangents_shape": list(nt_shape), "fastntk_shape": list(fastntk_shape), "max_rel_diff": error})

    for name in ("dense", "conv"):
        j1, j2, full_nt = a[f"{name}_j1"], a[f"{name}_j2"], a[f"{name}_full"]
        output_shape = tuple(j1.shape[1:-1])
        o = int(np.prod(output_shape))
        full = torch.einsum("nap,mbp->nmab", j1.reshape(j1.shape[0], o, -1), j2.reshape(j2.shape[0], o, -1))
        shapes = (tuple(full_nt.shape), tuple(full.shape))
        compare(f"{name}: from_neural_tangents(trace_axes=()) vs full", layout.from_neural_tangents(full_nt), full, *shapes)
        compare(f"{name}: to_neural_tangents(full, {output_shape}) vs trace_axes=()",
                layout.to_neural_tangents(full, output_shape if len(output_shape) > 1 else None), full_nt, *shapes)
        if f"{name}_default" in a:
            trace_mean = torch.diagonal(full, dim1=2, dim2=3).mean(-1)
            default = a[f"{name}_default"]
            compare(f"{name}: default trace_axes=(-1,) vs trace_mean", layout.from_neural_tangents(default), trace_mean,
                    tuple(default.shape), tuple(trace_mean.shape))
            diagonal = a[f"{name}_diagonal"]
            compare(f"{name}: diagonal_axes=(-1,) vs diagonal", diagonal, torch.diagonal(full, dim1=2, dim2=3),
                    tuple(diagonal.shape), tuple(diagonal.shape))
    print("| check | neural-tangents shape | fastntk shape | max rel. difference |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {tuple(r['neural_tangents_shape'])} | {tuple(r['fastntk_shape'])} | {r['max_rel_diff']:.1e} |")
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "layout_crosscheck.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
