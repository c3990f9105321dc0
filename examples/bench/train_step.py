"""Training-step time of every fxrelay mode against plain autograd of the untouched model.

One run, CPU: for each model, the median wall time of a full SGD step (forward, loss,
backward, optimizer step) of the untouched model and of ``standard``, ``deep``,
``relay`` and ``greedy`` transforms of it, next to the plan's theoretical FLOP ratios
(relay re-runs the backward of its overlap stages once per gradient channel).

    python examples/bench/train_step.py                      # resnet50, resnet18, vgg16_bn
    python examples/bench/train_step.py --models resnet18 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import fxrelay

MODES = ("standard", "deep", "relay", "greedy")


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    """Median seconds of one SGD step, after one warm-up step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    times = []
    for i in range(reps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, batch: int, size: int, reps: int) -> list[str]:
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=1000).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    untouched = step_time(base, x, y, reps)
    times, plans = {}, {}
    for mode in MODES:
        model = fxrelay.transform(base, mode, example_input=x[:1])
        plans[mode] = fxrelay.plan_of(model)
        times[mode] = step_time(model, x, y, reps)
    rows = [f"| {name} | untouched | {untouched:.3f} | | | {1:.3f} |"]
    for mode in MODES:
        plan = plans[mode]
        rows.append(f"| {name} | {mode} | {times[mode]:.3f} | {times[mode] / times['deep']:.3f} | "
                    f"{plan.step_flop_ratio():.3f} (bwd {plan.backward_flop_ratio():.3f}) | "
                    f"{times[mode] / untouched:.3f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnet18,vgg16_bn")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, batch {args.batch} x 3x{args.size}x{args.size}, median of {args.reps} steps")
    print("| model | mode | step s | measured / deep | theoretical / deep (FLOPs) | / untouched |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in bench_model(name, args.batch, args.size, args.reps):
            print(row, flush=True)


if __name__ == "__main__":
    main()
