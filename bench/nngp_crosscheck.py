"""Cross-check fastntk.nngp and fastntk.taylor_expand against neural-tangents on the same network.

Usage (from the repository root; needs .venv-nt, see bench/setup_nt_env.sh)::

    .venv/bin/python bench/nngp_crosscheck.py [--json results/nngp_crosscheck.json]

The library's environment builds a 5-24-3 tanh MLP (float64), computes its output NNGP
("full" and "trace_mean"), its hidden layer's NNGP (φφᵀ/24) and its degree-1 and degree-2
Taylor expansions at θ0 + δ, and writes the weights, δ and results to a temporary .npz;
``.venv-nt/bin/python`` then runs this file with ``--nt FILE`` to compute neural-tangents'
``empirical_nngp_fn`` (``trace_axes=()`` and the default ``(-1,)``) and ``taylor_expand`` on
the same weights, written as a JAX function (x @ Wᵀ + b, as torch's Linear). Prints the
largest relative difference per quantity and writes them as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent


def ours(path: Path) -> None:
    import torch
    from torch import nn

    import fastntk

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 3)).double()
    x1, x2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    arrays = {name.replace(".", "_"): p.detach() for name, p in net.named_parameters()} | {"x1": x1, "x2": x2}
    arrays |= {
        "ours_nngp_full": fastntk.nngp(net, x1, x2, mode="full"),
        "ours_nngp_trace_mean": fastntk.nngp(net, x1, x2, mode="trace_mean"),
        "ours_nngp_layer": fastntk.nngp(net, x1, x2, layer="1"),
    }
    generator = torch.Generator().manual_seed(1)
    deltas = {name.replace(".", "_"): 0.1 * torch.randn(p.shape, dtype=p.dtype, generator=generator) for name, p in net.named_parameters()}
    arrays |= {f"delta_{name}": d for name, d in deltas.items()}
    for degree in (1, 2):
        expanded = fastntk.taylor_expand(net, degree)
        with torch.no_grad():
            for (name, p), d in zip(expanded.module.named_parameters(), deltas.values()):
                p.add_(d)
            arrays[f"ours_taylor_{degree}"] = expanded(x1)
    np.savez(path, **{name: value.numpy() for name, value in arrays.items()})


def theirs(path: Path) -> None:
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    import scipy.linalg

    for name in ("tril", "triu"):  # gone from scipy >= 1.13; jax 0.4.23's jax.scipy.linalg still wraps them
        if not hasattr(scipy.linalg, name):
            setattr(scipy.linalg, name, getattr(np, name))
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import neural_tangents as nt

    a = {name: jnp.asarray(value) for name, value in np.load(path).items()}
    names = ("0_weight", "0_bias", "2_weight", "2_bias")
    params = {name: a[name] for name in names}
    delta = {name: a[f"delta_{name}"] for name in names}

    def hidden(p, x):
        return jnp.tanh(x @ p["0_weight"].T + p["0_bias"])

    def f(p, x):
        return hidden(p, x) @ p["2_weight"].T + p["2_bias"]

    out = {
        "nt_nngp_full": nt.empirical_nngp_fn(f, trace_axes=())(a["x1"], a["x2"], params),
        "nt_nngp_trace_mean": nt.empirical_nngp_fn(f)(a["x1"], a["x2"], params),
        "nt_nngp_layer": nt.empirical_nngp_fn(hidden)(a["x1"], a["x2"], params),
    }
    moved = {name: params[name] + delta[name] for name in names}
    for degree in (1, 2):
        out[f"nt_taylor_{degree}"] = nt.taylor_expand(f, params, degree)(moved, a["x1"])
    np.savez(path.with_suffix(".nt.npz"), **{name: np.asarray(value) for name, value in out.items()})


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--nt":
        theirs(Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "nngp.npz"
        ours(path)
        nt_python = BENCH.parent / ".venv-nt" / "bin" / "python"
        subprocess.run([str(nt_python), __file__, "--nt", str(path)], check=True)
        a, b = dict(np.load(path)), dict(np.load(path.with_suffix(".nt.npz")))
    differences = {}
    print("| quantity | shape | max |ours - neural-tangents| / max |neural-tangents| |")
    print("|---|---|---|")
    for name in sorted(b):
        theirs_, mine = b[name], a[name.replace("nt_", "ours_", 1)]
        assert mine.shape == theirs_.shape, (name, mine.shape, theirs_.shape)
        differences[name[3:]] = float(np.abs(mine - theirs_).max()) / max(float(np.abs(theirs_).max()), 1e-300)
        print(f"| {name[3:]} | {theirs_.shape} | {differences[name[3:]]:.2e} |")
    if len(sys.argv) == 3 and sys.argv[1] == "--json":
        Path(sys.argv[2]).write_text(json.dumps(differences, indent=2) + "\n")


if __name__ == "__main__":
    main()
