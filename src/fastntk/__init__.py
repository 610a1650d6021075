"""fastntk: exact empirical neural tangent kernels of PyTorch models, fast."""

from ._api import NTKFunction, ntk, ntk_fn, plan
from .plan import Plan
from ._heap import keep_freed_memory
from ._errors import FastNTKError, InputError, ModelError, NonFiniteError, OptionError, SelectionError
from .reference import reference_ntk
from .scale import ResumeError, gram

from ._version import __version__

__all__ = [
    "ntk",
    "ntk_fn",
    "NTKFunction",
    "plan",
    "Plan",
    "reference_ntk",
    "gram",
    "keep_freed_memory",
    "ResumeError",
    "FastNTKError",
    "InputError",
    "ModelError",
    "NonFiniteError",
    "OptionError",
    "SelectionError",
]
