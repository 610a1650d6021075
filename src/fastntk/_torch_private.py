"""Every private or undocumented PyTorch API fastntk uses, each behind a fallback.

The rest of the library calls only what this module exports. Each private API is a
:class:`PrivateAPI`: true when it is present in this PyTorch and works (probed once, on
first use), and not switched off. When it is false, the function that wraps it runs a
fallback made of public APIs that computes the same kernel, possibly slower:

- ``torch.ops.mkldnn._linear_pointwise`` (:data:`ONEDNN_LINEAR`): float32 CPU GEMMs by
  oneDNN (:mod:`._gemm`). Fallback ``F.linear``, PyTorch's GEMM (MKL: slower on AMD
  processors, the same elsewhere).
- ``Tensor._version`` (:data:`VERSION_COUNTERS`): in-place writes to a model's inputs (refused)
  and over what the structured method recorded. Fallback: the inputs are compared by value
  with a copy; the structured method records copies of the layers' inputs and outputs (one
  copy each per block) and leaves a chain of activations to autograd (no reverse pass of its own).
- ``aten.threshold_backward``, ``aten.tanh_backward``, ``aten.sigmoid_backward`` and their
  ``.grad_input`` (out=) overloads (:data:`FUSED_ACTIVATION_BACKWARD`): a chain's activations,
  backward from their outputs. Fallback: grad · f'(y) (a temporary of the output's size).
- ``aten.convolution_backward`` (:data:`CONVOLUTION_BACKWARD`): per-sample weight Jacobians of
  convolutions. Fallback: autograd through the convolution (one more forward convolution).
- ``torch.utils._pytree`` (:data:`PYTREE`): flattening batches and outputs. Fallback: a
  flattener of tuples, lists and dicts (namedtuples and dict subclasses included); containers
  registered with torch's (Hugging Face's model outputs are dicts) become leaves.

Public APIs replace what they can: oneDNN's switch is ``torch.backends.mkldnn.enabled``
(not ``torch._C._set_mkldnn_enabled``), BatchNorm is recognised by its public classes (not
``nn.modules.batchnorm._BatchNorm``).

The environment variable ``FASTNTK_TORCH_FALLBACKS`` switches fallbacks on for a whole
process: ``all``, or names separated by commas (``onednn_linear,pytree``); tests switch one
off with ``monkeypatch.setattr(ONEDNN_LINEAR, "off", True)``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

try:
    from torch.utils import _pytree as _torch_pytree
except ImportError:  # pragma: no cover - a PyTorch without it: the fallback
    _torch_pytree = None  # type: ignore[assignment]

_OFF = {name.strip() for name in os.environ.get("FASTNTK_TORCH_FALLBACKS", "").split(",") if name.strip()}


class PrivateAPI:
    """One private PyTorch API: true when present, working, and not switched ``off``."""

    def __init__(self, name: str, probe: Callable[[], object]) -> None:
        self.name = name
        self.probe = probe
        self.off = name in _OFF or "all" in _OFF
        """Forced to the fallback (tests, ``FASTNTK_TORCH_FALLBACKS``)."""

    @functools.cached_property
    def present(self) -> bool:
        """Whether this PyTorch has it and it passes its probe (asked once)."""
        try:
            return bool(self.probe())
        except Exception:  # noqa: BLE001 - missing or changed: whatever it raises, use the fallback
            return False

    def __bool__(self) -> bool:
        return not self.off and self.present

    def __repr__(self) -> str:
        return f"PrivateAPI({self.name!r}, {'used' if self else 'fallback'})"


# ------------------------------------------------------------------ oneDNN GEMM


def _probe_onednn_linear() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(s, generator=gen) for s in ((5, 7), (7, 3), (3,)))
    return bool(torch.allclose(torch.ops.mkldnn._linear_pointwise(a, b.T, c, "none", [], ""), torch.addmm(c, a, b), rtol=1e-5, atol=1e-5))


ONEDNN_LINEAR = PrivateAPI("onednn_linear", _probe_onednn_linear)
"""``torch.ops.mkldnn._linear_pointwise`` (the op ``torch.compile`` emits for CPU linear
layers): present, and right on a small case."""


def onednn_linear(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ b_tᵀ (+ bias), 2-D float32 CPU tensors: by oneDNN, else ``F.linear`` (PyTorch's GEMM).
    No autograd formula either way that callers may rely on: call it on tensors not to be
    differentiated."""
    if ONEDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")
    return F.linear(a, b_t, bias)


# ------------------------------------------------------------------ version counters


def _probe_version_counters() -> bool:
    t = torch.zeros(1)
    before = t._version
    t.add_(1)
    return isinstance(before, int) and t._version > before


VERSION_COUNTERS = PrivateAPI("version_counters", _probe_version_counters)
"""``Tensor._version``: present, and moved by an in-place op."""


def version(t: torch.Tensor) -> int | None:
    """t's version counter (moved by every in-place write to t or a view of its storage), or
    None without :data:`VERSION_COUNTERS`: callers then must not trust t to be unchanged."""
    return t._version if VERSION_COUNTERS else None


def versions(tensors: Sequence[torch.Tensor]) -> tuple[int | None, ...]:
    """:func:`version` of each tensor (asks for the counters once: the structured method's
    recorder calls it on every op's inputs)."""
    if VERSION_COUNTERS:
        return tuple(t._version for t in tensors)
    return (None,) * len(tensors)


def unchanged(t: torch.Tensor, recorded: int | None) -> bool:
    """Whether t has not been written in place since its version was ``recorded`` (False when
    that is unknown: no version was recorded, or there are no counters)."""
    return recorded is not None and bool(VERSION_COUNTERS) and t._version == recorded


# ------------------------------------------------------------------ fused backward kernels


def _probe_fused_activation_backward() -> bool:
    aten = torch.ops.aten
    y = torch.tensor([-1.0, 0.5])
    g = torch.tensor([2.0, 3.0])
    out = torch.empty(2)
    aten.threshold_backward.grad_input(g, y, 0, grad_input=out)
    return (
        torch.equal(out, torch.tensor([0.0, 3.0]))
        and torch.allclose(aten.tanh_backward.grad_input(g, y, grad_input=torch.empty(2)), g * (1 - y * y))
        and torch.allclose(aten.sigmoid_backward.grad_input(g, y, grad_input=torch.empty(2)), g * y * (1 - y))
    )


FUSED_ACTIVATION_BACKWARD = PrivateAPI("fused_activation_backward", _probe_fused_activation_backward)
"""``aten.threshold_backward``, ``aten.tanh_backward``, ``aten.sigmoid_backward`` and their
``.grad_input`` (out=) overloads."""


def activation_backward(kind: str, grad: torch.Tensor, output: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The cotangents of a ReLU's, tanh's or sigmoid's (``kind``) input from those of its
    output, ``grad``, and the output itself (broadcast against ``grad``); written over
    ``grad`` when ``in_place``. By PyTorch's fused backward kernels, else as grad · f'(y)."""
    if FUSED_ACTIVATION_BACKWARD:
        kernel, extra = _fused_backward_kernels()[kind]
        return kernel.grad_input(grad, output, *extra, grad_input=grad) if in_place else kernel(grad, output, *extra)
    if kind == "relu":  # as threshold_backward: 0 where y <= 0, grad elsewhere (NaN y included)
        return grad.masked_fill_(output <= 0, 0) if in_place else grad.masked_fill(output <= 0, 0)
    derivative = 1 - output * output if kind == "tanh" else (1 - output) * output
    return grad.mul_(derivative) if in_place else grad * derivative


@functools.cache
def _fused_backward_kernels() -> dict[str, tuple[Any, tuple]]:
    """The fused kernels by activation, and their extra arguments (ReLU's threshold)."""
    aten = torch.ops.aten
    return {"relu": (aten.threshold_backward, (0,)), "tanh": (aten.tanh_backward, ()), "sigmoid": (aten.sigmoid_backward, ())}


def _probe_convolution_backward() -> bool:
    x, g = torch.ones(1, 1, 3), torch.ones(1, 1, 2)
    _, grad_weight, _ = torch.ops.aten.convolution_backward(g, x, torch.zeros(1, 1, 2), None, [1], [0], [1], False, [0], 1, [False, True, False])
    return torch.equal(grad_weight, torch.full((1, 1, 2), 2.0))


CONVOLUTION_BACKWARD = PrivateAPI("convolution_backward", _probe_convolution_backward)
"""``aten.convolution_backward`` (a core ATen op, not documented as a Python API)."""

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def convolution_weight_grad(
    grad: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> torch.Tensor:
    """∂⟨grad, conv(x, W)⟩/∂W, of ``weight_shape``, for a 1d/2d/3d convolution with these
    options: by the convolution's weight backward, else by autograd through it (one more
    forward convolution)."""
    if CONVOLUTION_BACKWARD:
        weight = x.new_zeros(()).expand(*weight_shape)  # only its shape is read
        dims = x.dim() - 2
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, list(stride), list(padding), list(dilation), False, [0] * dims, groups, [False, True, False]
        )
        return grad_weight
    with torch.enable_grad():
        weight = x.new_zeros(weight_shape, requires_grad=True)  # the conv is linear in it: any value
        y = _CONVOLUTIONS[x.dim() - 2](x.detach(), weight, None, tuple(stride), tuple(padding), tuple(dilation), groups)
        return torch.autograd.grad(y, weight, grad)[0]


# ------------------------------------------------------------------ pytrees


def _probe_pytree() -> bool:
    t = torch.zeros(1)
    flat, spec = _torch_pytree.tree_flatten({"a": (t, [t])})
    return len(flat) == 2 and _torch_pytree.tree_unflatten(flat, spec)["a"][1][0] is t


PYTREE = PrivateAPI("pytree", _probe_pytree)
"""``torch.utils._pytree`` (what ``torch.func`` flattens with; also knows containers that
libraries register, such as Hugging Face's model outputs)."""


@dataclass(frozen=True)
class TreeSpec:
    """The fallback's structure of a pytree: a container type, its keys (dicts) and children; a leaf has no type."""

    type: type | None = None
    keys: tuple = ()
    children: tuple[TreeSpec, ...] = ()


_LEAF = TreeSpec()


def _flatten(x: Any, flat: list[Any]) -> TreeSpec:
    if isinstance(x, (tuple, list)):
        return TreeSpec(type(x), (), tuple(_flatten(c, flat) for c in x))
    if isinstance(x, dict):
        return TreeSpec(type(x), tuple(x), tuple(_flatten(v, flat) for v in x.values()))
    flat.append(x)
    return _LEAF


def _build(spec: TreeSpec, leaves: Iterator[Any]) -> Any:
    if spec.type is None:
        return next(leaves)
    children = [_build(c, leaves) for c in spec.children]
    if issubclass(spec.type, dict):
        try:
            return spec.type(zip(spec.keys, children))
        except TypeError:  # a dict subclass that cannot be built from pairs
            return dict(zip(spec.keys, children))
    if issubclass(spec.type, tuple) and hasattr(spec.type, "_fields"):  # a namedtuple
        return spec.type(*children)
    return spec.type(children)


class _Pytree:
    """``torch.utils._pytree``'s functions the library uses, or the fallback's (tuples, lists
    and dicts, namedtuples and dict subclasses included; anything else is a leaf)."""

    TreeSpec = Any

    @staticmethod
    def tree_flatten(x: Any) -> tuple[list[Any], Any]:
        if PYTREE:
            return _torch_pytree.tree_flatten(x)
        flat: list[Any] = []
        return flat, _flatten(x, flat)

    @staticmethod
    def tree_unflatten(leaves: Sequence[Any], spec: Any) -> Any:
        if isinstance(spec, TreeSpec):
            return _build(spec, iter(leaves))
        return _torch_pytree.tree_unflatten(leaves, spec)

    @staticmethod
    def tree_leaves(x: Any) -> list[Any]:
        if PYTREE:
            return _torch_pytree.tree_leaves(x)
        flat: list[Any] = []
        _flatten(x, flat)
        return flat

    @staticmethod
    def tree_structure(x: Any) -> Any:
        return _Pytree.tree_flatten(x)[1]

    @staticmethod
    def tree_map(fn: Callable[[Any], Any], x: Any) -> Any:
        if PYTREE:
            return _torch_pytree.tree_map(fn, x)
        flat, spec = _Pytree.tree_flatten(x)
        return _build(spec, iter([fn(leaf) for leaf in flat]))


pytree = _Pytree()
"""Use as ``pytree.tree_leaves(x)`` (``tree_flatten``, ``tree_unflatten``, ``tree_map``,
``tree_structure``)."""
