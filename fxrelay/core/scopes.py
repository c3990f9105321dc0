"""Gradient scopes at run time: the calls a transformed model's code makes between its stages.

The rule of where each loss's gradient stops is :mod:`fxrelay.core.channels`; this
module executes it:

* :func:`detach`: the scope of a stage input that no loss training the stage reaches past;
* :func:`overlap`: a stage covered by several gradient channels (relay's overlaps). It
  runs the stage forward once and returns one copy of every output per channel; its
  backward is :func:`stage_backward`: one parameter pass with the sum of the channels'
  cotangents and one input-only pass per channel that continues below the stage;
* :func:`checkpointed`: a stage or head whose activations are not kept: the forward
  keeps its inputs only, and the backward recomputes it (``transform(checkpoint=True)``).
  Dropout and drop-path draw the same masks again (the RNG state is restored), and
  buffers the recompute would update a second time (BatchNorm's running statistics)
  are restored after it.

Values that are not tensors (sizes, ints, ``None``, nested tuples of them) cross any
scope unchanged; tensors inside tuples, lists and dicts are scoped like bare ones.

The overlap's inner graph is kept as saved tensors of the autograd node, so it lives
exactly as long as the outer graph: ``loss.backward()`` frees it, ``retain_graph=True``
keeps it for a second backward, and ``create_graph=True`` makes the gradients
differentiable.

Example:
    >>> stage = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> x = torch.ones(1, 2, requires_grad=True)
    >>> c0, c1 = overlap(stage, (0, 1), ((0,),), x)
    >>> (c1.sum() * 0 + c0.sum()).backward()     # channel 0 continues into x, channel 1 stops
    >>> torch.equal(x.grad, stage.weight.sum(0, keepdim=True))
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import contextlib
import functools

import torch
from torch import nn
import torch.utils.checkpoint
from torch.utils.checkpoint import get_device_states, set_device_states

from ._compat import tree_flatten, tree_map, tree_unflatten

__all__ = ["detach", "overlap", "checkpointed", "stage_backward"]


def detach(value: Any) -> Any:
    """``value`` with every tensor in it detached: no gradient crosses into it."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


def checkpointed(module: nn.Module, *inputs: Any) -> Any:
    """``module(*inputs)``, keeping only the inputs for backward, which recomputes the rest."""
    if not (torch.is_grad_enabled() and module.training):
        return module(*inputs)
    return torch.utils.checkpoint.checkpoint(module, *inputs, use_reentrant=False,
                                             context_fn=functools.partial(_recompute_contexts, module))


def _recompute_contexts(module: nn.Module) -> tuple[Any, Any]:
    return contextlib.nullcontext(), _BuffersKept(module)


class _BuffersKept:
    """Gives a module copies of its buffers for each block it is entered for, and its own back after:
    a recompute must not update BatchNorm's running statistics a second time (nor touch tensors a
    graph saved)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self) -> None:
        self.kept = [(m, name, b) for m in self.module.modules() for name, b in m.named_buffers(recurse=False)]
        for m, name, b in self.kept:
            setattr(m, name, b.clone())

    def __exit__(self, *exc: Any) -> None:
        for m, name, b in self.kept:
            setattr(m, name, b)


@torch.compiler.disable  # reason: its backward re-enters autograd on the stage's own graph, kept for retain_graph
def overlap(stage: nn.Module, channels: tuple[int, ...], input_channels: tuple[tuple[int, ...], ...],
            *inputs: Any, checkpoint: bool = False) -> tuple[Any, ...]:
    """Run ``stage`` once and return one copy of each of its outputs per gradient channel.

    Args:
        stage: a stage GraphModule (``n_out`` outputs: one value, or a tuple of them).
        channels: the channels covering the stage, ascending.
        input_channels: per stage input, the channels whose gradient continues into it.
        inputs: per stage input, one value per channel in ``input_channels`` (its copy
            for that channel), or a single value where that tuple is empty (detached).
        checkpoint: keep only the inputs for backward, as :func:`checkpointed` does.

    Returns:
        ``n_out * len(channels)`` values, output-major: ``[out0@c0, out0@c1, ..., out1@c0, ...]``.
    """
    groups, i = [], 0
    for chans in input_channels:
        groups.append(inputs[i:i + max(1, len(chans))])
        i += max(1, len(chans))
    if not (torch.is_grad_enabled() and stage.training):
        outs = _outputs(stage, stage(*(group[0] for group in groups)))
        return tuple(o for o in outs for _ in channels)
    if checkpoint:
        return checkpointed(_OverlapCall(stage, channels, input_channels), *inputs)
    call = _Call(stage, channels, input_channels, groups)
    params = tuple(p for p in stage.parameters() if p.requires_grad)
    copies = _Overlap.apply(call, len(params), *call.tensor_inputs, *params)
    return call.assemble(copies)


def stage_backward(
    outputs: Sequence[torch.Tensor],
    cotangents: Mapping[int, Sequence[torch.Tensor | None]],
    params: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    input_channels: Sequence[tuple[int, ...]],
    *,
    create_graph: bool = False,
) -> tuple[tuple[torch.Tensor | None, ...], dict[tuple[int, int], torch.Tensor | None]]:
    """The backward of one stage whose outputs receive a cotangent per gradient channel.

    One pass computes the parameter gradient from the sum of all channels' cotangents;
    then one input-only pass per channel that continues into some input computes that
    channel's input gradients. The stage's graph (from ``inputs`` and ``params`` to
    ``outputs``) is retained: the caller owns its lifetime.

    Args:
        outputs: the stage's tensor outputs, with their graph.
        cotangents: per channel, one cotangent per output (``None``: none reached it).
        params: the parameters to differentiate.
        inputs: the stage's tensor inputs (leaves of its graph).
        input_channels: per input, the channels whose gradient continues into it.
        create_graph: make the gradients differentiable (double backward).

    Returns:
        The parameter gradients (aligned with ``params``) and the input gradients by
        ``(input index, channel)``.
    """
    live = [c for c, grads in cotangents.items() if any(g is not None for g in grads)]
    totals = [_sum([cotangents[c][o] for c in live]) for o in range(len(outputs))]
    param_grads = _vjp(outputs, params, totals, create_graph)
    input_grads: dict[tuple[int, int], torch.Tensor | None] = {}
    for c in live:
        targets = [i for i, chans in enumerate(input_channels) if c in chans and inputs[i].requires_grad]
        for i, g in zip(targets, _vjp(outputs, [inputs[i] for i in targets], cotangents[c], create_graph)):
            input_grads[(i, c)] = g
    return param_grads, input_grads


@dataclass
class _Call:
    """One overlap call: which tensors go in per channel, and how the outputs come back out."""

    stage: nn.Module
    channels: tuple[int, ...]
    input_channels: tuple[tuple[int, ...], ...]
    groups: list[tuple[Any, ...]]
    tensor_inputs: list[torch.Tensor] = field(default_factory=list)
    slot_channels: list[tuple[int, ...]] = field(default_factory=list)  # reason: per tensor leaf of the inputs
    slot_sizes: list[int] = field(default_factory=list)
    output_leaves: list[Any] = field(default_factory=list)
    output_specs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        for chans, group in zip(self.input_channels, self.groups):
            per_copy = [tree_flatten(value)[0] for value in group]
            for k, leaf in enumerate(per_copy[0]):
                if isinstance(leaf, torch.Tensor):
                    self.tensor_inputs += [copy[k] for copy in per_copy]
                    self.slot_channels.append(chans)
                    self.slot_sizes.append(len(per_copy))

    def run(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Call the stage with ``leaves`` in the tensor slots; return its tensor outputs (the first
        run also records how the outputs are structured)."""
        it = iter(leaves)
        args = []
        for group in self.groups:
            flat, spec = tree_flatten(group[0])
            args.append(tree_unflatten([next(it) if isinstance(v, torch.Tensor) else v for v in flat], spec))
        flats = [tree_flatten(out) for out in _outputs(self.stage, self.stage(*args))]
        if not self.output_specs:
            self.output_leaves, self.output_specs = [f for f, _ in flats], [s for _, s in flats]
        return [v for flat, _ in flats for v in flat if isinstance(v, torch.Tensor)]

    def rerun(self, leaves: list[torch.Tensor], rng: "_RngState") -> list[torch.Tensor]:
        """:meth:`run` again, drawing the same random numbers and leaving the buffers as they were."""
        with rng.restored(leaves), _BuffersKept(self.stage):
            return self.run(leaves)

    def assemble(self, copies: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        """The stage outputs per channel, output-major, from the channel copies of its tensors."""
        k, t, result = len(self.channels), 0, []
        for flat, spec in zip(self.output_leaves, self.output_specs):
            tensor_index = []
            for v in flat:
                tensor_index.append(t if isinstance(v, torch.Tensor) else None)
                t += isinstance(v, torch.Tensor)
            for c in range(k):
                result.append(tree_unflatten([v if i is None else copies[i * k + c] for v, i in zip(flat, tensor_index)],
                                             spec))
        return tuple(result)


class _OverlapCall(nn.Module):
    """An overlap of ``stage`` as a module of its own, to checkpoint it as a whole."""

    def __init__(self, stage: nn.Module, channels: tuple[int, ...], input_channels: tuple[tuple[int, ...], ...]):
        super().__init__()
        self.stage, self.channels, self.input_channels = stage, channels, input_channels
        self.training = stage.training

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        return overlap(self.stage, self.channels, self.input_channels, *inputs)


def _outputs(stage: nn.Module, result: Any) -> tuple[Any, ...]:
    """The stage's output values: a stage module returns a tuple only when it has several."""
    output = next(n for n in reversed(stage.graph.nodes) if n.op == "output")
    return result if isinstance(output.args[0], tuple) else (result,)


class _RngState:
    """The CPU and accelerator random states at a stage's forward, to draw the same numbers again."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.cpu = torch.get_rng_state()
        self.devices = get_device_states(*tensors)

    @contextlib.contextmanager
    def restored(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        devices, states = self.devices
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            set_device_states(devices, states)
            yield


class _Overlap(torch.autograd.Function):
    """Forward once; backward: :func:`stage_backward` with one cotangent per channel."""

    @staticmethod
    def forward(ctx: Any, call: _Call, n_params: int, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        copies, params = args[:len(args) - n_params], args[len(args) - n_params:]
        leaves = []
        for group in _slots(call, copies):
            needs_grad = any(t.requires_grad for t in group) and group[0].is_floating_point()
            leaves.append(group[0].detach().requires_grad_(needs_grad))
        rng = _RngState(leaves)
        with torch.enable_grad():
            outs = call.run(leaves)
        # reason: saved tensors live exactly as long as the outer graph (freed by backward unless retained)
        ctx.save_for_backward(*copies, *leaves, *outs)
        ctx.call, ctx.params, ctx.rng = call, params, rng
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outs for _ in call.channels)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        call, saved = ctx.call, ctx.saved_tensors
        n_copies, n_leaves = sum(call.slot_sizes), len(call.slot_sizes)
        copies, leaves, outs = saved[:n_copies], saved[n_copies:n_copies + n_leaves], saved[n_copies + n_leaves:]
        k = len(call.channels)
        cotangents = {c: [grads[o * k + ci] for o in range(len(outs))] for ci, c in enumerate(call.channels)}
        if torch.is_grad_enabled():
            param_grads, input_grads = _differentiable_backward(call, ctx.rng, copies, cotangents, ctx.params)
        else:
            param_grads, input_grads = stage_backward(outs, cotangents, ctx.params, leaves, call.slot_channels)
        flat = []
        for i, (chans, size) in enumerate(zip(call.slot_channels, call.slot_sizes)):
            flat += [input_grads.get((i, c)) for c in chans] if chans else [None] * size
        return (None, None, *flat, *param_grads)


def _slots(call: _Call, copies: Sequence[torch.Tensor]) -> list[Sequence[torch.Tensor]]:
    """The overlap's tensor inputs grouped per input slot (one copy per continuing channel)."""
    groups, i = [], 0
    for size in call.slot_sizes:
        groups.append(copies[i:i + size])
        i += size
    return groups


def _differentiable_backward(call: _Call, rng: _RngState, copies: Sequence[torch.Tensor],
                             cotangents: Mapping[int, Sequence[torch.Tensor | None]],
                             params: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
    """The backward with ``create_graph``: per channel, the stage is recomputed on that channel's own
    input copies, so a second-order gradient reaches below the stage exactly where the channel does.

    (The kept graph is not reused: a second-order backward re-enters this node's backward, which
    must still find it.)
    """
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    input_grads: dict[tuple[int, int], torch.Tensor | None] = {}
    for c, grads in cotangents.items():
        if all(g is None for g in grads):
            continue
        inputs = [group[call.slot_channels[i].index(c)] if c in call.slot_channels[i] else group[0].detach()
                  for i, group in enumerate(_slots(call, copies))]
        outs = call.rerun(inputs, rng)
        targets = [i for i, chans in enumerate(call.slot_channels) if c in chans and inputs[i].requires_grad]
        vjp = _vjp(outs, [*params, *(inputs[i] for i in targets)], grads, create_graph=True)
        param_grads = [_sum([a, b]) for a, b in zip(param_grads, vjp[:len(params)])]
        input_grads.update({(i, c): g for i, g in zip(targets, vjp[len(params):])})
    return tuple(param_grads), input_grads


def _vjp(outs: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None],
         create_graph: bool) -> tuple[torch.Tensor | None, ...]:
    pairs = [(o, g) for o, g in zip(outs, cotangents) if g is not None and o.requires_grad]
    if not wrt or not pairs:
        return tuple(None for _ in wrt)
    return torch.autograd.grad([o for o, _ in pairs], list(wrt), [g for _, g in pairs], retain_graph=True,
                               create_graph=create_graph, allow_unused=True)


def _sum(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    total = present[0]
    for v in present[1:]:
        total = total + v
    return total
