"""fastntk: exact empirical neural tangent kernels of PyTorch models, fast.

    ntk(model, x1, x2=None, *, mode="full", ...)      the kernel, in memory
    ntk_fn(model, *, mode="full", ...)                 the same as a reusable function of (x1, x2)
    gram(model, x1, x2=None, *, out=None, ...)         the same for datasets: on disk, resumable, over ranks
    plan(model, x1, x2=None, ...)                      what each method would cost, and the choice
    reference_ntk(model, x1, x2=None, ...)             the brute-force float64 kernel, to check against
    predict.kernel_ridge / gradient_descent_mse / gp_inference / max_learning_rate   using a kernel
    linearize(model)                                   f(θ0, x) + J(θ0, x)(θ − θ0) as a trainable module
    self_ntk(model, x, *, mode="full", ...)            K(x_i, x_i) for each sample alone
    analysis / plots / layout                          spectra, ranks, alignments; their plots; 2-D and neural-tangents layouts
    NTKOperator(model, x1, x2=None, ...)               Θ as a matrix-free linear operator (operator.solve / top_eigenvalues / trace_estimate)
    KernelTracker(model, probe_x, *, every=1, ...)     the kernel during training: distance from init, velocity
    taylor_expand(model, degree)                       the degree-k Taylor expansion in θ as a trainable module
    nngp(model, x1, x2=None, *, mode=None, layer=None) the empirical NNGP: outputs' or a layer's inner products
    monte_carlo(kernel, model_factory, x1, ...)        a kernel's mean and standard error over seeded initialisations
    layer_ntk(model, x1, x2=None, *, groups="module")  {group: Θ_g = J_g J_gᵀ}, summing to Θ, in one pass
    weighted_ntk(model, x1, x2=None, *, weights=...)   J Λ Jᵀ = Σ_g λ_g Θ_g (per-layer prior variances)
"""

from ._api import NTKFunction, ntk, ntk_fn, plan
from ._errors import FastNTKError, InputError, ModelError, NonFiniteError, OptionError, SelectionError
from . import analysis, layout, operator, plots, predict
from ._heap import keep_freed_memory
from .blocks.schedule import Block
from .linearize import Linearized, TaylorExpanded, linearize, taylor_expand
from .monte_carlo import MonteCarloKernel, monte_carlo
from .nngp import nngp
from .plan import Plan
from .reference import reference_ntk
from .self_kernel import self_ntk
from .operator import NTKOperator
from .tracking import KernelHistory, KernelTracker
from .layer_kernel import layer_ntk, parameter_groups, weighted_ntk
from .scale import LockedError, ResumeError, gram

from ._version import __version__

__all__ = [
    "ntk",
    "ntk_fn",
    "NTKFunction",
    "gram",
    "plan",
    "Plan",
    "predict",
    "analysis",
    "layout",
    "plots",
    "linearize",
    "self_ntk",
    "NTKOperator",
    "operator",
    "layer_ntk",
    "weighted_ntk",
    "parameter_groups",
    "Linearized",
    "KernelTracker",
    "KernelHistory",
    "taylor_expand",
    "TaylorExpanded",
    "nngp",
    "monte_carlo",
    "MonteCarloKernel",
    "Block",
    "reference_ntk",
    "keep_freed_memory",
    "FastNTKError",
    "InputError",
    "ModelError",
    "NonFiniteError",
    "OptionError",
    "SelectionError",
    "ResumeError",
    "LockedError",
    "__version__",
]
