"""Gradient channels: which losses' gradients cross which stage boundary, and what that costs.

A loss ``j`` trains the stages of its span ``[lo_j, a_j]``; below ``lo_j`` the stage
inputs are constants for it. Losses with the same ``lo`` propagate identically below
their heads, so they form one *gradient channel*, named by that ``lo``. A stage is
covered by the channels of the losses whose span contains it:

* one channel (every stage in ``deep`` and ``standard``, every stage in ``greedy``):
  the stage is a plain call; an input produced below the channel's ``lo`` is detached;
* several channels (the overlapping stages of ``relay``): the stage runs forward once
  and its backward takes one parameter pass with the sum of all channels' gradients,
  and one input-only pass per channel that continues below, so each channel's
  gradient stops exactly where its losses' windows end.

:func:`gradient_channels` is the pure heart, the one definition of where a loss's
gradient stops: the runtime (:mod:`fxrelay.core.scopes`), the rewrite, the executions
and the diagrams all read it.

Example:
    >>> from fxrelay.core.ir import Head
    >>> heads = [Head(0, 2, (0, 2), 0.3, "auto"), Head(1, 3, (2, 3), 0.3, "auto"),
    ...          Head(2, 4, (3, 4), 1.0, "main")]
    >>> producers = [(), (0,), (1,), (2,), (3,)]   # producing stage of each stage input
    >>> [s.channels for s in gradient_channels(producers, heads)]
    [(0,), (0,), (0, 2), (2, 3), (3,)]
    >>> stopping_losses(heads, producer=1, consumer=2)
    (1,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .ir import MAIN, Head, Stage

__all__ = ["StageScope", "gradient_channels", "producing_stages", "stopping_losses", "backward_flops",
           "stage_backward_flops", "sequential_peaks",
           "memory_peaks"]


@dataclass(frozen=True)
class StageScope:
    """How gradients flow through one stage.

    Attributes:
        channels: ``lo`` of every gradient channel covering the stage, ascending
            (empty: no loss trains the stage).
        input_channels: per stage input, the channels whose gradient continues into
            it (those with ``lo`` at or below the stage that produced it).
    """

    channels: tuple[int, ...]
    input_channels: tuple[tuple[int, ...], ...]

    @property
    def overlap(self) -> bool:
        """Whether several channels cover the stage (its backward is split per channel)."""
        return len(self.channels) > 1

    @property
    def continuing(self) -> tuple[int, ...]:
        """The channels whose gradient continues into at least one input."""
        return tuple(c for c in self.channels if any(c in chans for chans in self.input_channels))


def producing_stages(stages: Sequence[Stage]) -> list[tuple[int, ...]]:
    """Per stage, the stage that produced each of its inputs (-1: a model input)."""
    producer = {name: s.index for s in stages for name in s.outputs}
    return [tuple(producer.get(name, -1) for name in s.inputs) for s in stages]


def gradient_channels(producers: Sequence[Sequence[int]], heads: Sequence[Head]) -> tuple[StageScope, ...]:
    """The :class:`StageScope` of every stage.

    Args:
        producers: per stage, the producing stage of each input (see
            :func:`producing_stages`; -1 for model inputs).
        heads: the heads with their spans.
    """
    scopes = []
    for s, inputs in enumerate(producers):
        channels = _channels_at(heads, s)
        scopes.append(StageScope(channels, tuple(tuple(c for c in channels if _continues(c, t)) for t in inputs)))
    return tuple(scopes)


def stopping_losses(heads: Sequence[Head], producer: int, consumer: int) -> tuple[int, ...]:
    """Indices of the losses whose gradient stops on the edge from stage ``producer`` to
    stage ``consumer`` (they train ``consumer`` but not ``producer``): the edges a picture marks."""
    stopped = {c for c in _channels_at(heads, consumer) if not _continues(c, producer)}
    return tuple(h.index for h in heads if h.span[0] in stopped and h.span[0] <= consumer <= h.span[1])


def _channels_at(heads: Sequence[Head], stage: int) -> tuple[int, ...]:
    return tuple(sorted({h.span[0] for h in heads if h.span[0] <= stage <= h.span[1]}))


def _continues(channel: int, producer: int) -> bool:
    """Whether a channel's gradient continues into a value made by ``producer``.

    Model inputs (-1) stay differentiable for the channels reaching stage 0.
    """
    return channel <= max(producer, 0)


def backward_flops(stages: Sequence[Stage], heads: Sequence[Head]) -> int:
    """Theoretical backward FLOPs per sample of a training step.

    A stage's backward costs twice its forward (input and weight gradients); an
    overlap stage adds one input-gradient pass (one forward's worth) per channel that
    continues below it; each head costs twice its forward.
    """
    return 2 * sum(h.flops for h in heads) + sum(stage_backward_flops(stages, heads))


def stage_backward_flops(stages: Sequence[Stage], heads: Sequence[Head]) -> list[int]:
    """Per stage, the theoretical backward FLOPs per sample of the stage alone (see :func:`backward_flops`)."""
    return [stage.flops * (2 + (len(scope.continuing) if scope.overlap else 0)) if scope.channels else 0
            for stage, scope in zip(stages, gradient_channels(producing_stages(stages), heads))]


def memory_peaks(stages: Sequence[Stage], heads: Sequence[Head]) -> dict[str, int]:
    """Expected peak bytes per sample saved for backward, for each way of executing a training step.

    * ``one-line``: ``loss.backward()`` after the whole forward: every stage and head;
    * ``recompute``: stage outputs kept, one stage's activations recomputed at a time;
    * ``local``: :class:`fxrelay.LocalStep`: a stage lives until the last span
      containing it has been backpropagated, and keeps the input it saved after the stage
      that made it is freed;
    * ``sequential``: the lean sequential schedule training one stage, the prefix frozen.

    Heads count with the stage they read. A stage that no continuing gradient enters (greedy's
    stages, stage 0) runs on inputs that do not require grad: its layers before the first
    parameter save nothing (``Stage.detached_saved_bytes``). Without heads the plan trains as
    one network (plain backprop).

    >>> from fxrelay.core.ir import Head, Stage
    >>> stages = [Stage(k, f"s{k}", (), (), (), (), 1, 0, 0, saved_bytes=10, boundary_bytes=1,
    ...                 detached_saved_bytes=9, input_saved_bytes=1) for k in range(4)]
    >>> heads = [Head(j, j, (j, j), 0.3, "auto") for j in range(3)] + [Head(3, 3, (3, 3), 1.0, "main")]
    >>> memory_peaks(stages, heads)
    {'one-line': 32, 'recompute': 12, 'local': 9, 'sequential': 9}
    """
    heads = heads or (Head(0, len(stages) - 1, (0, len(stages) - 1), 1.0, MAIN),)
    detached = [k == 0 or not any(scope.input_channels)
                for k, scope in enumerate(gradient_channels(producing_stages(stages), heads))]
    # reason: a stage's output is saved by its own last layer or by its reader: no boundary term
    own = [s.detached_saved_bytes - s.input_saved_bytes if detached[s.index] else s.saved_bytes for s in stages]
    head = [sum(h.saved_bytes for h in heads if h.stage == s.index) for s in stages]
    # reason: without the stage above, an aux head keeps the output it reads (a stage ending with a pool)
    alone = [h + (s.unsaved_output_bytes if any(a.stage == s.index for a in heads if not a.is_main) else 0)
             for h, s in zip(head, stages)]
    last = [max((h.span[1] for h in heads if h.span[0] <= k <= h.span[1]), default=-1)
            for k in range(len(stages))]
    trained = [k for k in range(len(stages)) if last[k] >= 0]

    def alive(t: int) -> list[int]:
        return [k for k in trained if k <= t <= last[k]]

    # reason: in a local step a head's activations live only until its own loss is backpropagated
    local = max((sum(own[k] + (stages[k].input_saved_bytes if k - 1 not in alive(t) else 0) for k in alive(t))
                 + alone[t] for t in range(len(stages))), default=0)
    return {
        "one-line": sum(own[k] + head[k] for k in trained),
        "recompute": sum(s.boundary_bytes for s in stages) + max((own[k] + head[k] for k in trained), default=0),
        "local": local,
        "sequential": max(sequential_peaks(stages, heads), default=0),
    }


def sequential_peaks(stages: Sequence[Stage], heads: Sequence[Head]) -> list[int]:
    """Per stage ``k``, the bytes per sample saved for backward while the sequential schedule trains it:
    stage ``k`` on the frozen prefix's output (which does not require grad: ``Stage.detached_saved_bytes``,
    the input it saves included) and its head (with the output it reads, if the stage does not save it)."""
    return [s.detached_saved_bytes + sum(h.saved_bytes for h in heads if h.stage == s.index)
            + (s.unsaved_output_bytes if any(h.stage == s.index and not h.is_main for h in heads) else 0)
            for s in stages]
