"""Cross-check fastntk.predict against neural-tangents' predict functions on the same kernels.

Usage (from the repository root; needs .venv-nt, see bench/setup_nt_env.sh)::

    .venv/bin/python bench/predict_crosscheck.py

The library's environment computes eNTKs of a small MLP (full and trace_mean) and fastntk's
predictions, writes them to a temporary .npz, then runs ``.venv-nt/bin/python`` on this same
file with ``--nt FILE`` to compute neural-tangents' predictions (float64, x64 enabled) on the
same kernels, and prints the largest relative difference per function.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
TIMES = (0.5, 10.0)


def ours(path: Path) -> dict[str, np.ndarray]:
    import torch
    from torch import nn

    import fastntk
    from fastntk import predict

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).double()
    x, x_test = torch.randn(20, 6, dtype=torch.float64), torch.randn(7, 6, dtype=torch.float64)
    y = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad():
        f0, f0_test = net(x), net(x_test)
    arrays = {"y": y, "f0": f0, "f0_test": f0_test}
    for mode, key in (("full", "full"), ("trace_mean", "traced")):
        k, k_test, k_tt = fastntk.ntk(net, x, mode=mode), fastntk.ntk(net, x_test, x, mode=mode), fastntk.ntk(net, x_test, mode=mode)
        arrays |= {f"k_{key}": k, f"k_test_{key}": k_test, f"k_tt_{key}": k_tt}
        fn = predict.gradient_descent_mse(k, y, learning_rate=0.5)
        for t in (*TIMES, math.inf):
            train, test = fn(t, f0, f0_test, k_test)
            arrays |= {f"ours_gd_{key}_{t}_train": train, f"ours_gd_{key}_{t}_test": test}
        posterior = predict.gp_inference(k, y, k_test, k_tt, ridge=1e-2)
        arrays |= {f"ours_gp_{key}_mean": posterior.mean, f"ours_gp_{key}_cov": posterior.covariance}
        arrays[f"ours_lr_{key}"] = torch.tensor(predict.max_learning_rate(k, y_train_size=y.numel()), dtype=torch.float64)
    np.savez(path, **{name: value.numpy() for name, value in arrays.items()})
    return arrays


def import_neural_tangents() -> types.ModuleType:
    """neural_tangents in .venv-nt, float64 enabled (also used by bench/layout_crosscheck.py)."""
    sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
    import scipy.linalg

    for name in ("tril", "triu"):  # gone from scipy >= 1.13; jax 0.4.23's jax.scipy.linalg still wraps them
        if not hasattr(scipy.linalg, name):
            setattr(scipy.linalg, name, getattr(np, name))
    import jax

    jax.config.update("jax_enable_x64", True)
    import neural_tangents as nt

    return nt


def theirs(path: Path) -> None:
    nt = import_neural_tangents()
    import jax.numpy as jnp

    a = dict(np.load(path))
    out = {}
    for key in ("full", "traced"):
        k, k_test, k_tt = (jnp.asarray(a[f"{p}_{key}"]) for p in ("k", "k_test", "k_tt"))
        trace_axes = () if key == "full" else (-1,)
        fn = nt.predict.gradient_descent_mse(k, jnp.asarray(a["y"]), learning_rate=0.5, trace_axes=trace_axes)
        for t in (*TIMES, None):
            train, test = fn(t, jnp.asarray(a["f0"]), jnp.asarray(a["f0_test"]), k_test)
            name = math.inf if t is None else t
            out[f"nt_gd_{key}_{name}_train"], out[f"nt_gd_{key}_{name}_test"] = np.asarray(train), np.asarray(test)
        gp = nt.predict.gp_inference(k, jnp.asarray(a["y"]), diag_reg=1e-2, diag_reg_absolute_scale=True, trace_axes=trace_axes)
        posterior = gp("nngp", k_test, k_tt)  # the kernel as the prior covariance (our gp_inference)
        out[f"nt_gp_{key}_mean"], out[f"nt_gp_{key}_cov"] = np.asarray(posterior.mean), np.asarray(posterior.covariance)
        size = a["y"].size
        k2d = np.asarray(k if key == "traced" else k.transpose(0, 2, 1, 3).reshape(60, 60))
        # nt.predict.max_learning_rate's formula, 2·(1 + momentum)·|Y| / (λ_max + eps): its own call
        # passes scipy's removed `eigvals=` keyword (scipy >= 1.14), so the formula is written out
        out[f"nt_lr_{key}"] = np.asarray(2 * size / (np.linalg.eigvalsh(k2d)[-1] + 1e-12))
    np.savez(path.with_suffix(".nt.npz"), **out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--nt":
        theirs(Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernels.npz"
        ours(path)
        nt_python = BENCH.parent / ".venv-nt" / "bin" / "python"
        subprocess.run([str(nt_python), __file__, "--nt", str(path)], check=True)
        a, b = dict(np.load(path)), dict(np.load(path.with_suffix(".nt.npz")))
    print("| quantity | max |ours - neural-tangents| / max |neural-tangents| |")
    print("|---|---|")
    for name in sorted(b):
        theirs_ = b[name]
        mine = a[name.replace("nt_", "ours_", 1)]
        scale = max(float(np.abs(theirs_).max()), 1e-300)
        print(f"| {name[3:]} | {float(np.abs(mine.reshape(theirs_.shape) - theirs_).max()) / scale:.2e} |")


if __name__ == "__main__":
    main()
