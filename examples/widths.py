"""How far the NTK moves during training, for MLPs of several widths: the wider, the less
(the lazy regime of Jacot et al. 2018; relative change ~ width^(-1/2) in NTK parameterisation).

Each network is an MLP with two hidden tanh layers of width n in NTK parameterisation
(weights N(0, 1), each layer's output scaled by 1/sqrt(fan_in)), so one learning rate suits
every width; it is trained by full-batch gradient descent on a small seeded regression task
(a function on the unit circle), while fastntk.KernelTracker records the eNTK on a fixed probe
set every few steps. Prints a table (width, final distance from the initial kernel, relative
change, ...) and writes widths.png and widths.json to --out.

    python examples/widths.py            # the full run (widths 16 to 1024)
    python examples/widths.py --quick    # a few seconds (three widths, fewer steps)
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

WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
QUICK_WIDTHS = (16, 64, 256)


class NTKLinear(nn.Module):
    """y = (σ_w / sqrt(fan_in)) W x + σ_b b with W, b ~ N(0, 1): the NTK parameterisation."""

    def __init__(self, fan_in: int, fan_out: int, sigma_w: float = 1.5, sigma_b: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.randn(fan_out))
        self.scale, self.sigma_b = sigma_w / math.sqrt(fan_in), sigma_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x @ self.weight.T + self.sigma_b * self.bias


def mlp(width: int, seed: int) -> nn.Module:
    """Two hidden tanh layers of ``width``, one output, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(NTKLinear(2, width), nn.Tanh(), NTKLinear(width, width), nn.Tanh(), NTKLinear(width, 1))


def circle(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n points on the unit circle (random angles, or evenly spaced without a generator) and
    the target sin(2a) + 0.5 cos(3a) at angle a: inputs (n, 2), targets (n, 1)."""
    if generator is None:
        angle = torch.arange(n) * (2 * math.pi / n)
    else:
        angle = torch.rand(n, generator=generator) * 2 * math.pi
    x = torch.stack([angle.cos(), angle.sin()], dim=1)
    return x, (torch.sin(2 * angle) + 0.5 * torch.cos(3 * angle))[:, None]


def train(width: int, x: torch.Tensor, y: torch.Tensor, probe: torch.Tensor, steps: int, every: int, lr: float, seed: int) -> dict:
    """Train one width by full-batch gradient descent on MSE, tracking the kernel on ``probe``."""
    model = mlp(width, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    start = time.perf_counter()
    with fastntk.KernelTracker(model, probe, every=every, mode="trace").attach(optimizer) as tracker:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = 0.5 * (model(x) - y).square().mean()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        final_loss = float(0.5 * (model(x) - y).square().mean())
    h = tracker.history
    return {
        "width": width,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": final_loss,
        "distance": h.distance[-1],
        "relative_change": h.relative_change[-1],
        "kernel_seconds": sum(h.seconds),
        "seconds": time.perf_counter() - start,
        "history": h.as_dict(),
    }


def slope(widths: list[int], values: list[float]) -> float:
    """The least-squares slope of log(value) against log(width)."""
    lx = torch.tensor([math.log(w) for w in widths], dtype=torch.float64)
    ly = torch.tensor([math.log(v) for v in values], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / lx.square().sum())


def average(runs: list[dict]) -> dict:
    """One width's runs over seeds: the mean (and standard deviation) of the final numbers, the
    mean of each recorded series."""
    first = runs[0]
    out = {"width": first["width"], "parameters": first["parameters"], "seeds": len(runs)}
    for key in ("final_loss", "distance", "relative_change", "kernel_seconds", "seconds"):
        values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
        out[key] = float(values.mean())
        out[key + "_std"] = float(values.std()) if len(runs) > 1 else 0.0
    out["steps"] = first["history"]["steps"]
    for key in ("distance", "relative_change"):
        out[key + "_series"] = torch.tensor([run["history"][key] for run in runs], dtype=torch.float64).mean(0).tolist()
    return out


def plot(widths: list[dict], change_slope: float, path: Path) -> None:
    """The relative kernel change against step per width, and the final change against width."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise SystemExit("this example plots with matplotlib: pip install 'fastntk[examples]'") from exc
    figure = Figure(figsize=(10, 4), layout="constrained")
    over_steps, over_width = figure.subplots(1, 2)
    for i, w in enumerate(widths):
        over_steps.plot(w["steps"][1:], w["relative_change_series"][1:], color=f"C{i}", label=f"width {w['width']}")
    over_steps.set(xlabel="gradient descent step", ylabel="‖K_t − K_0‖ / ‖K_0‖", yscale="log", title="How far the NTK on the probe set moves")
    over_steps.legend(fontsize="small")
    n = [w["width"] for w in widths]
    for key, marker in (("relative_change", "o"), ("distance", "s")):
        over_width.loglog(n, [w[key] for w in widths], marker=marker, label=f"{key.replace('_', ' ')} at the end")
    for power, style in ((0.5, "k:"), (1.0, "k--")):
        anchor = widths[-1]["relative_change"] * n[-1] ** power
        over_width.loglog(n, [anchor * v ** -power for v in n], style, lw=1, label=f"∝ width^−{power:g}")
    over_width.set(xlabel="width", title=f"Wider moves less (relative change ∝ width^{change_slope:.2f})")
    over_width.legend(fontsize="small")
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    """Run the example (``argv``: the command line's arguments; None: sys.argv's); returns what it writes to widths.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three widths, one seed, fewer steps (a few seconds)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out", help="where widths.png and widths.json go")
    parser.add_argument("--seeds", type=int, default=None, help="initialisations per width (default 3; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=0.6)
    args = parser.parse_args(argv)
    widths = QUICK_WIDTHS if args.quick else WIDTHS
    seeds = args.seeds or (1 if args.quick else 3)
    steps, every = (60, 10) if args.quick else (200, 10)
    x, y = circle(32, torch.Generator().manual_seed(0))
    probe, _ = circle(16)  # evenly spaced, fixed across widths
    started = time.perf_counter()
    results = [average([train(width, x, y, probe, steps, every, args.lr, seed) for seed in range(seeds)]) for width in widths]
    change_slope = slope(list(widths), [w["relative_change"] for w in results])
    distance_slope = slope(list(widths), [w["distance"] for w in results])

    print(f"NTK-parameterised tanh MLPs (2 hidden layers), {steps} steps of full-batch GD (lr {args.lr}) on 32 points;")
    print(f"the eNTK on 16 probe points every {every} steps; mean ± std over {seeds} seed(s)")
    print(f"{'width':>6} {'params':>9} {'final loss':>10} {'distance from K_0':>21} {'‖K_T − K_0‖/‖K_0‖':>21} {'kernel s':>8}")
    for w in results:
        print(
            f"{w['width']:>6} {w['parameters']:>9} {w['final_loss']:>10.1e} {w['distance']:>11.2e} ± {w['distance_std']:<7.1e}"
            f" {w['relative_change']:>11.2e} ± {w['relative_change_std']:<7.1e} {w['kernel_seconds']:>8.2f}"
        )
    print(f"log-log slope against width: relative change {change_slope:.2f}, distance {distance_slope:.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, change_slope, args.out / "widths.png")
    result = {
        "config": {"widths": list(widths), "seeds": seeds, "steps": steps, "every": every, "lr": args.lr, "train": 32, "probes": 16,
                   "model": "NTK-parameterised MLP, 2 hidden tanh layers", "quick": args.quick},
        "widths": results,
        "slope": {"relative_change": change_slope, "distance": distance_slope},
        "seconds": time.perf_counter() - started,
    }
    (args.out / "widths.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'widths.png'} and {args.out / 'widths.json'} in {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
