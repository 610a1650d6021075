"""Fingerprints: what a kernel on disk was computed from, so a resumed run can be checked against it.

A fingerprint is a dict of named sha256 digests and settings:

* ``model``: the class, every parameter and buffer (name, dtype, shape, bytes, as the kernel
  sees them: cast to the compute dtype), which parameters are differentiated, and the
  train/eval flag of every submodule. The model's *code* is not hashed; its class name is.
* ``x1``, ``x2``: every sample as the model receives it (after ``select``, floating tensors
  cast to the compute dtype), streamed in chunks; the same values hash alike however they are
  given (tensor, array, .npy file) and read (chunk size, memory budget).
* ``settings``: mode, compute dtype, N1, N2, O, fastntk's version.

Together they are what fixes the kernel's values: a resumed run must match them. The plan
(method, block size, the structured method's calibration) is stored beside them but may change
on resume (a smaller budget, another method): it changes the result only by float rounding.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .._functional import FunctionalModel
from ..sources import Source, tensor_bytes

LABELS = {
    "model": "the model (its weights, buffers, parameter selection or train/eval mode)",
    "x1": "the inputs x1",
    "x2": "the inputs x2",
    "settings": "the settings",
}


def model_digest(f: FunctionalModel) -> str:
    """sha256 of the model as a function: class, tensors, selection, train/eval flags."""
    module = f.module
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    h.update(("selected:" + ",".join(f.primals)).encode())
    h.update(("training:" + "".join("1" if m.training else "0" for m in module.modules())).encode())
    tensors = {**f.constants, **f.primals}
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def fingerprint(f: FunctionalModel, x1: Source, x2: Source | None, settings: dict[str, Any], chunk_bytes: int) -> dict[str, Any]:
    """The fingerprint of a kernel computation (see the module docstring)."""
    return {
        "model": model_digest(f),
        "x1": x1.digest(chunk_bytes, f.dtype),
        "x2": None if x2 is None else x2.digest(chunk_bytes, f.dtype),
        "settings": dict(settings),
    }


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable descriptions of what differs between two fingerprints."""
    out = []
    for key, label in LABELS.items():
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            changed = [f"{k}: {a.get(k)!r} then, {b.get(k)!r} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"the settings ({'; '.join(changed)})")
        else:
            out.append(label)
    return out
