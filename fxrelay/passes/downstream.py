"""Downstream heads: an aux head built from fresh copies of the model's own later layers.

For a head at stage ``s`` (AugLocal, Ma et al., ICLR 2024): ``depth`` layers sampled
uniformly, in order, from the layers of the stages after ``s`` (the middle one of each of
``depth`` equal slices), average-pooled first where the layers skipped would have
downsampled; each is a fresh,
independently initialised copy (``copy.deepcopy`` then ``reset_parameters`` on every
submodule that has one) with its channel widths scaled by ``width``; then global
average pooling and a linear classifier. A *layer* is a unit of the traced graph
between two cuts a single tensor crosses: a residual block (``layer2.0``,
``stages.1.blocks.0``, ``blocks.3``), an inverted-residual block, or a plain CNN's
conv(+BN+activation) group. A layer whose nodes are exactly one module's is copied as
that module (the head holds a ``BasicBlock``); otherwise its subgraph is copied. Where
the copy cannot run on the head's feature (more than one input, a width that a fixed
reshape pins), it is tried at width 1, and else replaced by a conv3x3-BN-ReLU (tokens:
linear-LN-GELU) of the layer's output shape, which the head's description says.
A 1x1 conv (tokens: a linear) adapts the channels where a layer expects others.

Example:
    >>> import fxrelay, torchvision
    >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "greedy", head_kind="downstream")
    >>> fxrelay.plan_of(model).heads[2].layers
    'downstream: layer3.1(BasicBlock)x0.5, layer4.1..avgpool(BasicBlock+AdaptiveAvgPool2d)x0.5 - pool - linear'
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Union

import torch
import torch.fx as fx
from torch import nn

from ..core.modules import training_mode
from ..core.plan import Plan
from .cuts import constant_nodes
from .heads import ChannelsLast, HeadFactory, TokenMean, make_head
from .tracing import module_path
from .widths import scale_width, scaled

__all__ = ["Downstream", "DownstreamHead", "build_head", "default_depth"]

_MAX_DEPTH = 3
_INPLACE = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub}


class Downstream:
    """``head_kind=Downstream(depth=2, width=0.5)``: heads made of the model's own later layers.

    Args:
        depth: layers per head; ``None``: AugLocal's pyramid, ``ceil(3 * (S-1-s) / (S-1))``
            for the head at stage ``s`` of ``S`` (3 at the bottom, 1 near the top).
        width: channel-width multiplier of the copied layers (bounds the head's cost).
    """

    __name__ = "downstream"

    def __init__(self, depth: int | None = None, width: float = 0.5):
        if depth is not None and (not isinstance(depth, int) or depth < 1):
            raise ValueError(f"Downstream(depth=) must be an integer >= 1 or None, got {depth!r}")
        if not 0 < width <= 4:
            raise ValueError(f"Downstream(width=) must be in (0, 4], got {width!r}")
        self.depth, self.width = depth, float(width)

    def __repr__(self) -> str:
        return f"Downstream(depth={self.depth}, width={self.width:g})"

    def __call__(self, feature_shape: tuple, num_classes: int) -> nn.Module:
        raise TypeError("a downstream head is built from the model's later layers: pass it to "
                        "fxrelay.transform(model, head_kind=...), not as a bare factory")

    def build(self, model: nn.Module, plan: Plan, stage: int, num_classes: int) -> DownstreamHead:
        """The head for the aux head at ``stage`` of ``plan`` (``model`` is the traced model)."""
        units = later_units(plan, stage)
        depth = min(len(units), self.depth or default_depth(stage, len(plan.stages)))
        picked = [units[int((i + 0.5) * len(units) / depth)] for i in range(depth)]  # reason: one per equal slice
        shape = tuple(plan.stages[stage].shape)
        p = next(model.parameters(), None)
        placement = {"device": p.device, "dtype": p.dtype} if p is not None else {}
        layers, notes, reduction = [], [], plan.stages[stage].reduction
        for unit in picked:
            pool = _pool(shape, reduction, unit)
            if pool is not None:
                layers.append(pool)
                shape = _output_shape(pool, shape, placement)
            layer, shape, note = _copy_unit(model, plan, unit, shape, self.width, placement)
            reduction = _reduction(unit.nodes[-1]) or reduction
            layers.append(layer)
            notes.append(note)
        if not units:
            warnings.warn(f"downstream head at stage {stage} ({plan.stages[stage].name}): no later layer reads one "
                          "map or token tensor, so it is pool-linear; pass head_stages= or another head_kind",
                          UserWarning, stacklevel=4)
        tail, shape_note = _classifier(shape, num_classes)
        head = DownstreamHead(nn.Sequential(*layers), tail, ", ".join(notes or ["no layer"]) + f" - {shape_note}"
                              " - linear")
        return head.to(**placement)


def default_depth(stage: int, num_stages: int) -> int:
    """AugLocal's pyramidal depth: deeper heads low in the network, one layer near the top."""
    return max(1, math.ceil(_MAX_DEPTH * (num_stages - 1 - stage) / max(num_stages - 1, 1)))


def build_head(kind: Union[str, HeadFactory], model: nn.Module, plan: Plan, stage: int,
               num_classes: int) -> nn.Module:
    """The aux head of kind ``kind`` for ``stage``: downstream heads read the model, the others its shape."""
    if isinstance(kind, str) and kind == "downstream":
        kind = Downstream()
    if isinstance(kind, Downstream):
        return kind.build(model, plan, stage, num_classes)
    return make_head(kind, plan.stages[stage].shape, num_classes)


class DownstreamHead(nn.Module):
    """Copied later layers, then pooling and a linear classifier; ``description`` says which."""

    def __init__(self, layers: nn.Sequential, classifier: nn.Sequential, description: str):
        super().__init__()
        self.layers, self.classifier, self.description = layers, classifier, f"downstream: {description}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x))


@dataclass(frozen=True)
class Unit:
    """A layer of the traced graph: its nodes, the value it reads, and the module path holding it."""

    nodes: tuple[fx.Node, ...]
    source: fx.Node
    path: tuple[str, ...]
    flops: int
    parts: tuple[tuple[str, ...], ...]  # reason: the module path of each merged segment, for the description


def later_units(plan: Plan, stage: int) -> list[Unit]:
    """The layers of the stages after ``stage`` whose outputs are maps or tokens, in order."""
    gm = plan.graph_module
    constants = constant_nodes(gm.graph)
    by_name = {n.name: n for n in gm.graph.nodes}
    units: list[Unit] = []
    for s in plan.stages[stage + 1:]:
        order = [by_name[name] for name in s.nodes if name not in constants]
        units += [u for u in _stage_units(order, constants) if _rank(u.nodes[-1]) >= 2]
    return units


def _stage_units(order: list[fx.Node], constants: set[str]) -> list[Unit]:
    """Segments between single-tensor cuts, merged into layers (same block, or a segment without FLOPs).

    Non-tensor values (sizes) do not separate layers: a layer that reads one from outside is not copied.
    """
    position = {n.name: i for i, n in enumerate(order)}
    last_use = {n.name: max((position.get(u.name, len(order)) for u in n.users), default=i)
                for i, n in enumerate(order)}
    outside = {}  # reason: values from earlier stages: live from the stage start to their last use here
    for i, n in enumerate(order):
        for src in n.all_input_nodes:
            if src.name not in position and src.name not in constants and _rank(src):
                outside[src.name] = max(outside.get(src.name, 0), i)
    live = [0] * (len(order) + 2)
    for i, n in enumerate(filter(_rank, order)):  # reason: a tensor computed at i is live at gaps i+1 .. last use
        i = position[n.name]
        live[i + 1] += 1
        live[last_use[n.name] + 1] -= 1
    for last in outside.values():
        live[0] += 1
        live[last + 1] -= 1
    counts = list(itertools.accumulate(live))
    starts = [0] + [b for b in range(1, len(order)) if counts[b] == 1]
    units: list[Unit] = []
    for b, e in zip(starts, starts[1:] + [len(order)]):
        nodes = tuple(order[b:e])
        path = _block_path(nodes)
        flops = sum(_flops(n) for n in nodes)
        same_rank = units and _rank(nodes[-1]) == _rank(units[-1].nodes[-1])
        if same_rank and (path == units[-1].path or not flops or not units[-1].flops):
            last = units[-1]
            units[-1] = Unit(last.nodes + nodes, last.source, _common(last.path, path), last.flops + flops,
                             last.parts + (path or _common_all([module_path(n) for n in nodes]),))
        else:
            sources = [src for src in nodes[0].all_input_nodes if src.name not in constants]
            units.append(Unit(nodes, sources[0] if len(sources) == 1 else nodes[0], path, flops,
                              (path or _common_all([module_path(n) for n in nodes]),)))
    return units


def _block_path(nodes: tuple[fx.Node, ...]) -> tuple[str, ...]:
    """The deepest enclosing module whose name ends in a digit (``layer2.0``, ``blocks.3``, ``denselayer4``)."""
    path = _common_all([module_path(n) for n in nodes])
    while path and not path[-1][-1:].isdigit():
        path = path[:-1]
    return path


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return a[:k]


def _common_all(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    common = paths[0] if paths else ()
    for p in paths[1:]:
        common = _common(common, p)
    return common


def _flops(n: fx.Node) -> int:
    info = n.meta.get("fxrelay")
    return info.flops if info is not None else 0


def _shape(n: fx.Node) -> tuple[int, ...]:
    info = n.meta.get("fxrelay")
    return tuple(info.shape[1:]) if info is not None and info.shape else ()


def _rank(n: fx.Node) -> int:
    return len(_shape(n))


def _channel_dim(shape: tuple[int, ...]) -> int:
    """Per-sample channel dimension: 0 for (C, H, W) maps, the last for tokens and (H, W, C) maps."""
    if len(shape) == 3 and not (shape[0] == shape[1] != shape[2]):
        return 0
    return len(shape) - 1


class _NotCopyable(Exception):
    """A layer that cannot be copied onto the head's feature (the message says why)."""


def _copy_unit(model: nn.Module, plan: Plan, unit: Unit, shape: tuple[int, ...], width: float, placement: dict
               ) -> tuple[nn.Module, tuple[int, ...], str]:
    """A fresh copy of ``unit`` reading features of ``shape``: ``(module, its output shape, description)``."""
    label, kind = _label(model, plan, unit)
    reason = "unknown"
    for w in dict.fromkeys((width, 1.0)):
        try:
            body = _adapted(scale_width(_fresh(model, plan, unit), w), shape, _scaled_channels(unit.source, w))
            layer, out = _checked(body, shape, unit, w, placement)
            return layer, out, f"{label}({kind})x{w:g}"
        except (_NotCopyable, RuntimeError, ValueError, TypeError, IndexError) as e:
            reason = str(e).splitlines()[0][:60] if str(e) else type(e).__name__
    layer = _fallback(shape, unit, width).to(**placement)
    return layer, _output_shape(layer, shape, placement), f"{label}(conv in place of {kind}: {reason})"


def _label(model: nn.Module, plan: Plan, unit: Unit) -> tuple[str, str]:
    if _is_whole_module(plan, unit):
        return ".".join(unit.path), type(model.get_submodule(".".join(unit.path))).__name__
    parts = [p for p in dict.fromkeys(unit.parts) if p] or \
        [tuple(n.target.split(".")) for n in unit.nodes if n.op == "call_module"]
    types = [type(model.get_submodule(".".join(p))).__name__ for p in parts]
    first, last = (".".join(parts[0]), ".".join(parts[-1])) if parts else ("ops", "ops")
    return (first if first == last else f"{first}..{last}"), "+".join(dict.fromkeys(types)) or "ops"


def _is_whole_module(plan: Plan, unit: Unit) -> bool:
    """Whether ``unit``'s nodes are exactly the nodes the module at ``unit.path`` computes."""
    if not unit.path:
        return False
    constants = constant_nodes(plan.graph_module.graph)
    under = {n.name for n in plan.graph_module.graph.nodes
             if n.name not in constants and module_path(n)[:len(unit.path)] == unit.path}
    return under == {n.name for n in unit.nodes}


def _fresh(model: nn.Module, plan: Plan, unit: Unit) -> nn.Module:
    """An independent copy of ``unit`` (its module, else its subgraph), re-initialised, nothing in place."""
    if unit.source in unit.nodes:
        raise _NotCopyable("it reads more than one value")
    body = copy.deepcopy(model.get_submodule(".".join(unit.path))) if _is_whole_module(plan, unit) \
        else _graph_copy(plan.graph_module, unit)
    for m in body.modules():
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False  # reason: the head's input is the stage's output, which the stages still read
    return body


def _graph_copy(gm: fx.GraphModule, unit: Unit) -> fx.GraphModule:
    """``unit``'s nodes as a GraphModule of one input, with copies of the modules and constants they use."""
    graph, owner = fx.Graph(), nn.Module()
    env = {unit.source.name: graph.placeholder("x")}

    def value(n: fx.Node) -> fx.Node:
        if n.name not in env:
            if n.op in ("placeholder", "output") or n not in constants:
                raise _NotCopyable(f"it reads {n.name} from outside the layer")
            copy_node(n)
        return env[n.name]

    def copy_node(n: fx.Node) -> None:
        if n.op in ("call_module", "get_attr"):
            _set_attr(owner, n.target, copy.deepcopy(gm.get_submodule(n.target) if n.op == "call_module"
                                                     else _get_attr(gm, n.target)))
        new = graph.node_copy(n, value)
        if "inplace" in new.kwargs:
            new.kwargs = {**new.kwargs, "inplace": False}
        if new.op == "call_function":
            new.target = _out_of_place(new.target)
        if new.op == "call_method" and new.target.endswith("_") and not new.target.endswith("__"):
            new.target = new.target[:-1]
        env[n.name] = new

    constants = {n for n in gm.graph.nodes if n.name in constant_nodes(gm.graph)}
    for n in unit.nodes:
        copy_node(n)
    graph.output(env[unit.nodes[-1].name])
    return fx.GraphModule(owner, graph)


def _out_of_place(function: object) -> object:
    """The out-of-place twin of an in-place function (``operator.iadd``, ``torch.relu_``), else ``function``.

    >>> _out_of_place(torch.relu_) is torch.relu, _out_of_place(operator.iadd) is operator.add
    (True, True)
    """
    if function in _INPLACE:
        return _INPLACE[function]
    name = getattr(function, "__name__", "")
    # reason: the copy's input is the stage output the next stage still reads; it must stay untouched
    if name.endswith("_") and not name.endswith("__") and callable(getattr(torch, name[:-1], None)):
        return getattr(torch, name[:-1])
    return function


def _get_attr(root: nn.Module, target: str) -> torch.Tensor:
    *path, name = target.split(".")
    return getattr(root.get_submodule(".".join(path)), name)


def _set_attr(root: nn.Module, target: str, value: object) -> None:
    *path, name = target.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    if isinstance(value, nn.Parameter) or isinstance(value, nn.Module):
        setattr(root, name, value)
    else:
        root.register_buffer(name, value)


def _scaled_channels(node: fx.Node, width: float) -> int:
    shape = _shape(node)
    return scaled(shape[_channel_dim(shape)], width)


def _adapted(body: nn.Module, shape: tuple[int, ...], expected: int) -> nn.Module:
    """``body`` behind a 1x1 conv (tokens, NHWC: a linear) where it expects other than ``shape``'s channels."""
    dim = _channel_dim(shape)
    if shape[dim] == expected:
        return body
    if len(shape) == 3 and dim == 0:
        return nn.Sequential(nn.Conv2d(shape[0], expected, 1, bias=False), body)
    return nn.Sequential(nn.Linear(shape[dim], expected), body)


def _output_shape(layer: nn.Module, shape: tuple[int, ...], placement: dict) -> tuple[int, ...]:
    # reason: fx prints a failing generated forward's code to stderr; a failure here only means "try the next"
    with training_mode(layer, False), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        y = layer(torch.zeros(1, *shape, **placement))
    if not isinstance(y, torch.Tensor):
        raise _NotCopyable(f"it returns a {type(y).__name__}")
    return tuple(y.shape[1:])


def _checked(layer: nn.Module, shape: tuple[int, ...], unit: Unit, width: float, placement: dict
             ) -> tuple[nn.Module, tuple[int, ...]]:
    """``layer`` on ``placement`` and its output shape, if that has the layer's rank and scaled channels."""
    layer = layer.to(**placement)
    out, want = _output_shape(layer, shape, placement), _shape(unit.nodes[-1])
    if len(out) != len(want) or out[_channel_dim(out)] != _scaled_channels(unit.nodes[-1], width):
        raise _NotCopyable(f"its output {out} does not match {want} at width {width:g}")
    return layer, out


def _fallback(shape: tuple[int, ...], unit: Unit, width: float) -> nn.Module:
    """A conv3x3-BN-ReLU with the layer's stride (tokens, NHWC: linear-LN-GELU) to its scaled channels."""
    channels, dim = _scaled_channels(unit.nodes[-1], width), _channel_dim(shape)
    if len(shape) == 3 and dim == 0:
        into, out = _reduction(unit.source), _reduction(unit.nodes[-1])
        stride = max(1, out // into) if into and out else 1
        return nn.Sequential(nn.Conv2d(shape[0], channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels),
                             nn.ReLU())
    return nn.Sequential(nn.Linear(shape[dim], channels), nn.LayerNorm(channels), nn.GELU())


def _reduction(node: fx.Node) -> int | None:
    info = node.meta.get("fxrelay")
    return info.reduction if info is not None else None


def _pool(shape: tuple[int, ...], reduction: int | None, unit: Unit) -> nn.Module | None:
    """Average pooling to the resolution ``unit`` works at, where the layers skipped would have reduced it."""
    into = _reduction(unit.source)
    if len(shape) != 3 or _channel_dim(shape) != 0 or not reduction or not into or into <= reduction:
        return None
    return nn.AvgPool2d(into // reduction, ceil_mode=True)


def _classifier(shape: tuple[int, ...], num_classes: int) -> tuple[nn.Sequential, str]:
    """Global average pooling (tokens: mean over tokens and LayerNorm) and a linear classifier."""
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], num_classes)), "vector"
    channels = shape[_channel_dim(shape)]
    if len(shape) == 2:
        return nn.Sequential(TokenMean(), nn.LayerNorm(channels), nn.Linear(channels, num_classes)), "token mean-LN"
    first = [ChannelsLast()] if _channel_dim(shape) == 2 else []
    return nn.Sequential(*first, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)), "pool"
