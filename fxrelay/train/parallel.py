"""Decoupled stage-parallel training across processes (torch.distributed).

In ``greedy`` mode a stage's gradient comes only from its own head, in ``relay`` mode
from the heads of the few stages above it, so stages need not wait for a whole
backward: placed on different processes, they train at the same time.
:class:`StageParallel` gives each of ``K`` pipeline ranks a contiguous group of stages of
a transformed model (balanced by the plan's training FLOPs) plus the heads reading them;
each rank runs its stages with the shared engine (:mod:`fxrelay.train.stagerun`) over ``M``
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

from ..core._compat import tree_map
from ..core.channels import stage_backward_flops
from ..passes.rewrite import plan_of
from .stagerun import AllReduceSink, MicroBatch, StageRunner, Wiring, wiring

__all__ = ["StageParallel", "StepStats", "balance", "split_batch"]

_HEADER = 14  # reason: kind, dtype, requires_grad, ndim, (micro-batch, position), up to 8 dims
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
    parameters are broadcast within each stage group's replicas. The last step's messages
    may still be in flight after :meth:`step`: call :meth:`gather_model` (which waits for
    them) before dropping the object.

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

    def step(self, x: torch.Tensor | Sequence[torch.Tensor], y: Any) -> StepStats:
        """One synchronous training step on this replica's batch: zero the gradients, run the
        ``M`` micro-batches through the pipeline, all-reduce over replicas, ``optimizer.step()``.

        Args:
            x: the model input(s); the first tensor's first dimension is the batch.
            y: the target: a tensor or any pytree of values (mixup's ``(ya, yb, lam)``), split
                by :func:`split_batch`.

        Raises:
            ValueError: no input tensor, or the batch has fewer samples than micro-batches.
        """
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        size = next((t.shape[0] for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if size is None:
            raise ValueError("StageParallel.step needs a batched tensor input: x's first tensor gives the batch size")
        if size < self.microbatches:
            raise ValueError(f"a batch of {size} samples cannot be split into {self.microbatches} micro-batches")
        start = time.perf_counter()
        self._transport.waiting = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        chunks = split_batch(inputs, size, self.microbatches)
        targets = split_batch(y, size, self.microbatches)
        lag = self.pipeline - 1 - self.rank_in_pipeline  # reason: cotangents come back after the ranks above ran
        micro_batches: list[MicroBatch] = []
        for m in range(self.microbatches):
            micro_batch = self.runner.micro_batch(chunks[m], targets[m], index=m, loss_scale=1 / self.microbatches)
            micro_batches.append(self.runner.forward(micro_batch, heads_last=True))  # reason: activations leave first
            if m >= lag:
                self._backward(micro_batches[m - lag])
        for m in range(max(0, self.microbatches - lag), self.microbatches):
            self._backward(micro_batches[m])
        results = [self.runner.finish(t) for t in micro_batches]
        self._transport.end_step(self.microbatches)
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

    def _backward(self, micro_batch: MicroBatch) -> None:
        for read in self.runner.remote_reads:
            self.runner.deliver(micro_batch, read, self._transport.recv_grad(micro_batch, read))


def split_batch(value: Any, size: int, parts: int) -> list[Any]:
    """``value`` (a tensor, or a pytree such as a mixup target ``(ya, yb, lam)``) as ``parts``
    micro-batches: every tensor whose first dimension is the batch ``size`` is ``tensor_split``;
    any other leaf (a float, a tensor of another length) goes to every micro-batch unchanged.

    >>> [len(ya) for ya, yb, lam in split_batch((torch.zeros(5), torch.ones(5), 0.3), 5, 2)]
    [3, 2]
    """
    def part(leaf: Any, i: int) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == size:
            return leaf.tensor_split(parts)[i]
        return leaf
    return [tree_map(lambda leaf: part(leaf, i), value) for i in range(parts)]


def _stage_costs(plan) -> list[float]:
    """Training FLOPs per sample of each stage with the heads reading it (forward + backward)."""
    costs = [s.flops + b for s, b in zip(plan.stages, stage_backward_flops(plan.stages, plan.heads))]
    for h in plan.heads:
        costs[h.stage] += 3 * h.flops
    return costs


class _Lane:
    """The messages one rank sends another in a step, in the one order the wiring fixes.

    The order is micro-batch by micro-batch, and within one the ``keys`` in their order
    (values by producing stage and output, cotangents by read index). A sending lane
    sends a message once every earlier one was sent (later ones wait in ``held``); a
    receiving lane receives in that order, keeping messages that arrive before they are
    needed.
    """

    def __init__(self, peer: int, keys: Sequence[Any]):
        self.peer, self.keys = peer, tuple(keys)
        self.position = {key: i for i, key in enumerate(self.keys)}
        self.next = (0, 0)
        self.held: dict[tuple[int, int], Any] = {}

    def advance(self) -> tuple[int, int]:
        """The current slot; moves to the next one."""
        m, i = slot = self.next
        self.next = (m, i + 1) if i + 1 < len(self.keys) else (m + 1, 0)
        return slot

    def check_done(self, microbatches: int) -> None:
        """A step ends with every message of its ``microbatches`` through the lane; the next starts afresh.

        Raises:
            RuntimeError: a message is missing or was held back (a schedule error).
        """
        if self.held or self.next != (microbatches, 0):
            raise RuntimeError(f"point-to-point messages with rank {self.peer} out of order: at "
                               f"(micro-batch, message) {self.next} of {microbatches} x {len(self.keys)}, "
                               f"{len(self.held)} held; every value and cotangent must cross once per micro-batch")
        self.next = (0, 0)


class _P2P:
    """Point-to-point messages of one pipeline replica, matched by order alone.

    NCCL ignores message tags, so every message has tag 0 and each ordered pair of ranks
    carries one sequence (a :class:`_Lane`): the values the sender's stages produce for
    the receiver's readers, or the cotangents of the sender's reads of values the receiver
    produced, micro-batch by micro-batch in the order fixed by the wiring. Each message is
    a fixed-size header (kind, dtype, shape and the message's (micro-batch, position),
    checked on arrival: a stray message raises rather than trains on a wrong value) then
    the payload; non-tensor values travel pickled.

    A gloo send completes only once the receiver has posted its receive, so a step does
    not wait for its own sends: it waits for the previous step's. A rank may thus run up
    to one step ahead of the ranks reading its values (greedy: the first rank never waits
    for the second).
    """

    def __init__(self, wiring: Wiring, rank_of_stage: dict[int, int], device: torch.device):
        self.wiring, self.rank_of_stage, self.device = wiring, rank_of_stage, device
        self.rank = dist.get_rank()
        self._out: dict[int, _Lane] = {}
        self._in: dict[int, _Lane] = {}
        for peer in sorted(set(rank_of_stage.values()) - {self.rank}):
            self._lanes(peer)
        self._sends: list[tuple[Any, torch.Tensor]] = []
        self._previous: list[tuple[Any, torch.Tensor]] = []
        self.waiting = 0.0

    def _lanes(self, peer: int) -> None:
        """The lanes to and from ``peer``: values flow up the pipeline, cotangents down."""
        w, rank = self.wiring, self.rank_of_stage
        order = sorted((n for n, s in w.producer.items() if s >= 0), key=lambda n: (w.producer[n], w.position[n]))
        for src, dst in ((self.rank, peer), (peer, self.rank)):
            sent = [n for n in order if rank[w.producer[n]] == src and any(rank[t] == dst for t in w.readers[n])]
            grads = [k for k, r in enumerate(w.reads) if w.producer[r.value] >= 0
                     and rank[r.stage] == src and rank[w.producer[r.value]] == dst]
            if sent and grads:  # reason: two sequences would interleave unmatched; a value sent down is a head's view
                raise ValueError(f"rank {src} sends rank {dst} values and cotangents; " + (f"a head on rank {dst} reads"
                    f" {sent[0]!r}, an output leaf made on rank {src}: return the logits alone, or use LocalStep"
                    if src > dst else "place the stages in contiguous groups in pipeline order (stages_per_rank)"))
            lane = _Lane(peer, [("value", n) for n in sent] + [("grad", k) for k in grads])
            (self._out if src == self.rank else self._in)[peer] = lane

    def recv_value(self, micro_batch: MicroBatch, name: str) -> Any:
        return self._get(self.rank_of_stage[self.wiring.producer[name]], micro_batch.index, ("value", name))

    def send_value(self, micro_batch: MicroBatch, name: str, value: Any) -> None:
        for lane in self._out.values():
            if ("value", name) in lane.position:
                self._put(lane, micro_batch.index, ("value", name), value)

    def send_grad(self, micro_batch: MicroBatch, read: int, grad: torch.Tensor | None) -> None:
        dst = self.rank_of_stage[self.wiring.producer[self.wiring.reads[read].value]]
        self._put(self._out[dst], micro_batch.index, ("grad", read), grad)

    def recv_grad(self, micro_batch: MicroBatch, read: int) -> torch.Tensor | None:
        return self._get(self.rank_of_stage[self.wiring.reads[read].stage], micro_batch.index, ("grad", read))

    def end_step(self, microbatches: int) -> None:
        """Check every lane is through the step; wait until the previous step's messages were
        received (this step's stay in flight)."""
        for lane in (*self._out.values(), *self._in.values()):
            if lane.keys:
                lane.check_done(microbatches)
        for work, _ in self._previous:
            self._wait(work)
        self._previous, self._sends = self._sends, []

    def drain(self) -> None:
        """Wait until every message sent so far was received."""
        for work, _ in self._previous + self._sends:
            self._wait(work)
        self._previous, self._sends = [], []

    def _put(self, lane: _Lane, m: int, key: Any, value: Any) -> None:
        lane.held[(m, lane.position[key])] = value
        while lane.next in lane.held:
            slot = lane.advance()
            self._send(lane.held.pop(slot), lane.peer, slot)

    def _get(self, src: int, m: int, key: Any) -> Any:
        lane = self._in[src]
        slot = (m, lane.position[key])
        if slot < lane.next and slot not in lane.held:
            raise RuntimeError(f"{key} of micro-batch {m} from rank {src} was already received")
        while slot not in lane.held:
            expected = lane.advance()
            lane.held[expected] = self._recv(src, expected)
        return lane.held.pop(slot)

    def _send(self, value: Any, dst: int, slot: tuple[int, int]) -> None:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[4:6] = torch.tensor(slot)
        payload = None
        if value is None:
            header[0] = _NONE
        elif isinstance(value, torch.Tensor) and value.dim() <= _HEADER - 6 and value.dtype in _DTYPES:
            header[:4] = torch.tensor([_TENSOR, _DTYPES.index(value.dtype), int(value.requires_grad), value.dim()])
            header[6:6 + value.dim()] = torch.tensor(value.shape, dtype=torch.int64)
            payload = value.detach().contiguous()
        else:
            payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8).to(self.device)
            header[0], header[6] = _OBJECT, payload.numel()
        header = header.to(self.device)
        self._sends.append((dist.isend(header, dst), header))
        if payload is not None:
            self._sends.append((dist.isend(payload, dst), payload))

    def _recv(self, src: int, slot: tuple[int, int]) -> Any:
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        self._wait(dist.irecv(header, src))
        header = header.cpu()
        if tuple(header[4:6].tolist()) != slot:
            raise RuntimeError(f"rank {src} sent message {tuple(header[4:6].tolist())} where {slot} "
                               "(micro-batch, position) was expected: the ranks disagree on the wiring")
        kind = int(header[0])
        if kind == _NONE:
            return None
        if kind == _OBJECT:
            payload = torch.empty(int(header[6]), dtype=torch.uint8, device=self.device)
            self._wait(dist.irecv(payload, src))
            return pickle.loads(payload.cpu().numpy().tobytes())
        ndim = int(header[3])
        value = torch.empty(header[6:6 + ndim].tolist(), dtype=_DTYPES[int(header[1])], device=self.device)
        self._wait(dist.irecv(value, src))
        return value.requires_grad_(bool(header[2]))

    def _wait(self, work: Any) -> None:
        start = time.perf_counter()
        work.wait()
        self.waiting += time.perf_counter() - start
