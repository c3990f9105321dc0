"""Stage-by-stage execution of a transformed model on explicit values.

The one-line step (``criterion(model(x), y).backward()``) keeps the whole forward for one
backward at the end. This engine computes the same gradients stage by stage, with the
values that cross stage boundaries held explicitly, so that a schedule decides when each
stage's backward runs, when its activations are freed and on which process it lives:

* :func:`fxrelay.core.scopes.stage_backward` is the per-stage backward math and nothing else: given the
  cotangents of a stage's outputs per gradient channel (see :mod:`fxrelay.core.channels`), one
  parameter pass with their sum and one input pass per channel that continues below the
  stage; a single pass when only one channel is live.
* :class:`StageRunner` runs a set of stages (all of them, or one process's contiguous
  group) on one micro-batch (a :class:`Tape`): each stage's forward on detached copies of
  its inputs, each head's loss as soon as its stage ran, and each stage's backward as soon
  as every cotangent it needs has arrived (a count per stage and channel, like autograd's
  own dependency counting). A channel's input pass at a stage runs when that channel's
  cotangents are complete; the parameter pass, which frees the stage's activations, runs
  when the last channel covering the stage is complete. So greedy frees a stage right
  after its own head's loss, relay after the last window containing it, deep at the end.

Values read or produced on other processes go through a transport
(:mod:`fxrelay.train.parallel`); parameter gradients go to ``.grad`` through autograd (hooks
fire), or to a sink (:class:`AllReduceSink`) that all-reduces them for data parallelism.

Example:
    >>> import fxrelay, torch, torch.nn.functional as F, torchvision
    >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "greedy")
    >>> runner = StageRunner(model, F.cross_entropy)
    >>> tape = runner.forward(runner.tape((torch.randn(2, 3, 32, 32),), torch.tensor([1, 2])))
    >>> runner.finish(tape).losses.keys() == set(range(len(fxrelay.plan_of(model).heads)))
    True
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from ..core._compat import tree_map
from ..core.channels import StageScope
from ..core.ir import Head
from ..core.plan import Plan
from ..core.scopes import stage_backward
from ..passes.rewrite import plan_of

__all__ = ["Wiring", "wiring", "Tape", "TapeResult", "Transport", "StageRunner", "AllReduceSink"]


# --- static wiring: who produces and who reads every cut value ---

@dataclass(frozen=True)
class Read:
    """One gradient-carrying read of a cut value.

    Attributes:
        value: the value's name.
        channel: the gradient channel the reader's cotangent belongs to.
        stage: the stage whose process runs the reader (a head: the stage it reads).
    """

    value: str
    channel: int
    stage: int


@dataclass(frozen=True)
class Wiring:
    """The data flow between the stages and heads of a transformed model (static).

    Attributes:
        plan: the model's Plan.
        scopes: the gradient channels of every stage.
        producer: value name -> producing stage (-1: a model input).
        position: value name -> its index in the producer's outputs (or in the model inputs).
        reads: every gradient-carrying read; its index names the cotangent it sends back.
        stage_reads: ``(stage, input index, channel) -> read index``.
        head_values: per head, the names of the values it reads (the main head: the
            leaves of the model output, in order).
        head_reads: ``(head, value position) -> read index`` (absent: no gradient).
        expected: ``(stage, channel) -> number of reads`` whose cotangents it waits for.
        readers: value name -> the stages reading it in the forward (consumer stages, and
            the stages of the heads reading it).
    """

    plan: Plan
    scopes: tuple[StageScope, ...]
    producer: dict[str, int]
    position: dict[str, int]
    reads: tuple[Read, ...]
    stage_reads: dict[tuple[int, int, int], int]
    head_values: tuple[tuple[str, ...], ...]
    head_reads: dict[tuple[int, int], int]
    expected: dict[tuple[int, int], int]
    readers: dict[str, tuple[int, ...]]


def wiring(model: nn.Module) -> Wiring:
    """The :class:`Wiring` of a transformed model."""
    plan = plan_of(model)
    scopes = plan.scopes()
    producer = {name: -1 for name in plan.input_names}
    position = {name: i for i, name in enumerate(plan.input_names)}
    for s in plan.stages:
        producer.update({name: s.index for name in s.outputs})
        position.update({name: o for o, name in enumerate(s.outputs)})
    reads: list[Read] = []
    stage_reads = {}
    for s, scope in zip(plan.stages, scopes):
        for i, (name, chans) in enumerate(zip(s.inputs, scope.input_channels)):
            for c in chans:
                stage_reads[(s.index, i, c)] = len(reads)
                reads.append(Read(name, c, s.index))
    output_names: list[str] = []
    fx.node.map_arg(plan.output_node.args[0], lambda n: output_names.append(n.name))
    head_values, head_reads = [], {}
    for h in plan.heads:
        names = tuple(output_names) if h.is_main else (plan.stages[h.stage].outputs[-1],)
        head_values.append(names)
        for pos, name in enumerate(names):
            channel = _read_channel(scopes, producer[name], h.window[0])
            if channel is not None:
                head_reads[(h.index, pos)] = len(reads)
                reads.append(Read(name, channel, h.stage))
    expected = {(s, c): 0 for s, scope in enumerate(scopes) for c in scope.channels}
    for r in reads:
        if producer[r.value] >= 0:
            expected[(producer[r.value], r.channel)] += 1
    readers = {name: tuple([s.index for s in plan.stages if name in s.inputs]
                           + [h.stage for h, names in zip(plan.heads, head_values) if name in names])
               for name in producer}
    return Wiring(plan, scopes, producer, position, tuple(reads), stage_reads, tuple(head_values), head_reads,
                  expected, readers)


def _read_channel(scopes: Sequence[StageScope], stage: int, lo: int) -> int | None:
    """The channel a head of window ``lo..`` reads stage ``stage``'s value in (None: no gradient)."""
    if stage < 0:
        return 0 if lo == 0 else None
    channels = scopes[stage].channels
    if lo in channels:
        return lo
    # reason: the one-line graph reads a single-channel stage's plain output whatever the head's window
    return channels[0] if len(channels) == 1 else None


# --- one micro-batch ---

@dataclass
class _StageState:
    leaves: list[Any]
    outs: tuple[Any, ...]
    cotangents: dict[int, list[torch.Tensor | None]]
    pending: dict[int, int]
    ready: set[int] = field(default_factory=set)
    passed: set[int] = field(default_factory=set)


@dataclass
class Tape:
    """The state of one micro-batch on one process: forward values still needed, stage
    graphs awaiting their backward, head losses.

    Attributes:
        index: the micro-batch's index within the step (names its messages).
        inputs: the model inputs.
        target: the criterion's target.
        loss_scale: factor on every head's loss (``1/M`` for ``M`` micro-batches).
    """

    index: int
    inputs: tuple[Any, ...]
    target: Any
    loss_scale: float
    env: dict[str, Any] = field(default_factory=dict)
    uses: dict[str, int] = field(default_factory=dict)
    states: dict[int, _StageState] = field(default_factory=dict)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    output: Any = None


@dataclass(frozen=True)
class TapeResult:
    """The outcome of one micro-batch on one process.

    Attributes:
        losses: head index -> its (unweighted, detached) loss, for the heads run here.
        output: the main head's output (detached), where the main head ran here.
    """

    losses: dict[int, torch.Tensor]
    output: Any


class Transport(Protocol):
    """How a :class:`StageRunner` exchanges values with runners on other processes."""

    def recv_value(self, tape: Tape, name: str) -> Any:
        """The value ``name`` of ``tape``'s micro-batch, produced on another process."""

    def send_value(self, tape: Tape, name: str, value: Any) -> None:
        """Send a locally produced value to the processes reading it."""

    def send_grad(self, tape: Tape, read: int, grad: torch.Tensor | None) -> None:
        """Send the cotangent of read ``read`` (a local reader) to the value's producer."""


class StageRunner:
    """Runs a set of stages of a transformed model on explicit values, one micro-batch at a time.

    Args:
        model: a model made by :func:`fxrelay.transform`, in train mode.
        criterion: ``criterion(logits, target) -> scalar loss``, applied to every head.
        stages: the stages run here (default: all); values and cotangents crossing to
            other stages go through ``transport``.
        grad_scaler: a ``torch.amp.GradScaler``: each head's loss is scaled before its
            backward.
        grad_sink: ``sink(params, grads)`` receives every parameter pass's gradients
            instead of ``.grad`` (data parallelism, :class:`AllReduceSink`).
        transport: required when ``stages`` is not every stage.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Any, Any], torch.Tensor], *,
                 stages: Sequence[int] | None = None, grad_scaler: Any = None,
                 grad_sink: Callable[[list[torch.Tensor], Sequence[torch.Tensor | None]], None] | None = None,
                 transport: Transport | None = None):
        self.model = model
        self.wiring = wiring(model)
        plan = self.wiring.plan
        self.stages = tuple(sorted(range(len(plan.stages)) if stages is None else stages))
        if transport is None and len(self.stages) != len(plan.stages):
            raise ValueError("a StageRunner over some of the stages needs a transport")
        self.criterion, self.grad_scaler, self.grad_sink, self.transport = criterion, grad_scaler, grad_sink, transport
        local = set(self.stages)
        self.heads = tuple(h for h in plan.heads if h.stage in local)
        self._aux_index = {h.index: k for k, h in enumerate(h for h in plan.heads if not h.is_main)}
        uses: dict[str, int] = {}
        for s in self.stages:
            for name in plan.stages[s].inputs:
                uses[name] = uses.get(name, 0) + 1
        for h in self.heads:
            for name in self.wiring.head_values[h.index]:
                uses[name] = uses.get(name, 0) + 1
        self._uses = uses
        self.exported = {name for s in self.stages for name in plan.stages[s].outputs
                         if any(r not in local for r in self.wiring.readers[name])}
        self.remote_reads = tuple(k for k, r in enumerate(self.wiring.reads)
                                  if self.wiring.producer[r.value] in local and r.stage not in local)

    def tape(self, inputs: tuple[Any, ...], target: Any, *, index: int = 0, loss_scale: float = 1.0) -> Tape:
        """A new micro-batch.

        Raises:
            ValueError: the model is in eval mode, or ``inputs`` has the wrong length.
        """
        if not self.model.training:
            raise ValueError("stage-by-stage steps train: call model.train() first (in eval mode, call model(x))")
        plan = self.wiring.plan
        if len(inputs) != len(plan.input_names):
            raise ValueError(f"the model takes {len(plan.input_names)} input(s), got {len(inputs)}")
        tape = Tape(index, tuple(inputs), target, loss_scale, uses=dict(self._uses))
        tape.env.update((name, v) for name, v in zip(plan.input_names, inputs) if name in tape.uses)
        return tape

    def forward(self, tape: Tape, *, heads_last: bool = False) -> Tape:
        """Run the local stages and heads on ``tape``, with every backward that becomes ready.

        Args:
            heads_last: run every local stage before the first head, so that values for
                other processes leave sooner (a pipeline's fill); the local stages' graphs
                of this micro-batch then live until the heads ran. Default: each head
                right after its stage (least memory).
        """
        for s in self.stages:
            self._forward_stage(tape, s)
            if not heads_last:
                self._run_heads(tape, s)
        if heads_last:
            for s in self.stages:
                self._run_heads(tape, s)
        return tape

    def _forward_stage(self, tape: Tape, s: int) -> None:
        plan, scopes = self.wiring.plan, self.wiring.scopes
        stage, scope = plan.stages[s], scopes[s]
        leaves = [_leaf(self._take(tape, name), bool(chans))
                  for name, chans in zip(stage.inputs, scope.input_channels)]
        with torch.set_grad_enabled(bool(scope.channels)):
            result = self.model.stages[s](*leaves)
        outs = (result,) if len(stage.outputs) == 1 else tuple(result)
        for name, value in zip(stage.outputs, outs):
            if tape.uses.get(name):
                tape.env[name] = value
            if name in self.exported:
                self.transport.send_value(tape, name, value)
        if scope.channels:
            tape.states[s] = _StageState(
                leaves, outs, {c: [None] * len(outs) for c in scope.channels},
                {c: self.wiring.expected[(s, c)] for c in scope.channels})
        for c in scope.channels:
            if s in tape.states and self.wiring.expected[(s, c)] == 0:
                self._ready(tape, s, c)  # reason: no loss reaches the stage through this channel

    def _run_heads(self, tape: Tape, s: int) -> None:
        for h in self.heads:
            if h.stage == s:
                self._run_head(tape, h)

    def deliver(self, tape: Tape, read: int, grad: torch.Tensor | None) -> None:
        """The cotangent of read ``read``: from a local reader, or received from another process."""
        r = self.wiring.reads[read]
        t = self.wiring.producer[r.value]
        if t < 0:
            value = tape.inputs[self.wiring.position[r.value]]
            if grad is not None and (isinstance(value, torch.Tensor) and value.requires_grad):
                torch.autograd.backward([value], [grad])
            return
        if t not in self.stages:
            self.transport.send_grad(tape, read, grad)
            return
        state = tape.states[t]
        o = self.wiring.position[r.value]
        cots = state.cotangents[r.channel]
        if grad is not None:
            cots[o] = grad if cots[o] is None else cots[o] + grad
        state.pending[r.channel] -= 1
        if state.pending[r.channel] == 0:
            self._ready(tape, t, r.channel)

    def finish(self, tape: Tape) -> TapeResult:
        """The micro-batch's losses and output, once every local backward has run.

        Raises:
            RuntimeError: a local stage still waits for cotangents (a schedule error).
        """
        if tape.states:
            raise RuntimeError(f"stages {sorted(tape.states)} still wait for gradients from other processes")
        return TapeResult(dict(tape.losses), tape.output)

    def _take(self, tape: Tape, name: str) -> Any:
        if name not in tape.env:
            tape.env[name] = self.transport.recv_value(tape, name)
        value = tape.env[name]
        tape.uses[name] -= 1
        if tape.uses[name] == 0:
            del tape.env[name]  # reason: the last local reader ran; stage graphs hold what backward needs
        return value

    def _run_head(self, tape: Tape, head: Head) -> None:
        names = self.wiring.head_values[head.index]
        reads = [self.wiring.head_reads.get((head.index, pos)) for pos in range(len(names))]
        leaves = [_leaf(self._take(tape, name), r is not None) for name, r in zip(names, reads)]
        if head.is_main:
            module, params = None, []
            it = iter(leaves)
            logits = fx.node.map_arg(self.wiring.plan.output_node.args[0], lambda n: next(it))
        else:
            module = self.model.heads[self._aux_index[head.index]]
            params = [p for p in module.parameters() if p.requires_grad]
            logits = module(leaves[0])
        loss = self.criterion(logits, tape.target)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise ValueError(f"criterion must return a scalar tensor, got {type(loss).__name__} "
                             f"of shape {tuple(getattr(loss, 'shape', ()))}")
        tape.losses[head.index] = loss.detach()
        if head.is_main:
            tape.output = tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, logits)
        weighted = loss * (head.weight * tape.loss_scale)
        if self.grad_scaler is not None:
            weighted = self.grad_scaler.scale(weighted)
        grads = self._backward(params, (weighted,), {0: [torch.ones_like(weighted)]}, leaves,
                               [(0,) if r is not None else () for r in reads], retain=False)
        for pos, r in enumerate(reads):
            if r is not None:
                self.deliver(tape, r, grads.get((pos, 0)))

    def _ready(self, tape: Tape, s: int, c: int) -> None:
        state, scope = tape.states[s], self.wiring.scopes[s]
        state.ready.add(c)
        if len(state.ready) == len(scope.channels):
            todo = set(scope.channels) - state.passed
            channels = [tuple(x for x in chans if x in todo) for chans in scope.input_channels]
            params = [p for p in self.model.stages[s].parameters() if p.requires_grad]
            grads = self._backward(params, state.outs, state.cotangents, state.leaves, channels, retain=False)
            del tape.states[s]  # reason: the stage's graph is freed; its activations with it
        elif any(c in chans for chans in scope.input_channels):
            channels = [tuple(x for x in chans if x == c) for chans in scope.input_channels]
            grads = self._backward([], state.outs, {c: state.cotangents[c]}, state.leaves, channels, retain=True)
            state.passed.add(c)
        else:
            return
        for i, chans in enumerate(channels):
            for x in chans:
                self.deliver(tape, self.wiring.stage_reads[(s, i, x)], grads.get((i, x)))

    def _backward(self, params: list[torch.Tensor], outs: Sequence[Any], cotangents: Mapping[int, Sequence],
                  leaves: Sequence[Any], channels: Sequence[Sequence[int]],
                  retain: bool) -> dict[tuple[int, int], torch.Tensor | None]:
        result = stage_backward(outs, cotangents, params, leaves, channels, accumulate=self.grad_sink is None,
                                retain_graph=retain)
        if self.grad_sink is not None and params:
            self.grad_sink(params, result.params)
        return result.inputs


def _leaf(value: Any, differentiable: bool) -> Any:
    """A stage's own copy of an input: detached; requires grad where a gradient continues into it."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.detach().requires_grad_(differentiable and value.requires_grad)


class AllReduceSink:
    """Data parallelism for a :class:`StageRunner`: each parameter pass's gradients are
    all-reduced asynchronously right away (one bucket per pass and dtype); :meth:`finish`
    waits, averages over the group and accumulates into ``.grad``.

    Every process of the group must run the same model on its own shard of the batch:
    the passes, and so the collectives, come in the same order everywhere.

    Args:
        group: the process group of the replicas (``None``: the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self._pending: list[tuple[list[torch.Tensor], torch.Tensor, Any]] = []

    def __call__(self, params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, g in zip(params, grads):
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append((p, g))
        for pairs in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for _, g in pairs])
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append(([p for p, _ in pairs], flat, work))

    def finish(self) -> float:
        """Wait for every all-reduce, accumulate the averages into ``.grad``; returns seconds waited."""
        size = dist.get_world_size(self.group)
        waited = 0.0
        for params, flat, work in self._pending:
            start = time.perf_counter()
            work.wait()
            waited += time.perf_counter() - start
            flat /= size
            offset = 0
            for p in params:
                g = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self._pending.clear()
        return waited
