"""The ``fastntk`` command line: the default run, models, weights, input files, outputs, errors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fastntk
from fastntk import cli, zoo
from fastntk.cli import compute

NETS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 6)
            self.l2 = nn.Linear(6, 3)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)))


    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(2, 3)

        def forward(self, x, y):
            return torch.tanh(self.a(x) + self.b(y))


    def make():
        return Net()


    net = make()
    holder = type("Holder", (), {"inner": make})


    def make_two():
        return Two()


    def make_dropout():
        return nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3))


    def not_a_model():
        return 3


    def broken():
        raise RuntimeError("boom")


    number = 5
    """
)


@pytest.fixture(scope="module")
def default_kernel() -> torch.Tensor:
    """fastntk.ntk on the CLI's built-in default, computed once."""
    return fastntk.ntk(zoo.tutorial_cnn(seed=0), zoo.cifar_like_inputs(20, seed=1), zoo.cifar_like_inputs(5, seed=2))


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A directory with nets.py and small input files, made the current directory."""
    (tmp_path / "nets.py").write_text(NETS)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    y1, y2 = torch.randn(5, 2, generator=g), torch.randn(3, 2, generator=g)
    np.save(tmp_path / "a.npy", a.numpy())
    np.save(tmp_path / "b.npy", b.numpy())
    np.save(tmp_path / "a64.npy", a.double().numpy())
    np.savez(tmp_path / "ab.npz", first=a.numpy(), second=b.numpy())
    torch.save(a, tmp_path / "a.pt")
    torch.save((a, y1), tmp_path / "pair1.pt")
    torch.save((b, y2), tmp_path / "pair2.pt")
    torch.save({"x": a, "y": y1}, tmp_path / "dict1.pt")
    torch.save({"x": b, "y": y2}, tmp_path / "dict2.pt")
    torch.save({"left": a, "right": b}, tmp_path / "named.pt")
    np.save(tmp_path / "wide.npy", torch.randn(5, 7, generator=g).numpy())
    bad = a.clone()
    bad[2, 1] = float("nan")
    np.save(tmp_path / "nan.npy", bad.numpy())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_nets(path: Path):
    spec = importlib.util.spec_from_file_location("nets_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeded_factory(factory, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def inputs(work: Path, *names: str) -> list[torch.Tensor]:
    return [torch.from_numpy(np.load(work / f"{n}.npy")) for n in names]


def read(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)


def run_ok(capsys, *argv: str) -> str:
    code = cli.main(["compute", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


# ---------------------------------------------------------------------------- the default


def test_default_run(tmp_path, monkeypatch, capsys, default_kernel):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compute"]) == 0
    out, err = capsys.readouterr()
    kernel = np.load(tmp_path / "ntk.npy")
    assert kernel.shape == (20, 5, 10, 10) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel, default_kernel.numpy(), rtol=1e-5, atol=1e-6 * float(default_kernel.abs().max()))
    for expected in (
        "tutorial_cnn(seed=0)", "P = 235,722 parameters", "O = 10 outputs", "eval mode",
        "x1        (20, 3, 32, 32) float32", "x2        (5, 3, 32, 32) float32", "mode      full",
        "result    (20, 5, 10, 10) float32", " s (wall", "peak RSS", "MiB",
        "largest eigenvalue", "condition number", "effective rank", "participation ratio",
        f"wrote     {tmp_path / 'ntk.npy'}",
    ):
        assert expected in out, expected
    method_line = next(line for line in out.splitlines() if line.startswith("method"))
    assert method_line.split()[1] in ("jacobian", "vp", "structured") and "chosen by auto" in method_line
    assert "Traceback" not in err


@pytest.mark.slow
def test_console_script_default(tmp_path, default_kernel):
    script = shutil.which("fastntk", path=os.path.dirname(sys.executable)) or shutil.which("fastntk")
    command = [script, "compute"] if script else [sys.executable, "-m", "fastntk", "compute"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "result    (20, 5, 10, 10) float32" in done.stdout and "effective rank" in done.stdout
    np.testing.assert_allclose(np.load(tmp_path / "ntk.npy"), default_kernel.numpy(), rtol=1e-5,
                               atol=1e-6 * float(default_kernel.abs().max()))


@pytest.mark.slow
def test_python_dash_m(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastntk", "compute", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: fastntk compute" in done.stdout and "--train-mode" in done.stdout


def test_help_and_version(capsys):
    assert cli.main(["--help"]) == 0
    assert "compute" in capsys.readouterr().out
    assert cli.main(["compute", "--help"]) == 0
    out = capsys.readouterr().out
    assert "model.eval()" in out and "--train-mode" in out and "trace_mean" in out
    assert cli.main(["--version"]) == 0
    assert fastntk.__version__ in capsys.readouterr().out


# ---------------------------------------------------------------------------- models and weights


def test_model_factory_from_py_file(work, capsys):
    out = run_ok(capsys, "--model", str(work / "nets.py") + ":make", "--x1", "a.npy", "--x2", "b.npy")
    model = seeded_factory(load_nets(work / "nets.py").make, 0).eval()
    a, b = inputs(work, "a", "b")
    expected = fastntk.ntk(model, a, b)
    torch.testing.assert_close(read(work / "ntk.npy"), expected)
    assert "P = 51 parameters, O = 3 outputs" in out and "(Net)" in out


def test_seed_changes_factory_weights(work, capsys):
    run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--out", "s0.npy")
    run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--out", "s1.npy", "--seed", "1")
    model = seeded_factory(load_nets(work / "nets.py").make, 1)
    torch.testing.assert_close(read(work / "s1.npy"), fastntk.ntk(model, inputs(work, "a")[0]))
    assert not torch.allclose(read(work / "s0.npy"), read(work / "s1.npy"))


def test_model_instance_from_module_in_cwd(work, capsys, monkeypatch):
    (work / "cli_test_nets_mod.py").write_text(NETS)
    monkeypatch.delitem(sys.modules, "cli_test_nets_mod", raising=False)
    run_ok(capsys, "--model", "cli_test_nets_mod:net", "--x1", "a.npy", "--mode", "trace")
    net = sys.modules["cli_test_nets_mod"].net
    torch.testing.assert_close(read(work / "ntk.npy"), fastntk.ntk(net, inputs(work, "a")[0], mode="trace"))
    run_ok(capsys, "--model", "cli_test_nets_mod:holder.inner", "--x1", "a.npy", "--out", "dotted.npy")
    assert read(work / "dotted.npy").shape == (5, 5, 3, 3)


def test_weights(work, capsys):
    model = seeded_factory(load_nets(work / "nets.py").make, 123)
    torch.save(model.state_dict(), work / "w.pt")
    run_ok(capsys, "--model", "nets.py:make", "--weights", "w.pt", "--x1", "a.npy", "--x2", "b.npy")
    a, b = inputs(work, "a", "b")
    torch.testing.assert_close(read(work / "ntk.npy"), fastntk.ntk(model, a, b))


def test_model_from_package_module(work, capsys):
    torch.save(zoo.cifar_like_inputs(1, seed=9), work / "img.pt")
    out = run_ok(capsys, "--model", "fastntk.zoo:tutorial_cnn", "--x1", "img.pt", "--mode", "diagonal")
    expected = fastntk.ntk(zoo.tutorial_cnn(seed=0), zoo.cifar_like_inputs(1, seed=9), mode="diagonal")
    torch.testing.assert_close(read(work / "ntk.npy"), expected)
    assert "O = 10 outputs" in out and "(TutorialCNN)" in out


def test_eval_by_default_and_train_mode(work, capsys):
    run_ok(capsys, "--model", "nets.py:make_dropout", "--x1", "a.npy")
    assert cli.main(["compute", "--model", "nets.py:make_dropout", "--x1", "a.npy", "--train-mode"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastntk: error: ModelError:") and "Dropout" in err


# ---------------------------------------------------------------------------- input files


@pytest.mark.parametrize("x1, x2", [
    ("ab.npz", None),
    ("ab.npz:first", "ab.npz:second"),
    ("a.pt", None),
    ("named.pt:left", "named.pt:right"),
    ("a64.npy", "b.npy"),  # float64 arrays are cast to the model's float32
])
def test_input_formats(work, capsys, x1, x2):
    argv = ["--model", "nets.py:net", "--x1", x1] + (["--x2", x2] if x2 else [])
    out = run_ok(capsys, *argv)
    kernel = read(work / "ntk.npy")
    assert kernel.shape == ((5, 3, 3, 3) if x2 else (5, 5, 3, 3)) and kernel.dtype == torch.float32
    if x1 == "a64.npy":
        assert "cast float64 -> float32" in out


def test_input_formats_match_npy(work, capsys):
    spec = str(work / "nets.py") + ":make"
    results = {}
    for x1, x2 in (("a.npy", "b.npy"), ("ab.npz", "ab.npz:second"), ("a.pt", "named.pt:right"), ("a64.npy", "b.npy")):
        run_ok(capsys, "--model", spec, "--x1", x1, "--x2", x2, "--out", "k.npy")
        results[x1] = read(work / "k.npy")
    reference = results.pop("a.npy")
    for kernel in results.values():
        torch.testing.assert_close(kernel, reference)


@pytest.mark.parametrize("kind", ["pair", "dict"])
def test_tuple_and_dict_inputs(work, capsys, kind):
    out = run_ok(capsys, "--model", "nets.py:make_two", "--x1", f"{kind}1.pt", "--x2", f"{kind}2.pt")
    model = seeded_factory(load_nets(work / "nets.py").make_two, 0).eval()
    x1, x2 = (torch.load(work / f"{kind}{i}.pt", weights_only=True) for i in (1, 2))
    torch.testing.assert_close(read(work / "ntk.npy"), fastntk.ntk(model, x1, x2))
    assert ("dict {x: (5, 4) float32, y: (5, 2) float32}" if kind == "dict" else "tuple ((5, 4) float32, (5, 2) float32)") in out


# ---------------------------------------------------------------------------- options and outputs


def test_out_pt_and_quiet(work, capsys):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--out", "sub.pt", "--quiet")
    assert out.strip() == str(work / "sub.pt")
    kernel = torch.load(work / "sub.pt", weights_only=True)
    assert isinstance(kernel, torch.Tensor) and kernel.shape == (5, 5, 3, 3)


@pytest.mark.parametrize("mode, shape", [("full", (5, 3, 3, 3)), ("trace", (5, 3)), ("diagonal", (5, 3, 3)), ("trace_mean", (5, 3))])
def test_modes(work, capsys, mode, shape):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--x2", "b.npy", "--mode", mode)
    kernel = read(work / "ntk.npy")
    assert kernel.shape == shape and f"mode      {mode}" in out
    model = seeded_factory(load_nets(work / "nets.py").make, 0)
    a, b = inputs(work, "a", "b")
    torch.testing.assert_close(kernel, fastntk.ntk(model, a, b, mode=mode))


def test_gram_spectrum_from_result(work, capsys):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--mode", "diagonal")
    assert "(from the result;" in out and "5x5" in out
    gram = read(work / "ntk.npy").sum(-1).double()
    eig = torch.linalg.eigvalsh(gram)
    assert f"largest eigenvalue {float(eig[-1]):.6g}" in out
    assert f"effective rank {fastntk.analysis.effective_rank(gram):.4g}" in out
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--no-spectrum")
    assert not any(line.startswith("spectrum") for line in out.splitlines())


def test_dtype_float64(work, capsys):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--x2", "b.npy", "--dtype", "float64", "--out", "k.pt")
    kernel = read(work / "k.pt")
    assert kernel.dtype == torch.float64 and "float64" in out
    model = seeded_factory(load_nets(work / "nets.py").make, 0)
    a, b = inputs(work, "a", "b")
    torch.testing.assert_close(kernel, fastntk.ntk(model, a, b, dtype=torch.float64))
    run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--dtype", "float64")
    assert read(work / "ntk.npy").dtype == torch.float64


@pytest.mark.parametrize("method", fastntk._options.METHOD_NAMES)
def test_methods_and_block_size(work, capsys, method):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--method", method, "--block-size", "2", "--device", "cpu")
    model = seeded_factory(load_nets(work / "nets.py").make, 0)
    torch.testing.assert_close(read(work / "ntk.npy"), fastntk.ntk(model, inputs(work, "a")[0]))
    if method != "auto":
        assert f"method    {method}\n" in out


@pytest.mark.parametrize("size, nbytes", [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("300000", 300000)])
def test_max_memory_sizes(work, capsys, size, nbytes):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--max-memory", size)
    assert f"max memory {size} ({nbytes:,} bytes)" in out
    model = seeded_factory(load_nets(work / "nets.py").make, 0)
    torch.testing.assert_close(read(work / "ntk.npy"), fastntk.ntk(model, inputs(work, "a")[0]))


def test_max_memory_default_is_4gb(work, capsys):
    out = run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy")
    assert "max memory 4GB (4,000,000,000 bytes)" in out


def test_deprecated_chunk_size_still_works_and_warns(work, capsys):
    """--chunk-size is the old spelling of --block-size: hidden from --help, same result, a note on stderr."""
    code = cli.main(["compute", "--model", "nets.py:make", "--x1", "a.npy", "--chunk-size", "2", "--out", "old.npy"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "fastntk: warning: --chunk-size is deprecated" in err and "use --block-size" in err
    run_ok(capsys, "--model", "nets.py:make", "--x1", "a.npy", "--block-size", "2", "--out", "new.npy")
    torch.testing.assert_close(read(work / "old.npy"), read(work / "new.npy"))
    assert cli.main(["compute", "--chunk-size", "0"]) == 2
    assert "not a positive integer" in capsys.readouterr().err
    assert cli.main(["compute", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--block-size" in out and "--max-memory" in out and "--chunk-size" not in out


# ---------------------------------------------------------------------------- errors

ERRORS = {
    "missing x1": (["--x1", "nope.npy"], "no such file"),
    "missing x2": (["--x1", "a.npy", "--x2", "nope.pt"], "no such file"),
    "x2 without x1": (["--x2", "b.npy"], "--x2 needs --x1"),
    "input suffix": (["--x1", "nets.py"], "unsupported file type"),
    "npz key": (["--x1", "ab.npz:third"], "no array 'third'"),
    "pt key": (["--x1", "named.pt:middle"], "no entry 'middle'"),
    "npy key": (["--x1", "a.npy:k"], "holds one array"),
    "pt not a batch": (["--x1", "w_list.pt"], "expected a tensor"),
    "wrong shape": (["--x1", "wide.npy"], "ModelError"),
    "x1 x2 mismatch": (["--x1", "a.npy", "--x2", "wide.npy"], "InputError"),
    "nan input": (["--x1", "nan.npy"], "NonFiniteError"),
    "missing weights": (["--weights", "nope.pt", "--x1", "a.npy"], "no such file"),
    "weights mismatch": (["--weights", "w_other.pt", "--x1", "a.npy"], "does not fit the model"),
    "weights not a state_dict": (["--weights", "w_list.pt", "--x1", "a.npy"], "not a state_dict"),
    "weights unreadable": (["--weights", "a.npy", "--x1", "a.npy"], "cannot load"),
    "model no colon": (["--model", "nets.py", "--x1", "a.npy"], "expected MODULE:ATTR"),
    "model missing module": (["--model", "no_such_module_xyz:f", "--x1", "a.npy"], "no module named"),
    "model missing file": (["--model", "nope.py:f", "--x1", "a.npy"], "no such file"),
    "model missing attr": (["--model", "nets.py:nothing", "--x1", "a.npy"], "no attribute 'nothing'"),
    "model not callable": (["--model", "nets.py:number", "--x1", "a.npy"], "must be an nn.Module"),
    "factory not a module": (["--model", "nets.py:not_a_model", "--x1", "a.npy"], "not a torch.nn.Module"),
    "factory raises": (["--model", "nets.py:broken", "--x1", "a.npy"], "RuntimeError: boom"),
    "out suffix": (["--x1", "a.npy", "--out", "k.txt"], "unsupported file type"),
    "out directory": (["--x1", "a.npy", "--out", "nodir/k.npy"], "does not exist"),
    "bad mode": (["--x1", "a.npy", "--mode", "sum"], "invalid choice"),
    "bad method": (["--x1", "a.npy", "--method", "magic"], "invalid choice"),
    "bad block size": (["--x1", "a.npy", "--block-size", "0"], "not a positive integer"),
    "bad max memory": (["--x1", "a.npy", "--max-memory", "lots"], "'lots' is not a memory size"),
    "bad device": (["--x1", "a.npy", "--device", "toaster"], "--device"),
    "unknown option": (["--x1", "a.npy", "--frobnicate"], "unrecognized arguments"),
}


def prepare_error_files(work: Path) -> None:
    torch.save([1, 2, 3], work / "w_list.pt")
    torch.save({"other.weight": torch.zeros(2)}, work / "w_other.pt")


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("name", list(ERRORS))
def test_errors(work, capsys, name, debug):
    prepare_error_files(work)
    argv, fragment = ERRORS[name]
    needs_model = name not in ("missing x1", "x2 without x1") and not any(a == "--model" for a in argv)
    argv = ["compute", *(["--model", "nets.py:make"] if needs_model else []), *argv, *(["--debug"] if debug else [])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("fastntk: error: ") and fragment in lines[-1]
    if debug:
        assert "Traceback (most recent call last)" in err
    else:
        assert len(lines) == 1 and "Traceback" not in err
    assert not (work / "ntk.npy").exists()


def test_no_command(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().err.strip() == "fastntk: error: choose a command: compute (see 'fastntk --help')"


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_unexpected_error_exits_1(work, capsys, monkeypatch, debug):
    def explode(*_):
        raise RuntimeError("disk\non fire")

    monkeypatch.setattr(compute, "save_kernel", explode)
    assert cli.main(["compute", "--model", "nets.py:make", "--x1", "a.npy", *(["--debug"] if debug else [])]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("fastntk: error: unexpected RuntimeError: disk on fire")
    assert ("Traceback (most recent call last)" in err) == debug
    if not debug:
        assert len(lines) == 1 and "--debug" in lines[0]
