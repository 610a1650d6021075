"""Real data: scikit-learn's bundled handwritten digits (8x8 images, 10 classes), three ways.

(a) NTK kernel regression at initialisation: the eNTK of the untrained MLP on the training and
    test images (fastntk.ntk_fn, mode="trace_mean" by default: one kernel for all ten outputs), and fastntk.predict.gradient_descent_mse, the
    closed form of the network trained by gradient flow in the kernel regime, at every training
    time and at t = ∞ (kernel regression from the network's initial outputs f_0);
(b) the network itself, trained by full-batch gradient descent on MSE to one-hot targets;
(c) its linearisation around the initial parameters (fastntk.linearize), trained the same way.
While (b) trains, fastntk.KernelTracker records how far its NTK moves on 32 training images.

The MLP (64 -> 256 -> 256 -> 10, ReLU) has PyTorch's standard parameterisation and default
initialisation; the learning rate is half the largest stable one of its initial kernel
(fastntk.predict.max_learning_rate). Prints the test accuracies and writes digits.png (test
accuracy against step) and digits.json to --out. Needs scikit-learn and matplotlib:
``pip install 'fastntk[examples]'``.

    python examples/digits.py            # the full run: 1000 training images, 797 test images
    python examples/digits.py --quick    # a few seconds: 300 and 200 images, a smaller MLP
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import fastntk


def load(train: int, test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded split of the digits: inputs (N, 64) standardised with the training set's
    statistics, integer labels (N,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("this example reads scikit-learn's digits: pip install 'fastntk[examples]'") from exc
    digits = load_digits()
    x, labels = torch.tensor(digits.data, dtype=torch.float32), torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = order[:train], order[train:train + test]
    mean, std = x[train_idx].mean(0), x[train_idx].std(0).clamp(min=1e-3)  # some border pixels are always 0
    x = (x - mean) / std
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]


def mlp(width: int, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((outputs.argmax(1) == labels).double().mean())


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """neural-tangents' loss ‖f − Y‖² / (2|Y|), the one fastntk.predict assumes."""
    return 0.5 * (outputs - targets).square().mean()


def checkpoints(steps: int, count: int) -> list[int]:
    """About ``count`` steps from 0 to ``steps``, evenly spaced in log(step)."""
    return sorted({0, steps} | {int(round(math.exp(i * math.log(steps) / (count - 1)))) for i in range(count)})


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor,
          labels_test: torch.Tensor, record: list[int]) -> list[float]:
    """Full-batch gradient descent on MSE up to step ``record[-1]``; the test accuracy at the steps ``record``."""
    accuracies = []
    for step in range(record[-1] + 1):
        if step in record:
            with torch.no_grad():
                accuracies.append(accuracy(model(x_test), labels_test))
        if step == record[-1]:
            break
        optimizer.zero_grad()
        mse(model(x), y).backward()
        optimizer.step()
    return accuracies


def plot(steps: list[int], result: dict, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise SystemExit("this example plots with matplotlib: pip install 'fastntk[examples]'") from exc
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axes = figure.subplots()
    curves = result["curves"]
    axes.plot(steps, curves["network"], label="(b) network, GD on MSE", color="C0")
    axes.plot(steps, curves["linearised"], label="(c) linearised network, same GD", color="C1")
    axes.plot(steps, curves["kernel"], "--", label="(a) NTK at init, gradient flow (closed form)", color="C2")
    axes.axhline(result["accuracy"]["kernel_regression"], color="C2", lw=1, ls=":", label="(a) NTK kernel regression (t = ∞)")
    axes.axhline(0.1, color="grey", lw=0.8, label="chance")
    axes.set_xscale("symlog", linthresh=1)
    axes.set(xlabel="full-batch gradient descent step", ylabel="test accuracy", ylim=(0, 1.0), xlim=(0, steps[-1]),
             title=f"Digits: {result['config']['train']} train / {result['config']['test']} test images, width {result['config']['width']}")
    axes.legend(fontsize="small", loc="lower right")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    """Run the example (``argv``: the command line's arguments; None: sys.argv's); returns what it writes to digits.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, a smaller MLP, fewer steps (a few seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="where digits.png and digits.json go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=("trace_mean", "full"), default="trace_mean",
                        help="the kernel of (a): trace_mean, one (N, N) kernel for every output (default); full, "
                             "(N, N, 10, 10), which (c) follows exactly but is a (10 N)^2 system")
    parser.add_argument("--train", type=int, default=None, help="training images (default 1000; 300 with --quick)")
    parser.add_argument("--test", type=int, default=None, help="test images (default 797, the rest; 200 with --quick)")
    args = parser.parse_args(argv)
    n_train, n_test, width, steps = (300, 200, 64, 200) if args.quick else (1000, 797, 256, 1000)
    n_train, n_test = args.train or n_train, args.test or n_test
    if n_train + n_test > 1797:
        parser.error(f"--train {n_train} and --test {n_test} add up to more than the 1797 digits")
    started = time.perf_counter()
    x, labels, x_test, labels_test = load(n_train, n_test, args.seed)
    y = torch.nn.functional.one_hot(labels, 10).float()
    model = mlp(width, args.seed)
    with torch.no_grad():
        f0, f0_test = model(x), model(x_test)

    # (a) the kernel at initialisation
    clock = time.perf_counter()
    kernel = fastntk.ntk_fn(model, mode=args.mode)
    k_train, k_test = kernel(x), kernel(x_test, x)  # trace_mean: (N, N), (N_test, N); full: (N, N, 10, 10), (N_test, N, 10, 10)
    kernel_seconds = time.perf_counter() - clock
    lr = 0.5 * fastntk.predict.max_learning_rate(k_train, y_train_size=y.numel())
    flow = fastntk.predict.gradient_descent_mse(k_train, y, learning_rate=lr)
    regression = flow(math.inf, f0, f0_test, k_test)[1]
    record = checkpoints(steps, 30)
    kernel_curve = [accuracy(flow(float(t), f0, f0_test, k_test)[1], labels_test) for t in record]

    # (b) the network and (c) its linearisation, trained the same way from the same start
    clock = time.perf_counter()
    linearised = fastntk.linearize(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with fastntk.KernelTracker(model, x[:32], every=max(1, steps // 10), mode="trace_mean").attach(optimizer) as tracker:
        network_curve = train(model, optimizer, x, y, x_test, labels_test, record)  # how far its kernel moves, too
    network_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    linearised_curve = train(linearised, torch.optim.SGD(linearised.parameters(), lr=lr), x, y, x_test, labels_test, record)
    linearised_seconds = time.perf_counter() - clock
    with torch.no_grad():
        f_network, f_linearised = model(x_test), linearised(x_test)
    f_kernel = flow(float(steps), f0, f0_test, k_test)[1].float()

    result = {
        "config": {"train": n_train, "test": n_test, "width": width, "steps": steps, "learning_rate": lr,
                   "seed": args.seed, "kernel_mode": args.mode, "model": f"MLP 64-{width}-{width}-10 ReLU, standard parameterisation", "quick": args.quick},
        "accuracy": {
            "kernel_regression": accuracy(regression, labels_test),
            "kernel_at_end": kernel_curve[-1],
            "network": network_curve[-1],
            "linearised": linearised_curve[-1],
            "initial": accuracy(f0_test, labels_test),
        },
        "test_mse": {
            "kernel_regression": float(mse(regression.float(), torch.nn.functional.one_hot(labels_test, 10).float())),
            "network": float(mse(f_network, torch.nn.functional.one_hot(labels_test, 10).float())),
            "linearised": float(mse(f_linearised, torch.nn.functional.one_hot(labels_test, 10).float())),
        },
        "relative_gap_linearised_to_kernel": float((f_linearised - f_kernel).norm() / (f_kernel - f0_test).norm()),
        "relative_gap_network_to_linearised": float((f_network - f_linearised).norm() / (f_linearised - f0_test).norm()),
        "kernel_movement": {"probes": 32, **tracker.history.as_dict()},
        "steps": record,
        "curves": {"network": network_curve, "linearised": linearised_curve, "kernel": kernel_curve},
        "seconds": {"kernels": kernel_seconds, "network": network_seconds, "linearised": linearised_seconds},
    }
    a = result["accuracy"]
    print(f"digits: {n_train} train / {n_test} test images; MLP 64-{width}-{width}-10 (ReLU, standard parameterisation), seed {args.seed}")
    print(f"kernel mode {args.mode}; full-batch GD on MSE, {steps} steps, learning rate {lr:.3g} (half the largest stable one of the initial NTK)")
    print(f"{'':44} {'test accuracy':>13}")
    print(f"{'(a) NTK kernel regression at init (t = ∞)':44} {a['kernel_regression']:>13.3f}")
    print(f"{'(a) NTK gradient flow at t = ' + str(steps):44} {a['kernel_at_end']:>13.3f}")
    print(f"{'(b) network trained by GD':44} {a['network']:>13.3f}")
    print(f"{'(c) linearised network trained by GD':44} {a['linearised']:>13.3f}")
    print(f"{'    (untrained network)':44} {a['initial']:>13.3f}")
    print(
        f"test outputs: ‖(c) − (a) at t‖ / ‖(a) − f_0‖ = {result['relative_gap_linearised_to_kernel']:.3f}; "
        f"‖(b) − (c)‖ / ‖(c) − f_0‖ = {result['relative_gap_network_to_linearised']:.3f}"
    )
    h = tracker.history
    print(f"(b)'s NTK on 32 training images moved: kernel distance from init {h.distance[-1]:.3g}, "
          f"‖K_T − K_0‖/‖K_0‖ = {h.relative_change[-1]:.3g} (fastntk.KernelTracker, every {tracker.every} steps)")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(record, result, args.out / "digits.png")
    result["seconds"]["total"] = time.perf_counter() - started
    (args.out / "digits.json").write_text(json.dumps(result, indent=1))
    s = result["seconds"]
    print(f"kernels {s['kernels']:.1f} s, network {s['network']:.1f} s, linearised {s['linearised']:.1f} s; "
          f"wrote {args.out / 'digits.png'} and {args.out / 'digits.json'} in {s['total']:.1f} s")
    return result


if __name__ == "__main__":
    main()
