"""Gradient scopes: which losses' gradients cross which stage boundary.

A loss ``j`` trains the stages of its window ``[lo_j, a_j]``; below ``lo_j`` the stage
inputs are constants for it. Losses with the same ``lo`` propagate identically below
their heads, so they form one *gradient channel*, named by that ``lo``. A stage is
covered by the channels of the losses whose window contains it:

* one channel (every stage in ``deep`` and ``standard``, every stage in ``greedy``):
  the stage is a plain call; an input produced below the channel's ``lo`` is detached;
* several channels (the overlapping stages of ``relay``): the stage runs forward once
  inside :func:`scoped_stage`; its backward takes one parameter pass with the sum of
  all channels' gradients, and one input-only pass per channel that continues below,
  so each channel's gradient stops exactly where its losses' windows end.

:func:`gradient_channels` is the pure heart: it maps a Plan's stages and heads to one
:class:`StageScope` per stage.

Example:
    >>> from fxrelay.plan import Head
    >>> heads = [Head(0, 2, (0, 2), 0.3, "auto"), Head(1, 3, (2, 3), 0.3, "auto"),
    ...          Head(2, 4, (3, 4), 1.0, "main")]
    >>> inputs = [(), (0,), (1,), (2,), (3,)]   # producing stage of each stage input
    >>> [s.channels for s in gradient_channels(inputs, heads)]
    [(0,), (0,), (0, 2), (2, 3), (3,)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .plan import Head, Plan

__all__ = ["StageScope", "gradient_channels", "producing_stages", "scoped_stage", "detach_scope",
           "backward_flops", "stage_backward_flops"]


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
    def scoped(self) -> bool:
        """Whether the stage needs :func:`scoped_stage` (several channels)."""
        return len(self.channels) > 1


def producing_stages(plan: Plan) -> list[tuple[int, ...]]:
    """Per stage, the stage that produced each of its inputs (-1: a model input)."""
    producer = {name: s.index for s in plan.stages for name in s.outputs}
    return [tuple(producer.get(name, -1) for name in s.inputs) for s in plan.stages]


def gradient_channels(producers: Sequence[Sequence[int]], heads: Sequence[Head]) -> tuple[StageScope, ...]:
    """The :class:`StageScope` of every stage.

    Args:
        producers: per stage, the producing stage of each input (see
            :func:`producing_stages`; -1 for model inputs).
        heads: the plan's heads with their windows.
    """
    scopes = []
    for s, inputs in enumerate(producers):
        channels = tuple(sorted({h.window[0] for h in heads if h.window[0] <= s <= h.window[1]}))
        # reason: model inputs (-1) stay differentiable for the channels reaching stage 0
        per_input = tuple(tuple(c for c in channels if c <= max(t, 0)) for t in inputs)
        scopes.append(StageScope(channels, per_input))
    return tuple(scopes)


def backward_flops(plan: Plan) -> int:
    """Theoretical backward FLOPs per sample of the plan's training step.

    A plain stage's backward costs twice its forward (input and weight gradients);
    a scoped stage adds one input-gradient pass (one forward's worth) per channel
    that continues below it; each head costs twice its forward.
    """
    return 2 * sum(h.flops for h in plan.heads) + sum(stage_backward_flops(plan))


def stage_backward_flops(plan: Plan) -> list[int]:
    """Per stage, the theoretical backward FLOPs per sample of the stage alone (see :func:`backward_flops`)."""
    flops = []
    for stage, scope in zip(plan.stages, gradient_channels(producing_stages(plan), plan.heads)):
        passing = {c for chans in scope.input_channels for c in chans}
        flops.append(stage.flops * (2 + (len(passing) if scope.scoped else 0)) if scope.channels else 0)
    return flops


def detach_scope(value: Any) -> Any:
    """The gradient scope of a stage input that no loss training the stage reaches past."""
    return value.detach() if isinstance(value, torch.Tensor) else value


def scoped_stage(stage: nn.Module, channels: tuple[int, ...], input_channels: tuple[tuple[int, ...], ...],
                 *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run ``stage`` once and return one copy of each output per gradient channel.

    Args:
        stage: the stage module (``n_out`` outputs).
        channels: the channels covering the stage.
        input_channels: per stage input, the channels continuing into it.
        inputs: per stage input, one value per channel in ``input_channels`` (a
            single detached value where that tuple is empty).

    Returns:
        ``n_out * len(channels)`` tensors, output-major: ``[out0@c0, out0@c1, ...]``.
    """
    counts = [max(1, len(c)) for c in input_channels]
    if not (torch.is_grad_enabled() and stage.training):
        firsts, i = [], 0
        for n in counts:
            firsts.append(inputs[i])
            i += n
        outs = _as_tuple(stage(*firsts))
        return tuple(o for o in outs for _ in channels)
    params = tuple(p for p in stage.parameters() if p.requires_grad)
    layout = _Layout(stage, channels, input_channels, tuple(counts), len(params))
    return _ScopedStage.apply(layout, *inputs, *params)


@dataclass(frozen=True)
class _Layout:
    stage: nn.Module
    channels: tuple[int, ...]
    input_channels: tuple[tuple[int, ...], ...]
    counts: tuple[int, ...]
    n_params: int


class _ScopedStage(torch.autograd.Function):
    """Forward once; backward once for the parameters and once per continuing channel."""

    @staticmethod
    def forward(ctx, layout: _Layout, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat_inputs, params = args[:len(args) - layout.n_params], args[len(args) - layout.n_params:]
        leaves, i = [], 0
        for n in layout.counts:
            group = flat_inputs[i:i + n]
            i += n
            leaves.append(group[0].detach().requires_grad_(any(t.requires_grad for t in group)))
        with torch.enable_grad():
            outs = _as_tuple(layout.stage(*leaves))
        ctx.set_materialize_grads(False)
        ctx.layout, ctx.leaves, ctx.outs, ctx.params = layout, leaves, outs, params
        return tuple(o.detach() for o in outs for _ in layout.channels)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        layout, leaves, outs, params = ctx.layout, ctx.leaves, ctx.outs, ctx.params
        k = len(layout.channels)
        per_channel = {c: [grads[o * k + ci] for o in range(len(outs))] for ci, c in enumerate(layout.channels)}
        live = [c for c in layout.channels if any(g is not None for g in per_channel[c])]
        totals = [_sum([per_channel[c][o] for c in live]) for o in range(len(outs))]
        passes = [c for c in live if any(c in chans for chans in layout.input_channels)]
        param_grads = _vjp(outs, params, totals, retain=bool(passes)) if params else ()
        input_grads: dict[tuple[int, int], torch.Tensor | None] = {}
        for n, c in enumerate(passes):
            targets = [i for i, chans in enumerate(layout.input_channels) if c in chans and leaves[i].requires_grad]
            vjp = _vjp(outs, [leaves[i] for i in targets], per_channel[c], retain=n < len(passes) - 1)
            input_grads.update({(i, c): g for i, g in zip(targets, vjp)})
        del ctx.outs, ctx.leaves
        flat = []
        for i, chans in enumerate(layout.input_channels):
            flat += [input_grads.get((i, c)) for c in chans] if chans else [None]
        return (None, *flat, *param_grads)


def _vjp(outs, wrt, cotangents, retain: bool) -> tuple[torch.Tensor | None, ...]:
    pairs = [(o, g) for o, g in zip(outs, cotangents) if g is not None and o.requires_grad]
    if not wrt or not pairs:
        return tuple(None for _ in wrt)
    return torch.autograd.grad([o for o, _ in pairs], list(wrt), [g for _, g in pairs],
                               retain_graph=retain, allow_unused=True)


def _sum(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    total = present[0]
    for v in present[1:]:
        total = total + v
    return total


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)
