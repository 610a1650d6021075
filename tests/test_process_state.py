"""A library call leaves the process as it found it: dispatch and function modes, torch.func
transforms, warning filters, grad mode, default dtype, thread counts, the RNG, backend flags;
after every public call with every method, after calls that fail midway, and after calls
from two threads at once (whose results equal the single-threaded ones)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import warnings
from typing import Any, Callable, Iterator

import pytest
import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

import fastntk
from fastntk import _gemm, _process
from cases import CASES_BY_NAME
from conftest import assert_kernel_close

METHODS = ("jacobian", "vp", "structured", "auto")


def backend_flags() -> dict[str, Any]:
    """Every backend flag PyTorch exposes that a kernel computation could set."""
    flags: dict[str, Any] = {
        "mkldnn.enabled": torch.backends.mkldnn.enabled,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn.enabled": torch.backends.cudnn.enabled,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "mha.fastpath": torch.backends.mha.get_fastpath_enabled(),
        "vmap_fallback": torch._C._functorch._is_vmap_fallback_enabled(),
    }
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        flags[f"sdp.{name}"] = getattr(torch.backends.cuda, f"{name}_sdp_enabled")()
    for backend in ("mkldnn", "cuda.matmul", "cudnn"):  # newer PyTorch: per-backend float32 precision
        module: Any = torch.backends
        for part in backend.split("."):
            module = getattr(module, part)
        if hasattr(module, "fp32_precision"):
            flags[f"{backend}.fp32_precision"] = module.fp32_precision
    return flags


def snapshot() -> dict[str, Any]:
    """The process state a call must leave as it found it (per thread where it is per thread)."""
    return {
        "dispatch_modes": [id(m) for m in _get_current_dispatch_mode_stack()],
        "function_modes": [id(m) for m in _get_current_function_mode_stack()],
        "functorch_transforms": torch._C._functorch.peek_interpreter_stack() is None,
        "warning_filters_list": id(warnings.filters),
        "warning_filters": [tuple(map(id, f)) for f in warnings.filters],
        "showwarning": warnings.showwarning,
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "forward_grad": torch._C._is_fwd_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "autocast": torch.is_autocast_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "rng": torch.get_rng_state(),
        "onednn_routing": _gemm._ROUTING.get(),
        "fallback_recorder": _process._SEEN.get(),
        "shared_users": [_process._FILTER.users] + [f.users for f in _vp_flags()],
        **backend_flags(),
    }


def _vp_flags() -> list[_process.Shared]:
    from fastntk.methods.vp import FUSED_KERNEL_FLAGS

    return FUSED_KERNEL_FLAGS


def assert_unchanged(before: dict[str, Any]) -> None:
    after = snapshot()
    assert after.keys() == before.keys()
    for key in before:
        same = torch.equal(before[key], after[key]) if isinstance(before[key], torch.Tensor) else before[key] == after[key]
        assert same, f"{key}: {before[key]!r} -> {after[key]!r}"


class CumMax(nn.Module):
    """A running maximum over features: its backward (cummaxmin_backward) has no batching
    rule, so torch.func warns "There is a performance drop" whenever it is vmapped."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cummax(torch.tanh(self.a(x)), dim=-1)[0])


class RaisesMidway(nn.Module):
    """An MLP whose forward raises from its ``raise_at``-th call on (None: never); counts calls.
    It stays broken, so that no retry (the per-sample loop after a failed vmap) gets past it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.calls, self.raise_at = 0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.raise_at is not None and self.calls >= self.raise_at:
            raise RuntimeError("the model failed")
        return self.net(x)


class SqrtAtZero(nn.Module):
    """Finite outputs whose derivatives are 0 · inf = NaN: the kernel is not finite."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sqrt(self.a(x) * 0.0))


def seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory()


def models() -> dict[str, tuple[nn.Module, torch.Tensor | Any, Any]]:
    """name -> (model, x1, x2): dense, convolutional, attention (vp's flags), a vmap fallback."""
    out = {}
    for name in ("mlp", "conv1d", "transformer"):
        case = CASES_BY_NAME[name]
        out[name] = (case.build(), case.draw(5, seed=1), case.draw(3, seed=2))
    gen = torch.Generator().manual_seed(3)
    out["cummax"] = (seeded(CumMax), torch.randn(5, 5, generator=gen), torch.randn(3, 5, generator=gen))
    return out


@pytest.fixture(autouse=True, scope="module")
def imported() -> None:
    """The first kernel imports what kernels need (sympy among them, which adds its own
    warning filter for good, as it does in any program that imports it): done before any
    snapshot, so the tests see what calls change, not what importing a module does."""
    model, x1, x2 = models()["mlp"]
    for method in METHODS:
        fastntk.ntk(model, x1, x2, method=method)


@pytest.fixture
def unusual_state():
    """Process state set away from PyTorch's defaults, so a call that resets to defaults shows."""
    saved_dtype, saved_threads, saved_fastpath = torch.get_default_dtype(), torch.get_num_threads(), torch.backends.mha.get_fastpath_enabled()
    saved_flash = torch.backends.cuda.flash_sdp_enabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a filter of the caller")
        torch.set_default_dtype(torch.float64)
        torch.set_num_threads(1)
        torch.backends.mha.set_fastpath_enabled(False)
        torch.backends.cuda.enable_flash_sdp(False)
        try:
            yield
        finally:
            torch.set_default_dtype(saved_dtype)
            torch.set_num_threads(saved_threads)
            torch.backends.mha.set_fastpath_enabled(saved_fastpath)
            torch.backends.cuda.enable_flash_sdp(saved_flash)


@pytest.mark.parametrize("state", ["default", "unusual"])
@pytest.mark.parametrize("method", METHODS)
def test_every_call_leaves_the_process_as_it_found_it(method: str, state: str, request: pytest.FixtureRequest) -> None:
    if state == "unusual":
        request.getfixturevalue("unusual_state")
    for name, (model, x1, x2) in models().items():
        before = snapshot()
        fastntk.ntk(model, x1, x2, method=method)
        assert_unchanged(before)
        fn = fastntk.ntk_fn(model, mode="trace", method=method, block_size=2)
        fn(x1)
        assert_unchanged(before)
        fastntk.plan(model, x1, x2)
        assert_unchanged(before)
        fastntk.gram(model, x1, x2, mode="diagonal", method=method, progress=False)
        assert_unchanged(before)
        tracker = fastntk.KernelTracker(model, x1, mode="trace", method=method, block_size=2)
        tracker.step()
        assert_unchanged(before)
        with torch.no_grad():  # grad mode off outside stays off
            before_no_grad = snapshot()
            fastntk.ntk(model, x1, method=method)
            assert_unchanged(before_no_grad)
        assert not any(entry is _process.FILTER for entry in warnings.filters), name


def calls_made(model: RaisesMidway, run: Callable[[], Any]) -> int:
    model.calls, model.raise_at = 0, None
    run()
    return model.calls


@pytest.mark.parametrize("method", METHODS)
def test_a_call_that_fails_midway_leaves_the_process_as_it_found_it(method: str) -> None:
    model = seeded(RaisesMidway)
    gen = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    runs: dict[str, Callable[[], Any]] = {
        "ntk": lambda: fastntk.ntk(model, x1, x2, method=method, block_size=2),
        "ntk_fn": lambda: fastntk.ntk_fn(model, mode="trace", method=method, block_size=2)(x1),
        "gram": lambda: fastntk.gram(model, x1, x2, method=method, progress=False, max_memory="64MB", mode="trace"),
    }
    for name, run in runs.items():
        total = calls_made(model, run)
        assert total >= 2, name
        model.calls, model.raise_at = 0, total // 2 + 1  # a forward pass midway through the computation
        before = snapshot()
        with pytest.raises(RuntimeError, match="the model failed"):
            run()
        assert model.calls >= total // 2 + 1, name
        assert_unchanged(before)


@pytest.mark.parametrize("method", METHODS)
def test_a_non_finite_kernel_leaves_the_process_as_it_found_it(method: str) -> None:
    model = seeded(SqrtAtZero)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    before = snapshot()
    with pytest.raises(fastntk.NonFiniteError):
        fastntk.ntk(model, x, method=method)
    assert_unchanged(before)
    with pytest.raises(fastntk.NonFiniteError):
        fastntk.ntk(model, x.masked_fill(x > 0, float("nan")), method=method)  # caught before any kernel
    assert_unchanged(before)


def test_fallback_warnings_are_silenced_in_the_call_only() -> None:
    model, x1, x2 = models()["cummax"]
    for method in ("jacobian", "structured"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fastntk.ntk(model, x1, x2, method=method)
            assert not [w for w in caught if _process.FALLBACK_WARNING in str(w.message)], method
            from torch.func import jacrev, vmap  # the caller's own vmap still warns

            vmap(jacrev(lambda x: torch.cummax(x, dim=-1)[0]))(x1)
            assert [w for w in caught if _process.FALLBACK_WARNING in str(w.message)], method


def test_structured_learns_that_the_backward_falls_back() -> None:
    """The structured method learns from the fallback warning, seen only in its own thread,
    that the backward pass does not vmap over outputs (and the kernel is still exact)."""
    from fastntk.methods.structured.method import StructuredMethod  # noqa: F401  (the method under test)

    model, x1, x2 = models()["cummax"]
    expected = fastntk.ntk(model.double(), x1.double(), x2.double(), method="jacobian")
    model.float()
    with _process.quiet_fallbacks() as seen:
        kernel = fastntk.ntk(model, x1, x2, method="structured")
    assert_kernel_close(kernel, expected, torch.float32)
    assert seen == []  # the call's own scope records its own warnings, not the caller's


def concurrent(jobs: list[Callable[[], torch.Tensor]], repeats: int) -> list[list[torch.Tensor]]:
    """Run each job ``repeats`` times, every job in its own thread, all at once."""
    results: list[list[torch.Tensor]] = [[] for _ in jobs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(repeats):
                results[i].append(jobs[i]())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("method", METHODS)
def test_two_threads_at_once(method: str) -> None:
    """Different models, and one ntk_fn object shared by both threads, many times over:
    the kernels equal the single-threaded ones, and the process state is as before."""
    cases = models()
    a, b = (cases[name] for name in ("cummax", "transformer" if method in ("vp", "auto") else "conv1d"))
    fn_a = fastntk.ntk_fn(a[0], method=method, block_size=2)
    fn_b = fastntk.ntk_fn(b[0], mode="trace", method=method)
    shared = fastntk.ntk_fn(a[0], mode="diagonal", method=method)
    jobs = [lambda: fn_a(a[1], a[2]), lambda: fn_b(b[1], b[2]), lambda: shared(a[1]), lambda: shared(a[1])]
    expected = [job() for job in jobs]
    before = snapshot()
    results = concurrent(jobs, repeats=8)
    assert_unchanged(before)
    for want, got in zip(expected, results):
        for kernel in got:
            assert_kernel_close(kernel, want, torch.float32)


HEAVY_MODULES = ("sympy", "torch.fx.experimental.symbolic_shapes", "torch._dynamo")
"""What only a kernel needs (torch.autograd.grad's lazy import) or nothing of fastntk needs."""


@pytest.mark.parametrize("code", [
    "import fastntk",
    "import sys; from fastntk import cli; sys.argv = ['fastntk', '--help']; cli.main(['--help']); cli.main(['compute', '--help'])",
])
def test_import_and_help_load_no_kernel_modules(code: str) -> None:
    """Regression: ``import fastntk`` imported symbolic_shapes and sympy (a few tenths of a
    second over torch for every user, ``fastntk --help`` included)."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_a_chain_kernel_imports_none_of_them() -> None:
    """Regression: the vmap probe's reverse pass imported torch._dynamo, and the check's and
    the pooling adjoint's grad_outputs sympy, in the first call of chain models (the
    benchmark's MLP and CNN, a CNN with global average pooling)."""
    probe = ("import sys, torch, fastntk\n"
             "nn = torch.nn\n"
             "mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))\n"
             "cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))\n"
             "for net, shape in ((mlp, (3,)), (cnn, (1, 6, 6))):\n"
             "    for mode in ('full', 'trace', 'diagonal'):\n"
             "        fastntk.ntk(net, torch.randn(4, *shape), mode=mode)\n"
             "        fastntk.ntk(net, torch.randn(4, *shape), torch.randn(3, *shape), mode=mode)\n"
             f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def interleave(first: Callable[[], Any], second: Callable[[], Any]) -> None:
    """Run two context managers' blocks in two threads as: first enters, second enters,
    first leaves, second leaves (the order that defeats save-and-restore per call)."""
    steps = [threading.Event() for _ in range(3)]

    def one(scope: Callable[[], Any], wait: int | None, done: int, then_wait: int | None, then_done: int | None) -> None:
        if wait is not None:
            steps[wait].wait()
        with scope():
            steps[done].set()
            if then_wait is not None:
                steps[then_wait].wait()
        if then_done is not None:
            steps[then_done].set()

    a = threading.Thread(target=one, args=(first, None, 0, 1, 2))
    b = threading.Thread(target=one, args=(second, 0, 1, 2, None))
    a.start(), b.start()
    a.join(), b.join()


def test_overlapping_calls_restore_the_filters_and_keep_the_callers() -> None:
    """Regression: with warnings.catch_warnings per call, this order left the silencing
    filter installed for good (and dropped filters added meanwhile)."""
    before = snapshot()
    added: list[Any] = []

    @contextlib.contextmanager
    def quiet_and_add_a_filter() -> Iterator[None]:
        with _process.quiet_fallbacks():
            warnings.filterwarnings("ignore", message="added by the caller meanwhile")
            added.append(warnings.filters[0])
            yield

    interleave(_process.quiet_fallbacks, quiet_and_add_a_filter)
    assert warnings.filters[0] is added[0]  # the caller's filter stays
    warnings.filters.remove(added[0])
    assert_unchanged(before)


def test_overlapping_calls_restore_a_shared_flag() -> None:
    state = {"flag": "theirs"}
    shared = _process.flag(lambda: state["flag"], lambda v: state.update(flag=v), "ours")
    seen: list[str] = []

    @contextlib.contextmanager
    def look() -> Iterator[None]:
        with shared.scope():
            seen.append(state["flag"])
            yield

    interleave(look, look)
    assert seen == ["ours", "ours"] and state["flag"] == "theirs" and shared.users == 0


def test_silenced_only_in_the_calling_thread() -> None:
    """While one thread is inside a call, another thread's fallback warnings still show."""
    from torch.func import jacrev, vmap

    inside, done = threading.Event(), threading.Event()

    def call() -> None:
        with _process.quiet_fallbacks():
            inside.set()
            done.wait()

    thread = threading.Thread(target=call)
    thread.start()
    inside.wait()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vmap(jacrev(lambda x: torch.cummax(x, dim=-1)[0]))(torch.randn(3, 4))
    finally:
        done.set()
        thread.join()
    assert [w for w in caught if _process.FALLBACK_WARNING in str(w.message)]


class CallsFastntk(nn.Module):
    """A model whose forward computes a kernel of another model."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.other = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fastntk.ntk(self.other, torch.ones(2, 3), method="vp")
        return self.lin(x)


@pytest.mark.parametrize("method", METHODS)
def test_fastntk_inside_a_models_forward_is_refused(method: str) -> None:
    """Regression (review): a model whose forward called fastntk held its module lock while
    the inner call waited for forward-mode AD's, which another thread held while waiting for
    that module: a deadlock. Nested calls are refused, naming the cause."""
    with pytest.raises(fastntk.ModelError, match="inside the forward pass"):
        fastntk.ntk(seeded(CallsFastntk), torch.randn(3, 3), method=method)
