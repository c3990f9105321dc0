"""Benchmark: inference latency of the eager model, fx's ``fuse`` and ``fxrelay.deploy`` on CPU.

For each model: median latency of one batch (8x3x224x224, 2 threads) for the eager
eval model, ``torch.fx.experimental.optimization.fuse(model)`` and
``fxrelay.deploy(model)``, the ratios between them, the BatchNorms each leaves, and
the max abs output difference against the eager model. The three variants are timed
round-robin and each ratio is the median of the ratios within a round, so that load
changes on a shared machine hit the variants alike.

With ``--check-export`` it instead checks that the deployed resnet50 / efficientnet_b0
(timm) / densenet121 pass ``torch.export.export``, ``torch.jit.trace`` and
``torch.compile``, and reproduce the deployed model's outputs.

Example:
    $ python examples/bench/deploy.py
    $ python examples/bench/deploy.py --check-export
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Callable

import timm
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse

from fxrelay.deployment.deploy import deploy
from fxrelay.deployment.fold import count_batchnorms

MODELS: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet50": lambda: torchvision.models.resnet50(),
    "timm_resnet50": lambda: timm.create_model("resnet50"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm_mobilenetv3_large_100": lambda: timm.create_model("mobilenetv3_large_100"),
    "timm_convnext_tiny": lambda: timm.create_model("convnext_tiny"),
}
EXPORTED: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet50": MODELS["tv_resnet50"],
    "timm_efficientnet_b0": MODELS["timm_efficientnet_b0"],
    "tv_densenet121": lambda: torchvision.models.densenet121(),
}


def randomized_statistics(model: nn.Module) -> nn.Module:
    """Eval mode with non-trivial BN statistics, so that folding errors would show."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def round_robin_times(variants: dict[str, nn.Module], x: torch.Tensor, reps: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per forward of each variant, timed round-robin after one warm-up round.

    At least ``reps`` rounds, more (up to 50) when they fit in ``budget_s``.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        warmup = sum(_timed(module, x) for module in variants.values())
        for _ in range(min(50, max(reps, int(budget_s / warmup)))):
            for name, module in variants.items():
                times[name].append(_timed(module, x))
    return times


def _timed(module: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(x)
    return time.perf_counter() - start


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s time over ``b``'s in the same round (robust to load drifts)."""
    return statistics.median(ta / tb for ta, tb in zip(times[a], times[b]))


def max_abs_diff(reference: nn.Module, other: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return (reference(x) - other(x)).abs().max().item()


def bench_model(name: str, reps: int, budget_s: float, x: torch.Tensor) -> dict:
    model = randomized_statistics(MODELS[name]())
    variants = {"eager": model, "fuse": fuse(model), "deploy": deploy(model)}
    times = round_robin_times(variants, x, reps, budget_s)
    return {
        "model": name, "rounds": len(times["eager"]),
        **{f"{k} ms": 1e3 * statistics.median(v) for k, v in times.items()},
        "fuse/eager": paired_ratio(times, "fuse", "eager"), "deploy/eager": paired_ratio(times, "deploy", "eager"),
        "deploy/fuse": paired_ratio(times, "deploy", "fuse"),
        **{f"BN {k}": count_batchnorms(v) for k, v in variants.items()},
        "maxdiff fuse": max_abs_diff(model, variants["fuse"], x),
        "maxdiff deploy": max_abs_diff(model, variants["deploy"], x),
    }


def format_table(rows: list[dict]) -> str:
    """A markdown table of the rows, numbers rounded."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.1e}" if v < 1e-2 else f"{v:.2f}" if v < 10 else f"{v:.1f}"
        return str(v)

    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(r[k]) for k in header) + " |" for r in rows]
    return "\n".join(lines)


def check_export(size: int) -> list[dict]:
    """export / jit.trace / compile of each deployed model: max abs diff to it and seconds taken."""
    rows = []
    x = torch.randn(2, 3, size, size)
    for name, factory in EXPORTED.items():
        deployed = deploy(randomized_statistics(factory()))
        row = {"model": name}
        with torch.inference_mode():
            expected = deployed(x)
        for tool, make in (
            ("export", lambda: torch.export.export(deployed, (x,)).module()),
            ("jit.trace", lambda: torch.jit.trace(deployed, (x,), check_trace=False)),
            ("compile", lambda: torch.compile(deployed)),
        ):
            start = time.perf_counter()
            with torch.no_grad():
                diff = (make()(x) - expected).abs().max().item()
            row[f"{tool} maxdiff"], row[f"{tool} s"] = diff, time.perf_counter() - start
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="least timed rounds per model (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=60,
                        help="seconds per model for rounds beyond --reps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="images per timed batch (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="image side in px (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="timm models to time (default: all: %(default)s)")
    parser.add_argument("--check-export", action="store_true",
                        help="instead of timing, check that deployed models pass torch.export, jit.trace, compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)  # reason: torch.jit.trace is deprecated
    if args.check_export:
        print(format_table(check_export(64)))
        return
    x = torch.randn(args.batch, 3, args.size, args.size)
    load_before = os.getloadavg()[0]
    start, rows = time.perf_counter(), []
    for name in args.models:
        rows.append(bench_model(name, args.reps, args.budget_s, x))
        print(f"{name} done ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nCPU, {args.threads} threads, batch {args.batch}x3x{args.size}x{args.size}, median latency over "
          f"round-robin rounds, ratios: median of same-round ratios; torch {torch.__version__}; "
          f"load average (1 min) {load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
