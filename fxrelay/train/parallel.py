"""Decoupled stage-parallel training across processes (torch.distributed).

In ``greedy`` mode a stage's gradient comes only from its own head, in ``relay`` mode
from the heads of the few stages above it, so stages need not wait for a whole
backward: placed on different processes, they train at the same time.
:class:`StageParallel` gives each of ``K`` pipeline ranks a contiguous group of stages of
a transformed model (balanced by the plan's training FLOPs) plus the heads reading them;
each rank runs its stages with the shared engine (:mod:`fxrelay.stagerun`) over ``M``
micro-batches. Activations flow forward with point-to-point ``isend``/``recv``; in
greedy mode nothing flows back; in relay mode a cotangent crosses a rank boundary only
for the windows (gradient channels) that span it. ``D`` replicas of the pipeline form a
``K x D`` grid (global rank ``d * K + k``), the gradients of each stage group being
all-reduced over its ``D`` replicas.

Synchronous (the only schedule): after :meth:`StageParallel.step`, every parameter's
gradient equals the single-process one-line step accumulated over the same ``M``
micro-batches, each loss scaled by ``1/M`` (averaged over the ``D`` replicas' shards);
BatchNorm statistics are per micro-batch, as in that reference.

Launch with ``torchrun --nproc-per-node K*D script.py`` (see ``examples/train.py --pipeline``
and ``docs/distributed.md``).

Example:
    >>> balance([4.0, 1.0, 1.0, 1.0, 1.0], 2)    # stages per rank, contiguous
    [1, 4]
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.channels import stage_backward_flops
from ..passes.rewrite import plan_of
from .stagerun import AllReduceSink, StageRunner, Tape, Wiring, wiring

__all__ = ["StageParallel", "StepStats", "balance"]

_HEADER = 12  # reason: kind, dtype, requires_grad, ndim, up to 8 dims
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_TENSOR, _OBJECT, _NONE = 0, 1, 2


def balance(costs: Sequence[float], k: int) -> list[int]:
    """Split ``costs`` into ``k`` contiguous non-empty groups minimising the largest group sum.

    Returns:
        The number of items in each group.
    """
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # reason: best[j][i]: the smallest possible maximum when the first i items form j groups
    best = [[float("inf")] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for h in range(j - 1, i):
                value = max(best[j - 1][h], prefix[i] - prefix[h])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, h
    sizes, i = [], n
    for j in range(k, 0, -1):
        sizes.append(i - cut[j][i])
        i = cut[j][i]
    return sizes[::-1]


@dataclass(frozen=True)
class StepStats:
    """Timing of one :meth:`StageParallel.step` on this rank.

    Attributes:
        seconds: wall time of the step (optimizer step included).
        waiting: seconds blocked on messages from other ranks and on gradient all-reduces.
        losses: head index -> loss averaged over the micro-batches (heads on this rank).
        logits: the main head's output for the whole batch (on the last pipeline rank), detached.
    """

    seconds: float
    waiting: float
    losses: dict[int, float]
    logits: torch.Tensor | None

    @property
    def busy(self) -> float:
        """Fraction of the step this rank computed rather than waited."""
        return 1.0 - self.waiting / self.seconds if self.seconds > 0 else 0.0


class StageParallel:
    """Train a greedy or relay transformed model with its stages spread over processes.

    Every process builds the same transformed model (same seed) and calls :meth:`step`
    with the batch of its pipeline replica (all ``K`` ranks of a replica pass the same
    ``x`` and ``y``; only the ranks whose stages read ``x`` use its values). Initial
    parameters are broadcast within each stage group's replicas.

    Args:
        model: a model made by :func:`fxrelay.transform` in ``greedy`` or ``relay`` mode.
        optimizer_factory: ``factory(params) -> optimizer``, called with this rank's
            parameters (its stages and heads); each rank owns its optimizer state.
        microbatches: ``M``: the batch is split into ``M`` micro-batches (``tensor_split``).
        pipeline: ``K`` ranks per pipeline (default: world size / ``replicas``).
        replicas: ``D`` data-parallel replicas of the pipeline.
        criterion: ``criterion(logits, target) -> scalar``, applied to every head.
        stages_per_rank: override the FLOPs-balanced placement: ``K`` positive counts.
        verbose: print the placement (global rank 0).

    Raises:
        TypeError: ``model`` was not made by :func:`fxrelay.transform`.
        ValueError: standard/deep mode (no decoupling), ``K`` larger than the number of
            stages, world size not ``K * D``, bad ``stages_per_rank``.
        RuntimeError: ``torch.distributed`` is not initialised.
    """

    def __init__(self, model: nn.Module, optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 *, microbatches: int = 1, pipeline: int | None = None, replicas: int = 1,
                 criterion: Callable[[Any, Any], torch.Tensor] = F.cross_entropy,
                 stages_per_rank: Sequence[int] | None = None, verbose: bool = True):
        plan = plan_of(model)
        if plan.mode not in ("greedy", "relay"):
            raise ValueError(f"StageParallel decouples stages of a greedy or relay model; in {plan.mode!r} mode "
                             "every loss reaches stage 0, so no stage can run ahead of the full backward "
                             "(no decoupling possible). For standard pipeline parallelism use "
                             "torch.distributed.pipelining (ScheduleGPipe, Schedule1F1B)")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("StageParallel needs torch.distributed: call torch.distributed.init_process_group "
                               "first (torchrun sets the environment for it)")
        if not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches must be an integer >= 1, got {microbatches!r}")
        world, stages = dist.get_world_size(), len(plan.stages)
        k = pipeline if pipeline is not None else world // max(replicas, 1)
        if k < 1 or replicas < 1:
            raise ValueError(f"pipeline and replicas must be >= 1, got {pipeline} and {replicas}")
        if k > stages:
            raise ValueError(f"pipeline of {k} ranks but the model has only {stages} stages; use at most "
                             f"{stages} ranks per pipeline or transform with num_stages={k} (or more)")
        if world != k * replicas:
            raise ValueError(f"world size {world} != pipeline {k} x replicas {replicas} = {k * replicas}; "
                             f"launch with torchrun --nproc-per-node {k * replicas}")
        self.model, self.plan, self.microbatches = model, plan, microbatches
        self.pipeline, self.replicas = k, replicas
        self.costs = _stage_costs(plan)
        sizes = list(stages_per_rank) if stages_per_rank is not None else balance(self.costs, k)
        if len(sizes) != k or sum(sizes) != stages or min(sizes) < 1:
            raise ValueError(f"stages_per_rank must be {k} positive counts summing to {stages}, got {sizes}")
        starts = [sum(sizes[:i]) for i in range(k)]
        self.placement = [range(a, a + n) for a, n in zip(starts, sizes)]
        rank = dist.get_rank()
        self.replica, self.rank_in_pipeline = divmod(rank, k)
        self.stages = self.placement[self.rank_in_pipeline]
        self._rank_of_stage = {s: self.replica * k + r for r, group in enumerate(self.placement) for s in group}
        groups = [dist.new_group([d * k + r for d in range(replicas)]) if replicas > 1 else None for r in range(k)]
        self._replica_group = groups[self.rank_in_pipeline]
        self._sink = AllReduceSink(self._replica_group) if replicas > 1 else None
        modules = self._modules(self.stages)
        params = list({id(p): p for m in modules for p in m.parameters()}.values())
        device = params[0].device if params else torch.device("cpu")
        self._transport = _P2P(wiring(model), self._rank_of_stage, device)
        self.runner = StageRunner(model, criterion, stages=self.stages, grad_sink=self._sink,
                                  transport=self._transport)
        if replicas > 1:
            for t in [*params, *(b for m in modules for b in m.buffers())]:
                dist.broadcast(t.data, src=self.rank_in_pipeline, group=self._replica_group)
        self.optimizer = optimizer_factory([p for p in params if p.requires_grad])
        if verbose and rank == 0:
            print(self.placement_table(), flush=True)

    def placement_table(self) -> str:
        """The placement: stages, heads and share of the training FLOPs of each pipeline rank."""
        total = sum(self.costs) or 1.0
        lines = [f"StageParallel: {self.pipeline} pipeline ranks x {self.replicas} replica(s), "
                 f"{self.microbatches} micro-batches, {self.plan.mode} mode",
                 "rank  stages  heads     step GFLOPs/sample  share  saved MB/sample"]
        for r, group in enumerate(self.placement):
            heads = ",".join(str(h.index) for h in self.plan.heads if h.stage in group)
            cost = sum(self.costs[s] for s in group)
            saved = sum(self.plan.stages[s].saved_bytes for s in group) + sum(
                h.saved_bytes for h in self.plan.heads if h.stage in group)
            lines.append(f"{r:>4}  {group.start}..{group.stop - 1:<4}  {heads:<8}  {cost / 1e9:>18.3g}  "
                         f"{100 * cost / total:4.1f}%  {saved / 2**20:>15.2f}")
        return "\n".join(lines)

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: torch.Tensor) -> StepStats:
        """One synchronous training step on this replica's batch: zero the gradients, run the
        ``M`` micro-batches through the pipeline, all-reduce over replicas, ``optimizer.step()``.

        Raises:
            ValueError: the batch has fewer samples than micro-batches.
        """
        if len(y) < self.microbatches:
            raise ValueError(f"a batch of {len(y)} samples cannot be split into {self.microbatches} micro-batches")
        start = time.perf_counter()
        self._transport.waiting = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        chunks = list(zip(*(t.tensor_split(self.microbatches) for t in inputs)))
        targets = y.tensor_split(self.microbatches)
        lag = self.pipeline - 1 - self.rank_in_pipeline  # reason: cotangents come back after the ranks above ran
        tapes: list[Tape] = []
        for m in range(self.microbatches):
            tape = self.runner.tape(chunks[m], targets[m], index=m, loss_scale=1 / self.microbatches)
            tapes.append(self.runner.forward(tape, heads_last=True))  # reason: activations leave first
            if m >= lag:
                self._backward(tapes[m - lag])
        for m in range(max(0, self.microbatches - lag), self.microbatches):
            self._backward(tapes[m])
        results = [self.runner.finish(t) for t in tapes]
        self._transport.end_step()
        if self._sink is not None:
            self._transport.waiting += self._sink.finish()
        self.optimizer.step()
        losses = {j: sum(float(r.losses[j]) for r in results) / len(results) for j in results[0].losses}
        outputs = [r.output for r in results if isinstance(r.output, torch.Tensor)]
        return StepStats(time.perf_counter() - start, self._transport.waiting, losses,
                         torch.cat(outputs) if outputs else None)

    def gather_model(self) -> nn.Module:
        """Copy every stage's and head's parameters and buffers from its owner (replica 0's
        rank) to every rank, so that each rank holds the whole trained model (to evaluate or
        save it). Collective: every rank must call it.
        """
        self._transport.drain()
        for r, group in enumerate(self.placement):
            for m in self._modules(group):
                for t in [*m.parameters(), *m.buffers()]:
                    dist.broadcast(t.data, src=r)
        return self.model

    def _modules(self, stages: range) -> list[nn.Module]:
        """The stage modules of ``stages`` and the aux heads reading them."""
        return [*(self.model.stages[s] for s in stages),
                *(self.model.heads[n] for n, h in enumerate(self.plan.aux_heads) if h.stage in stages)]

    def _backward(self, tape: Tape) -> None:
        for read in self.runner.remote_reads:
            self.runner.deliver(tape, read, self._transport.recv_grad(tape, read))


def _stage_costs(plan) -> list[float]:
    """Training FLOPs per sample of each stage with the heads reading it (forward + backward)."""
    costs = [s.flops + b for s, b in zip(plan.stages, stage_backward_flops(plan.stages, plan.heads))]
    for h in plan.heads:
        costs[h.stage] += 3 * h.flops
    return costs


class _P2P:
    """Point-to-point messages of one pipeline replica: a fixed-size header (kind, dtype,
    shape) then the payload; tags name the step's parity, the micro-batch and the value or
    read, so messages match whatever order they are sent in. Non-tensor values travel
    pickled.

    A gloo send completes only once the receiver has posted its receive, so a step does
    not wait for its own sends: it waits for the previous step's. A rank may thus run up
    to one step ahead of the ranks reading its values (greedy: the first rank never waits
    for the second).
    """

    def __init__(self, wiring: Wiring, rank_of_stage: dict[int, int], device: torch.device):
        self.wiring, self.rank_of_stage, self.device = wiring, rank_of_stage, device
        self._names = {name: i for i, name in enumerate(wiring.producer)}
        self._width = max(len(self._names), len(wiring.reads))
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._previous: list[tuple[Any, torch.Tensor]] = []
        self._parity = 0
        self.waiting = 0.0

    def _tag(self, tape: Tape, kind: int, index: int) -> int:
        message = (tape.index * self._width + index) * 2 + kind
        return (message * 2 + self._parity) * 2  # reason: +1 is the payload's tag

    def recv_value(self, tape: Tape, name: str) -> Any:
        src = self.rank_of_stage[self.wiring.producer[name]]
        return self._recv(src, self._tag(tape, 0, self._names[name]))

    def send_value(self, tape: Tape, name: str, value: Any) -> None:
        ranks = {self.rank_of_stage[s] for s in self.wiring.readers[name]} - {dist.get_rank()}
        for dst in sorted(ranks):
            self._send(value, dst, self._tag(tape, 0, self._names[name]))

    def send_grad(self, tape: Tape, read: int, grad: torch.Tensor | None) -> None:
        dst = self.rank_of_stage[self.wiring.producer[self.wiring.reads[read].value]]
        self._send(grad, dst, self._tag(tape, 1, read))

    def recv_grad(self, tape: Tape, read: int) -> torch.Tensor | None:
        src = self.rank_of_stage[self.wiring.reads[read].stage]
        return self._recv(src, self._tag(tape, 1, read))

    def end_step(self) -> None:
        """Wait until the previous step's messages were received; this step's stay in flight."""
        for work, _ in self._previous:
            self._wait(work)
        self._previous, self._sends = self._sends, []
        self._parity ^= 1

    def drain(self) -> None:
        """Wait until every message sent so far was received."""
        for work, _ in self._previous + self._sends:
            self._wait(work)
        self._previous, self._sends = [], []

    def _send(self, value: Any, dst: int, tag: int) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        payload = None
        if value is None:
            header[0] = _NONE
        elif isinstance(value, torch.Tensor) and value.dim() <= _HEADER - 4 and value.dtype in _DTYPES:
            header[:4] = torch.tensor([_TENSOR, _DTYPES.index(value.dtype), int(value.requires_grad), value.dim()])
            header[4:4 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
            payload = value.detach().contiguous()
        else:
            payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(self.device)
            header[0], header[4] = _OBJECT, payload.numel()
        header = header.to(self.device)
        self._sends.append((dist.isend(header, dst, tag=tag), header))
        if payload is not None:
            self._sends.append((dist.isend(payload, dst, tag=tag + 1), payload))

    def _recv(self, src: int, tag: int) -> Any:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(header, src, tag=tag))
        header = header.cpu()
        kind = int(header[0])
        if kind == _NONE:
            return None
        if kind == _OBJECT:
            payload = torch.empty(int(header[4]), dtype=torch.uint8, device=self.device)
            self._wait(dist.irecv(payload, src, tag=tag + 1))
            return pickle.loads(payload.cpu().numpy().tobytes())
        ndim = int(header[3])
        value = torch.empty(header[4:4 + ndim].tolist(), dtype=_DTYPES[int(header[1])], device=self.device)
        self._wait(dist.irecv(value, src, tag=tag + 1))
        return value.requires_grad_(bool(header[2]))

    def _wait(self, work: Any) -> None:
        start = time.perf_counter()
        work.wait()
        self.waiting += time.perf_counter() - start
