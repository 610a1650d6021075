"""A stateless view of an ``nn.Module``: f(θ, x) -> outputs (N, O), without touching the module."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call
from ._torch_private import pytree

from ._errors import InputError, ModelError, NonFiniteError, SelectionError
from ._inputs import Batch, batch_size, call_model, map_leaves
from ._process import using_module

ParamSelection = Union[None, Sequence[str], Callable[[str, nn.Parameter], bool]]
Params = dict[str, torch.Tensor]


def flatten_output(out: Any, n: int) -> torch.Tensor:
    """Outputs of a batch of n samples as an (n, O) matrix.

    Every tensor leaf of the output (tensor, tuple/list by position, dict in
    insertion order) is flattened per sample and the pieces are concatenated. A Hugging
    Face ``ModelOutput`` counts by its ``logits`` when it has them, else by its tensor
    fields in order (None fields are absent from it; caches, loss and the like are not outputs).
    """
    if is_model_output(out):
        out = out["logits"] if "logits" in out else [v for v in out.values() if isinstance(v, torch.Tensor)]
    flat = pytree.tree_leaves(out)
    if not flat or not all(isinstance(t, torch.Tensor) for t in flat):
        raise ModelError(
            f"the model returned {type(out).__name__}: it must return a tensor, or a tuple/list/dict of tensors, batched on dim 0"
        )
    for t in flat:
        if t.dim() == 0 or t.shape[0] != n:
            raise ModelError(
                f"the model returned an output of shape {tuple(t.shape)} for a batch of {n}: every output must be "
                "batched on dim 0 (one row per sample); a model that reduces over the batch has no per-sample NTK"
            )
        if not (t.is_floating_point() or t.is_complex()):
            raise ModelError(f"the model returned a {t.dtype} output: outputs must be floating point to be differentiated")
    return torch.cat([t.reshape(n, -1) for t in flat], dim=1)


def is_model_output(out: Any) -> bool:
    """Whether ``out`` is a Hugging Face transformers ``ModelOutput`` (detected without importing transformers)."""
    return isinstance(out, Mapping) and any(
        c.__name__ == "ModelOutput" and c.__module__.startswith("transformers.") for c in type(out).__mro__
    )


def select_parameters(model: nn.Module, params: ParamSelection) -> list[str]:
    """Canonical names of the parameters that count (tied weights appear once).

    Args:
        model: the module.
        params: None (every parameter with requires_grad=True), a list of names
            (aliases of tied weights accepted), or a predicate ``(name, parameter) -> bool``.

    Raises:
        SelectionError: an unknown name, a malformed selection, or an empty selection.
    """
    canonical = dict(model.named_parameters())
    alias = {name: _canonical_name(canonical, p) for name, p in model.named_parameters(remove_duplicate=False)}
    if not canonical:
        raise SelectionError("the model has no parameters, so its NTK is empty: pass a model with parameters to differentiate")
    if params is None:
        chosen = [name for name, p in canonical.items() if p.requires_grad]
        if not chosen:
            raise SelectionError("no parameter of the model has requires_grad=True: pass params=[names] to choose some")
        return chosen
    if callable(params):
        chosen = [name for name, p in canonical.items() if params(name, p)]
        if not chosen:
            raise SelectionError(f"the params predicate matched none of the model's {len(canonical)} parameters: check it against model.named_parameters()")
        return chosen
    if isinstance(params, str) or not isinstance(params, Iterable):
        raise SelectionError("params must be None, a list of parameter names, or a predicate (name, parameter) -> bool")
    chosen: list[str] = []
    for name in params:
        if name not in alias:
            close = difflib.get_close_matches(str(name), list(alias), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "; see model.named_parameters()"
            raise SelectionError(f"the model has no parameter named {name!r}{hint}")
        if alias[name] not in chosen:
            chosen.append(alias[name])
    if not chosen:
        raise SelectionError("params is an empty list: name at least one parameter, or pass None for all")
    return chosen


def _canonical_name(canonical: Mapping[str, nn.Parameter], p: nn.Parameter) -> str:
    for name, q in canonical.items():
        if q is p:
            return name
    raise AssertionError("unreachable: every parameter has a canonical name")


def model_device_dtype(model: nn.Module, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device of the model's tensors and the floating dtype the kernel is computed in."""
    tensors = list(model.parameters()) + list(model.buffers())
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ModelError(f"the model's tensors are on several devices {sorted(map(str, devices))}: move the whole model to one device")
    if any(device.type == "meta" for device in devices):
        raise ModelError(
            "the model's tensors are on the meta device, which holds shapes but no values, so there is no kernel to "
            "compute: materialize it first (e.g. model.to_empty(device='cpu'), then load or initialize its weights)"
        )
    floating = {t.dtype for t in tensors if t.is_floating_point()}
    if dtype is None:
        if len(floating) > 1:
            raise ModelError(f"the model mixes floating dtypes {sorted(map(str, floating))}: pass dtype= to compute in one of them")
        dtype = floating.pop() if floating else torch.get_default_dtype()
    elif not dtype.is_floating_point:
        raise InputError(f"dtype={dtype} is not a floating dtype: use e.g. torch.float32 or torch.float64")
    return devices.pop(), dtype


@dataclass
class FunctionalModel:
    """f(θ, x): the module as a pure function of the selected parameters θ.

    Attributes:
        module: the wrapped module, never modified.
        primals: the selected parameters θ (detached, in ``dtype``), by canonical name.
        constants: every other parameter and buffer (detached, in ``dtype``).
        device, dtype: where and in which floating dtype the kernel is computed.
        batchable: whether vmap can batch the model over samples (set by the probe; when
            not, per-sample Jacobians come from one pass per sample, see ``methods.per_sample``).
    """

    module: nn.Module
    primals: Params
    constants: Params
    device: torch.device
    dtype: torch.dtype
    batchable: bool = True

    @classmethod
    def build(cls, module: nn.Module, params: ParamSelection = None, dtype: torch.dtype | None = None) -> "FunctionalModel":
        """Select the parameters and detach every tensor of the module (cast to ``dtype`` if given)."""
        if not isinstance(module, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(module).__name__}")
        with using_module(module):  # not while another thread's functional_call swaps its tensors
            names = select_parameters(module, params)
            device, dtype = model_device_dtype(module, dtype)
            cast = lambda t: t.detach().to(dtype) if t.is_floating_point() else t.detach()  # noqa: E731
            named = dict(module.named_parameters())
            primals = {name: cast(named[name]) for name in names}
            constants = {name: cast(p) for name, p in named.items() if name not in primals}
            constants.update({name: cast(b) for name, b in module.named_buffers()})
        return cls(module, primals, constants, device, dtype)

    @property
    def num_params(self) -> int:
        """P, the number of scalar parameters that count."""
        return sum(p.numel() for p in self.primals.values())

    def restrict(self, names: list[str]) -> "FunctionalModel":
        """The same model as a function of the primals ``names`` only (the others held constant)."""
        kept = {name: self.primals[name] for name in names}
        held = {name: t for name, t in self.primals.items() if name not in kept}
        return FunctionalModel(self.module, kept, {**self.constants, **held}, self.device, self.dtype, self.batchable)

    def check_finite_params(self) -> None:
        """Raise NonFiniteError naming the first parameter or buffer holding NaN or inf.

        One sum per tensor and one synchronisation when all are finite (a finite total proves
        it: any NaN or inf makes it NaN or inf); only a total that is not finite, by overflow
        or a bad entry, is followed by the tensor-by-tensor test that names the culprit.
        """
        named = [
            (kind, name, t)
            for kind, tensors in (("parameter", self.primals), ("parameter/buffer", self.constants))
            for name, t in tensors.items()
            if t.is_floating_point()
        ]
        if not named or bool(torch.isfinite(torch.stack([t.sum() for _, _, t in named]).sum())):
            return
        for kind, name, t in named:
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"{kind} {name!r} contains NaN or inf: fix the model's weights first")

    def __call__(self, primals: Params, x: Batch) -> torch.Tensor:
        """Outputs (N, O) of the batch x with parameters ``primals``."""
        n = pytree.tree_leaves(x)[0].shape[0]
        tensors = {**self.constants, **primals}
        with using_module(self.module):  # functional_call swaps the module's tensors while it runs
            out = call_model(lambda *a, **k: functional_call(self.module, tensors, a, k), x)
        return flatten_output(out, n)

    def single(self, primals: Params, x: Batch) -> torch.Tensor:
        """Outputs (O,) of one sample x (no batch dim), for use under vmap."""
        return self(primals, map_leaves(lambda t: t.unsqueeze(0), x))[0]


def activation_bytes(f: FunctionalModel, x: Batch) -> int:
    """Bytes the forward pass of one sample saves for its backward (parameters and buffers not
    counted), measured on the batch ``x``: the activations a block holds per sample, which
    :class:`fastntk.NTKOperator`'s products and :func:`fastntk.nngp`'s blocks budget for."""
    own = {t.untyped_storage().data_ptr() for t in (*f.primals.values(), *f.constants.values())}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in own:
            saved += t.numel() * t.element_size()
        return t

    primals = {name: t.detach().requires_grad_() for name, t in f.primals.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(primals, x)
    return -(-saved // batch_size(x))
