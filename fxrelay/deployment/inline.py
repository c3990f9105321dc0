"""Inline leaf modules of a traced graph, so that the layers inside them become nodes.

:func:`fxrelay.trace` keeps torchvision's ``ops`` modules (``Conv2dNormActivation``,
``SqueezeExcitation``, ``MLP``), timm's registered leaves and untraceable submodules as
single ``call_module`` nodes. Passes that rewrite layer pairs (BatchNorm folding) need
to see inside: :func:`inline_leaves` replaces each selected leaf call by the nodes of
its own trace, named after the call (``stem`` -> ``stem_0``, ``stem_1``, ...). A leaf
whose code cannot be traced, that is called with keyword arguments, or whose output
is not a single tensor stays a leaf.

Example:
    >>> import torchvision, fxrelay
    >>> gm = fxrelay.trace(torchvision.models.mobilenet_v3_small().eval())
    >>> inline_leaves(gm, lambda m: True)[:2]
    ['features_0', 'features_1_block_0']
    >>> [n.name for n in gm.graph.nodes][1:4]
    ['features_0_0', 'features_0_1', 'features_0_2']
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx
from torch import nn

from ..core.ir import TracingConfig
from ..passes.tracing import TraceError, trace

__all__ = ["inline_leaves", "tidy"]


def inline_leaves(gm: fx.GraphModule, select: Callable[[nn.Module], bool], *,
                  tracing: TracingConfig | None = None) -> list[str]:
    """Inline, in place, every leaf call of ``gm`` whose module ``select`` accepts.

    Leaves that appear in inlined code are considered too. Returns the names of the
    inlined call nodes, in order; ``gm`` is recompiled.

    Args:
        gm: a traced GraphModule, modified in place.
        select: which leaf modules to inline (it is not asked about torch.nn layers).
        tracing: the tracing configuration to trace the leaves with.
    """
    inlined, tried = [], set()
    pending = [n for n in gm.graph.nodes if _is_candidate(n, gm, select, tried)]
    while pending:
        node = pending.pop(0)
        tried.add(node.target)
        new_nodes = _inline_call(gm, node, tracing)
        if new_nodes is None:
            continue
        inlined.append(node.name)
        pending = [n for n in new_nodes if _is_candidate(n, gm, select, tried)] + pending
    if inlined:
        tidy(gm)
    return inlined


def tidy(gm: fx.GraphModule) -> None:
    """The end of every in-place graph rewrite: check the graph, drop unused submodules, recompile."""
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _is_candidate(node: fx.Node, gm: fx.GraphModule, select: Callable, tried: set) -> bool:
    if node.op != "call_module" or node.target in tried or node.kwargs:
        return False
    module = gm.get_submodule(node.target)
    # reason: torch.nn layers are the primitives; a Sequential/ModuleList is never a leaf
    if type(module).__module__.startswith("torch.nn") or not any(True for _ in module.children()):
        return False
    return select(module)


def _inline_call(gm: fx.GraphModule, call: fx.Node, tracing: TracingConfig | None) -> list[fx.Node] | None:
    """Replace ``call`` by the nodes of its module's trace; None when it cannot be."""
    try:
        sub = trace(gm.get_submodule(call.target), tuple(call.args), tracing=tracing)
    except TraceError:
        return None
    output = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node):
        return None  # reason: tuple outputs would need their getitem users rewritten
    env = dict(zip((n for n in sub.graph.nodes if n.op == "placeholder"), call.args))
    new_nodes = []
    with gm.graph.inserting_before(call):
        for node in sub.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            env[node] = _copy_node(gm, sub, node, call, env)
            new_nodes.append(env[node])
    call.replace_all_uses_with(env[output])
    gm.graph.erase_node(call)
    return new_nodes


def _copy_node(gm: fx.GraphModule, sub: fx.GraphModule, node: fx.Node, call: fx.Node, env: dict) -> fx.Node:
    target = node.target
    if node.op in ("call_module", "get_attr"):
        target = f"{call.target}.{node.target}"
        name = target.replace(".", "_")
    else:
        name = f"{call.name}_{node.name}"
    if node.op == "get_attr":
        _copy_attr(sub, node.target, gm, target)
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    return gm.graph.create_node(node.op, target, args, kwargs, name=name)


def _copy_attr(src: nn.Module, src_path: str, dst: nn.Module, dst_path: str) -> None:
    """Make ``dst_path`` resolve in ``dst``: tracing stores tensor constants on the traced root only."""
    parent_path, _, attr = dst_path.rpartition(".")
    parent = dst.get_submodule(parent_path)
    if not hasattr(parent, attr):
        value = src
        for part in src_path.split("."):
            value = getattr(value, part)
        setattr(parent, attr, value)
