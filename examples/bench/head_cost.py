"""What downstream heads cost: greedy ``fxrelay.LocalStep`` with auto vs downstream heads.

For each head kind: the median wall time of a full SGD step (``LocalStep`` forward and
backward, optimizer step), the peak bytes saved for backward (:class:`fxrelay.SavedBytes`)
next to the plan's estimate, and the heads' parameters and FLOPs next to the model's.
Variants run round-robin, after one warm-up step each.

    python examples/bench/head_cost.py                         # resnet50, 8 stages, batch 16, 224 px
    python examples/bench/head_cost.py --model resnet18 --batch 4 --size 64 --rounds 1   # a quick check
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import fxrelay

KINDS = ("auto", "downstream")


def variant(name: str, kind: str, num_stages: int, x: torch.Tensor) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=1000).train()
    model = fxrelay.transform(base, "greedy", head_kind=kind, num_stages=num_stages, example_input=x[:1]).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
         y: torch.Tensor) -> tuple[float, int]:
    """Seconds of one SGD step and the peak bytes it saved for backward."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with fxrelay.SavedBytes([*model.parameters(), *model.buffers()]) as saved:  # reason: activations only
        fxrelay.LocalStep(model, F.cross_entropy)(x, y)
    optimizer.step()
    return time.perf_counter() - start, saved.peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="timm model name (default: resnet50)")
    p.add_argument("--num-stages", type=int, default=8, help="stages of the partition (default: 8)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--size", type=int, default=224, help="image side in px (default: 224)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, round-robin (default: 5)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all of them)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y = torch.randn(args.batch, 3, args.size, args.size), torch.randint(0, 1000, (args.batch,))
    built = {kind: variant(args.model, kind, args.num_stages, x) for kind in KINDS}
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    peaks: dict[str, int] = {}
    for kind in KINDS:
        step(*built[kind], x, y)  # reason: warm-up (allocator, lazy initialisation)
    for _ in range(args.rounds):
        for kind in KINDS:
            seconds, peaks[kind] = step(*built[kind], x, y)
            times[kind].append(seconds)
    print(f"{args.model}, greedy LocalStep, {args.num_stages} stages, batch {args.batch}, {args.size} px, "
          f"{args.threads} threads, median of {args.rounds} steps")
    print("| heads | step s | vs auto | saved MB (peak) | estimate MB | head params | head GFLOPs/sample | "
          "step GFLOPs/sample |")
    print("|---|---|---|---|---|---|---|---|")
    base = statistics.median(times["auto"])
    for kind in KINDS:
        plan = fxrelay.plan_of(built[kind][0])
        median = statistics.median(times[kind])
        print(f"| {kind} | {median:.3f} | {median / base:.2f}x | {peaks[kind] / 2**20:.0f} | "
              f"{plan.memory_estimate(args.batch)['local'] / 2**20:.0f} | "
              f"{sum(h.params for h in plan.aux_heads) / 1e6:.2f}M | "
              f"{sum(h.flops for h in plan.aux_heads) / 1e9:.3f} | {plan.step_flops() / 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
