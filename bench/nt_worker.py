"""Measure ONE (workload, neural-tangents implementation) pair (JAX env).

Runs in ``.venv-nt`` (``bash bench/setup_nt_env.sh``), where there is no
torch: the model is rebuilt as a plain JAX function from the weights that
``bench/reference.py`` cached, and its output is checked against the torch
output stored with them before anything is timed.

Usage: ``.venv-nt/bin/python bench/nt_worker.py WORKLOAD METHOD [--repeats 5]``
with METHOD one of ``nt-jac``, ``nt-vp``, ``nt-sd``.

Layouts: torch's NCHW inputs / OIHW kernels are converted to JAX's usual
NHWC / HWIO (what ``stax`` uses), dense weights to (in, out).  A flatten
before a Linear layer follows torch's (C, H, W) order, so the Linear rows are
permuted to (H, W, C).  Transposing or permuting parameters does not change
the eNTK.  Parameterisation is torch's ("standard"): y = x @ W + b.

Mode handling: neural-tangents' ``trace_axes=(-1,)`` returns the MEAN over
outputs; the result is multiplied by O (outside the timing) to get the sum.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# neural_tangents.experimental needs tensorflow/tf2jax (not installed, not used).
sys.modules.setdefault("neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import neural_tangents as nt  # noqa: E402
from jax import lax  # noqa: E402

from protocol import data_path, guarded, ref_path, rss_mib, run_protocol  # noqa: E402

IMPLEMENTATIONS = {
    "nt-jac": nt.NtkImplementation.JACOBIAN_CONTRACTION,
    "nt-vp": nt.NtkImplementation.NTK_VECTOR_PRODUCTS,
    "nt-sd": nt.NtkImplementation.STRUCTURED_DERIVATIVES,
}
OUTPUT_RTOL = 2e-5  # JAX vs torch model output, max|diff| / max|out|

Arrays = dict[str, jnp.ndarray]
ApplyFn = Callable[[Arrays, jnp.ndarray], jnp.ndarray]


# --------------------------------------------------------------------------
# weight conversion (numpy, torch layouts in -> JAX layouts out)
# --------------------------------------------------------------------------
def conv_kernel(w: np.ndarray) -> np.ndarray:
    """OIHW -> HWIO (also for grouped kernels: O, I/groups, H, W)."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> (in, out)."""
    return np.ascontiguousarray(w.T)


def dense_after_nchw_flatten(w: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Linear (out, C*H*W) reading a torch NCHW flatten -> (H*W*C, out)
    reading an NHWC flatten."""
    c, h, wd = chw
    return np.ascontiguousarray(w.reshape(-1, c, h, wd).transpose(2, 3, 1, 0).reshape(h * wd * c, -1))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """Image batch NCHW -> NHWC."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------
# layers (plain JAX)
# --------------------------------------------------------------------------
def conv(x: jnp.ndarray, w: jnp.ndarray, stride: int = 1, pad: int = 0, groups: int = 1) -> jnp.ndarray:
    """2-D convolution, NHWC x HWIO, symmetric zero padding."""
    return lax.conv_general_dilated(
        x, w, (stride, stride), [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
    )


def relu(x: jnp.ndarray) -> jnp.ndarray:
    """max(x, 0)."""
    return jnp.maximum(x, 0.0)


def batch_norm_eval(x: jnp.ndarray, p: Arrays, c: Arrays, name: str, eps: float = 1e-5) -> jnp.ndarray:
    """BatchNorm in eval mode: running statistics ``c`` are constants, the
    affine weight and bias in ``p`` are parameters (channels last)."""
    inv = 1.0 / jnp.sqrt(c[f"{name}.running_var"] + eps)
    return (x - c[f"{name}.running_mean"]) * inv * p[f"{name}.weight"] + p[f"{name}.bias"]


def layer_norm(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """LayerNorm over the last axis."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * w + b


# --------------------------------------------------------------------------
# models: arch key (bench/workloads.py) -> (params, constants, x converter, f)
# --------------------------------------------------------------------------
#: (parameters, constants, input converter, f(params, consts, x)), numpy in
Built = tuple[
    dict[str, np.ndarray], dict[str, np.ndarray],
    Callable[[np.ndarray], np.ndarray], Callable[..., jnp.ndarray],
]


def tutorial_cnn(w: dict[str, np.ndarray]) -> Built:
    """Conv(3,32,3)-ReLU-Conv(32,32,3)-ReLU-Conv(32,32,3)-flatten-Linear."""
    params = {f"conv{i}.weight": conv_kernel(w[f"conv{i}.weight"]) for i in (1, 2, 3)}
    params |= {f"conv{i}.bias": w[f"conv{i}.bias"] for i in (1, 2, 3)}
    params["fc.weight"] = dense_after_nchw_flatten(w["fc.weight"], (32, 26, 26))
    params["fc.bias"] = w["fc.bias"]

    def f(p: Arrays, c: Arrays, x: jnp.ndarray) -> jnp.ndarray:
        x = relu(conv(x, p["conv1.weight"]) + p["conv1.bias"])
        x = relu(conv(x, p["conv2.weight"]) + p["conv2.bias"])
        x = conv(x, p["conv3.weight"]) + p["conv3.bias"]
        return x.reshape(x.shape[0], -1) @ p["fc.weight"] + p["fc.bias"]

    return params, {}, nchw_to_nhwc, f


def dense_params(w: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Every ``<name>.weight`` as (in, out) and ``<name>.bias`` as is."""
    out = {}
    for n in names:
        out[f"{n}.weight"] = dense_kernel(w[f"{n}.weight"])
        if f"{n}.bias" in w:
            out[f"{n}.bias"] = w[f"{n}.bias"]
    return out


def dense(p: Arrays, name: str, x: jnp.ndarray) -> jnp.ndarray:
    """x @ W + b."""
    return x @ p[f"{name}.weight"] + p[f"{name}.bias"]


def mlp(w: dict[str, np.ndarray]) -> Built:
    """784-1024-1024-10 with ReLU (nn.Sequential indices 0, 2, 4)."""
    params = dense_params(w, ["0", "2", "4"])

    def f(p: Arrays, c: Arrays, x: jnp.ndarray) -> jnp.ndarray:
        x = relu(dense(p, "0", x))
        x = relu(dense(p, "2", x))
        return dense(p, "4", x)

    return params, {}, lambda x: x, f


def resnet_bn(w: dict[str, np.ndarray]) -> Built:
    """SmallResNet of workloads.py with BatchNorm in eval mode."""
    params, consts = {}, {}
    for k, v in w.items():
        if k.endswith(("running_mean", "running_var")):
            consts[k] = v
        elif k.endswith("num_batches_tracked"):
            continue
        elif v.ndim == 4:
            params[k] = conv_kernel(v)
        elif k == "fc.weight":
            params[k] = dense_kernel(v)
        else:
            params[k] = v

    def block(p: Arrays, c: Arrays, x: jnp.ndarray, name: str, stride: int) -> jnp.ndarray:
        y = relu(batch_norm_eval(conv(x, p[f"{name}.conv1.weight"], stride, 1), p, c, f"{name}.bn1"))
        y = batch_norm_eval(conv(y, p[f"{name}.conv2.weight"], 1, 1), p, c, f"{name}.bn2")
        if f"{name}.down.0.weight" in p:
            x = batch_norm_eval(conv(x, p[f"{name}.down.0.weight"], stride), p, c, f"{name}.down.1")
        return relu(y + x)

    def f(p: Arrays, c: Arrays, x: jnp.ndarray) -> jnp.ndarray:
        x = relu(batch_norm_eval(conv(x, p["stem.weight"], 1, 1), p, c, "bn"))
        x = block(p, c, block(p, c, x, "block1", 1), "block2", 2)
        return dense(p, "fc", x.mean(axis=(1, 2)))

    return params, consts, nchw_to_nhwc, f


def dwsep_cnn(w: dict[str, np.ndarray]) -> Built:
    """depthwise_separable_cnn of workloads.py (nn.Sequential indices)."""
    params = {k: conv_kernel(v) if v.ndim == 4 else v for k, v in w.items()}
    params["10.weight"] = dense_kernel(w["10.weight"])

    def cv(p: Arrays, x: jnp.ndarray, i: int, **kw: int) -> jnp.ndarray:
        return conv(x, p[f"{i}.weight"], **kw) + p[f"{i}.bias"]

    def f(p: Arrays, c: Arrays, x: jnp.ndarray) -> jnp.ndarray:
        x = relu(cv(p, x, 0, pad=1))
        x = relu(cv(p, cv(p, x, 2, pad=1, groups=32), 3))
        x = relu(cv(p, cv(p, x, 5, stride=2, pad=1, groups=64), 6))
        return dense(p, "10", x.mean(axis=(1, 2)))

    return params, {}, nchw_to_nhwc, f


def embedding_bag(w: dict[str, np.ndarray]) -> Built:
    """Embedding, mean over the bag, Linear."""
    params = {"embed.weight": w["embed.weight"], **dense_params(w, ["fc"])}

    def f(p: Arrays, c: Arrays, ids: jnp.ndarray) -> jnp.ndarray:
        return dense(p, "fc", jnp.take(p["embed.weight"], ids, axis=0).mean(axis=1))

    return params, {}, lambda x: x, f


def transformer(w: dict[str, np.ndarray], heads: int = 4) -> Built:
    """TinyTransformer of workloads.py: post-norm encoder layers, ReLU FFN."""
    params = dict(w)
    layers = sorted({k.split(".")[2] for k in w if k.startswith("encoder.layers.")})

    def attention(p: Arrays, x: jnp.ndarray, pre: str) -> jnp.ndarray:
        n, s, d = x.shape
        qkv = x @ p[f"{pre}.in_proj_weight"].T + p[f"{pre}.in_proj_bias"]
        q, k, v = (t.reshape(n, s, heads, d // heads) for t in jnp.split(qkv, 3, axis=-1))
        a = jax.nn.softmax(jnp.einsum("nqhe,nkhe->nhqk", q, k) / np.sqrt(d // heads), axis=-1)
        o = jnp.einsum("nhqk,nkhe->nqhe", a, v).reshape(n, s, d)
        return o @ p[f"{pre}.out_proj.weight"].T + p[f"{pre}.out_proj.bias"]

    def layer(p: Arrays, x: jnp.ndarray, pre: str) -> jnp.ndarray:
        x = layer_norm(x + attention(p, x, f"{pre}.self_attn"), p[f"{pre}.norm1.weight"], p[f"{pre}.norm1.bias"])
        h = relu(x @ p[f"{pre}.linear1.weight"].T + p[f"{pre}.linear1.bias"])
        h = h @ p[f"{pre}.linear2.weight"].T + p[f"{pre}.linear2.bias"]
        return layer_norm(x + h, p[f"{pre}.norm2.weight"], p[f"{pre}.norm2.bias"])

    def f(p: Arrays, c: Arrays, ids: jnp.ndarray) -> jnp.ndarray:
        x = jnp.take(p["embed.weight"], ids, axis=0) + p["pos"]
        for i in layers:
            x = layer(p, x, f"encoder.layers.{i}")
        return x.mean(axis=1) @ p["head.weight"].T + p["head.bias"]

    return params, {}, lambda x: x, f


MODELS: dict[str, Callable[[dict[str, np.ndarray]], Built]] = {
    "tutorial-cnn": tutorial_cnn,
    "mlp": mlp,
    "resnet-bn": resnet_bn,
    "dwsep-cnn": dwsep_cnn,
    "embedding-bag": embedding_bag,
    "transformer": transformer,
}


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------
def load(workload: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Metadata and arrays of the cached workload."""
    path = data_path(workload)
    if not path.exists():
        raise FileNotFoundError(f"no cache for {workload}: run .venv/bin/python bench/reference.py {workload}")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta"))), arrays


def ntk_axes(mode: str) -> dict[str, tuple[int, ...]]:
    """neural-tangents trace/diagonal axes for a mode."""
    return {
        "full": {"trace_axes": (), "diagonal_axes": ()},
        "trace": {"trace_axes": (-1,), "diagonal_axes": ()},
        "diagonal": {"trace_axes": (), "diagonal_axes": (-1,)},
    }[mode]


def output_rel_diff(f: ApplyFn, params: Arrays, x1: jnp.ndarray, out1: np.ndarray) -> float:
    """max|f(x1) - torch_out| / max|torch_out|."""
    out = np.asarray(jax.jit(f)(params, x1), dtype=np.float64)
    return float(np.max(np.abs(out - out1)) / np.max(np.abs(out1)))


def measure(workload: str, method: str, repeats: int) -> dict[str, Any]:
    """The protocol for one pair; returns the JSON record's figures."""
    meta, arrays = load(workload)
    weights = {k[2:]: v for k, v in arrays.items() if k.startswith("w:")}
    params_np, consts_np, to_x, f3 = MODELS[meta["arch"]](weights)
    missing = set(meta["params"]) - set(params_np)
    if missing:
        raise RuntimeError(f"JAX model lacks torch parameters {sorted(missing)}")
    params = {k: jnp.asarray(v) for k, v in params_np.items() if k in meta["params"]}
    consts = {k: jnp.asarray(v) for k, v in consts_np.items()}
    x1 = jnp.asarray(to_x(arrays["x1"]))
    x2 = jnp.asarray(to_x(arrays["x2"])) if "x2" in arrays else None
    jax.block_until_ready((params, consts, x1, x2))

    def f(p: Arrays, x: jnp.ndarray) -> jnp.ndarray:
        return f3(p, consts, x)

    rss_setup = rss_mib()

    def start() -> tuple[Callable[[], jnp.ndarray], jnp.ndarray]:
        fn = jax.jit(nt.empirical_ntk_fn(
            f, vmap_axes=0, implementation=IMPLEMENTATIONS[method], **ntk_axes(meta["mode"])
        ))
        return (lambda: fn(x1, x2, params)), fn(x1, x2, params)

    scale = meta["n_out"] if meta["mode"] == "trace" else 1
    record = run_protocol(
        rss_after_setup=rss_setup,
        start=start,
        sync=jax.block_until_ready,
        to_numpy=lambda k: np.asarray(k, dtype=np.float64) * scale,
        reference=ref_path(workload),
        repeats=repeats,
    )
    # after the measurement: jitting the plain model must not count in it
    record["output_rel_diff"] = diff = output_rel_diff(f, params, x1, arrays["out1"])
    if diff > OUTPUT_RTOL:
        raise RuntimeError(f"JAX model output differs from torch's: rel diff {diff:.2e}")
    return record


def versions() -> dict[str, str]:
    """Versions of this environment."""
    import jaxlib

    return {"python": sys.version.split()[0], "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "neural_tangents": nt.__version__, "numpy": np.__version__}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description="one (workload, nt method) measurement")
    ap.add_argument("workload")
    ap.add_argument("method", choices=sorted(IMPLEMENTATIONS))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    context = {"workload": args.workload, "method": args.method,
               "repeats": args.repeats, "versions": versions()}
    return guarded(lambda: measure(args.workload, args.method, args.repeats), context)


if __name__ == "__main__":
    sys.exit(main())
