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
  group) on one micro-batch (a :class:`MicroBatch`): each stage's forward on detached copies of
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
    >>> micro_batch = runner.forward(runner.micro_batch((torch.randn(2, 3, 32, 32),), torch.tensor([1, 2])))
    >>> runner.finish(micro_batch).losses.keys() == set(range(len(fxrelay.plan_of(model).heads)))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..core._compat import tree_flatten, tree_map
from ..core.ir import Head
from ..core.outputs import output_leaf, replace_leaf
from ..core.wiring import Wiring, plan_wiring, view_nodes
from ..core.scopes import stage_backward
from ..passes.rewrite import plan_of
from .allreduce import AllReduceSink

__all__ = ["Wiring", "wiring", "MicroBatch", "MicroBatchResult", "Transport", "StageRunner", "AllReduceSink"]


def wiring(model: nn.Module) -> Wiring:
    """The :class:`~fxrelay.core.wiring.Wiring` of a transformed model."""
    return plan_wiring(plan_of(model))


# --- one micro-batch ---

@dataclass
class _StageState:
    leaves: list[torch.Tensor | None]    # reason: the tensor leaves of every input, flat; None: no gradient into it
    in_slices: list[slice]
    outs: list[Any]                      # reason: the tensor leaves of every output, flat
    out_slices: list[slice]
    cotangents: dict[int, list[torch.Tensor | None]]
    pending: dict[int, int]
    ready: set[int] = field(default_factory=set)
    passed: set[int] = field(default_factory=set)


@dataclass
class MicroBatch:
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
    heads: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    input_grads: dict[str, tuple[int, list[torch.Tensor | None]]] = field(default_factory=dict)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    output: Any = None


@dataclass(frozen=True)
class MicroBatchResult:
    """The outcome of one micro-batch on one process.

    Attributes:
        losses: head index -> its (unweighted, detached) loss, for the heads run here.
        output: the main head's output (detached), where the main head ran here.
        logits: head index -> its logits (detached; the main head's: the leaf at ``plan.output``).
    """

    losses: dict[int, torch.Tensor]
    output: Any
    logits: dict[int, torch.Tensor] = field(default_factory=dict)


class Transport(Protocol):
    """How a :class:`StageRunner` exchanges values with runners on other processes."""

    def recv_value(self, micro_batch: MicroBatch, name: str) -> Any:
        """The value ``name`` of ``micro_batch``'s micro-batch, produced on another process."""

    def send_value(self, micro_batch: MicroBatch, name: str, value: Any) -> None:
        """Send a locally produced value to the processes reading it."""

    def send_grad(self, micro_batch: MicroBatch, read: int, grad: Any) -> None:
        """Send the cotangent of read ``read`` (a local reader) to the value's producer: a tensor, a
        list with one per tensor leaf of the value, or ``None``."""


class StageRunner:
    """Runs a set of stages of a transformed model on explicit values, one micro-batch at a time.

    Every head runs as soon as the stage it reads ran (its module right after that
    stage, as in the emitted one-line code, so dropout draws the same masks), and its
    loss as soon as every value of its view exists (see :mod:`fxrelay.core.wiring`).
    Values crossing stages may be tensors or tuples, lists and dicts of them.

    Args:
        model: a model made by :func:`fxrelay.transform`, in train mode (a model
            transformed with stage recompute runs its stages plainly here: same gradients,
            the engine's own memory).
        criterion: ``criterion(output, target) -> scalar loss``, applied to every head's
            view of the output.
        stages: the stages run here (default: all); values and cotangents crossing to
            other stages go through ``transport``.
        grad_scaler: a ``torch.amp.GradScaler``: each head's loss is scaled before its
            backward.
        grad_sink: ``sink(params, grads)`` receives every parameter pass's gradients
            instead of ``.grad`` (data parallelism, :class:`AllReduceSink`).
        transport: required when ``stages`` is not every stage.
        only: run the sequential schedule's step for stage ``only`` (``k``): the stages below
            run without grad (in the model's mode: in train mode, as the one-line step runs
            them, BatchNorm on batch statistics, updating its running statistics), then stage
            ``k`` and its heads with grad; nothing above ``k`` runs. Stage ``k``'s gradients are
            the one-line step's for it (other stages frozen); ``stages`` is ignored.
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Any, Any], torch.Tensor], *,
                 stages: Sequence[int] | None = None, grad_scaler: Any = None,
                 grad_sink: Callable[[list[torch.Tensor], Sequence[torch.Tensor | None]], None] | None = None,
                 transport: Transport | None = None, only: int | None = None):
        self.model = model
        self.wiring = w = wiring(model)
        plan = w.plan
        if only is not None and not 0 <= only < len(plan.stages):
            raise ValueError(f"only must be a stage in 0..{len(plan.stages) - 1}, got {only}")
        self.only = only
        self.stages = tuple(sorted(range(len(plan.stages)) if stages is None else stages))
        if only is not None:
            self.stages = tuple(range(only + 1))
        elif transport is None and len(self.stages) != len(plan.stages):
            raise ValueError("a StageRunner over some of the stages needs a transport")
        self.criterion, self.grad_scaler, self.grad_sink, self.transport = criterion, grad_scaler, grad_sink, transport
        local = set(self.stages)
        self.heads = tuple(h for h in plan.heads if h.stage in local and (only is None or h.stage == only))
        self._live, self._expected = self._live_reads()
        self._channels = {s: () if only is not None and s < only else w.scopes[s].channels for s in self.stages}
        self._in_channels = {s: tuple(tuple(c for c in chans if w.stage_reads[(s, i, c)] in self._live)
                                      for i, chans in enumerate(w.scopes[s].input_channels)) for s in self.stages}
        self._aux_index = {h.index: k for k, h in enumerate(h for h in plan.heads if not h.is_main)}
        self._output_names, self._at_path = view_nodes(plan)
        uses: dict[str, int] = {}
        for s in self.stages:
            for name in plan.stages[s].inputs:
                uses[name] = uses.get(name, 0) + 1
        for h in self.heads:
            for name in self.wiring.head_values[h.index]:
                uses[name] = uses.get(name, 0) + 1
        self._uses = uses
        self.exported = set() if only is not None else {
            name for s in self.stages for name in plan.stages[s].outputs if any(r not in local for r in w.readers[name])}
        self.remote_reads = tuple(k for k in self._live if w.producer[w.reads[k].value] in local
                                  and w.reads[k].stage not in local)
        self._input_reads = {name: sum(1 for k in self._live if w.reads[k].value == name and w.reads[k].stage in local)
                             for name in plan.input_names}

    def _live_reads(self) -> tuple[set[int], dict[tuple[int, int], int]]:
        """The reads that carry a gradient here, and per (stage, channel) how many cotangents it waits for.

        With ``only=k``: the reads of stage ``k`` and its heads, of values stage ``k`` produced.
        """
        w = self.wiring
        if self.only is None:
            return set(range(len(w.reads))), w.expected
        k = self.only
        live = {i for (s, _, _), i in w.stage_reads.items() if s == k and w.producer[w.reads[i].value] == k}
        live |= {i for (j, _), i in w.head_reads.items()
                 if w.plan.heads[j].stage == k and w.producer[w.reads[i].value] in ((k, -1) if k == 0 else (k,))}
        expected = {key: 0 for key in w.expected}
        for i in live:
            if w.producer[w.reads[i].value] >= 0:
                expected[(w.producer[w.reads[i].value], w.reads[i].channel)] += 1
        return live, expected

    def micro_batch(self, inputs: tuple[Any, ...], target: Any, *, index: int = 0,
                    loss_scale: float = 1.0) -> MicroBatch:
        """A new micro-batch.

        Raises:
            ValueError: the model is in eval mode, or ``inputs`` has the wrong length.
            RuntimeError: gradients are off (``torch.no_grad()``, ``torch.inference_mode()``).
        """
        if not self.model.training:
            raise ValueError("stage-by-stage steps train: call model.train() first (in eval mode, call model(x))")
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError("a training step computes gradients: call it outside torch.no_grad() and "
                               "torch.inference_mode()")
        plan = self.wiring.plan
        if len(inputs) != len(plan.input_names):
            raise ValueError(f"the model takes {len(plan.input_names)} input(s), got {len(inputs)}")
        micro_batch = MicroBatch(index, tuple(inputs), target, loss_scale, uses=dict(self._uses))
        micro_batch.env.update((name, v) for name, v in zip(plan.input_names, inputs) if name in micro_batch.uses)
        return micro_batch

    def forward(self, micro_batch: MicroBatch, *, heads_last: bool = False) -> MicroBatch:
        """Run the local stages and heads on ``micro_batch``, with every backward that becomes ready.

        Args:
            heads_last: run every local stage before the first head, so that values for
                other processes leave sooner (a pipeline's fill); the local stages' graphs
                of this micro-batch then live until the heads ran, and heads draw random
                numbers in another order. Default: each head right after its stage.
        """
        for s in self.stages:
            self._forward_stage(micro_batch, s)
            if not heads_last:
                self._run_heads(micro_batch, s)
        if heads_last:
            for s in self.stages:
                self._run_heads(micro_batch, s)
        for h in self.heads:
            if h.index not in micro_batch.losses:
                self._head_loss(micro_batch, h)  # reason: its view reads values made on other processes
        return micro_batch

    def _forward_stage(self, micro_batch: MicroBatch, s: int) -> None:
        plan, scopes = self.wiring.plan, self.wiring.scopes
        stage, scope = plan.stages[s], scopes[s]
        inputs = [_leaf(self._take(micro_batch, name), bool(chans))
                  for name, chans in zip(stage.inputs, self._in_channels[s])]
        channels = self._channels[s]
        with torch.set_grad_enabled(bool(channels)):
            result = self.model.stages[s](*inputs)
        outs = (result,) if len(stage.outputs) == 1 else tuple(result)
        for name, value in zip(stage.outputs, outs):
            if micro_batch.uses.get(name):
                micro_batch.env[name] = value
            if name in self.exported:
                self.transport.send_value(micro_batch, name, value)
        if channels:
            leaves, in_slices = _flat(inputs)
            flat_outs, out_slices = _flat(outs)
            # reason: an input no gradient continues into (a greedy stage's) is not kept: its graph saves it if needed
            leaves = [t if t.requires_grad else None for t in leaves]
            micro_batch.states[s] = _StageState(
                leaves, in_slices, flat_outs, out_slices, {c: [None] * len(flat_outs) for c in channels},
                {c: self._expected[(s, c)] for c in channels})
        for c in channels:
            if s in micro_batch.states and self._expected[(s, c)] == 0:
                # reason: no loss reaches the stage through this channel
                self._backward_ready_channels(micro_batch, s, c)

    def _run_heads(self, micro_batch: MicroBatch, s: int) -> None:
        """After stage ``s``: the aux heads reading it, then every loss whose view now exists."""
        for h in self.heads:
            if h.stage == s and not h.is_main:
                leaf = _leaf(self._take(micro_batch, self.wiring.head_values[h.index][0]),
                             self.wiring.head_reads.get((h.index, 0)) in self._live)
                micro_batch.heads[h.index] = (leaf, self.model.heads[self._aux_index[h.index]](leaf))
        for h in self.heads:
            if self.wiring.head_after[h.index] == s:
                self._head_loss(micro_batch, h)

    def deliver(self, micro_batch: MicroBatch, read: int, grad: Any) -> None:
        """The cotangent of read ``read`` (a tensor, one per tensor leaf of the value, or None): from
        a local reader, or received from another process."""
        r = self.wiring.reads[read]
        t = self.wiring.producer[r.value]
        if t >= 0 and t not in self.stages:
            one = isinstance(grad, list) and len(grad) == 1
            self.transport.send_grad(micro_batch, read, grad[0] if one else grad)  # reason: a bare tensor travels raw
            return
        grads = [grad] if isinstance(grad, torch.Tensor) else grad
        if t < 0:
            self._deliver_input(micro_batch, r.value, grads)
            return
        state = micro_batch.states[t]
        cots = state.cotangents[r.channel]
        if grads is not None:
            for k, g in zip(range(len(state.outs))[state.out_slices[self.wiring.position[r.value]]], grads):
                if g is not None:
                    cots[k] = g if cots[k] is None else cots[k] + g
        state.pending[r.channel] -= 1
        if state.pending[r.channel] == 0:
            self._backward_ready_channels(micro_batch, t, r.channel)

    def _deliver_input(self, micro_batch: MicroBatch, name: str, grads: list[torch.Tensor | None] | None) -> None:
        """Sum a model input's cotangents; one backward into it once every local reader sent its own."""
        value = micro_batch.inputs[self.wiring.position[name]]
        tensors = _tensors(value)
        left, total = micro_batch.input_grads.get(name, (self._input_reads[name], [None] * len(tensors)))
        for k, g in enumerate(grads or ()):
            if g is not None:
                total[k] = g if total[k] is None else total[k] + g
        micro_batch.input_grads[name] = (left - 1, total)
        if left > 1:
            return
        del micro_batch.input_grads[name]
        pairs = [(v, g) for v, g in zip(tensors, total) if g is not None and v.requires_grad]
        if pairs:
            torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])

    def finish(self, micro_batch: MicroBatch) -> MicroBatchResult:
        """The micro-batch's losses and output, once every local backward has run.

        Raises:
            RuntimeError: a local stage still waits for cotangents (a schedule error).
        """
        if micro_batch.states:
            raise RuntimeError(f"stages {sorted(micro_batch.states)} still wait for gradients from other processes")
        return MicroBatchResult(dict(micro_batch.losses), micro_batch.output, dict(micro_batch.logits))

    def _take(self, micro_batch: MicroBatch, name: str) -> Any:
        if name not in micro_batch.env:
            micro_batch.env[name] = self.transport.recv_value(micro_batch, name)
        value = micro_batch.env[name]
        micro_batch.uses[name] -= 1
        if micro_batch.uses[name] == 0:
            del micro_batch.env[name]  # reason: the last local reader ran; stage graphs hold what backward needs
        return value

    def _view(self, head: Head, values: list[Any], logits: Any) -> Any:
        """What the criterion sees for ``head``: the output with its logits at ``plan.output``."""
        plan, it = self.wiring.plan, iter(values)
        view = fx.node.map_arg(plan.output_node.args[0],
                               lambda n: None if not head.is_main and n.name == self._at_path else next(it))
        return view if head.is_main else replace_leaf(view, plan.output, lambda _: logits)

    def _head_loss(self, micro_batch: MicroBatch, head: Head) -> None:
        names = self.wiring.head_values[head.index]
        first = 0 if head.is_main else 1
        reads = [self.wiring.head_reads.get((head.index, pos)) for pos in range(len(names))]
        reads = [r if r in self._live else None for r in reads]
        values = [_leaf(self._take(micro_batch, name), r is not None) for name, r in zip(names[first:], reads[first:])]
        module_input, logits = micro_batch.heads.pop(head.index, ((), None))
        view = self._view(head, values, logits)
        loss = self.criterion(view, micro_batch.target)
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            raise ValueError(f"criterion must return a scalar tensor, got {type(loss).__name__} "
                             f"of shape {tuple(getattr(loss, 'shape', ()))}")
        micro_batch.losses[head.index] = loss.detach()
        micro_batch.logits[head.index] = _detached(logits if not head.is_main
                                                   else output_leaf(view, self.wiring.plan.output))
        if head.is_main:
            micro_batch.output = _detached(view)
        weighted = loss * (head.weight * micro_batch.loss_scale)
        if self.grad_scaler is not None:
            weighted = self.grad_scaler.scale(weighted)
        params = [] if head.is_main else [p for p in self.model.heads[self._aux_index[head.index]].parameters()
                                          if p.requires_grad]
        read_values = values if head.is_main else [module_input, *values]
        leaves, slices = _flat(read_values)
        channels = [(0,) if r is not None else () for r, sl in zip(reads, slices) for _ in range(sl.start, sl.stop)]
        grads = self._backward(params, (weighted,), {0: [torch.ones_like(weighted)]}, leaves, channels, retain=False)
        for r, sl in zip(reads, slices):
            if r is not None:
                self.deliver(micro_batch, r, [grads.get((k, 0)) for k in range(sl.start, sl.stop)])

    def _backward_ready_channels(self, micro_batch: MicroBatch, s: int, c: int) -> None:
        state, scope, inputs = micro_batch.states[s], self.wiring.scopes[s], self._in_channels[s]
        state.ready.add(c)
        if len(state.ready) == len(scope.channels):
            todo = set(scope.channels) - state.passed
            channels = [tuple(x for x in chans if x in todo) for chans in inputs]
            params = [p for p in self.model.stages[s].parameters() if p.requires_grad]
            grads = self._backward(params, state.outs, state.cotangents, state.leaves,
                                   _per_leaf(channels, state.in_slices), retain=False)
            del micro_batch.states[s]  # reason: the stage's graph is freed; its activations with it
        elif any(c in chans for chans in inputs):
            channels = [tuple(x for x in chans if x == c) for chans in inputs]
            grads = self._backward([], state.outs, {c: state.cotangents[c]}, state.leaves,
                                   _per_leaf(channels, state.in_slices), retain=True)
            state.passed.add(c)
        else:
            return
        for i, (chans, sl) in enumerate(zip(channels, state.in_slices)):
            for x in chans:
                self.deliver(micro_batch, self.wiring.stage_reads[(s, i, x)],
                             [grads.get((k, x)) for k in range(sl.start, sl.stop)])

    def _backward(self, params: list[torch.Tensor], outs: Sequence[Any], cotangents: Mapping[int, Sequence],
                  leaves: Sequence[Any], channels: Sequence[Sequence[int]],
                  retain: bool) -> dict[tuple[int, int], torch.Tensor | None]:
        result = stage_backward(outs, cotangents, params, leaves, channels, accumulate=self.grad_sink is None,
                                retain_graph=retain)
        if self.grad_sink is not None and params:
            self.grad_sink(params, result.params)
        return result.inputs


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensor leaves of a value (a tensor, or tuples, lists and dicts of them), in pytree order."""
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def _flat(values: Sequence[Any]) -> tuple[list[torch.Tensor], list[slice]]:
    """The tensor leaves of several values, flat, and the slice of each value's leaves."""
    flat: list[torch.Tensor] = []
    slices = []
    for value in values:
        tensors = _tensors(value)
        slices.append(slice(len(flat), len(flat) + len(tensors)))
        flat += tensors
    return flat, slices


def _detached(value: Any) -> Any:
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


def _per_leaf(channels: Sequence[tuple[int, ...]], slices: Sequence[slice]) -> list[tuple[int, ...]]:
    return [chans for chans, sl in zip(channels, slices) for _ in range(sl.start, sl.stop)]


def _leaf(value: Any, differentiable: bool) -> Any:
    """A reader's own copy of a value: every tensor in it detached, requiring grad where a gradient
    continues into it."""
    return tree_map(lambda v: v.detach().requires_grad_(differentiable and v.requires_grad)
                    if isinstance(v, torch.Tensor) else v, value)
