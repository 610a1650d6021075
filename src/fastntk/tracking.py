"""The NTK during training: the kernel on a fixed probe set every k optimiser steps, and how far
it has moved (from the initial kernel, and since the last record)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from ._api import ntk_fn
from ._errors import InputError, OptionError
from ._functional import ParamSelection
from ._options import is_positive_int
from .analysis import kernel_distance
from .blocks.budget import DEFAULT_MAX_MEMORY


@dataclass
class KernelHistory:
    """What a :class:`KernelTracker` recorded, one entry per recorded kernel K_t (aligned lists;
    the first entry is the initial kernel K_0 at step 0). A distance from a zero kernel (e.g.
    of a network whose ReLU units all died) is undefined: NaN in ``distance`` and ``velocity``
    where K_t or the previous record K_s is zero, in ``relative_velocity`` where K_s is.

    Attributes:
        steps: the optimiser step t of each record.
        distance: the kernel distance of Fort et al. (2020) from K_0,
            1 − ⟨K_0, K_t⟩_F / (‖K_0‖_F ‖K_t‖_F) (:func:`fastntk.analysis.kernel_distance`);
            0 at step 0.
        relative_change: ‖K_t − K_0‖_F / ‖K_0‖_F; 0 at step 0.
        velocity: the kernel distance between K_t and the previous record K_s, per step:
            d(K_s, K_t) / (t − s) (Fort et al.'s kernel velocity); NaN at step 0.
        relative_velocity: ‖K_t − K_s‖_F / ‖K_s‖_F / (t − s); NaN at step 0.
        norm: ‖K_t‖_F.
        seconds: the wall-clock time each kernel took to compute.
        kernels: every recorded kernel (on the CPU, in the compute dtype) when the tracker
            keeps them, else None.
    """

    steps: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)
    relative_change: list[float] = field(default_factory=list)
    velocity: list[float] = field(default_factory=list)
    relative_velocity: list[float] = field(default_factory=list)
    norm: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    kernels: list[torch.Tensor] | None = None

    SERIES: ClassVar[tuple[str, ...]] = ("distance", "relative_change", "velocity", "relative_velocity", "norm", "seconds")
    """The per-record numbers (besides ``steps``)."""

    def __len__(self) -> int:
        return len(self.steps)

    def as_dict(self) -> dict[str, list[Any]]:
        """The steps and every series as plain lists for ``json.dump`` (NaN as None; no kernels)."""
        out: dict[str, list[Any]] = {"steps": list(self.steps)}
        for name in self.SERIES:
            out[name] = [None if math.isnan(v) else v for v in getattr(self, name)]
        return out


class KernelTracker:
    """The empirical NTK of ``model`` on a fixed probe set, recorded every ``every`` optimiser
    steps, with its distance from the initial kernel and its velocity (:class:`KernelHistory`).

    The initial kernel K_0 is computed when the tracker is made (step 0). Then either attach
    it to an optimiser, which counts every ``optimizer.step()`` (a step post-hook, removed by
    :meth:`detach` or on leaving a ``with`` block), or call :meth:`step` after each update in a
    loop of your own. One :func:`fastntk.ntk_fn` serves every record: the method is chosen
    (``method="auto"``: the cheapest) and calibrated once, and each record reads the model's
    parameters as they are then.

    Recording leaves the training run as it was: no autograd graph, ``.grad``, random-number
    state or train/eval flag is changed (with ``eval_mode=True`` the kernel is computed with
    every module's flag set to eval and each flag restored afterwards).

    Args:
        model: the ``nn.Module`` being trained.
        probe_x: the N probe samples, in any form :func:`fastntk.ntk` takes (kept, not
            copied: do not modify them in place while tracking).
        every: record the kernel after every ``every``-th step (a positive int).
        mode: the kernel's mode, as for :func:`fastntk.ntk`: "full" (N, N, O, O), "trace"
            or "trace_mean" (N, N), "diagonal" (N, N, O).
        keep_kernels: keep every recorded kernel in ``history.kernels`` (on the CPU);
            otherwise only K_0 and the latest are held.
        eval_mode: compute each kernel with every module in eval mode (dropout off,
            BatchNorm on its running statistics; each module's flag is restored after),
            so that the kernel is defined while the model trains; False: as the model is.
        method: as for :func:`fastntk.ntk` (default "auto": the cheapest, chosen once).
        params: as for :func:`fastntk.ntk`.
        dtype: as for :func:`fastntk.ntk`.
        block_size: as for :func:`fastntk.ntk`.
        max_memory: as for :func:`fastntk.ntk`.
        check: as for :func:`fastntk.ntk`.

    Raises:
        OptionError: ``every`` not a positive int, ``keep_kernels``/``eval_mode`` not a
            bool, or a bad kernel option.
        FastNTKError: as :func:`fastntk.ntk`, for the model and the probe set.
        InputError: an initial kernel that is zero (no distance from it is defined).

    Example:
        >>> import torch, fastntk
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> x, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with fastntk.KernelTracker(net, x[:8], every=5, mode="trace").attach(optimizer) as tracker:
        ...     for _ in range(20):
        ...         optimizer.zero_grad()
        ...         torch.nn.functional.mse_loss(net(x), y).backward()
        ...         optimizer.step()
        >>> tracker.history.steps
        [0, 5, 10, 15, 20]
    """

    def __init__(
        self,
        model: nn.Module,
        probe_x: Any,
        *,
        every: int = 1,
        mode: str = "full",
        keep_kernels: bool = False,
        eval_mode: bool = True,
        method: str = "auto",
        params: ParamSelection = None,
        dtype: torch.dtype | None = None,
        block_size: int | None = None,
        max_memory: int | str = DEFAULT_MAX_MEMORY,
        check: bool = True,
    ) -> None:
        """Compute the initial kernel K_0 = K(probe_x, probe_x) (step 0); see the class for the arguments."""
        if not is_positive_int(every):
            raise OptionError(f"every={every!r}: give a positive number of optimiser steps between records")
        for name, flag in (("keep_kernels", keep_kernels), ("eval_mode", eval_mode)):
            if not isinstance(flag, bool):
                raise OptionError(f"{name}={flag!r}: pass True or False")
        self.model, self.probe_x, self.every, self.eval_mode = model, probe_x, int(every), eval_mode
        self._kernel_fn = ntk_fn(
            model, mode=mode, method=method, params=params, dtype=dtype, block_size=block_size, max_memory=max_memory, check=check,
        )
        self._handle: Any = None
        self._step = 0
        self.history = KernelHistory(kernels=[] if keep_kernels else None)
        kernel, seconds = self._compute()
        self._initial = self._latest = kernel
        self._initial64 = self._latest64 = kernel.to("cpu", torch.float64, copy=True)  # ours: the caller may change kernel
        self._initial_norm = float(torch.linalg.vector_norm(self._initial64))
        if self._initial_norm == 0:
            raise InputError(
                "the kernel on the probe set is zero at the start, so no distance from it is defined: the outputs do not "
                "depend on the parameters at probe_x (e.g. all-zero inputs to a model without biases); choose other probes"
            )
        self._append(0, 0.0, 0.0, math.nan, math.nan, self._initial_norm, seconds, kernel)

    # -- counting steps ----------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """The optimiser steps counted so far."""
        return self._step

    @property
    def initial(self) -> torch.Tensor:
        """K_0, the kernel at step 0 (on the model's device, in the compute dtype)."""
        return self._initial

    @property
    def latest(self) -> torch.Tensor:
        """The most recently recorded kernel."""
        return self._latest

    def step(self) -> bool:
        """Count one optimiser step; record the kernel if the count is a multiple of ``every``.
        Call it after each ``optimizer.step()`` in loops without :meth:`attach`.

        Returns:
            Whether a kernel was recorded.
        """
        self._step += 1
        if self._step % self.every:
            return False
        self.record()
        return True

    def record(self) -> torch.Tensor:
        """Record the kernel at the current step now (e.g. at the end of training when the last
        step is not a multiple of ``every``); nothing new if this step is recorded already.

        Returns:
            The kernel K_t (N, N[, O[, O]]).
        """
        if self.history.steps[-1] == self._step:
            return self._latest
        kernel, seconds = self._compute()
        current = kernel.to("cpu", torch.float64, copy=True)
        elapsed = self._step - self.history.steps[-1]
        norm = float(torch.linalg.vector_norm(current))
        previous_norm = self.history.norm[-1]  # ‖K_s‖, recorded with K_s
        self._append(
            self._step,
            kernel_distance(self._initial64, current) if norm else math.nan,
            float(torch.linalg.vector_norm(current - self._initial64)) / self._initial_norm,
            kernel_distance(self._latest64, current) / elapsed if norm and previous_norm else math.nan,
            float(torch.linalg.vector_norm(current - self._latest64)) / previous_norm / elapsed if previous_norm else math.nan,
            norm,
            seconds,
            kernel,
        )
        self._latest, self._latest64 = kernel, current
        return kernel

    # -- the optimiser hook --------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> "KernelTracker":
        """Count every ``optimizer.step()`` from now on (a step post-hook).

        Args:
            optimizer: a ``torch.optim.Optimizer`` updating the model's parameters.

        Returns:
            The tracker itself, also a context manager that detaches on exit.

        Raises:
            InputError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            OptionError: the tracker is attached already.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InputError(
                f"attach() takes a torch.optim.Optimizer, got {type(optimizer).__name__}: without one, call "
                "tracker.step() after each parameter update"
            )
        if self._handle is not None:
            raise OptionError("the tracker is attached to an optimiser already: call tracker.detach() first")
        self._handle = optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: self.step())
        return self

    def detach(self) -> None:
        """Remove the optimiser hook (later steps are not counted); nothing if not attached."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def attached(self) -> bool:
        """Whether an optimiser's steps are being counted."""
        return self._handle is not None

    def __enter__(self) -> "KernelTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- internals -----------------------------------------------------------------------------

    def _compute(self) -> tuple[torch.Tensor, float]:
        """The kernel on the probe set with the parameters as they are now, and its seconds."""
        start = time.perf_counter()
        with _in_eval_mode(self.model, self.eval_mode), torch.no_grad():
            kernel = self._kernel_fn(self.probe_x)
        return kernel, time.perf_counter() - start

    def _append(self, step: int, distance: float, change: float, velocity: float, relative_velocity: float,
                norm: float, seconds: float, kernel: torch.Tensor) -> None:
        h = self.history
        h.steps.append(step)
        h.distance.append(distance)
        h.relative_change.append(change)
        h.velocity.append(velocity)
        h.relative_velocity.append(relative_velocity)
        h.norm.append(norm)
        h.seconds.append(seconds)
        if h.kernels is not None:
            h.kernels.append(kernel.detach().to("cpu", copy=True))


@contextmanager
def _in_eval_mode(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Every module's ``training`` flag False inside (set directly: no overridden ``train()``
    runs), each restored after."""
    if not enabled:
        yield
        return
    flags = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in flags:
            module.training = False
        yield
    finally:
        for module, training in flags:
            module.training = training
