"""Training-step time of every fxrelay mode against plain autograd of the untouched model.

One run, CPU: for each model, the median wall time of a full SGD step (forward, loss,
backward, optimizer step) of the untouched model and of ``standard``, ``deep``,
``relay`` and ``greedy`` transforms of it, next to the plan's theoretical FLOP ratios
(relay re-runs the backward of its overlap stages once per gradient channel): the
theoretical ratio is ``plan.step_flops()`` of the mode over that of the deep transform.

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


def sgd_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one SGD step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def bench_model(name: str, batch: int, size: int, reps: int) -> list[str]:
    """Rows of the table; variants run round-robin, ratios are medians of per-round ratios."""
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=1000).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    variants = {"untouched": base}
    variants.update({mode: fxrelay.transform(base, mode, example_input=x[:1]) for mode in MODES})
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in variants.items()}
    times = {k: [] for k in variants}
    for rep in range(reps + 1):  # reason: the first round warms up
        for k, model in variants.items():
            seconds = sgd_step(model, optimizers[k], x, y)
            if rep:
                times[k].append(seconds)
    deep_flops = fxrelay.plan_of(variants["deep"]).step_flops()
    rows = [f"| {name} | untouched | {statistics.median(times['untouched']):.3f} | | | 1.000 |"]
    for mode in MODES:
        plan = fxrelay.plan_of(variants[mode])
        rows.append(f"| {name} | {mode} | {statistics.median(times[mode]):.3f} | "
                    f"{_ratio(times[mode], times['deep']):.3f} | {plan.step_flops() / deep_flops:.3f} | "
                    f"{_ratio(times[mode], times['untouched']):.3f} |")
    return rows


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,resnet18,vgg16_bn",
                        help="comma-separated timm models (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="images per training step (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="image side in px (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="round-robin rounds of timed steps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (default: torch's, here %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU, {args.threads} threads, batch {args.batch} x 3x{args.size}x{args.size}, {args.reps} rounds "
          "(variants round-robin; ratios are medians of per-round ratios)")
    print("| model | mode | step s | measured / deep | theoretical / deep (step FLOPs) | measured / untouched |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in bench_model(name, args.batch, args.size, args.reps):
            print(row, flush=True)


if __name__ == "__main__":
    main()
