"""Decoupled stage parallelism (fxrelay.parallel) vs torch.distributed.pipelining, CPU/gloo.

One invocation spawns K processes with one thread each (gloo on 127.0.0.1) and, for each
number of micro-batches M, runs round-robin blocks of 1 + ``--steps`` consecutive training
steps (forward, backward, SGD step; no barrier between the steps of a block, as in a
training loop) over the same global batch split into the same M micro-batches:

1. ``greedy``: StageParallel on the greedy transform;
2. ``relay``: StageParallel on the relay transform (window 2);
3. ``gpipe``: torch.distributed.pipelining ``ScheduleGPipe`` on the untouched model;
4. ``1f1b``: ``Schedule1F1B`` on the untouched model;
5. ``single``: the untouched model in one process with K threads (the other ranks wait),
   the one-line step accumulated over the M micro-batches.

The greedy and relay transforms use ``--head`` aux heads, by default DGL's MLP-SR
(``head_kind="dgl"``: pooled to 2x2 first, so that a head costs little next to its stage, as
in the DGL paper). Each pipeline gets its own FLOPs-balanced contiguous split of the stages (the torch
schedules: the untouched model's stages at the same partition, single-tensor cuts).
The steady state of a training loop is measured: on every rank, from the end of a block's
first step to the end of its last; a step's time is the slowest rank's. Reported: samples/s
(global batch / median step time), per-rank busy fraction (1 - time blocked on messages /
that wall time; the torch schedules' waits are timed by wrapping their
``_wait_batch_p2p``, StageParallel's come from its ``StepStats``) and throughput ratios to
GPipe (medians of per-round ratios). On a loaded machine a rank also waits while its peer
is descheduled: the 1-minute load average is printed with every table.

    python examples/bench/pipeline.py                     # timm resnet18, 96 px, batch 64, M=2,4,8, K=2
    python examples/bench/pipeline.py --model vgg11_bn --size 64 --microbatches 4 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import time
from typing import Callable

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, schedules

import fxrelay
from fxrelay.train.parallel import StageParallel, balance

VARIANTS = ("greedy", "relay", "gpipe", "1f1b", "single")
BLOCKED = [0.0]  # reason: seconds this rank waited on messages in the current block
_wait_batch_p2p = schedules._wait_batch_p2p


def _timed_wait(work: list) -> None:
    start = time.perf_counter()
    _wait_batch_p2p(work)
    BLOCKED[0] += time.perf_counter() - start


schedules._wait_batch_p2p = _timed_wait  # reason: the torch schedules do not report their waits


class StageGroup(nn.Module):
    """Consecutive stages of an untouched model's plan as one module (single-tensor cuts)."""

    def __init__(self, plan: fxrelay.Plan, indices: range):
        super().__init__()
        self.plan, self.indices = plan, indices
        modules = fxrelay.split_stages(plan)
        self.stages = nn.ModuleList(modules[i] for i in indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.plan.stages[self.indices.start]
        env = {first.inputs[0]: x}
        for i, module in zip(self.indices, self.stages):
            stage = self.plan.stages[i]
            out = module(*(env[n] for n in stage.inputs))
            env.update(zip(stage.outputs, out if len(stage.outputs) > 1 else (out,)))
        return env[self.plan.stages[self.indices.stop - 1].outputs[-1]]


def torch_pipeline(schedule_type: type, base: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, m: int,
                   args: argparse.Namespace) -> Callable[[], None]:
    """One step of a torch.distributed.pipelining schedule on the untouched model."""
    plan = fxrelay.partition(base, example_input=x[:1], num_stages=args.num_stages)
    if any(len(s.inputs) != 1 for s in plan.stages):
        raise SystemExit(f"{type(base).__name__} has multi-tensor cuts; the torch schedules need single tensors")
    sizes = balance([float(s.flops) for s in plan.stages], k)
    rank = dist.get_rank()
    start = sum(sizes[:rank])
    group = StageGroup(plan, range(start, start + sizes[rank]))
    stage = PipelineStage(group, rank, k, torch.device("cpu"))
    schedule = schedule_type(stage, n_microbatches=m, loss_fn=F.cross_entropy)
    optimizer = torch.optim.SGD(group.parameters(), lr=args.lr, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            schedule.step(x)
        elif rank == k - 1:
            schedule.step(target=y)
        else:
            schedule.step()
        optimizer.step()
    return step


def single_process(base: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, m: int, lr: float) -> Callable[[], None]:
    """Rank 0: the untouched model's one-line step over M micro-batches with K threads."""
    optimizer = torch.optim.SGD(base.parameters(), lr=lr, momentum=0.9)

    def step() -> None:
        if dist.get_rank() != 0:
            return
        torch.set_num_threads(k)
        optimizer.zero_grad(set_to_none=True)
        for xs, ys in zip(x.tensor_split(m), y.tensor_split(m)):
            (F.cross_entropy(base(xs), ys) / m).backward()
        optimizer.step()
        torch.set_num_threads(1)
    return step


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    k = args.pipeline
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    torch.manual_seed(0)
    base = timm.create_model(args.model, num_classes=args.classes).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    for m in (int(v) for v in args.microbatches.split(",")):
        periods, busy, placement = bench(args, base, x, y, m)
        gathered: list = [None] * k
        dist.all_gather_object(gathered, (periods, busy))
        if rank == 0:
            seconds = {v: [max(p[v][i] for p, _ in gathered) for i in range(args.reps)] for v in VARIANTS}
            report(args, m, seconds, [b for _, b in gathered], placement)
    dist.destroy_process_group()


def bench(args: argparse.Namespace, base: nn.Module, x: torch.Tensor, y: torch.Tensor,
          m: int) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str]]:
    """Per variant and round: this rank's seconds per step and busy fraction in the steady state."""
    k = args.pipeline
    steps: dict[str, Callable[[], object]] = {}
    placement = {}
    for mode in ("greedy", "relay"):
        model = fxrelay.transform(copy.deepcopy(base), mode, example_input=x[:1], num_stages=args.num_stages,
                                  head_kind=args.head)
        parallel = StageParallel(model, lambda p: torch.optim.SGD(p, lr=args.lr, momentum=0.9),
                                 microbatches=m, verbose=False)
        placement[mode] = parallel.placement_table()
        steps[mode] = lambda parallel=parallel: _count(parallel.step(x, y).waiting)
    steps["gpipe"] = torch_pipeline(ScheduleGPipe, copy.deepcopy(base), x, y, k, m, args)
    steps["1f1b"] = torch_pipeline(Schedule1F1B, copy.deepcopy(base), x, y, k, m, args)
    steps["single"] = single_process(copy.deepcopy(base), x, y, k, m, args.lr)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    busy: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps + 1):  # reason: round 0 warms up (shape inference, allocator)
        for name in VARIANTS:
            dist.barrier()
            steps[name]()  # reason: the block's first step fills the pipeline; timing starts after it
            start, blocked = time.perf_counter(), BLOCKED[0]
            for _ in range(args.steps):
                steps[name]()
            wall = time.perf_counter() - start
            if rep:
                seconds[name].append(wall / args.steps)
                busy[name].append(1 - (BLOCKED[0] - blocked) / wall)
    return seconds, busy, placement


def _count(waiting: float) -> None:
    BLOCKED[0] += waiting


def report(args: argparse.Namespace, m: int, seconds: dict[str, list[float]], busy: list[dict[str, list[float]]],
           placement: dict[str, str]) -> None:
    print(f"\n{args.model}, {args.size} px, global batch {args.batch}, {m} micro-batches, "
          f"K={args.pipeline} processes x 1 thread (single: 1 process x {args.pipeline} threads), CPU/gloo, "
          f"{args.reps} rounds of 1 + {args.steps} consecutive steps, round-robin; 1-min load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for mode, table in placement.items():
        print(f"{mode}: {table}")
    print("| variant | step s | samples/s | vs GPipe | busy per rank |")
    print("|---|---|---|---|---|")
    for name in VARIANTS:
        median = statistics.median(seconds[name])
        ratio = statistics.median(g / s for g, s in zip(seconds["gpipe"], seconds[name]))
        ranks = "-" if name == "single" else " / ".join(f"{statistics.median(b[name]):.2f}" for b in busy)
        print(f"| {name} | {median:.3f} | {args.batch / median:.1f} | {ratio:.2f}x | {ranks} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="timm model (default: resnet18)")
    parser.add_argument("--size", type=int, default=96, help="image side in px (default: 96)")
    parser.add_argument("--batch", type=int, default=64, help="global batch size (default: 64)")
    parser.add_argument("--microbatches", default="2,4,8", help="comma-separated values of M (default: 2,4,8)")
    parser.add_argument("--steps", type=int, default=3, help="consecutive steps per timed block (default: 3)")
    parser.add_argument("--pipeline", type=int, default=2, help="K processes (default: 2)")
    parser.add_argument("--num-stages", type=int, default=None, help="stages of the transform (default: one per level)")
    parser.add_argument("--head", default="dgl", help="aux head kind of the greedy and relay transforms (default: dgl)")
    parser.add_argument("--classes", type=int, default=100, help="classes (default: 100)")
    parser.add_argument("--reps", type=int, default=3, help="timed blocks per variant (default: 3)")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD learning rate (default: 1e-3)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.pipeline)


if __name__ == "__main__":
    main()
