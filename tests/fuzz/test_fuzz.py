"""Differential fuzzer: every method, mode, x2 and block size against the float64 reference.

Hypothesis draws a model spec from a grammar family (:mod:`grammar`), a dtype and a sample
of the (method, mode, x2, chunk_size) combinations; :mod:`differential` checks each call,
and one reused ``ntk_fn`` across inputs and a weight update. The library's size thresholds,
which these tiny models never cross, are fuzzed on both sides by ``test_fuzz_thresholds``.

Environment (``make fuzz`` sets the long run):
    FASTNTK_FUZZ_EXAMPLES   examples per family (default 40: the CI budget, about half a minute)
    FASTNTK_FUZZ_FAMILIES   comma-separated families to run (default: all of grammar.FAMILIES)
    FASTNTK_FUZZ_COMBOS     combinations per example, or "all" (default 6)
    FASTNTK_FUZZ_LOG        a JSON-lines file: record every failure there and go on (no shrinking)
    FASTNTK_FUZZ_SHRINK     1: shrink a failure to a minimal spec (off by default: shrinking reruns
                            the example hundreds of times, which the CI budget cannot hold)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import DTYPES
from differential import ALL_COMBOS, Checker, Combo
from grammar import FAMILIES, Spec, build, compact_tail, draw_inputs, selection, specs

EXAMPLES = int(os.environ.get("FASTNTK_FUZZ_EXAMPLES", "40"))
FAMILY_SELECTION = [f for f in os.environ.get("FASTNTK_FUZZ_FAMILIES", ",".join(FAMILIES)).split(",") if f]
COMBOS = os.environ.get("FASTNTK_FUZZ_COMBOS", "6")
LOG = os.environ.get("FASTNTK_FUZZ_LOG")
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
SHRINK = os.environ.get("FASTNTK_FUZZ_SHRINK", "0") == "1"


def combos() -> st.SearchStrategy[list[Combo]]:
    """The combinations one example runs: a sample of FASTNTK_FUZZ_COMBOS of them, or all."""
    if COMBOS == "all":
        return st.just(ALL_COMBOS)
    k = int(COMBOS)
    return st.lists(st.sampled_from(ALL_COMBOS), min_size=k, max_size=k, unique=True)


def check_spec(spec: Spec, dtype: torch.dtype, chosen: list[Combo], reuse: Combo) -> None:
    """Check the spec's model on ``chosen`` and a reused ``ntk_fn`` on ``reuse``; raise the
    first failure, or log them all (FASTNTK_FUZZ_LOG)."""
    if compact_tail(spec) and not any(c.mode == "trace" and c.method in ("structured", "auto") for c in chosen):
        # the compact rows of such a tail exist in trace mode only: run it there too
        chosen = [*chosen, Combo("structured", "trace", spec.seed % 2 == 0, ("default", "1", "2", "N")[spec.seed % 4])]
    model = build(spec, dtype)
    checker = Checker(model, draw_inputs(spec, spec.n1, 1, dtype), draw_inputs(spec, spec.n2, 2, dtype), selection(spec, model))
    for combo in chosen:
        checker.check(combo)
    checker.check_self(reuse)  # fastntk.self_ntk: the Gram matrix's diagonal, in the reused combo's mode and block size
    checker.check_operator(reuse)  # fastntk.NTKOperator @ v: the kernel laid out 2-D times v, in the reused combo's x2 and block size
    checker.check_tracker(reuse)  # fastntk.KernelTracker: its kernels are the Gram matrix, the model left as it was
    checker.check_nngp(reuse)  # fastntk.nngp: the outputs' inner products
    checker.check_nngp_layer(reuse, spec.seed)  # and one submodule's features (or the right refusal)
    checker.check_linearize(reuse, degree=1 + spec.seed % 2)  # linearize / taylor_expand(2) at θ0: outputs and gradient
    checker.check_layers(chosen[0], ("module", "parameter")[spec.seed % 2])  # layer_ntk sums to the reference; weighted_ntk is Σ_g λ_g of per-group references
    checker.check_reuse(reuse)
    if not LOG:
        checker.raise_first()
        return
    with open(LOG, "a") as log:
        log.write(json.dumps({"ok": not checker.failures, "family": spec.family, "dtype": str(dtype), "calls": len(checker.outcomes)}) + "\n")
        for kind, combo, detail in checker.failures:
            log.write(json.dumps({"class": kind.__name__, "combo": asdict(combo), "detail": detail, "dtype": str(dtype), "spec": repr(spec)}) + "\n")


@pytest.mark.parametrize("family", FAMILY_SELECTION)
@settings(
    max_examples=EXAMPLES, deadline=None, database=None, phases=tuple(Phase) if SHRINK else NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(data=st.data(), dtype=st.sampled_from(DTYPES), chosen=combos(), reuse=st.sampled_from(ALL_COMBOS))
def test_every_method_matches_the_reference(family: str, data: st.DataObject, dtype: torch.dtype, chosen: list[Combo], reuse: Combo) -> None:
    check_spec(data.draw(specs(family), label="spec"), dtype, chosen, reuse)
