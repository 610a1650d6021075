"""fastntk: exact empirical neural tangent kernels of PyTorch models, fast."""

# torch.autograd.grad imports this (and sympy) lazily on its first call with grad_outputs,
# which every method makes: load it with the package, not in the middle of the first kernel.
import torch.fx.experimental.symbolic_shapes  # noqa: F401

from ._api import NTKFunction, ntk, ntk_fn, plan
from .plan import Plan
from ._errors import FastNTKError, InputError, ModelError, NonFiniteError, OptionError, SelectionError
from .reference import reference_ntk
from .scale import ResumeError, gram

__version__ = "0.1.0"

__all__ = [
    "ntk",
    "ntk_fn",
    "NTKFunction",
    "plan",
    "Plan",
    "reference_ntk",
    "gram",
    "ResumeError",
    "FastNTKError",
    "InputError",
    "ModelError",
    "NonFiniteError",
    "OptionError",
    "SelectionError",
]
