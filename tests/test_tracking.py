"""fastntk.KernelTracker: its records against kernels computed by hand (reference_ntk, float64)
at the same steps, step counting, the optimiser hook and its removal, and a training run left
as it was (grads, train/eval flags, buffers, the RNG, the trajectory)."""

from __future__ import annotations

import doctest
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import fastntk
from fastntk import analysis, tracking
from cases import CASES_BY_NAME
from conftest import RTOL64, assert_rel_close

PROBES = 6


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def regression(case: str, n: int = 16, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded model of a test case, n inputs and random targets of its output's shape."""
    c = CASES_BY_NAME[case]
    model, x = c.build(dtype), c.draw(n, dtype)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    return model, x, y


@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("case", ["tanh", "layernorm_gelu", "tutorial_cnn"])
def test_records_equal_kernels_computed_by_hand_at_those_steps(case: str, mode: str) -> None:
    """Seeded SGD training; at each recorded step the float64 reference kernel is computed by
    hand from the same parameters, and every recorded number is recomputed from those."""
    model, x, y = regression(case)
    probe = x[:PROBES]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    references = [fastntk.reference_ntk(model, probe, mode=mode)]
    with fastntk.KernelTracker(model, probe, every=3, mode=mode, keep_kernels=True).attach(optimizer) as tracker:
        for step in range(1, 11):
            train_step(model, optimizer, x, y)
            if step % 3 == 0:
                references.append(fastntk.reference_ntk(model, probe, mode=mode))
    h = tracker.history
    assert h.steps == [0, 3, 6, 9] and tracker.steps == 10
    assert len(h.kernels) == len(references)
    for kernel, reference in zip(h.kernels, references):
        assert_rel_close(kernel, reference, RTOL64)
    # the recorded numbers are functions of the kernels: compare with those of the reference kernels,
    # to the accuracy the kernels have (Frobenius norms of entrywise errors <= RTOL64 max|K| sum to N·N·O·O entries)
    tol = 4 * RTOL64 * math.sqrt(references[0].numel())
    assert h.distance[0] == 0.0 and h.relative_change[0] == 0.0
    assert math.isnan(h.velocity[0]) and math.isnan(h.relative_velocity[0])
    k0 = references[0]
    for i in range(1, len(references)):
        k, previous = references[i], references[i - 1]
        assert h.distance[i] == pytest.approx(analysis.kernel_distance(k0, k), abs=tol)
        assert h.relative_change[i] == pytest.approx(float((k - k0).norm() / k0.norm()), abs=tol)
        assert h.velocity[i] == pytest.approx(analysis.kernel_distance(previous, k) / 3, abs=tol)
        assert h.relative_velocity[i] == pytest.approx(float((k - previous).norm() / previous.norm()) / 3, abs=tol)
        assert h.norm[i] == pytest.approx(float(k.norm()), rel=tol)
    assert h.relative_change[-1] > 100 * tol and h.distance[-1] > 0  # the kernel moved: the comparison means something


def test_step_counting_with_every_k_and_manual_records() -> None:
    model, x, y = regression("tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = fastntk.KernelTracker(model, x[:PROBES], every=3, mode="trace")
    recorded = []
    for _ in range(10):
        train_step(model, optimizer, x, y)
        recorded.append(tracker.step())  # a loop without attach()
    assert recorded == [False, False, True, False, False, True, False, False, True, False]
    assert tracker.steps == 10 and tracker.history.steps == [0, 3, 6, 9]
    kernel = tracker.record()  # the last step, off the grid
    assert tracker.history.steps == [0, 3, 6, 9, 10]
    assert tracker.record() is kernel and len(tracker.history) == 5  # recorded already: nothing new
    assert torch.equal(tracker.latest, kernel)
    previous = tracker.history.kernels  # not kept
    assert previous is None
    # velocity is per step: the record at 10 follows the one at 9 by one step
    d = tracker.history.velocity[-1]
    assert d > 0 and all(len(getattr(tracker.history, name)) == 5 for name in tracking.KernelHistory.SERIES)


def test_every_one_records_each_step() -> None:
    model, x, y = regression("tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with fastntk.KernelTracker(model, x[:PROBES], mode="trace").attach(optimizer) as tracker:
        for _ in range(4):
            train_step(model, optimizer, x, y)
    assert tracker.history.steps == [0, 1, 2, 3, 4]


def test_zero_distance_before_training() -> None:
    model, x, y = regression("tanh")
    tracker = fastntk.KernelTracker(model, x[:PROBES], every=1, mode="full")
    h = tracker.history
    assert h.steps == [0] and h.distance == [0.0] and h.relative_change == [0.0]
    assert h.norm[0] == pytest.approx(float(fastntk.reference_ntk(model, x[:PROBES]).norm()), rel=1e-10)
    assert torch.equal(tracker.initial, tracker.latest)
    tracker.initial.mul_(2)  # the caller's copy (a float64 kernel on the CPU): the records use their own
    # steps that do not change the parameters (learning rate 0): the kernel stays where it was
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker.attach(frozen)
    for _ in range(2):
        train_step(model, frozen, x, y)
    tracker.detach()
    assert h.steps == [0, 1, 2]
    assert max(h.distance) <= 1e-15 and max(h.relative_change) <= 1e-15 and max(h.velocity[1:]) <= 1e-15


def test_each_record_reads_the_live_parameters_with_one_calibrated_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters changed in place between records are seen (the kernel equals a fresh
    fastntk.ntk), and the method is chosen and calibrated once, at the first kernel."""
    from fastntk import _api

    calls = {"plan": 0, "calibrate": 0}
    make_plan, calibrate = _api.make_plan, _api.calibrate_on_first_block

    def counted_plan(*args, **kwargs):
        calls["plan"] += 1
        return make_plan(*args, **kwargs)

    def counted_calibrate(*args, **kwargs):
        calls["calibrate"] += 1
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(_api, "make_plan", counted_plan)
    monkeypatch.setattr(_api, "calibrate_on_first_block", counted_calibrate)
    model, x, _ = regression("mlp")
    probe = x[:PROBES]
    tracker = fastntk.KernelTracker(model, probe, mode="full")
    first = dict(calls)
    assert first == {"plan": 1, "calibrate": 1}
    for i in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1 + 0.1 * i)
        tracker.step()
        assert_rel_close(tracker.latest, fastntk.reference_ntk(model, probe), RTOL64 * 10)
    assert calls == first  # no new plan or calibration (reference_ntk plans nothing)
    assert tracker.history.distance[-1] > 0  # the in-place changes moved the kernel


def test_detach_removes_the_hook() -> None:
    model, x, y = regression("tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = fastntk.KernelTracker(model, x[:PROBES], every=1, mode="trace")
    hooks_before = dict(optimizer._optimizer_step_post_hooks)
    assert tracker.attach(optimizer) is tracker and tracker.attached
    train_step(model, optimizer, x, y)
    tracker.detach()
    assert not tracker.attached and optimizer._optimizer_step_post_hooks == hooks_before
    for _ in range(3):
        train_step(model, optimizer, x, y)
    assert tracker.history.steps == [0, 1] and tracker.steps == 1  # further steps record nothing
    tracker.detach()  # detaching twice is fine
    tracker.attach(optimizer)  # and it can be attached again
    train_step(model, optimizer, x, y)
    assert tracker.history.steps == [0, 1, 2]
    tracker.detach()


def test_leaving_the_with_block_detaches_also_on_error() -> None:
    model, x, y = regression("tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = fastntk.KernelTracker(model, x[:PROBES], every=1, mode="trace")
    with pytest.raises(RuntimeError, match="stop"):
        with tracker.attach(optimizer):
            train_step(model, optimizer, x, y)
            raise RuntimeError("stop")
    assert not tracker.attached and not optimizer._optimizer_step_post_hooks
    train_step(model, optimizer, x, y)
    assert tracker.history.steps == [0, 1]


class DropoutBatchNormNet(nn.Module):
    """Dropout and BatchNorm: random and batch-coupled in training mode, so the kernel is defined
    only in eval mode; and a custom train() that must not run when the tracker flips flags."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.train_calls = 0

    def train(self, mode: bool = True) -> "DropoutBatchNormNet":
        self.train_calls += 1
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def run_training(track: bool, steps: int = 6) -> tuple[DropoutBatchNormNet, fastntk.KernelTracker | None]:
    torch.manual_seed(0)
    model = DropoutBatchNormNet()
    x, y = torch.randn(24, 4), torch.randn(24, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = fastntk.KernelTracker(model, x[:5], every=2, mode="full") if track else None
    if tracker is not None:
        tracker.attach(optimizer)
    for _ in range(steps):
        train_step(model, optimizer, x, y)
    if tracker is not None:
        tracker.detach()
    return model, tracker


def test_tracking_leaves_the_training_run_as_it_was() -> None:
    """Same seed, with and without a tracker: the same parameters, buffers and RNG state at the
    end, bitwise (dropout draws random numbers, BatchNorm updates running statistics)."""
    tracked, tracker = run_training(True)
    plain, _ = run_training(False)
    assert tracker.history.steps == [0, 2, 4, 6]
    for (name, a), (_, b) in zip(tracked.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert tracked.training and all(m.training for m in tracked.modules())
    assert tracked.train_calls == plain.train_calls  # flags set directly, no train() call


def test_a_record_between_backward_and_step_changes_no_grad_flag_or_buffer() -> None:
    torch.manual_seed(0)
    model = DropoutBatchNormNet()
    model.body[3].eval()  # a mixed set of flags, to be restored one by one
    x, y = torch.randn(24, 4), torch.randn(24, 2)
    tracker = fastntk.KernelTracker(model, x[:5], every=1, mode="trace")
    torch.nn.functional.mse_loss(model(x), y).backward()
    grads = {name: (p.grad, p.grad.clone()) for name, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rng = torch.get_rng_state()
    grad_enabled = torch.is_grad_enabled()
    assert tracker.step()  # computes a kernel
    for name, p in model.named_parameters():
        assert p.grad is grads[name][0] and torch.equal(p.grad, grads[name][1]), name
        assert p.requires_grad and p.grad_fn is None
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng) and torch.is_grad_enabled() == grad_enabled


def test_eval_mode_false_keeps_the_model_as_it_is() -> None:
    torch.manual_seed(0)
    model = DropoutBatchNormNet()
    with pytest.raises(fastntk.ModelError, match="training mode"):
        fastntk.KernelTracker(model, torch.randn(5, 4), eval_mode=False)
    model.eval()
    tracker = fastntk.KernelTracker(model, torch.randn(5, 4), eval_mode=False, mode="trace")
    assert tracker.history.steps == [0] and not model.training


def test_bad_arguments_are_refused() -> None:
    model, x, _ = regression("tanh")
    for every in (0, -2, 1.5, True, "3", None):
        with pytest.raises(fastntk.OptionError, match="every="):
            fastntk.KernelTracker(model, x, every=every)
    with pytest.raises(fastntk.OptionError, match="keep_kernels="):
        fastntk.KernelTracker(model, x, keep_kernels="yes")
    with pytest.raises(fastntk.OptionError, match="eval_mode="):
        fastntk.KernelTracker(model, x, eval_mode=1)
    with pytest.raises(fastntk.OptionError, match="unknown mode"):
        fastntk.KernelTracker(model, x, mode="traces")
    with pytest.raises(fastntk.OptionError, match="unknown method"):
        fastntk.KernelTracker(model, x, method="fast")
    with pytest.raises(fastntk.ModelError, match="failed on the inputs"):
        fastntk.KernelTracker(model, torch.randn(4, 5, dtype=torch.float64))  # the model takes 4 features
    tracker = fastntk.KernelTracker(model, x[:PROBES], mode="trace")
    with pytest.raises(fastntk.InputError, match="torch.optim.Optimizer"):
        tracker.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker.attach(optimizer)
    with pytest.raises(fastntk.OptionError, match="attached"):
        tracker.attach(optimizer)
    tracker.detach()
    with pytest.raises(fastntk.InputError, match="zero"):  # no distance from a zero kernel
        fastntk.KernelTracker(nn.Linear(3, 1, bias=False), torch.zeros(4, 3))


def test_a_kernel_that_becomes_zero_during_training_is_recorded_not_raised() -> None:
    """A network that dies during training (ReLU units all off, no biases) has a zero kernel:
    the record says so (norm 0, NaN where a distance from or relative to a zero kernel is
    undefined) rather than raising out of optimizer.step(), and tracking goes on."""
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 1, bias=False)).double()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs()
    tracker = fastntk.KernelTracker(net, x, mode="trace")
    with torch.no_grad():
        net[0].weight.fill_(-1.0)  # every hidden unit off on every (positive) probe: the kernel is zero
    assert tracker.step()
    h = tracker.history
    assert h.norm[1] == 0.0 and h.relative_change[1] == 1.0 and h.relative_velocity[1] == 1.0
    assert math.isnan(h.distance[1]) and math.isnan(h.velocity[1])
    with torch.no_grad():
        net[0].weight.fill_(1.0)  # alive again
    assert tracker.step()
    reference = fastntk.reference_ntk(net, x, mode="trace")
    assert h.norm[2] == pytest.approx(float(reference.norm()), rel=1e-10)
    assert h.distance[2] == pytest.approx(analysis.kernel_distance(tracker.initial, reference), abs=1e-12)
    assert math.isnan(h.velocity[2]) and math.isnan(h.relative_velocity[2])  # from the zero kernel: undefined
    assert json.loads(json.dumps(h.as_dict(), allow_nan=False))["distance"][1] is None


def test_history_as_dict_is_json_and_kernels_are_kept_on_request() -> None:
    model, x, y = regression("tanh")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with fastntk.KernelTracker(model, x[:PROBES], every=2, mode="diagonal", keep_kernels=True).attach(optimizer) as tracker:
        for _ in range(4):
            train_step(model, optimizer, x, y)
    h = tracker.history
    data = json.loads(json.dumps(h.as_dict(), allow_nan=False))
    assert set(data) == {"steps", *tracking.KernelHistory.SERIES}
    assert data["steps"] == [0, 2, 4] and data["velocity"][0] is None and data["distance"] == h.distance
    assert len(h.kernels) == 3 and all(k.device.type == "cpu" and k.shape == (PROBES, PROBES, 2) for k in h.kernels)
    assert torch.equal(h.kernels[0], tracker.initial) and torch.equal(h.kernels[-1], tracker.latest)
    assert h.kernels[-1] is not tracker.latest  # a copy: the caller may change it


def test_the_docstring_example_runs() -> None:
    assert doctest.testmod(tracking, raise_on_error=False).failed == 0


def test_the_guide_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example of docs/guide/training.md, as written (its figure written into a temporary folder)."""
    import re

    page = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "training.md").read_text()
    monkeypatch.chdir(tmp_path)
    codes = re.findall(r"```python\n(.*?)```", page, re.S)
    assert codes
    namespace: dict = {}
    for code in codes:
        exec(compile(code, "training.md", "exec"), namespace)  # noqa: S102
    assert namespace["history"].steps == list(range(0, 101, 10))
    assert namespace["record"]["velocity"][0] is None and 0 < namespace["history"].distance[-1] < 1
    assert not namespace["tracker"].attached
    assert (tmp_path / "kernel_during_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
