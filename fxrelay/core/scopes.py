"""Gradient scopes at run time: the calls a transformed model's code makes between its stages.

The rule of where each loss's gradient stops is :mod:`fxrelay.core.channels`; this
module executes it:

* :func:`detach`: the scope of a stage input that no loss training the stage reaches past;
* :func:`overlap`: a stage covered by several gradient channels (relay's overlaps). It
  runs the stage forward once and returns one copy of every output per channel; its
  backward is :func:`stage_backward`: one parameter pass with the sum of the channels'
  cotangents and one input-only pass per channel that continues below the stage;
* :func:`checkpointed`: a stage or head whose activations are not kept: the forward
  keeps its inputs only, and the backward recomputes it (``transform(recompute=True)``).
  Dropout and drop-path draw the same masks again (the RNG state is restored), and
  buffers the recompute would update a second time (BatchNorm's running statistics)
  are restored after it.

The emitted code calls them through two small modules that name what they do:
:class:`Overlap` (``self.overlaps.layer2(x)``, whose result has one attribute per
channel: ``.c0``, ``.c2``) and :class:`Recomputed` (``self.recomputed.stages.layer4(x)``).
Each refers to its stage or head without owning it: the parameters stay under
``stages.<name>`` and ``heads.<name>`` alone (state-dict keys, ``model.stages[i]``).

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
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import collections
import contextlib
import functools

import torch
from torch import nn
import torch.utils.checkpoint
from torch.utils.checkpoint import get_device_states, set_device_states

from ._compat import tree_flatten, tree_map, tree_unflatten

__all__ = ["detach", "overlap", "checkpointed", "stage_backward", "StageGrads", "Overlap", "Recomputed"]


def detach(value: Any) -> Any:
    """``value`` with every tensor in it detached: no gradient crosses into it."""
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)


@torch.compiler.disable  # reason: dynamo cannot trace a checkpoint whose context_fn keeps buffers; run it eagerly
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
    call = _Call(stage, channels, input_channels, groups)
    params = tuple(p for p in stage.parameters() if p.requires_grad)
    copies = _Overlap.apply(call, len(params), checkpoint, *call.tensor_inputs, *params)
    return call.assemble(copies)


class Overlap(nn.Module):
    """A stage that several gradient channels cover, called like a module: :func:`overlap` on it.

    The stage is referred to, not owned (it stays ``stages.<name>``: no second state-dict
    key, and ``model.stages[i]`` is still the plain stage).

    Attributes:
        channels: the channels covering the stage, ascending.
        input_channels: per stage input, the channels whose gradient continues into it.
        recompute: keep only the inputs for backward (``transform(recompute=True)``).

    Returns (of a call): one attribute per channel, ``c<channel>``: the stage's output
    (a tuple of them for a stage with several) as that channel's gradient sees it.
    Arguments: per stage input, one value per channel in its ``input_channels`` entry,
    or one (detached) value where that entry is empty.
    """

    def __init__(self, stage: nn.Module, channels: tuple[int, ...], input_channels: tuple[tuple[int, ...], ...],
                 recompute: bool = False):
        super().__init__()
        self.__dict__["stage"] = stage  # reason: referred to, not a submodule: its keys stay stages.<name>
        self.channels, self.input_channels, self.recompute = tuple(channels), tuple(input_channels), recompute

    def forward(self, *inputs: Any) -> tuple[Any, ...]:
        copies = overlap(self.stage, self.channels, self.input_channels, *inputs, checkpoint=self.recompute)
        k = len(self.channels)
        per_channel = [copies[c::k] for c in range(k)]
        return _channel_tuple(self.channels)(*(v[0] if len(v) == 1 else tuple(v) for v in per_channel))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, input_channels={self.input_channels}, recompute={self.recompute}"


@functools.lru_cache(maxsize=None)
def _channel_tuple(channels: tuple[int, ...]) -> type:
    """The named tuple an :class:`Overlap` returns: fields ``c<channel>``."""
    return collections.namedtuple("Channels", [f"c{c}" for c in channels])


class Recomputed(nn.Module):
    """A stage or head called through :func:`checkpointed`: its activations are recomputed in backward.

    The module is referred to, not owned (its state-dict keys stay where they are).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.__dict__["module"] = module  # reason: referred to, not a submodule

    def forward(self, *inputs: Any) -> Any:
        return checkpointed(self.module, *inputs)


class StageGrads(NamedTuple):
    """What :func:`stage_backward` computed.

    Attributes:
        params: per parameter, its gradient (``None``: unused), or ``None`` when the
            gradients were accumulated into ``.grad``.
        inputs: ``(input index, channel) -> gradient`` for every channel that continues
            into a differentiable input (the gradient is ``None`` when nothing flowed).
    """

    params: tuple[torch.Tensor | None, ...] | None
    inputs: dict[tuple[int, int], torch.Tensor | None]


def stage_backward(outputs: Sequence[Any], cotangents: Mapping[int, Sequence[torch.Tensor | None]],
                   params: Sequence[torch.Tensor], leaves: Sequence[Any],
                   input_channels: Sequence[Sequence[int]], *, accumulate: bool = True,
                   retain_graph: bool = False) -> StageGrads:
    """The backward of one stage forward, per gradient channel.

    The parameter gradient is the vector-Jacobian product with the *sum* of all channels'
    cotangents (one pass); each channel that continues below the stage gets its own
    input-only pass, so the input gradient of channel ``c`` carries only the losses of
    ``c``. When one channel alone is live, its parameter and input gradients come from a
    single pass. No schedule logic: it only runs autograd on the given graph (and writes
    ``.grad`` when ``accumulate``).

    Args:
        outputs: the stage's outputs, computed with grad from ``leaves`` (non-tensor
            outputs and outputs that do not require grad are skipped).
        cotangents: ``channel -> per-output cotangent`` (``None``: no gradient for that
            output); the channels of the parameter pass.
        params: the parameters to differentiate (empty: no parameter pass).
        leaves: the stage's inputs as the forward saw them (detached tensors that require
            grad where a gradient may continue; anything else is passed over).
        input_channels: per input, the channels whose gradient continues into it; only
            channels also in ``cotangents`` get an input pass.
        accumulate: accumulate parameter gradients into ``.grad`` through autograd (so
            ``post_accumulate_grad`` hooks fire) instead of returning them.
        retain_graph: keep the graph for later passes over the same outputs.

    Returns:
        The parameter gradients (unless accumulated) and the per-channel input gradients.
    """
    outs = [o if isinstance(o, torch.Tensor) and o.requires_grad else None for o in outputs]
    live = {c: tuple(g if o is not None else None for o, g in zip(outs, cots)) for c, cots in cotangents.items()}
    live = {c: cots for c, cots in live.items() if any(g is not None for g in cots)}
    targets = {c: [i for i, chans in enumerate(input_channels) if c in chans and _differentiable(leaves[i])]
               for c in cotangents}
    grads: dict[tuple[int, int], torch.Tensor | None] = {(i, c): None for c, idx in targets.items() for i in idx}
    passes = [c for c in live if targets[c]]
    params = list(params)
    param_grads: tuple[torch.Tensor | None, ...] | None = None if accumulate else tuple(None for _ in params)
    if not live:
        return StageGrads(param_grads, grads)
    if params and len(live) == 1 and passes:  # reason: one live channel: parameters and inputs in one pass
        c = passes[0]
        param_grads, leaf_grads = _vjp(outs, live[c], params, [leaves[i] for i in targets[c]], accumulate,
                                       retain_graph)
        grads.update({(i, c): g for i, g in zip(targets[c], leaf_grads)})
        return StageGrads(param_grads, grads)
    if params:
        totals = [_sum([cots[o] for cots in live.values()]) for o in range(len(outs))]
        param_grads, _ = _vjp(outs, totals, params, [], accumulate, retain_graph or bool(passes))
    for n, c in enumerate(passes):
        _, leaf_grads = _vjp(outs, live[c], [], [leaves[i] for i in targets[c]], accumulate,
                             retain_graph or n < len(passes) - 1)
        grads.update({(i, c): g for i, g in zip(targets[c], leaf_grads)})
    return StageGrads(param_grads, grads)


def _vjp(outs: list[torch.Tensor | None], cots: Sequence[torch.Tensor | None], params: list[torch.Tensor],
         leaves: list[torch.Tensor], accumulate: bool,
         retain: bool) -> tuple[tuple[torch.Tensor | None, ...] | None, tuple[torch.Tensor | None, ...]]:
    pairs = [(o, g) for o, g in zip(outs, cots) if o is not None and g is not None]
    wrt = [*params, *leaves]
    if not pairs or not wrt:
        return (None if accumulate else tuple(None for _ in params)), tuple(None for _ in leaves)
    if not accumulate:
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], retain_graph=retain,
                                    allow_unused=True)
        return grads[:len(params)], grads[len(params):]
    for leaf in leaves:
        leaf.grad = None
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], retain_graph=retain, inputs=wrt)
    leaf_grads = tuple(leaf.grad for leaf in leaves)
    for leaf in leaves:
        leaf.grad = None
    return None, leaf_grads


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


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


def _outputs(stage: nn.Module, result: Any) -> tuple[Any, ...]:
    """The stage's output values: a stage module returns a tuple only when it has several."""
    output = next(n for n in reversed(stage.graph.nodes) if n.op == "output")
    return result if isinstance(output.args[0], tuple) else (result,)


class _RngState:
    """The random states and autocast settings at a stage's forward, to compute it again the same way
    (the same masks, the same dtypes), as ``torch.utils.checkpoint`` does."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.cpu = torch.get_rng_state()
        self.devices = get_device_states(*tensors)
        kinds = {"cpu", *(t.device.type for t in tensors)}
        self.autocast = {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in kinds}
        self.cache = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def restored(self, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
        devices, states = self.devices
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            torch.set_rng_state(self.cpu)
            set_device_states(devices, states)
            for kind, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.cache))
            yield


class _Overlap(torch.autograd.Function):
    """Forward once; backward: :func:`stage_backward` with one cotangent per channel.

    With ``recompute``, the forward keeps only the inputs and the backward runs the stage
    again first (``torch.utils.checkpoint`` cannot do it from outside: the backward's nested
    autograd passes over the inner graph are graph tasks of their own, each of which would
    recompute the stage once more).
    """

    @staticmethod
    def forward(ctx: Any, call: _Call, n_params: int, recompute: bool,
                *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        copies, params = args[:len(args) - n_params], args[len(args) - n_params:]
        leaves = []
        for group in _slots(call, copies):
            needs_grad = any(t.requires_grad for t in group) and group[0].is_floating_point()
            leaves.append(group[0].detach().requires_grad_(needs_grad))
        rng = _RngState(leaves)
        with torch.set_grad_enabled(not recompute):
            outs = call.run(leaves)
        # reason: saved tensors live exactly as long as the outer graph (freed by backward unless retained)
        ctx.save_for_backward(*copies, *leaves, *(() if recompute else outs))
        ctx.call, ctx.params, ctx.rng, ctx.recompute = call, params, rng, recompute
        ctx.set_materialize_grads(False)
        return tuple(o.detach() for o in outs for _ in call.channels)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        call, saved = ctx.call, ctx.saved_tensors
        n_copies, n_leaves = sum(call.slot_sizes), len(call.slot_sizes)
        copies, leaves, outs = saved[:n_copies], saved[n_copies:n_copies + n_leaves], saved[n_copies + n_leaves:]
        k = len(call.channels)
        cotangents = {c: list(grads[ci::k]) for ci, c in enumerate(call.channels)}
        if torch.is_grad_enabled():
            param_grads, input_grads = _differentiable_backward(call, ctx.rng, copies, cotangents, ctx.params)
        elif ctx.recompute:
            with torch.enable_grad():
                outs = call.rerun(list(leaves), ctx.rng)
            param_grads, input_grads = stage_backward(outs, cotangents, ctx.params, leaves, call.slot_channels,
                                                      accumulate=False)
        else:
            # reason: the kept graph lives as long as this node's saved tensors (retain_graph decides)
            param_grads, input_grads = stage_backward(outs, cotangents, ctx.params, leaves, call.slot_channels,
                                                      accumulate=False, retain_graph=True)
        flat = []
        for i, (chans, size) in enumerate(zip(call.slot_channels, call.slot_sizes)):
            flat += [input_grads.get((i, c)) for c in chans] if chans else [None] * size
        return (None, None, None, *flat, *param_grads)


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
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [*params, *(inputs[i] for i in targets)]
        vjp = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                  allow_unused=True) if pairs else (None,) * len(wrt)
        param_grads = [_sum([a, b]) for a, b in zip(param_grads, vjp[:len(params)])]
        input_grads.update({(i, c): g for i, g in zip(targets, vjp[len(params):])})
    return tuple(param_grads), input_grads


def _sum(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    total = present[0]
    for v in present[1:]:
        total = total + v
    return total
