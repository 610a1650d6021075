"""The fuzzer's oracle: run (method, mode, x2, chunk_size) combinations on one model and
classify every way a call can be wrong.

A call must match the float64 reference (``fastntk.reference_ntk``) to the dtype's
tolerance, leave the model (parameters, buffers, requires_grad, train flags, grads) and
the inputs as they were, and may refuse only with a ModelError naming a method that
computes the kernel; "auto" never refuses a model an exact method computes.
"""

from __future__ import annotations

import copy
import itertools
import re
import traceback
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils import _pytree as pytree

import fastntk
from conftest import assert_kernel_close, reduce_full, rtol
from fastntk._functional import flatten_output, select_parameters
from fastntk._inputs import call_model
from fastntk.reference import reference_jacobian

METHODS = ("jacobian", "vp", "structured", "auto")
EXACT = METHODS[:3]
MODES = ("full", "trace", "diagonal")
CHUNKS = ("1", "2", "N", "default")
ROUNDING_FACTOR = 10
"""A kernel may differ from the float64 one by this many times what the model's own rounding
moves the brute-force reference (see :meth:`Checker.rounding`): exact algorithms round
differently, but by amounts of that order."""
"""Block sizes: one sample, two (ragged for odd N), exactly N1, and the default (None)."""


@dataclass(frozen=True)
class Combo:
    """One call: method, mode, x2 given (gram=False) or None (gram=True), and chunk_size."""

    method: str
    mode: str
    gram: bool
    chunk: str

    def block_size(self, n1: int) -> int | None:
        return {"1": 1, "2": 2, "N": n1, "default": None}[self.chunk]


def combos_of(methods: Iterable[str] = METHODS, modes: Iterable[str] = MODES, grams: Iterable[bool] = (True, False), chunks: Iterable[str] = CHUNKS) -> list[Combo]:
    """The combinations of these methods, modes, x2 choices and block sizes."""
    return [Combo(*c) for c in itertools.product(methods, modes, grams, chunks)]


ALL_COMBOS = combos_of()


class FuzzFailure(AssertionError):
    """A failure of one combination; subclasses name its class (hypothesis keeps them apart)."""


class WrongKernel(FuzzFailure):
    """The kernel differs from the float64 reference beyond the dtype's tolerance."""


class Crash(FuzzFailure):
    """An exception other than a refusal (a ModelError naming a method that works)."""


class BadRefusal(FuzzFailure):
    """A ModelError naming no method that computes the kernel."""


class AutoRefused(FuzzFailure):
    """method="auto" refused a model that an exact method computes."""


class Mutated(FuzzFailure):
    """The call changed the model (parameters, buffers, flags, grads) or the inputs."""


class StaleReuse(FuzzFailure):
    """A reused ``ntk_fn`` gave a wrong kernel: on other inputs, or after the weights changed."""


@dataclass
class Outcome:
    kernel: torch.Tensor | None = None
    error: BaseException | None = None


class Snapshot:
    """Everything a call must leave as it found it: the model's tensors and flags, and the inputs."""

    def __init__(self, model: nn.Module, *inputs: Any) -> None:
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.requires_grad = {k: p.requires_grad for k, p in model.named_parameters()}
        self.training = {k: m.training for k, m in model.named_modules()}
        self.inputs = [copy.deepcopy(x) for x in inputs]

    def differences(self, model: nn.Module, *inputs: Any) -> list[str]:
        now = model.state_dict(keep_vars=True)
        out = [f"tensor {k} changed" for k, v in self.tensors.items() if k not in now or not torch.equal(now[k].detach(), v)]
        out += [f"requires_grad of {k} changed" for k, p in model.named_parameters() if self.requires_grad.get(k) != p.requires_grad]
        out += [f"train flag of {k or 'model'} changed" for k, m in model.named_modules() if self.training.get(k) != m.training]
        out += [f"grad of {k} set" for k, p in model.named_parameters() if p.grad is not None]
        for i, (before, after) in enumerate(zip(self.inputs, inputs)):
            a, b = pytree.tree_leaves(before), pytree.tree_leaves(after)
            if before is None and after is None:  # x2=None (a leaf of its own for torch's pytree)
                continue
            if len(a) != len(b) or not all(torch.equal(s, t) for s, t in zip(a, b)):
                out.append(f"input x{i + 1} changed")
        return out


def where(exc: BaseException) -> str:
    """The innermost frame of the traceback inside fastntk (or the last one), for grouping."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [fr for fr in frames if "/fastntk/" in fr.filename] or frames
    fr = inside[-1]
    return f"{fr.filename.split('/src/')[-1]}:{fr.lineno} ({fr.name})"


class Checker:
    """Runs combinations on one model and collects each failure as (class, combo, detail)."""

    def __init__(self, model: nn.Module, x1: Any, x2: Any, params: list[str] | None = None) -> None:
        self.model, self.x1, self.x2, self.params = model, x1, x2, params
        self.dtype = next(iter(model.parameters())).dtype
        self.n1 = pytree.tree_leaves(x1)[0].shape[0]
        self.snapshot = Snapshot(model, x1, x2)
        self.outcomes: dict[Combo, Outcome] = {}
        self.references: dict[bool, torch.Tensor] = {}
        self.rounding_errors: dict[bool, torch.Tensor] = {}
        self.failures: list[tuple[type[FuzzFailure], Combo, str]] = []

    def reference(self, gram: bool) -> torch.Tensor:
        if gram not in self.references:
            x2 = None if gram else self.x2
            self.references[gram] = fastntk.reference_ntk(self.model, self.x1, x2, mode="full", params=self.params)
        return self.references[gram]

    def rounding(self, gram: bool) -> torch.Tensor:
        """What the model's rounding alone moves its kernel by, in its dtype (full mode): |K − K_ref|
        of the brute-force reference computed in float32, scaled by eps(dtype)/eps(float32)
        (rounding errors scale with eps times the model's conditioning). Cancellation (a norm
        of a nearly constant input, tiny kernels of frozen paths) can make that far more than
        the dtype's ulps of max|K|."""
        if gram not in self.rounding_errors:
            x2 = None if gram else self.x2
            own = fastntk.reference_ntk(self.model, self.x1, x2, mode="full", params=self.params, dtype=torch.float32)
            scale = torch.finfo(self.dtype).eps / torch.finfo(torch.float32).eps
            self.rounding_errors[gram] = (own.double() - self.reference(gram).double()).abs() * scale
        return self.rounding_errors[gram]

    def assert_close(self, kernel: torch.Tensor, mode: str, gram: bool, swapped: bool = False, samples_diagonal: bool = False) -> None:
        """The kernel within the dtype's tolerance of the float64 reference (:func:`assert_kernel_close`),
        or within ROUNDING_FACTOR times what the model's own rounding moves it (see
        :meth:`rounding`). ``swapped``: the kernel is K(x2, x1); ``samples_diagonal``: it is
        K(x_i, x_i) for each i (:func:`fastntk.self_ntk`), the Gram matrix's diagonal."""
        def swap(full: torch.Tensor) -> torch.Tensor:
            if samples_diagonal:
                return torch.stack([full[i, i] for i in range(full.shape[0])])[:, None]  # (N, 1, O, O)
            return full.permute(1, 0, 3, 2) if swapped else full

        if samples_diagonal:
            kernel = kernel.reshape(kernel.shape[0], 1, *kernel.shape[1:])

        expected = reduce_full(swap(self.reference(gram)), mode)
        try:
            assert_kernel_close(kernel, expected, self.dtype)
        except AssertionError:
            error = (kernel.double() - expected).abs().max().item()
            rounding = reduce_full(swap(self.rounding(gram)), mode).max().item()  # |Σ| <= Σ|·|: a bound for trace
            if error > ROUNDING_FACTOR * rounding:
                raise

    def fail(self, kind: type[FuzzFailure], combo: Combo, detail: str) -> None:
        self.failures.append((kind, combo, detail))

    def outcome(self, combo: Combo) -> Outcome:
        """The call's kernel or error, checked against the reference and the snapshot once."""
        if combo in self.outcomes:
            return self.outcomes[combo]
        result = Outcome()
        try:
            result.kernel = fastntk.ntk(
                self.model, self.x1, None if combo.gram else self.x2, mode=combo.mode, method=combo.method,
                params=self.params, block_size=combo.block_size(self.n1),
            )
        except Exception as exc:  # noqa: BLE001 - every error is classified by check()
            result.error = exc
        self.outcomes[combo] = result
        changed = self.snapshot.differences(self.model, self.x1, self.x2)
        if changed:
            self.fail(Mutated, combo, "; ".join(changed))
            self.snapshot = Snapshot(self.model, self.x1, self.x2)
        if result.kernel is not None:
            try:
                assert result.kernel.dtype == self.dtype, f"dtype {result.kernel.dtype}"
                self.assert_close(result.kernel, combo.mode, combo.gram)
            except AssertionError as exc:
                self.fail(WrongKernel, combo, str(exc).splitlines()[0])
                result.error = exc
        return result

    def computes(self, combo: Combo) -> bool:
        out = self.outcome(combo)
        return out.kernel is not None and out.error is None

    def check(self, combo: Combo) -> None:
        """Run ``combo`` (once) and record how it failed, if it did."""
        exc = self.outcome(combo).error
        if exc is None or isinstance(exc, AssertionError):
            return
        message = str(exc).splitlines()[0] if str(exc) else ""
        detail = f"{type(exc).__name__} at {where(exc)}: {message[:300]}"
        if not isinstance(exc, fastntk.ModelError):
            self.fail(Crash, combo, detail)
            return
        others = [Combo(m, combo.mode, combo.gram, combo.chunk) for m in EXACT if m != combo.method]
        if combo.method == "auto" and any(self.computes(c) for c in others):
            self.fail(AutoRefused, combo, detail)
            return
        named = [m for m in re.findall(r"method='(\w+)'", str(exc)) if m in METHODS and m != combo.method]
        if not any(self.computes(Combo(m, combo.mode, combo.gram, combo.chunk)) for m in named):
            self.fail(BadRefusal, combo, detail)

    def check_reuse(self, combo: Combo) -> None:
        """One ``ntk_fn`` called on (x1, x2), x1 alone, (x2, x1), then on (x1, x2) again after every
        parameter and floating buffer moved: each kernel must match its reference. Run last (it
        changes the weights), and only where the single call on (x1, x2) computed the kernel."""
        combo = Combo(combo.method, combo.mode, False, combo.chunk)
        if not self.computes(combo):
            return
        fn = fastntk.ntk_fn(self.model, mode=combo.mode, method=combo.method, params=self.params, block_size=combo.block_size(self.n1))
        try:
            self.compare_reuse(combo, "x1, x2", fn(self.x1, self.x2), gram=False)
            self.compare_reuse(combo, "x1", fn(self.x1), gram=True)
            self.compare_reuse(combo, "x2, x1", fn(self.x2, self.x1), gram=False, swapped=True)
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for t in [*self.model.parameters(), *self.model.buffers()]:
                    if t.is_floating_point():  # upwards, so running variances stay positive
                        t.add_(0.1 * torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
            self.snapshot, self.references, self.rounding_errors = Snapshot(self.model, self.x1, self.x2), {}, {}
            self.compare_reuse(combo, "x1, x2 after a weight update", fn(self.x1, self.x2), gram=False)
        except Exception as exc:  # noqa: BLE001 - the single call computed it, so any error is a failure
            self.fail(StaleReuse, combo, f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")

    def check_self(self, combo: Combo) -> None:
        """fastntk.self_ntk on x1 against the reference Gram matrix's diagonal, in the combo's mode
        and block size, wherever the Jacobian method computes that Gram matrix."""
        if not self.computes(Combo("jacobian", combo.mode, True, combo.chunk)):
            return
        try:
            kernel = fastntk.self_ntk(self.model, self.x1, mode=combo.mode, params=self.params, block_size=combo.block_size(self.n1))
            self.assert_close(kernel, combo.mode, gram=True, samples_diagonal=True)
        except Exception as exc:  # noqa: BLE001 - the Gram matrix was computed, so any error is a failure
            self.fail(WrongKernel if isinstance(exc, AssertionError) else Crash, Combo("self_ntk", combo.mode, True, combo.chunk),
                      f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")

    def check_operator(self, combo: Combo) -> None:
        """fastntk.NTKOperator @ v (a seeded random v) against the reference kernel laid out 2-D
        (N1·O, N2·O) times v, in the combo's x2 choice and block size, wherever the Jacobian
        method computes that kernel. Tolerance: the dtype's (conftest.rtol) on each of the
        sum's terms |Θ_ij v_j|, or ROUNDING_FACTOR times the model's own rounding pushed through |v|."""
        if not self.computes(Combo("jacobian", "full", combo.gram, combo.chunk)):
            return
        try:
            full = self.reference(combo.gram)
            n1, n2, o, _ = full.shape
            theta = full.permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
            v = torch.randn(n2 * o, dtype=torch.float64, generator=torch.Generator().manual_seed(n1 * 31 + n2))
            op = fastntk.NTKOperator(self.model, self.x1, None if combo.gram else self.x2, params=self.params, block_size=combo.block_size(self.n1))
            product = op @ v.to(self.dtype)
            assert product.dtype == self.dtype, f"dtype {product.dtype}"
            error = (product.double() - theta @ v).abs().max().item()
            bound = rtol(self.dtype) * (theta.abs() @ v.abs()).max().item()
            if error > bound:
                rounding = self.rounding(combo.gram).permute(0, 2, 1, 3).reshape(n1 * o, n2 * o)
                assert error <= ROUNDING_FACTOR * (rounding @ v.abs()).max().item(), f"Θv max error {error:.3g} vs bound {bound:.3g}"
        except Exception as exc:  # noqa: BLE001 - the kernel was computed, so any error is a failure
            self.fail(WrongKernel if isinstance(exc, AssertionError) else Crash, Combo("NTKOperator", "full", combo.gram, combo.chunk),
                      f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")

    def check_tracker(self, combo: Combo) -> None:
        """fastntk.KernelTracker on x1 in the combo's mode, method and block size, with the model
        as it is (``eval_mode=False``): its K_0, and its record after a step that changed no
        parameter, against the reference Gram matrix, and the model and inputs left unchanged;
        wherever the single call computes that (non-zero) Gram matrix."""
        gram = Combo(combo.method, combo.mode, True, combo.chunk)
        if not self.computes(gram) or not bool(self.reference(True).any()):  # a zero kernel has no distance
            return
        tracked = Combo("tracker", combo.mode, True, combo.chunk)
        try:
            tracker = fastntk.KernelTracker(
                self.model, self.x1, mode=combo.mode, method=combo.method, params=self.params,
                block_size=combo.block_size(self.n1), eval_mode=False,
            )
            self.assert_close(tracker.initial, combo.mode, gram=True)
            assert tracker.step() and tracker.history.steps == [0, 1], tracker.history.steps
            self.assert_close(tracker.latest, combo.mode, gram=True)
        except Exception as exc:  # noqa: BLE001 - the Gram matrix was computed, so any error is a failure
            self.fail(WrongKernel if isinstance(exc, AssertionError) else Crash, tracked,
                      f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")
        changed = self.snapshot.differences(self.model, self.x1, self.x2)
        if changed:
            self.fail(Mutated, tracked, "; ".join(changed))
            self.snapshot = Snapshot(self.model, self.x1, self.x2)

    def check_linearize(self, combo: Combo, degree: int = 1) -> None:
        """fastntk.taylor_expand(model, degree) (degree 1: linearize) at θ0: the model's outputs and
        the gradient of a random projection of them in every trainable parameter, against a float64
        copy of the model (within the dtype's tolerance or ROUNDING_FACTOR times what the model's
        own rounding moves them, as :meth:`assert_close`), wherever the Jacobian method computes
        the Gram matrix. A refusal is right only where forward-mode AD is missing (method="vp"
        refuses too) and the error says so."""
        if not self.computes(Combo("jacobian", combo.mode, True, combo.chunk)):
            return
        name = Combo(f"taylor{degree}", combo.mode, True, combo.chunk)
        try:
            expanded = fastntk.taylor_expand(self.model, degree)
            actual = self.outputs_and_gradient(expanded, expanded.module)
        except fastntk.ModelError as exc:
            if not ("forward-mode AD" in str(exc) and self.vp_refuses_all_parameters()):
                self.fail(BadRefusal, name, f"ModelError at {where(exc)}: {str(exc).splitlines()[0][:200]}")
            return
        except Exception as exc:  # noqa: BLE001 - the model is valid (its Gram matrix was computed)
            self.fail(Crash, name, f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")
            return
        finally:
            changed = self.snapshot.differences(self.model, self.x1, self.x2)
            if changed:
                self.fail(Mutated, name, "; ".join(changed))
                self.snapshot = Snapshot(self.model, self.x1, self.x2)
        copies = {dtype: copy.deepcopy(self.model).to(dtype) for dtype in (torch.float64, torch.float32)}
        expected, single = (self.outputs_and_gradient(m, m, dtype) for dtype, m in copies.items())
        spread = (0.0, self.forward_reverse_spread(expected[1]))
        for what, a, e, f32, modes in zip(("outputs", "gradient"), actual, expected, single, spread):
            if a.shape != e.shape:
                self.fail(WrongKernel, name, f"{what} at θ0 have shape {tuple(a.shape)}, the model's {tuple(e.shape)}")
                continue
            if not e.numel():
                continue
            error = (a.double() - e).abs().max().item()
            scale = torch.finfo(self.dtype).eps / torch.finfo(torch.float32).eps
            rounding = max(scale * (f32.double() - e).abs().max().item(), modes)
            allowed = max(rtol(self.dtype) * e.abs().max().item(), ROUNDING_FACTOR * rounding)
            if error > allowed:
                self.fail(WrongKernel, name, f"{what} at θ0 differ by {error:.3g} (allowed {allowed:.3g}, max {e.abs().max().item():.3g})")

    def forward_reverse_spread(self, reverse64: torch.Tensor) -> float:
        """max |Jᵀw by forward mode − by reverse mode| of the model in its own dtype (the expansions
        transpose forward-mode tangents; where a norm of a few values cancels, the two modes'
        roundings differ by more than eps-scaling of float32's suggests); 0 where forward mode
        is missing (the expansion then uses reverse mode too)."""
        from torch.func import functional_call, jacfwd

        model = copy.deepcopy(self.model)
        names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = {name: model.get_parameter(name).detach() for name in names}
        n = self.n1
        if not names:
            return 0.0

        def outputs(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return flatten_output(call_model(lambda *a, **k: functional_call(model, p, a, k), self.x1), n).reshape(-1)

        try:
            jacobian = jacfwd(outputs)(params)
        except (NotImplementedError, RuntimeError):
            return 0.0
        weights = torch.randn(n * (outputs(params).numel() // n), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        forward = torch.cat([(weights.to(self.dtype) @ jacobian[name].reshape(weights.numel(), -1)).reshape(-1) for name in names])
        _, own = self.outputs_and_gradient(model, model)
        return (forward.double() - own.double()).abs().max().item()

    def vp_refuses_all_parameters(self) -> bool:
        """Whether method="vp" refuses the model for lack of forward-mode AD when every trainable
        parameter counts (the expansions differentiate them all, whatever the selection)."""
        try:
            fastntk.ntk(self.model, self.x1, method="vp", mode="trace")
        except fastntk.ModelError as exc:
            return "forward-mode AD" in str(exc)
        return False

    def outputs_and_gradient(self, model: nn.Module, module: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``model``'s flattened outputs (N·O,) on x1 (cast to ``dtype``) and the gradient of a fixed
        random projection of them in ``module``'s trainable parameters, concatenated (missing: 0)."""
        x = self.x1 if dtype is None else pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, self.x1)
        out = flatten_output(call_model(model, x), self.n1).reshape(-1)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(out.dtype)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:  # nothing trainable: no gradient to compare
            return out.detach(), torch.zeros(0, dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
        flat = torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1) for p, g in zip(params, grads)])
        return out.detach(), flat

    def check_nngp(self, combo: Combo) -> None:
        """fastntk.nngp in the combo's mode, x2 and block of memory against the outputs' products
        from a float64 copy of the model (tolerance as :meth:`check_linearize`), wherever the
        Jacobian method computes the Gram matrix."""
        if not self.computes(Combo("jacobian", combo.mode, True, combo.chunk)):
            return
        name = Combo("nngp", combo.mode, combo.gram, combo.chunk)
        x2 = None if combo.gram else self.x2
        try:
            kernel = fastntk.nngp(self.model, self.x1, x2, mode=combo.mode)
        except Exception as exc:  # noqa: BLE001 - the model is valid, so any error is a failure
            self.fail(Crash, name, f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")
            return
        changed = self.snapshot.differences(self.model, self.x1, self.x2)
        if changed:
            self.fail(Mutated, name, "; ".join(changed))
            self.snapshot = Snapshot(self.model, self.x1, self.x2)

        def direct(dtype: torch.dtype) -> torch.Tensor:
            model = copy.deepcopy(self.model).to(dtype)
            cast = lambda x: pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, x)  # noqa: E731
            with torch.no_grad():
                a = flatten_output(call_model(model, cast(self.x1)), self.n1).double()
                b = a if x2 is None else flatten_output(call_model(model, cast(x2)), pytree.tree_leaves(x2)[0].shape[0]).double()
            return reduce_full(torch.einsum("na,mb->nmab", a, b), combo.mode)

        expected, single = direct(torch.float64), direct(torch.float32)
        scale = torch.finfo(self.dtype).eps / torch.finfo(torch.float32).eps
        error = (kernel.double() - expected).abs().max().item()
        allowed = max(rtol(self.dtype) * expected.abs().max().item(), ROUNDING_FACTOR * scale * (single - expected).abs().max().item())
        if kernel.dtype != self.dtype or kernel.shape != expected.shape or error > allowed:
            self.fail(WrongKernel, name, f"{kernel.dtype} {tuple(kernel.shape)}: differs by {error:.3g} (allowed {allowed:.3g})")

    def check_nngp_layer(self, combo: Combo, index: int) -> None:
        """fastntk.nngp(layer=...) with the model's ``index``-th submodule (mod the count), "trace_mean":
        φφᵀ/d of its output as a hook of the oracle's own reads it from a float64 copy; or, where
        that module runs other than once or returns no floating tensor batched on dim 0, a
        ModelError saying so."""
        names = [name for name, m in self.model.named_modules() if name and not isinstance(m, nn.ModuleDict)]  # containers never run
        if not names or not self.computes(Combo("jacobian", combo.mode, True, combo.chunk)):
            return
        layer = names[index % len(names)]
        name = Combo(f"nngp[{layer}]", "trace_mean", combo.gram, combo.chunk)
        x2 = None if combo.gram else self.x2

        def features(model: nn.Module, x: Any, dtype: torch.dtype) -> torch.Tensor | str:
            seen: list[Any] = []
            handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: seen.append(out))
            n = pytree.tree_leaves(x)[0].shape[0]
            with torch.no_grad():
                call_model(model, pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, x))
            handle.remove()
            if len(seen) != 1:
                return f"ran {len(seen)} times"
            leaves = [t for t in pytree.tree_leaves(seen[0]) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if not leaves or any(t.dim() == 0 or t.shape[0] != n for t in leaves):
                return "batched on dim 0"
            return torch.cat([t.reshape(n, -1) for t in leaves], dim=1).double()

        def direct(dtype: torch.dtype) -> torch.Tensor | str:
            model = copy.deepcopy(self.model).to(dtype)
            alone = features(model, pytree.tree_map(lambda t: t[:1], self.x1), dtype)  # dim 0 must follow the batch size
            if isinstance(alone, str):
                return alone
            a = features(model, self.x1, dtype)
            b = a if x2 is None or isinstance(a, str) else features(model, x2, dtype)
            return a if isinstance(a, str) else (a @ b.T) / a.shape[1]  # type: ignore[union-attr]

        expected = direct(torch.float64)
        try:
            kernel = fastntk.nngp(self.model, self.x1, x2, layer=layer)
        except fastntk.ModelError as exc:
            if not (isinstance(expected, str) and expected in str(exc)):
                self.fail(BadRefusal, name, f"ModelError at {where(exc)}: {str(exc).splitlines()[0][:200]}")
            return
        except Exception as exc:  # noqa: BLE001 - the model is valid, so any other error is a failure
            self.fail(Crash, name, f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")
            return
        if isinstance(expected, str):
            self.fail(WrongKernel, name, f"a kernel where the layer {expected}")
            return
        single = direct(torch.float32)
        assert isinstance(single, torch.Tensor)
        scale = torch.finfo(self.dtype).eps / torch.finfo(torch.float32).eps
        error = (kernel.double() - expected).abs().max().item()
        allowed = max(rtol(self.dtype) * expected.abs().max().item(), ROUNDING_FACTOR * scale * (single - expected).abs().max().item())
        if kernel.shape != expected.shape or error > allowed:
            self.fail(WrongKernel, name, f"{tuple(kernel.shape)}: differs by {error:.3g} (allowed {allowed:.3g})")

    def group_references(self, gram: bool, grouping: str = "module") -> dict[str, torch.Tensor]:
        """Each group's float64 reference kernel (full mode), from one reference Jacobian per
        side sliced by the group's parameters (their columns, in ``params`` order)."""
        names = select_parameters(self.model, self.params)
        sizes = dict(self.model.named_parameters())
        columns, start = {}, 0
        for name in names:
            columns[name] = torch.arange(start, start + sizes[name].numel())
            start += sizes[name].numel()
        j1 = reference_jacobian(self.model, self.x1, self.params)
        j2 = j1 if gram else reference_jacobian(self.model, self.x2, self.params)
        groups = fastntk.parameter_groups(self.model, grouping, self.params)
        out = {}
        for group, params in groups.items():
            index = torch.cat([columns[name] for name in params])
            out[group] = torch.einsum("nap,mbp->nmab", j1[..., index], j2[..., index])
        return out

    def check_layers(self, combo: Combo, grouping: str = "module") -> None:
        """fastntk.layer_ntk (``grouping``: "module" or "parameter", which splits the structured
        method's joint weight-and-bias factors) summing to the reference, and fastntk.weighted_ntk
        matching Σ_g λ_g of the per-group references, in the combo's mode, x2 and block size,
        wherever the Jacobian method computes the kernel ("vp" combos run "auto")."""
        if not self.computes(Combo("jacobian", combo.mode, combo.gram, combo.chunk)):
            return
        method = combo.method if combo.method in ("jacobian", "structured") else "auto"
        x2 = None if combo.gram else self.x2
        options = dict(mode=combo.mode, method=method, params=self.params, block_size=combo.block_size(self.n1), groups=grouping)
        try:
            kernels = fastntk.layer_ntk(self.model, self.x1, x2, **options)
            self.assert_close(sum(kernels.values()), combo.mode, combo.gram)
            references = self.group_references(combo.gram, grouping)
            weights = {group: 0.5 + g for g, group in enumerate(references)}
            kernel = fastntk.weighted_ntk(self.model, self.x1, x2, weights=weights, **options)
            expected = sum(w * reduce_full(references[group], combo.mode) for group, w in weights.items())
            try:
                assert_kernel_close(kernel, expected, self.dtype)
            except AssertionError:  # within what the model's own rounding moves the kernel, weighted by the largest λ
                rounding = max(weights.values()) * reduce_full(self.rounding(combo.gram), combo.mode).max().item()
                if (kernel.double() - expected).abs().max().item() > ROUNDING_FACTOR * rounding:
                    raise
        except Exception as exc:  # noqa: BLE001 - the kernel was computed, so any error is a failure
            self.fail(WrongKernel if isinstance(exc, AssertionError) else Crash, Combo("layer_ntk", combo.mode, combo.gram, combo.chunk),
                      f"{type(exc).__name__} at {where(exc)}: {str(exc).splitlines()[0][:200]}")

    def compare_reuse(self, combo: Combo, what: str, kernel: torch.Tensor, gram: bool, swapped: bool = False) -> None:
        try:
            self.assert_close(kernel, combo.mode, gram, swapped)
        except AssertionError as exc:
            self.fail(StaleReuse, combo, f"{what}: {str(exc).splitlines()[0]}")

    def raise_first(self) -> None:
        if self.failures:
            kind, combo, detail = self.failures[0]
            summary = [(k.__name__, c) for k, c, _ in self.failures]
            raise kind(f"{combo}: {detail}\n({len(self.failures)} failures in all: {summary})")


def check_model(model: nn.Module, x1: Any, x2: Any, params: list[str] | None = None, combos: Iterable[Combo] = ALL_COMBOS) -> None:
    """Raise the first failure of any of ``combos`` on this model (all of them by default)."""
    checker = Checker(model, x1, x2, params)
    for combo in combos:
        checker.check(combo)
    checker.raise_first()

