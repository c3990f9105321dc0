"""Memory and time of one training step, for every way fxrelay can execute it.

For each model and partition, the variants are: the untouched model end to end; the
one-line step (``loss.backward()``) of greedy and relay transforms; the same with stage
checkpointing (``transform(recompute=True)``); ``fxrelay.LocalStep`` of greedy, relay
(window 2) and deep transforms; and the sequential greedy schedule training the middle
stage (``fxrelay.train.sequential.train_stage``). Each step is a full SGD step. Each variant
is transformed for its execution (``transform(execution=...)``): with ``--num-stages`` and
``--balance auto`` the memory executions get their own boundaries.

Memory, three ways, each variant in a fresh process (after a warm-up step, so that
gradients and optimizer state exist before the measured step):

* saved: peak bytes of tensors saved for backward (``fxrelay.SavedBytes``, parameters
  excluded); not seen through ``torch.utils.checkpoint``, so n/a for checkpointed steps;
* allocated: peak bytes of tensor storages created during the step and alive at once
  (``fxrelay.AllocatedBytes``: activations, gradients of activations, workspaces);
* RSS: the process's resident high-water mark during the step minus its resident size
  before it (``/proc/self/clear_refs`` resets the mark; Linux), with glibc told to serve
  large blocks from mmap and return them when freed, so that the resident size follows
  the live tensors rather than the allocator's cache.

Time: the variants of one model run round-robin in one process; each ratio is the
median over rounds of the variant's step time over the untouched step's in that round.
The plan's estimate (``Plan.memory_estimate``) is printed next to the measured saved bytes.

    python examples/bench/memory.py                                   # resnet50 and vgg16_bn, batch 16 at 224
    python examples/bench/memory.py --models resnet18 --batch 8 --size 128 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import timm
import torch
import torch.nn.functional as F

import fxrelay
from fxrelay.core.channels import sequential_peaks
from fxrelay.core.choices import BALANCES
from fxrelay.train.sequential import train_stage

VARIANTS = ("untouched", "one-line greedy", "one-line relay", "checkpointed greedy", "checkpointed relay",
            "LocalStep greedy", "LocalStep relay", "LocalStep deep", "sequential greedy")
_EXECUTION_OF = {"one-line": "one-line", "checkpointed": "recompute", "LocalStep": "local",
                 "sequential": "sequential"}


def build(name: str, variant: str, num_stages: int | None, balance: str, x: torch.Tensor) -> tuple[Callable, dict]:
    """The variant's step function ``step(x, y)`` and its facts (the plan's estimate)."""
    torch.manual_seed(0)
    base = timm.create_model(name, num_classes=1000).train()
    if variant == "untouched":
        plan = fxrelay.partition(base, num_stages=num_stages, balance=balance, example_input=x[:1])
        return _sgd(base, lambda x, y: F.cross_entropy(base(x), y).backward()), \
            {"estimate": plan.memory_estimate(len(x))["one-line"]}
    execution, mode = variant.split()
    model = fxrelay.transform(base, mode, window=2, num_stages=num_stages, balance=balance, example_input=x[:1],
                              execution=_EXECUTION_OF[execution]).train()
    facts = {"estimate": fxrelay.plan_of(model).memory_estimate(len(x))[_EXECUTION_OF[execution]]}
    if execution == "LocalStep":
        local = fxrelay.LocalStep(model, F.cross_entropy)
        return _sgd(model, local), facts
    if execution == "sequential":
        plan = fxrelay.plan_of(model)
        middle = len(plan.stages) // 2
        facts["estimate"] = sequential_peaks(plan.stages, plan.heads)[middle] * len(x)
        context = train_stage(model, middle)
        step = context.__enter__()  # reason: stays entered for the life of this benchmark process
        return _sgd(model, lambda x, y: (step.weight * F.cross_entropy(step(x), y)).backward()), facts
    return _sgd(model, lambda x, y: F.cross_entropy(model(x), y).backward()), facts


def _sgd(model: torch.nn.Module, backward: Callable) -> Callable:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)  # reason: gradient buffers exist before the measured step
        backward(x, y)
        optimizer.step()

    step.model = model
    return step


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.batch, 3, args.size, args.size, generator=g), torch.randint(0, 1000, (args.batch,),
                                                                                        generator=g)


def measure_one(args: argparse.Namespace) -> dict:
    """In this (fresh) process: RSS, allocated and saved peaks of one step of ``args.variant``."""
    x, y = batch(args)
    step, facts = build(args.model, args.variant, args.num_stages, args.balance, x)
    step(x, y)
    step(x, y)
    before = _rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reason: resets the resident high-water mark (VmHWM)
    step(x, y)
    rss = _rss("VmHWM") - before
    model = step.model
    with fxrelay.AllocatedBytes() as allocated, fxrelay.SavedBytes([*model.parameters(), *model.buffers()]) as saved:
        step(x, y)
    return {**facts, "rss": rss, "allocated": allocated.peak,
            "saved": None if args.variant.startswith("checkpointed") else saved.peak}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def fresh(args: argparse.Namespace, model: str, variant: str, num_stages: int | None) -> dict:
    command = [sys.executable, __file__, "--measure", variant, "--models", model, "--batch", str(args.batch),
               "--size", str(args.size), "--balance", args.balance, "--threads", str(args.threads)]
    command += ["--num-stages", str(num_stages)] if num_stages else []
    # reason: large blocks always from mmap, returned when freed: the resident size follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def times(args: argparse.Namespace, model: str, num_stages: int | None) -> dict[str, float]:
    """Median per-round ratio of each variant's step time to the untouched step's (round-robin)."""
    x, y = batch(args)
    steps = {v: build(model, v, num_stages, args.balance, x)[0] for v in VARIANTS}
    for step in steps.values():
        step(x, y)
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        seconds = {}
        for variant, step in steps.items():
            start = time.perf_counter()
            step(x, y)
            seconds[variant] = time.perf_counter() - start
        for variant in VARIANTS:
            ratios[variant].append(seconds[variant] / seconds["untouched"])
    return {v: statistics.median(r) for v, r in ratios.items()}


def table(args: argparse.Namespace, model: str, num_stages: int | None) -> list[str]:
    rows = {v: fresh(args, model, v, num_stages) for v in VARIANTS}
    speed = times(args, model, num_stages)
    base = rows["untouched"]
    partition = f"num_stages={num_stages}, balance={args.balance}" if num_stages else "default partition"
    lines = [f"\n{model}, batch {args.batch} at {args.size} px, {partition}, {args.threads} threads",
             "| variant | saved MB | plan's estimate MB | estimate / saved | saved / untouched | "
             "allocated / untouched | RSS / untouched | time / untouched |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, r in rows.items():
        saved = f"{r['saved'] / 2**20:.0f}" if r["saved"] is not None else "n/a"
        fit = f"{r['estimate'] / r['saved']:.3f}" if r["saved"] else "n/a"
        ratio = f"{r['saved'] / base['saved']:.3f}" if r["saved"] is not None else "n/a"
        lines.append(f"| {variant} | {saved} | {r['estimate'] / 2**20:.0f} | {fit} | {ratio} | "
                     f"{r['allocated'] / base['allocated']:.3f} | {r['rss'] / base['rss']:.3f} | "
                     f"{speed[variant]:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet50,vgg16_bn", help="comma-separated timm model names (default: resnet50,vgg16_bn)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--size", type=int, default=224, help="image side in px (default: 224)")
    p.add_argument("--num-stages", type=int, default=None, help="one partition only (default: the default partition and 8)")
    p.add_argument("--balance", default="auto", choices=BALANCES,
                   help="how num_stages merges and splits stages (default: auto: the one-line variants' FLOPs and "
                        "saved bytes, the memory executions' recompute boundaries)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, round-robin over the variants (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        args.model, args.variant = args.models, args.measure
        print(json.dumps(measure_one(args)))
        return
    print(f"CPU, load average {os.getloadavg()[0]:.1f} at start")
    for model in args.models.split(","):
        for num_stages in ([args.num_stages] if args.num_stages else [None, 8]):
            print("\n".join(table(args, model, num_stages)), flush=True)


if __name__ == "__main__":
    main()
