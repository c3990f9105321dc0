"""The code of a transformed model: stage calls, gradient scopes, head calls, combined output.

:func:`staged_module` builds what :func:`fxrelay.transform` returns from a Plan with
heads and the stage and head modules; :func:`staged_graph` is its code: one call per
stage (``self.stages.layer1(...)``), a call of its :class:`~fxrelay.core.scopes.Overlap`
for a stage that several gradient channels cover (``self.overlaps.layer2(...)``, read per
channel as ``.c0``, ``.c2``), a :func:`~fxrelay.detach` where no channel continues into a
value, one call per aux head right after its stage, and :func:`~fxrelay.combine_heads`
at the end. With stage recompute, the other stages and the heads are called through their
:class:`~fxrelay.core.scopes.Recomputed` (``self.recomputed.stages.layer4(...)``). Values
carried per gradient channel are named after the value and the channel (``layer2_c0``).
:class:`StagedModule` is the GraphModule class of the result.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
from torch import nn

from ..core._compat import rebuild_graph_module
from ..core.channels import StageScope
from ..core.ir import Stage
from ..core.modules import ModuleSeq
from ..core.outputs import combine_heads
from ..core.plan import Plan
from ..core.scopes import Overlap, Recomputed, detach
from ..core.wiring import Wiring, plan_wiring, view_nodes
from .tracing import GeneratedCodeTracer

__all__ = ["StagedModule", "staged_graph", "staged_module"]

for _function in (combine_heads, detach):
    _function.__module__ = "fxrelay"  # reason: emitted code names them fxrelay_<name>; pickles import them from fxrelay


class StagedModule(fx.GraphModule):
    """A transformed model: a GraphModule whose ``stages`` and ``heads`` index like lists.

    ``fx.GraphModule`` rebuilds the containers of the submodules its code calls as plain
    modules; this subclass keeps the :class:`~fxrelay.core.modules.ModuleSeq` containers
    (and the state the forward never reads) through construction, deepcopy and pickle.
    """

    _KEPT = ("stages", "heads", "unused_state", "overlaps", "recomputed")

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


def staged_module(plan: Plan, stages: ModuleSeq, heads: ModuleSeq, class_name: str,
                  unused_state: nn.Module | None = None) -> StagedModule:
    """The transformed model: ``stages`` and ``heads`` (the parameters, as given), the
    :class:`~fxrelay.core.scopes.Overlap` of every overlap stage and, with ``plan.recompute``,
    the :class:`~fxrelay.core.scopes.Recomputed` of every other stage and head, called by
    :func:`staged_graph`'s code."""
    root = nn.Module()
    root.stages, root.heads = stages, heads
    if unused_state is not None:
        root.unused_state = unused_state
    scopes = plan.scopes()
    overlaps = {s.name: Overlap(stages[s.index], scope.channels, scope.input_channels, plan.recompute)
                for s, scope in zip(plan.stages, scopes) if scope.overlap}
    if overlaps:
        root.overlaps = ModuleSeq(overlaps)
    if plan.recompute:
        root.recomputed = nn.Module()
        root.recomputed.stages = ModuleSeq({s.name: Recomputed(stages[s.index])
                                            for s, scope in zip(plan.stages, scopes) if not scope.overlap})
        root.recomputed.heads = ModuleSeq({name: Recomputed(head) for name, head in zip(heads.names, heads)})
    return StagedModule(root, staged_graph(plan), class_name)


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
            _emit_overlap(graph, values, stage, scope, [a for group in args for a in group])
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


def _call(graph: fx.Graph, path: str, args: tuple, name: str, recompute: bool) -> fx.Node:
    """A call of the submodule at ``path``, or of its :class:`~fxrelay.core.scopes.Recomputed`."""
    return graph.create_node("call_module", f"recomputed.{path}" if recompute else path, args, name=name)


def _emit_overlap(graph: fx.Graph, values: "_ChannelValues", stage: Stage, scope: StageScope,
                  flat: list[fx.Node]) -> None:
    """``self.overlaps.<stage>(...)``, then each channel's copy by attribute (``layer2.c0``); a stage
    with several outputs gets a tuple per channel, unpacked into the values by name."""
    call = graph.create_node("call_module", f"overlaps.{stage.name}", tuple(flat), name=stage.name)
    for c in scope.channels:
        copy = graph.create_node("call_function", getattr, (call, f"c{c}"), name=f"{stage.name}_c{c}")
        if len(stage.outputs) == 1:
            values.per_channel[(stage.outputs[0], c)] = copy
            continue
        for o, name in enumerate(stage.outputs):
            values.per_channel[(name, c)] = graph.create_node("call_function", operator.getitem, (copy, o),
                                                              name=f"{name}_c{c}")


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
