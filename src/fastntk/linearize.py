"""Taylor expansions of a model around its parameters θ0, as trainable ``nn.Module``s: the
linearisation (degree 1) and higher degrees, by nested forward-mode AD."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.overrides import TorchFunctionMode

from ._errors import ModelError, OptionError
from ._options import is_positive_int
from ._torch_private import pytree
from .methods.per_sample import or_on_composite_kernels
from .methods.vp import forward_mode_kernels

Params = dict[str, torch.Tensor]


class TaylorExpanded(nn.Module):
    r"""f_k(θ, x) = Σ_{j=0..k} (1/j!) D^j f(θ0, x)[δ, …, δ] with δ = θ − θ0: the Taylor expansion
    of degree k of the model in its parameters (k = 1: f(θ0, x) + J(θ0, x) δ; k = 2 adds
    ½ δᵀ H(θ0, x) δ per output). θ are the parameters of ``self.module`` (a copy of the model,
    starting at θ0); θ0 is kept as buffers. The directional derivatives come from k nested
    forward-mode passes (``torch.func.jvp`` of ``jvp``: about 2^k forward passes' work, no
    Jacobian or Hessian formed); gradients with respect to θ flow through them, so any
    optimiser trains it like the model itself. Buffers (e.g. BatchNorm statistics) and
    train/eval mode are the copy's; in training mode, BatchNorm normalises by the batch's
    statistics at θ0 and updates the copy's running statistics with them. The floating tensors of the output are expanded; its other
    leaves (a Hugging Face key/value cache, integer tensors) are passed through as computed at θ0.

    Models with an operation that has no forward-mode derivative (e.g. ``weight_norm``'s
    ``_weight_norm_interface``, ``EmbeddingBag``), which ``method="vp"`` refuses: degree 1 falls
    back to a VJP of a VJP (reverse mode only, about three times the cost), degree 2 and more
    raise a :class:`ModelError` naming the operation.

    Args:
        model: the module to expand around its current parameters (not changed).
        degree: k >= 1.

    Raises:
        OptionError: a degree that is not a positive integer.
    """

    def __init__(self, model: nn.Module, degree: int = 1) -> None:
        super().__init__()
        if not is_positive_int(degree):
            raise OptionError(f"degree={degree!r}: a Taylor expansion has a positive integer degree (1: linearize, 2: quadratic)")
        self.degree = int(degree)
        try:
            self.module = copy.deepcopy(model)
        except RuntimeError as exc:
            raise ModelError(
                f"the model cannot be copied ({str(exc).splitlines()[0]}); the expansion trains a copy of it: "
                "replace torch.nn.utils.weight_norm by torch.nn.utils.parametrizations.weight_norm"
            ) from exc
        self._names = [name for name, p in self.module.named_parameters() if p.requires_grad]
        for i, name in enumerate(self._names):
            self.register_buffer(f"initial_{i}", self.module.get_parameter(name).detach().clone())

    def initial(self) -> dict[str, torch.Tensor]:
        """θ0, by parameter name."""
        return {name: getattr(self, f"initial_{i}") for i, name in enumerate(self._names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        theta0 = self.initial()
        if not theta0:  # nothing trainable: the expansion is the model
            return self.module(*args, **kwargs)
        delta = {name: self.module.get_parameter(name) - value for name, value in theta0.items()}
        structure: list[Any] = []  # the output's leaves and spec, as the innermost pass at θ0 computed them
        # a module in training mode may update its buffers (BatchNorm's statistics): the transforms refuse
        # in-place updates of captured tensors, so the pass updates copies made inside it, copied back after
        buffers = dict(self.module.named_buffers()) if any(m.training for m in self.module.modules()) else {}
        updated: dict[str, torch.Tensor] = {}

        def f(params: Params) -> tuple[torch.Tensor, ...]:
            """The output's floating tensors (what is expanded); caches, integers and the like aside."""
            updated.update({name: b.clone() for name, b in buffers.items()})
            leaves, spec = pytree.tree_flatten(functional_call(self.module, {**params, **updated}, args, kwargs))
            structure[:] = [leaves, spec]
            return tuple(t for t in leaves if expandable(t))

        # composite kernels where fused ones lack forward mode, as the vp method's
        with forward_mode_kernels(), (NormsFromTheirDefinition() if self.degree > 1 else contextlib.nullcontext()):
            try:
                terms = or_on_composite_kernels(lambda: derivatives(f, theta0, delta, self.degree))
            except NotImplementedError as exc:
                missing = str(exc).splitlines()[0]
                if self.degree > 1:
                    raise ModelError(
                        f"fastntk.taylor_expand(degree={self.degree}) needs forward-mode AD, which an operation of this model "
                        f"lacks ({missing}); degree 1 (fastntk.linearize) falls back to reverse mode for such models"
                    ) from exc
                terms = None
        if terms is None:
            terms = first_order_by_reverse_mode(f, theta0, delta, missing)
        with torch.no_grad():
            for name, b in buffers.items():
                b.copy_(updated[name])
        summed = iter([sum(term[i] / math.factorial(j) for j, term in enumerate(terms)) for i in range(len(terms[0]))])
        leaves, spec = structure
        return pytree.tree_unflatten([next(summed) if expandable(t) else unwrapped(t) for t in leaves], spec)


def expandable(t: Any) -> bool:
    """Whether an output leaf is expanded: a floating (or complex) tensor."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def unwrapped(value: Any) -> Any:
    """A leaf passed through from inside the forward-mode transforms, as a plain tensor if it is
    one (a copy made outside the transforms is one)."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def derivatives(f: Callable[[Params], Any], theta: Params, delta: Params, degree: int) -> list[Any]:
    """[f(θ), Df(θ)[δ], …, D^degree f(θ)[δ, …, δ]] by nested jvp: the derivatives up to k − 1
    are a function of θ, and one more jvp of that function along δ adds the k-th."""
    if degree == 0:
        return [f(theta)]
    lower, higher = jvp(lambda p: derivatives(f, p, delta, degree - 1), (theta,), (delta,))
    return [*lower, higher[-1]]


class NormsFromTheirDefinition(TorchFunctionMode):
    """Normalisations on statistics of their input, computed from their definition (mean, var,
    rsqrt) while a Taylor expansion of degree >= 2 runs: PyTorch's forward-mode rules for
    ``native_layer_norm`` and ``native_batch_norm`` on batch statistics are not themselves
    forward-differentiable (a jvp of their jvp gives wrong second derivatives, as of torch 2.13),
    whereas the composite ops' are. Values agree to rounding.

    Raises:
        ModelError: instance_norm with input statistics and running statistics to update.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return layer_norm_by_definition(*args, **kwargs)
        if func is F.batch_norm:
            bound = BATCH_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["training"] or a["running_mean"] is None:
                return batch_norm_by_definition(**a)
        if func is F.instance_norm:
            bound = INSTANCE_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["use_input_stats"]:
                if a["running_mean"] is not None:
                    raise ModelError(
                        "fastntk.taylor_expand(degree>=2) cannot expand InstanceNorm with track_running_stats=True in training "
                        "mode; call model.eval() or use degree 1"
                    )
                return normalized(a["input"], tuple(range(2, a["input"].dim())), a["weight"], a["bias"], a["eps"])
        return func(*args, **kwargs)


BATCH_NORM = inspect.signature(F.batch_norm)
INSTANCE_NORM = inspect.signature(F.instance_norm)


def normalized(x: torch.Tensor, dims: tuple[int, ...], weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over ``dims`` (biased variance), then the per-channel affine map (channels on dim 1)."""
    mean = x.mean(dims, keepdim=True)
    out = (x - mean) * torch.rsqrt((x - mean).square().mean(dims, keepdim=True) + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def layer_norm_by_definition(input: torch.Tensor, normalized_shape: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:  # noqa: A002
    """``F.layer_norm`` from mean and variance over the last ``len(normalized_shape)`` dims."""
    dims = tuple(range(-len(tuple(normalized_shape) if not isinstance(normalized_shape, int) else (normalized_shape,)), 0))
    mean = input.mean(dims, keepdim=True)
    out = (input - mean) * torch.rsqrt((input - mean).square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def batch_norm_by_definition(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float, eps: float) -> torch.Tensor:  # noqa: A002
    """``F.batch_norm`` on the batch's statistics, updating the running ones as it does (unbiased variance)."""
    dims = (0, *range(2, input.dim()))
    if running_mean is not None and running_var is not None and training:
        with torch.no_grad():
            count = input.numel() // input.shape[1]
            x = input.detach()
            running_mean.mul_(1 - momentum).add_(momentum * x.mean(dims))
            running_var.mul_(1 - momentum).add_(momentum * x.var(dims, correction=1 if count > 1 else 0))
    return normalized(input, dims, weight, bias, eps)


def first_order_by_reverse_mode(f: Callable[[Params], Any], theta0: Params, delta: Params, missing: str) -> list[Any]:
    """[f(θ0), J(θ0) δ] without forward mode, for models with an op that lacks it: u ↦ Jᵀu is
    linear in u, and J δ is the gradient in u of ⟨Jᵀu, δ⟩ (a VJP of a VJP, about three times a
    forward and backward pass), still differentiable in δ so that θ trains.

    Raises:
        ModelError: the operation lacking forward mode has no double backward either (named).
    """
    try:
        with torch.enable_grad():
            primals = {name: t.detach().requires_grad_() for name, t in theta0.items()}
            value = f(primals)
            outputs, spec = pytree.tree_flatten(value)
            cotangents = [torch.zeros_like(t, requires_grad=True) for t in outputs]
            pulled = torch.autograd.grad(outputs, list(primals.values()), cotangents, create_graph=True, allow_unused=True)
            inner = sum((g * d).sum() for g, d in zip(pulled, delta.values()) if g is not None)
            if not isinstance(inner, torch.Tensor):  # no output depends on θ
                tangents = [torch.zeros_like(t) for t in outputs]
            else:
                tangents = torch.autograd.grad(inner, cotangents, create_graph=True, allow_unused=True)
                tangents = [torch.zeros_like(t) if g is None else g for t, g in zip(outputs, tangents)]
    except (NotImplementedError, RuntimeError) as exc:
        raise ModelError(
            f"fastntk.linearize needs forward-mode AD or a double backward, and an operation of this model has neither "
            f"({missing}; then {str(exc).splitlines()[0]}); its kernel is still computed by fastntk.ntk(method='jacobian')"
        ) from exc
    return [pytree.tree_unflatten([t.detach() for t in outputs], spec), pytree.tree_unflatten(list(tangents), spec)]


class Linearized(TaylorExpanded):
    """f_lin(θ, x) = f(θ0, x) + J(θ0, x)(θ − θ0): the :class:`TaylorExpanded` model of degree 1.

    Args:
        model: the module to linearise around its current parameters (not changed).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, 1)


def linearize(model: nn.Module) -> Linearized:
    """The first-order Taylor expansion of ``model`` around its current parameters, as a module
    whose parameters start there (the model itself is not changed).

    Args:
        model: the module to linearise.

    Returns:
        A :class:`Linearized` module, called like the model.

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> lin = fastntk.linearize(net)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(lin(x), net(x))
        True
    """
    return Linearized(model)


def taylor_expand(model: nn.Module, degree: int) -> TaylorExpanded:
    r"""The Taylor expansion of ``model`` of ``degree`` around its current parameters θ0, as a
    module whose parameters start there (neural-tangents' ``taylor_expand``, as a module):
    degree 1 is :func:`linearize`, degree 2 adds ½ δᵀ H δ (H the Hessian of each output in the
    parameters, δ = θ − θ0) from a jvp of a jvp, never forming H.

    Args:
        model: the module to expand (not changed).
        degree: the degree k >= 1; the cost of a call grows like 2^k forward passes.

    Returns:
        A :class:`TaylorExpanded` module (a :class:`Linearized` for degree 1), called like the model.

    Raises:
        OptionError: a degree that is not a positive integer.

    Example:
        >>> import torch, fastntk
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> quadratic = fastntk.taylor_expand(net, 2)
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(quadratic(x), net(x))
        True
    """
    if degree == 1 and not isinstance(degree, bool):
        return Linearized(model)
    return TaylorExpanded(model, degree)
