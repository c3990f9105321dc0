"""The wiring of a Plan: who produces and who reads every cut value, on which gradient channel.

This is the one definition of *which gradient channel a read belongs to*. The emitted
one-line graph (:mod:`fxrelay.passes.emit`) and the stage-by-stage engine
(:mod:`fxrelay.train.stagerun`) are both built from it, so every execution computes the
same loss. Stage inputs follow :func:`fxrelay.core.channels.gradient_channels`; heads
follow :func:`read_channel`:

* head ``j`` (span ``[lo_j, a_j]``) reads a value produced by a stage ``t`` with
  ``lo_j <= t <= a_j`` in its own channel ``lo_j`` (its gradient trains ``t``);
* a value produced below ``lo_j`` is detached for head ``j`` (as the gradient oracle
  does: the head's loss sees the stages below its span as constants); a model input
  is differentiable only for heads with ``lo_j == 0``;
* a value produced by a stage above ``a_j`` is detached for head ``j``: a head never
  trains the stages above it (its loss then waits until that value exists).

What each head's criterion sees (its *view*): the whole model output with that head's
logits at ``plan.output`` and every other leaf read by the rule above. For a model that
returns one tensor that is just the head's logits; for ``(logits, features)`` head ``j``
sees ``(logits_j, features read in channel lo_j or detached)``. An aux head's view does
not read the output value that its logits replace.

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.plan_of(fxrelay.transform(torchvision.models.resnet18(num_classes=10), "greedy"))
    >>> w = plan_wiring(plan)
    >>> [w.head_values[h.index] for h in plan.heads][:2], w.head_after[:2]
    ([('relu',), ('layer1_1_relu_1',)], (0, 1))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch.fx as fx

from .channels import StageScope
from .ir import Head
from .plan import Plan

__all__ = ["Read", "Wiring", "plan_wiring", "read_channel", "view_nodes"]


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


def read_channel(head: Head, producer: int) -> int | None:
    """The channel head ``head`` reads a value made by stage ``producer`` in (-1: a model input;
    ``None``: detached for this head)."""
    lo, top = head.span[0], head.stage
    if producer < 0:
        return 0 if lo == 0 else None
    return lo if lo <= producer <= top else None


def view_nodes(plan: Plan) -> tuple[list[str], str | None]:
    """The names of the values the model output is made of, and the one at ``plan.output``
    (``None`` where the path leads inside a value, e.g. a namedtuple a node builds)."""
    names: list[str] = []
    fx.node.map_arg(plan.output_node.args[0], lambda n: names.append(n.name))
    node: Any = plan.output_node.args[0]
    for key in plan.output:
        if isinstance(node, fx.Node):
            return names, None
        node = node[key]
    return names, node.name if isinstance(node, fx.Node) else None


@dataclass(frozen=True)
class Wiring:
    """The data flow between the stages and heads of a Plan (static).

    Attributes:
        plan: the Plan.
        scopes: the gradient channels of every stage.
        producer: value name -> producing stage (-1: a model input).
        position: value name -> its index in the producer's outputs (or in the model inputs).
        reads: every gradient-carrying read; its index names the cotangent it sends back.
        stage_reads: ``(stage, input index, channel) -> read index``.
        head_values: per head, the names of the values it reads: an aux head its stage's
            main output first (its module's input), then the values of its view; the main
            head the values of the model output, in order.
        head_reads: ``(head, value position) -> read index`` (absent: detached for that head).
        head_after: per head, the stage after which every value its loss reads exists.
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
    head_after: tuple[int, ...]
    expected: dict[tuple[int, int], int]
    readers: dict[str, tuple[int, ...]]

    def head_channel(self, head: int, position: int) -> int | None:
        """The channel of head ``head``'s read at ``position`` of :attr:`head_values` (None: detached)."""
        read = self.head_reads.get((head, position))
        return None if read is None else self.reads[read].channel

    def input_reads(self, name: str) -> int:
        """How many gradient-carrying reads a model input ``name`` has."""
        return sum(1 for r in self.reads if r.value == name)


def plan_wiring(plan: Plan) -> Wiring:
    """The :class:`Wiring` of a Plan with heads."""
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
    output_names, at_path = view_nodes(plan)
    head_values, head_reads, head_after = [], {}, []
    for h in plan.heads:
        names = _head_values(plan, h, output_names, at_path)
        head_values.append(names)
        head_after.append(max([h.stage, *(producer[name] for name in names)]))
        for pos, name in enumerate(names):
            channel = read_channel(h, producer[name])
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
                  tuple(head_after), expected, readers)


def _head_values(plan: Plan, head: Head, output_names: Sequence[str], at_path: str | None) -> tuple[str, ...]:
    if head.is_main:
        return tuple(output_names)
    view = [name for name in output_names if name != at_path]
    return (plan.stages[head.stage].outputs[-1], *view)
