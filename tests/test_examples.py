"""The examples (examples/widths.py, examples/digits.py) run with --quick and write sane results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("sklearn", reason="the examples extra: pip install 'fastntk[examples]'")
pytest.importorskip("matplotlib", reason="the examples extra: pip install 'fastntk[examples]'")


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_widths_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = example("widths").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "widths.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "widths.json").read_text()) == json.loads(json.dumps(result))
    widths = result["widths"]
    assert [w["width"] for w in widths] == [16, 64, 256]
    for w in widths:
        assert w["steps"] == [0, 10, 20, 30, 40, 50, 60]
        assert w["distance_series"][0] == 0.0 and w["relative_change_series"][0] == 0.0
        assert 0 < w["distance"] < 1 and 0 < w["relative_change"] < 10 and w["final_loss"] < 0.5
    # wider moves less: seeded, and the gaps are factors of 2 to 3 (0.20, 0.064, 0.031), far above rounding
    changes = [w["relative_change"] for w in widths]
    assert changes[0] > changes[1] > changes[2] and result["slope"]["relative_change"] < -0.3
    assert "width" in capsys.readouterr().out


@pytest.mark.slow
def test_digits_quick(tmp_path: Path) -> None:
    result = example("digits").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "digits.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "digits.json").read_text())["accuracy"] == result["accuracy"]
    accuracy = result["accuracy"]
    # chance is 0.1; seeded quick runs give 0.94 (a), 0.94 (b), 0.90 (c)
    for name in ("kernel_regression", "kernel_at_end", "network", "linearised"):
        assert accuracy[name] > 0.7, name
    curves = result["curves"]
    assert all(len(curve) == len(result["steps"]) for curve in curves.values())
    assert result["steps"][0] == 0 and result["steps"][-1] == result["config"]["steps"]
    assert curves["network"][0] == curves["linearised"][0] == curves["kernel"][0] == accuracy["initial"]  # one start
    movement = result["kernel_movement"]
    assert movement["distance"][0] == 0 and movement["distance"][-1] > 0 and movement["steps"][-1] == result["config"]["steps"]


@pytest.mark.slow
def test_digits_linearised_network_follows_the_full_kernel_closed_form(tmp_path: Path) -> None:
    """With the full (N, N, 10, 10) kernel, (c) trained by gradient descent ends where
    gradient_descent_mse puts it (up to the difference of discrete steps and flow)."""
    result = example("digits").main(["--quick", "--mode", "full", "--train", "120", "--test", "100", "--out", str(tmp_path)])
    assert result["relative_gap_linearised_to_kernel"] < 1e-2
    assert result["accuracy"]["linearised"] == pytest.approx(result["accuracy"]["kernel_at_end"], abs=0.011)
