"""The code of a transformed model: stage calls, gradient scopes, head calls, combined output.

:func:`staged_graph` turns a Plan with heads into the ``torch.fx.Graph`` that
:func:`fxrelay.transform` compiles: one call per stage (``self.stages.layer1(...)``),
an :func:`~fxrelay.overlap` call for a stage that several gradient channels cover, a
:func:`~fxrelay.detach` where no channel continues into a value, one call per aux head,
and :func:`~fxrelay.combine_heads` at the end. Values carried per gradient channel are
named after the value and the channel (``layer2_c0``). :class:`StagedModule` is the
GraphModule class of the result.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
from torch import nn

from ..core._compat import rebuild_graph_module
from ..core.channels import StageScope
from ..core.ir import Stage
from ..core.outputs import combine_heads
from ..core.plan import Plan
from ..core.scopes import checkpointed, detach, overlap
from ..core.wiring import Wiring, plan_wiring, view_nodes
from .tracing import GeneratedCodeTracer

__all__ = ["StagedModule", "staged_graph"]

for _function in (checkpointed, combine_heads, detach, overlap):
    _function.__module__ = "fxrelay"  # reason: emitted code names them fxrelay_<name>; pickles import them from fxrelay


class StagedModule(fx.GraphModule):
    """A transformed model: a GraphModule whose ``stages`` and ``heads`` index like lists.

    ``fx.GraphModule`` rebuilds the containers of the submodules its code calls as plain
    modules; this subclass keeps the :class:`~fxrelay.core.modules.ModuleSeq` containers
    (and the state the forward never reads) through construction, deepcopy and pickle.
    """

    _KEPT = ("stages", "heads", "unused_state")

    def __init__(self, root: nn.Module | dict, graph: fx.Graph, class_name: str = "GraphModule"):
        super().__init__(root, graph, class_name)
        for name in self._KEPT:
            child = root._modules.get(name) if isinstance(root, nn.Module) else None
            if child is not None:
                setattr(self, name, child)

    def _deepcopy_init(self) -> Callable[..., None]:
        return StagedModule.__init__

    def __reduce__(self) -> tuple:
        _, (body, import_block) = super().__reduce__()
        return _unpickle, (body, import_block)


def _unpickle(body: dict, import_block: str) -> StagedModule:
    return rebuild_graph_module(body, import_block, StagedModule)


def staged_graph(plan: Plan) -> fx.Graph:
    """The training graph: each stage, the aux heads reading it right after it, and the combined output
    (every read in the gradient channel :mod:`fxrelay.core.wiring` gives it)."""
    graph = fx.Graph(tracer_cls=GeneratedCodeTracer)
    wiring = plan_wiring(plan)
    values = _ChannelValues(graph)
    for name in plan.input_names:
        values.plain[name] = graph.placeholder(name)
    head_nodes = {}
    for stage, scope in zip(plan.stages, wiring.scopes):
        args = [values.for_channels(name, chans) for name, chans in zip(stage.inputs, scope.input_channels)]
        if scope.overlap:
            _emit_overlap(graph, values, stage, scope, [a for group in args for a in group], plan.recompute)
        else:
            call = _call(graph, f"stages.{stage.name}", tuple(group[0] for group in args), stage.name, plan.recompute)
            outs = [call] if len(stage.outputs) == 1 else [
                graph.create_node("call_function", operator.getitem, (call, i), name=out)
                for i, out in enumerate(stage.outputs)]
            for name, node in zip(stage.outputs, outs):
                values.plain[name] = node
                values.per_channel.update({(name, c): node for c in scope.channels})
        for h in plan.aux_heads:  # reason: each head right after its stage: one order of random draws everywhere
            if h.stage == stage.index:
                features = values.read(stage.outputs[-1], wiring.head_channel(h.index, 0))
                head_nodes[h.index] = _call(graph, f"heads.{stage.name}", (features,), f"aux_{stage.name}",
                                            plan.recompute)
    main = plan.heads[-1].index if plan.heads else None
    positions = iter(range(len(wiring.head_values[main]) if plan.heads else 0))
    result = fx.node.map_arg(plan.output_node.args[0], lambda n: values.read(
        n.name, wiring.head_channel(main, next(positions))) if plan.heads else values.get(n.name, None))
    if head_nodes:  # reason: standard mode (no aux heads) returns exactly what the original does
        kwargs = {"aux": tuple(head_nodes[h.index] for h in plan.aux_heads),
                  "weights": tuple(h.weight for h in plan.heads)}
        if plan.output:
            kwargs["path"] = plan.output
        if _structured(wiring, main):
            kwargs["views"] = tuple(_view(plan, wiring, values, h.index) for h in plan.aux_heads)
        result = graph.create_node("call_function", combine_heads, (result,), kwargs, name="output")
    graph.output(result)
    return graph


def _structured(wiring: Wiring, main: int) -> bool:
    """Whether the output has other values than the main logits (then every head gets its own view)."""
    return len(wiring.head_values[main]) > 1 or view_nodes(wiring.plan)[1] is None


def _view(plan: Plan, wiring: Wiring, values: "_ChannelValues", head: int) -> object:
    """Head ``head``'s view of the output (the leaf its logits replace is ``None``)."""
    at_path = view_nodes(plan)[1]
    positions = iter(range(1, len(wiring.head_values[head])))
    return fx.node.map_arg(plan.output_node.args[0], lambda n: None if n.name == at_path else values.read(
        n.name, wiring.head_channel(head, next(positions))))


def _call(graph: fx.Graph, path: str, args: tuple, name: str, checkpoint: bool) -> fx.Node:
    """A call of the submodule at ``path``, or of :func:`~fxrelay.checkpointed` on it."""
    if not checkpoint:
        return graph.create_node("call_module", path, args, name=name)
    return graph.create_node("call_function", checkpointed, (graph.get_attr(path), *args), name=name)


def _emit_overlap(graph: fx.Graph, values: "_ChannelValues", stage: Stage, scope: StageScope,
                  flat: list[fx.Node], checkpoint: bool) -> None:
    module = graph.get_attr(f"stages.{stage.name}")
    call = graph.create_node("call_function", overlap, (module, scope.channels, scope.input_channels, *flat),
                             {"checkpoint": True} if checkpoint else {}, name=stage.name)
    for o, name in enumerate(stage.outputs):
        label = stage.name if o == len(stage.outputs) - 1 else name
        for k, c in enumerate(scope.channels):
            values.per_channel[(name, c)] = graph.create_node(
                "call_function", operator.getitem, (call, o * len(scope.channels) + k), name=f"{label}_c{c}")


class _ChannelValues:
    """Which graph node carries each cut value, plain and per gradient channel."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.plain: dict[str, fx.Node] = {}
        self.per_channel: dict[tuple[str, int], fx.Node] = {}
        self.detached: dict[str, fx.Node] = {}

    def get(self, name: str, channel: int | None) -> fx.Node:
        if (name, channel) in self.per_channel:
            return self.per_channel[(name, channel)]
        if name in self.plain:
            return self.plain[name]
        # reason: an overlap stage's output read where none of its channels continues: any copy, detached below
        return next(node for (value, _), node in self.per_channel.items() if value == name)

    def read(self, name: str, channel: int | None) -> fx.Node:
        """The node a head reads ``name`` from in ``channel`` (``None``: a detached copy)."""
        if channel is not None:
            return self.get(name, channel)
        source = self.get(name, None)
        key = f"{source.name}_detached"
        if key not in self.detached:
            self.detached[key] = self.graph.create_node("call_function", detach, (source,), name=key)
        return self.detached[key]

    def for_channels(self, name: str, channels: tuple[int, ...]) -> list[fx.Node]:
        """The arguments for a stage input: one per continuing channel, else one detached copy."""
        if channels:
            return [self.get(name, c) for c in channels]
        return [self.read(name, None)]
