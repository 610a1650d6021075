"""Differential fuzzer: every method, mode, x2 and block size against the float64 reference.

Hypothesis draws a model spec from a grammar family (:mod:`grammar`), a dtype and a sample
of the (method, mode, x2, chunk_size) combinations; each call must match
``fastntk.reference_ntk`` to the dtype's tolerance, leave the model (parameters, buffers,
requires_grad, train flags, grads) and the inputs as they were, and refuse only with a
ModelError naming a method that computes the kernel ("auto" never refuses a model an
exact method computes).

Environment (``make fuzz`` sets the long run):
    FASTNTK_FUZZ_EXAMPLES   examples per family (default 6: the CI budget)
    FASTNTK_FUZZ_FAMILIES   comma-separated families to run (default: all of grammar.FAMILIES)
    FASTNTK_FUZZ_COMBOS     combinations per example, or "all" (default 6)
    FASTNTK_FUZZ_LOG        a JSON-lines file: record every failure there and go on (no shrinking)
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import fastntk
from conftest import DTYPES, assert_kernel_close, reduce_full
from grammar import FAMILIES, Spec, build, draw_inputs, selection, specs

METHODS = ("jacobian", "vp", "structured", "auto")
EXACT = METHODS[:3]
MODES = ("full", "trace", "diagonal")
CHUNKS = ("1", "2", "N", "default")
"""Block sizes: one sample, two (ragged for odd N), exactly N1, and the default (None)."""

EXAMPLES = int(os.environ.get("FASTNTK_FUZZ_EXAMPLES", "6"))
FAMILY_SELECTION = [f for f in os.environ.get("FASTNTK_FUZZ_FAMILIES", ",".join(FAMILIES)).split(",") if f]
COMBOS = os.environ.get("FASTNTK_FUZZ_COMBOS", "6")
LOG = os.environ.get("FASTNTK_FUZZ_LOG")


@dataclass(frozen=True)
class Combo:
    method: str
    mode: str
    gram: bool
    chunk: str

    def chunk_size(self, n1: int) -> int | None:
        return {"1": 1, "2": 2, "N": n1, "default": None}[self.chunk]


ALL_COMBOS = [Combo(*c) for c in itertools.product(METHODS, MODES, (True, False), CHUNKS)]


def combos() -> st.SearchStrategy[list[Combo]]:
    if COMBOS == "all":
        return st.just(ALL_COMBOS)
    k = int(COMBOS)
    return st.lists(st.sampled_from(ALL_COMBOS), min_size=k, max_size=k, unique=True)


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


@dataclass
class Outcome:
    kernel: torch.Tensor | None = None
    error: BaseException | None = None


class Snapshot:
    """Everything a call must leave as it found it: the model's tensors and flags, and the inputs."""

    def __init__(self, model: torch.nn.Module, *inputs: Any) -> None:
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.requires_grad = {k: p.requires_grad for k, p in model.named_parameters()}
        self.training = {k: m.training for k, m in model.named_modules()}
        self.inputs = [copy.deepcopy(x) for x in inputs]

    def differences(self, model: torch.nn.Module, *inputs: Any) -> list[str]:
        now = model.state_dict(keep_vars=True)
        out = [f"tensor {k} changed" for k, v in self.tensors.items() if k not in now or not torch.equal(now[k].detach(), v)]
        out += [f"requires_grad of {k} changed" for k, p in model.named_parameters() if self.requires_grad.get(k) != p.requires_grad]
        out += [f"train flag of {k or 'model'} changed" for k, m in model.named_modules() if self.training.get(k) != m.training]
        out += [f"grad of {k} set" for k, p in model.named_parameters() if p.grad is not None]
        for i, (before, after) in enumerate(zip(self.inputs, inputs)):
            if before is None:
                continue
            a, b = pytree.tree_leaves(before), pytree.tree_leaves(after)
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
    """Runs the combinations on one model and collects each failure as (class, combo, detail)."""

    def __init__(self, spec: Spec, dtype: torch.dtype) -> None:
        self.spec, self.dtype = spec, dtype
        self.model = build(spec, dtype)
        self.names = selection(spec, self.model)
        self.x1 = draw_inputs(spec, spec.n1, 1, dtype)
        self.x2 = draw_inputs(spec, spec.n2, 2, dtype)
        self.snapshot = Snapshot(self.model, self.x1, self.x2)
        self.outcomes: dict[Combo, Outcome] = {}
        self.references: dict[bool, torch.Tensor] = {}
        self.failures: list[tuple[type[FuzzFailure], Combo, str]] = []

    def reference(self, gram: bool) -> torch.Tensor:
        if gram not in self.references:
            self.references[gram] = fastntk.reference_ntk(self.model, self.x1, None if gram else self.x2, mode="full", params=self.names)
        return self.references[gram]

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
                params=self.names, chunk_size=combo.chunk_size(self.spec.n1),
            )
        except Exception as exc:  # noqa: BLE001 - every error is classified below
            result.error = exc
        self.outcomes[combo] = result
        changed = self.snapshot.differences(self.model, self.x1, self.x2)
        if changed:
            self.fail(Mutated, combo, "; ".join(changed))
            self.snapshot = Snapshot(self.model, self.x1, self.x2)
        if result.kernel is not None:
            expected = reduce_full(self.reference(combo.gram), combo.mode)
            try:
                assert result.kernel.dtype == self.dtype, f"dtype {result.kernel.dtype}"
                assert_kernel_close(result.kernel, expected, self.dtype)
            except AssertionError as exc:
                self.fail(WrongKernel, combo, str(exc))
                result.error = exc
        return result

    def computes(self, combo: Combo) -> bool:
        out = self.outcome(combo)
        return out.kernel is not None and out.error is None

    def check(self, combo: Combo) -> None:
        out = self.outcome(combo)
        exc = out.error
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


def check_spec(spec: Spec, dtype: torch.dtype, chosen: list[Combo]) -> None:
    checker = Checker(spec, dtype)
    for combo in chosen:
        checker.check(combo)
    if LOG:
        with open(LOG, "a") as log:
            log.write(json.dumps({"ok": not checker.failures, "family": spec.family, "dtype": str(dtype)}) + "\n")
            for kind, combo, detail in checker.failures:
                log.write(json.dumps({"class": kind.__name__, "combo": asdict(combo), "detail": detail, "dtype": str(dtype), "spec": repr(spec)}) + "\n")
        return
    if checker.failures:
        kind, combo, detail = checker.failures[0]
        raise kind(f"{combo}: {detail} ({len(checker.failures)} failures in all: {[(k.__name__, c) for k, c, _ in checker.failures]})")


@pytest.mark.parametrize("family", FAMILY_SELECTION)
@settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), chosen=combos())
def test_every_method_matches_the_reference(family: str, data: st.DataObject, dtype: torch.dtype, chosen: list[Combo]) -> None:
    spec = data.draw(specs(family), label="spec")
    check_spec(spec, dtype, chosen)
