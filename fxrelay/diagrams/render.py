"""Pass 6: draw a Plan with graphviz: stages, heads, loss windows and gradient scopes.

:func:`render_graph` is the pure heart: it turns a :class:`~fxrelay.Plan` into a
``graphviz.Digraph``. :func:`render` accepts a Plan or a model (plain, transformed or
deployed) and writes ``.svg``, ``.png``, ``.pdf`` or ``.dot`` by the path's suffix.

Two levels of detail:

* ``level="stage"``: one box per stage (index, reduction, output shape, params, FLOPs
  share), the model inputs and output, one box per head beside the stage it reads, and
  for each loss ``L<j>`` a coloured bar left of the stages it trains (its window). A red
  ``scope`` marker sits on every edge where a loss's gradient stops. A cut that several
  tensors cross is drawn as several edges, one per tensor, each from its producer.
* ``level="node"``: the fx nodes inside one cluster per stage; modules deeper than
  ``depth`` are collapsed into one box labelled with the module path and op count.

Both levels draw every stage as a ``cluster_stage_<i>`` subgraph and end with a legend
headed by the model's name (``title=``, e.g. the name it was created by). An aux head's box
says what was built (``conv1x1-BN-ReLU-pool2x2-linear``) and its cost. PNGs are rendered
at :data:`PNG_DPI`, crisp at twice the size.

Example:
    >>> import torchvision, fxrelay
    >>> from fxrelay.diagrams.render import render_graph
    >>> plan = fxrelay.partition(torchvision.models.resnet18())
    >>> graph = render_graph(plan, level="stage")
    >>> sum(line.strip().startswith("subgraph cluster_stage_") for line in graph.source.splitlines())
    5
"""

from __future__ import annotations

import html
from pathlib import Path

import graphviz
import torch.fx as fx
from torch import nn

from ..core.channels import stopping_losses
from ..core.choices import FORMATS, LEVELS
from ..core.ir import Head, Stage, TracingConfig
from ..core.plan import Plan, si, times
from ..passes.partition import partition
from ..passes.rewrite import is_transformed, plan_of
from ..passes.tracing import ExampleInput, check_module, module_path

__all__ = ["render", "render_graph", "as_plan", "GraphvizNotFound", "LEVELS", "DEFAULT_DEPTH", "PNG_DPI"]

DEFAULT_DEPTH = 2
PNG_DPI = 192  # reason: graphviz's 96 dpi default blurs text on 2x (HiDPI) screens
_LOSS_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                 "#7f7f7f")
_SCOPE_COLOUR = "#d62728"
_FONT = "Helvetica"
_GRAPH_ATTR = {"rankdir": "TB", "fontname": _FONT, "nodesep": "0.18", "ranksep": "0.3", "newrank": "true"}
_NODE_ATTR = {"fontname": _FONT, "fontsize": "10", "shape": "box", "style": "rounded", "margin": "0.1,0.04"}
_EDGE_ATTR = {"fontname": _FONT, "fontsize": "8", "fontcolor": "#666666", "arrowsize": "0.6"}


class GraphvizNotFound(RuntimeError):
    """The graphviz ``dot`` program is missing: only ``.dot`` files can be written."""


def render(
    model_or_plan: Plan | nn.Module,
    path: str | Path,
    level: str = "stage",
    depth: int | None = DEFAULT_DEPTH,
    *,
    example_input: ExampleInput | None = None,
    tracing: TracingConfig | None = None,
    title: str | None = None,
) -> Path:
    """Draw a Plan, or the plan of a model, to an ``.svg``, ``.png``, ``.pdf`` or ``.dot`` file.

    Args:
        model_or_plan: a :class:`~fxrelay.Plan`; a model from :func:`fxrelay.transform`
            (its plan, heads included); or any other ``nn.Module``, deployed ones too,
            which is partitioned (no heads).
        path: the file to write; its suffix picks the format.
        level: ``"stage"`` (one box per stage) or ``"node"`` (the fx nodes of each stage).
        depth: for ``level="node"``, modules nested deeper than this are drawn as one
            box; ``None`` draws every fx node.
        example_input, tracing: passed to :func:`fxrelay.partition` for plain models.
        title: the model's name in the legend (default: its class name).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown suffix or level, or ``depth`` below 1.
        GraphvizNotFound: a rendered format was asked for and ``dot`` is not installed.

    Example:
        >>> import torchvision
        >>> from fxrelay.diagrams.render import render
        >>> render(torchvision.models.resnet18(), "/tmp/resnet18.dot").suffix
        '.dot'
    """
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"cannot tell the format of {str(path)!r}: use one of {', '.join(FORMATS)}")
    graph = render_graph(as_plan(model_or_plan, example_input, tracing=tracing), level, depth, title=title)
    fmt = FORMATS[path.suffix.lower()]
    if fmt == "png":
        graph.graph_attr["dpi"] = str(PNG_DPI)
    if fmt is None:
        path.write_text(graph.source, encoding="utf-8")
        return path
    try:
        path.write_bytes(graph.pipe(format=fmt))
    except graphviz.ExecutableNotFound as e:
        raise GraphvizNotFound(
            f"cannot write {path}: the graphviz 'dot' program is not on PATH. Install it with "
            "`apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) or "
            f"`conda install -c conda-forge graphviz`, or write a '.dot' file instead ({path.with_suffix('.dot')})."
        ) from e
    return path


def as_plan(model_or_plan: Plan | nn.Module, example_input: ExampleInput | None = None, *,
            tracing: TracingConfig | None = None) -> Plan:
    """The Plan to draw: the Plan itself, a transformed model's plan, or a fresh partition.

    Example:
        >>> import torchvision
        >>> len(as_plan(torchvision.models.resnet18()).stages)
        5
    """
    if isinstance(model_or_plan, Plan):
        return model_or_plan
    check_module(model_or_plan, "render")
    if is_transformed(model_or_plan):
        return plan_of(model_or_plan)
    return partition(model_or_plan, example_input=example_input, tracing=tracing)


def render_graph(plan: Plan, level: str = "stage", depth: int | None = DEFAULT_DEPTH, *,
                 title: str | None = None) -> graphviz.Digraph:
    """The graphviz drawing of ``plan`` (pure: nothing is written or run).

    Args:
        plan: the Plan to draw, with or without heads.
        level: ``"stage"`` or ``"node"``.
        depth: for ``level="node"``, the module depth below which modules collapse.
        title: the model's name (default: ``plan.model_name``, its class name).

    Returns:
        A ``graphviz.Digraph``: clusters ``cluster_stage_<i>``, nodes ``stage_<i>``
        (stage level), ``head_<j>``, ``input_<name>``, ``output``, ``legend``, and
        ``scope_*`` markers.

    Raises:
        ValueError: unknown level, or ``depth`` below 1.

    Example:
        >>> import torchvision, fxrelay
        >>> plan = fxrelay.partition(torchvision.models.vgg11())
        >>> "cluster_stage_5" in render_graph(plan, "node", depth=1).source
        True
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if depth is not None and depth < 1:
        raise ValueError(f"depth must be None or at least 1 (level='stage' draws one box per stage), got {depth}")
    stage_of = plan.stage_of()
    nodes = {n.name: n for n in plan.graph_module.graph.nodes}
    box_of = _stage_boxes(stage_of) if level == "stage" else _node_boxes(plan, stage_of, depth)
    title = title or plan.model_name
    graph = graphviz.Digraph(title, graph_attr=_GRAPH_ATTR, node_attr=_NODE_ATTR, edge_attr=_EDGE_ATTR)
    for name in plan.input_names:
        graph.node(f"input_{name}", f"input {name}\n{_shape_text(nodes[name])}", shape="oval", style="solid")
    for stage in plan.stages:
        with graph.subgraph(name=f"cluster_stage_{stage.index}") as cluster:
            if level == "stage":
                _draw_stage_row(cluster, plan, stage, box_of)
            else:
                _draw_stage_nodes(cluster, plan, stage, box_of, nodes)
    if level == "stage":
        _draw_windows(graph, plan)
    graph.node("output", "output", shape="oval", style="solid")
    for tail, head, tensor, stops in _edges(plan, nodes, stage_of, box_of, labelled=level == "stage"):
        _draw_edge(graph, tail, head, tensor, stops)
    graph.node("legend", _legend(plan, title), shape="plain", style="solid")
    graph.edge("output", "legend", style="invis")
    return graph


def _stage_boxes(stage_of: dict[str, int]) -> dict[str, str]:
    """Stage level: every fx node is drawn as its stage's box."""
    return {name: f"stage_{k}" if k >= 0 else f"input_{name}" for name, k in stage_of.items()}


def _node_boxes(plan: Plan, stage_of: dict[str, int], depth: int | None) -> dict[str, str]:
    """Node level: an fx node's box is its module at ``depth`` within its stage, else itself.

    Nodes whose value never reaches the output (shape assertions) are not drawn.
    """
    box_of, live = {}, _reaching_output(plan)
    for node in plan.graph_module.graph.nodes:
        k = stage_of.get(node.name)
        if k is None or node.name not in live:
            continue
        path = module_path(node)
        collapsed = depth is not None and k >= 0 and len(path) >= depth
        box_of[node.name] = f"group_{k}_{'.'.join(path[:depth])}" if collapsed else _own_box(node.name, k)
    return _ungroup_singletons(box_of, stage_of)


def _reaching_output(plan: Plan) -> set[str]:
    live = {plan.output_node.name}
    for node in reversed(plan.graph_module.graph.nodes):
        if any(user.name in live for user in node.users):
            live.add(node.name)
    return live


def _own_box(name: str, stage: int) -> str:
    return f"input_{name}" if stage < 0 else f"node_{name}"


def _ungroup_singletons(box_of: dict[str, str], stage_of: dict[str, int]) -> dict[str, str]:
    """A module box holding a single fx node is drawn as that node."""
    members: dict[str, list[str]] = {}
    for name, box in box_of.items():
        members.setdefault(box, []).append(name)
    return {name: _own_box(name, stage_of[name]) if len(members[box]) == 1 else box for name, box in box_of.items()}


def _module_type(node: fx.Node, qualname: str) -> str:
    for name, module_type in (node.meta.get("nn_module_stack") or {}).values():
        if name == qualname:
            return getattr(module_type, "__name__", str(module_type))
    return ""


def _shape_text(node: fx.Node) -> str:
    info = node.meta.get("fxrelay")
    shape = info.shape if info is not None and info.shape else ()
    return "×".join(map(str, shape[1:] if len(shape) > 1 else shape))


def _loss_colour(head: Head) -> str:
    return _LOSS_COLOURS[head.index % len(_LOSS_COLOURS)]


def _trains(head: Head, stage: int) -> bool:
    return head.span[0] <= stage <= head.span[1]


def _draw_stage_row(cluster: graphviz.Digraph, plan: Plan, stage: Stage, box_of: dict[str, str]) -> None:
    """Stage level: one row holding a window chip per loss, the stage box and its heads."""
    cluster.attr(label="", style="rounded", color="#d0d0d0")
    with cluster.subgraph() as row:
        row.attr(rank="same")
        training = [h for h in plan.heads if _trains(h, stage.index)]
        chips = [f"window_{h.index}_{stage.index}" for h in training]
        for chip, head in zip(chips, training):
            row.node(chip, f"L{head.index}", shape="box", style="filled", fillcolor=_loss_colour(head),
                     color=_loss_colour(head), fontcolor="white", width="0.3", height="0.3", fixedsize="true")
        for left, right in zip(chips, chips[1:] + [f"stage_{stage.index}"]):  # reason: L0 leftmost, then L1...
            row.edge(left, right, style="invis")
        row.node(f"stage_{stage.index}", f"<{_stage_text(plan, stage)}>", style="rounded,filled", fillcolor="#f4f4f4")
        _draw_heads(row, plan, stage, box_of)


def _stage_text(plan: Plan, stage: Stage) -> str:
    """Index, reduction, output shape, params and FLOPs share of a stage, as HTML."""
    share = 100 * stage.flops / (sum(s.flops for s in plan.stages) or 1)
    return (f"<B>stage {stage.index}</B>  /{stage.reduction}<BR/>{_shape_of(stage)}<BR/>"
            f"<FONT POINT-SIZE=\"9\">{si(stage.params)} params · {share:.1f}% FLOPs</FONT>")


def _shape_of(stage: Stage) -> str:
    return "×".join(map(str, stage.shape)) or "-"


def _draw_windows(graph: graphviz.Digraph, plan: Plan) -> None:
    """Stage level: join a loss's chips from stage to stage into one coloured bar."""
    for head in plan.heads:
        for k in range(*head.span):
            graph.edge(f"window_{head.index}_{k}", f"window_{head.index}_{k + 1}", weight="20", arrowhead="none",
                       penwidth="5", color=_loss_colour(head))


def _draw_stage_nodes(cluster: graphviz.Digraph, plan: Plan, stage: Stage, box_of: dict[str, str],
                      nodes: dict[str, fx.Node]) -> None:
    """Node level: the stage's fx nodes, collapsed into module boxes where ``box_of`` says."""
    members: dict[str, list[str]] = {}
    for name in filter(box_of.__contains__, stage.nodes):
        members.setdefault(box_of[name], []).append(name)
    chips = "".join(f"<TD BGCOLOR=\"{_loss_colour(h)}\" VALIGN=\"MIDDLE\"><FONT COLOR=\"white\">L{h.index}</FONT></TD>"
                    for h in plan.heads if _trains(h, stage.index))
    cluster.attr(label="", style="rounded,filled", fillcolor="#f8f8f8", color="#c0c0c0")
    with cluster.subgraph() as top:  # reason: a header node beside the first box, where no edge runs through it
        top.attr(rank="same")
        top.node(f"stage_{stage.index}", f"<<TABLE BORDER=\"0\" CELLSPACING=\"3\"><TR><TD>{_stage_text(plan, stage)}"
                                         f"</TD>{chips}</TR></TABLE>>", shape="plain", style="solid")
        top.edge(f"stage_{stage.index}", next(iter(members)), style="invis")
    for box, names in members.items():
        label = _group_label(nodes, box, names) if box.startswith("group_") else _node_label(plan, nodes[names[0]])
        cluster.node(box, label, style="rounded,filled", fillcolor="white")
    with cluster.subgraph() as beside:  # reason: heads sit level with the output they read
        beside.attr(rank="same")
        _draw_heads(beside, plan, stage, box_of)


def _group_label(nodes: dict[str, fx.Node], box: str, names: list[str]) -> str:
    qualname = box.split("_", 2)[2]
    module_type = _module_type(nodes[names[0]], qualname)
    kind = f" · {html.escape(module_type)}" if module_type else ""
    return (f"<<B>{html.escape(qualname)}</B>{kind}<BR/>"
            f"<FONT POINT-SIZE=\"8\">{len(names)} ops · {_shape_text(nodes[names[-1]])}</FONT>>")


def _node_label(plan: Plan, node: fx.Node) -> str:
    name = node.name
    if node.op == "call_module":
        op = type(plan.graph_module.get_submodule(node.target)).__name__
    elif node.op == "get_attr":
        op = "param"
    else:
        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return (f"<{html.escape(name)}<BR/>"
            f"<FONT POINT-SIZE=\"8\">{html.escape(op)} · {_shape_text(node)}</FONT>>")


def _draw_heads(cluster: graphviz.Digraph, plan: Plan, stage: Stage, box_of: dict[str, str]) -> None:
    """Each head reading ``stage``, beside it, fed by the stage's main output."""
    main_output = (stage.outputs or stage.nodes)[-1]
    for head in (h for h in plan.heads if h.stage == stage.index):
        colour = _loss_colour(head)
        cluster.node(f"head_{head.index}", f"<{_head_text(head, stage)}>", color=colour, penwidth="2",
                     style="rounded,filled", fillcolor="white")
        cluster.edge(box_of[main_output], f"head_{head.index}", color=colour, style="dashed")


def _head_text(head: Head, stage: Stage) -> str:
    """``head 0 · auto: conv1x1-BN-ReLU-pool2x2-linear``, then its params and FLOPs (and their ratio to the
    stage's), weight and loss, as HTML."""
    built = f"{head.kind}: {head.layers}" if head.layers else head.kind
    built = built if head.kind != "downstream" else head.layers  # reason: its layers start with the kind
    cost = (f"{si(head.params)} params ({times(head.params, stage.params)} stage) · " if head.params else "") \
        + (f"{si(head.flops)} FLOPs ({times(head.flops, stage.flops)}) · " if head.flops else "")
    return (f"<B>head {head.index}</B> · {html.escape(built)}<BR/>"
            f"<FONT POINT-SIZE=\"9\">{cost}w={head.weight:g} → L{head.index}</FONT>")


def _edges(plan: Plan, nodes: dict[str, fx.Node], stage_of: dict[str, int], box_of: dict[str, str],
           labelled: bool) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """Edges between boxes: ``(tail, head, label, losses whose gradient stops on it)``.

    An edge that crosses a cut is kept per tensor and labelled with it (``labelled``);
    constants that a later stage recomputes do not cross cuts.
    """
    edges: dict[tuple[str, str, str], tuple[int, ...]] = {}
    for stage in plan.stages:
        for name in filter(box_of.__contains__, stage.nodes):
            for src in nodes[name].all_input_nodes:
                crossing = stage_of[src.name] != stage.index
                tail, head = box_of[src.name], box_of[name]
                if tail == head or (crossing and src.name not in stage.inputs):
                    continue
                label = f" {src.name}" if crossing and labelled else ""
                stops = stopping_losses(plan.heads, stage_of[src.name], stage.index) if crossing else ()
                edges.setdefault((tail, head, label), stops)
    for src in plan.output_node.all_input_nodes:
        edges.setdefault((box_of[src.name], "output", ""), ())
    return [(tail, head, label, stops) for (tail, head, label), stops in edges.items()]


def _draw_edge(graph: graphviz.Digraph, tail: str, head: str, label: str, stops: tuple[int, ...]) -> None:
    if not stops:
        graph.edge(tail, head, label)
        return
    scope = f"scope_{tail}_{head}_{label}"
    losses = ", ".join(f"L{j}" for j in stops)
    graph.node(scope, f"✕ scope: {losses} stop{'s' if len(stops) == 1 else ''}", shape="box", style="filled",
               fillcolor="#fde2e2", color=_SCOPE_COLOUR, fontcolor=_SCOPE_COLOUR, fontsize="9", height="0.2",
               margin="0.06,0.02")
    graph.edge(tail, scope, label, arrowhead="none")
    graph.edge(scope, head, color=_SCOPE_COLOUR, arrowhead="teenormal")


def _legend(plan: Plan, title: str) -> str:
    """HTML table: the model, then one row per loss (its colour, head and window)."""
    total_flops = sum(s.flops for s in plan.stages)
    rows = [f"<TR><TD COLSPAN=\"2\"><B>{html.escape(title)}</B> · mode={plan.mode} · "
            f"{len(plan.stages)} stages · {si(sum(p.numel() for p in plan.graph_module.parameters()))} params · "
            f"{total_flops / 1e9:.3g} GFLOPs/sample</TD></TR>"]
    for head in plan.heads:
        lo, hi = head.span
        stages = f"stages {lo}–{hi}" if lo < hi else f"stage {lo}"
        rows.append(f"<TR><TD BGCOLOR=\"{_loss_colour(head)}\"><FONT COLOR=\"white\">L{head.index}</FONT></TD>"
                    f"<TD ALIGN=\"LEFT\">loss {head.index} (head at stage {head.stage}, {html.escape(head.kind)}, "
                    f"w={head.weight:g}) trains {stages}</TD></TR>")
    if any(h.span[0] > 0 for h in plan.heads):
        rows.append(f"<TR><TD BGCOLOR=\"#fde2e2\"><FONT COLOR=\"{_SCOPE_COLOUR}\">✕</FONT></TD>"
                    "<TD ALIGN=\"LEFT\">gradient scope: the named losses stop backpropagating here</TD></TR>")
    if not plan.heads:
        rows.append("<TR><TD COLSPAN=\"2\">no heads: fxrelay.transform adds the losses</TD></TR>")
    return f"<<TABLE BORDER=\"1\" CELLBORDER=\"0\" CELLSPACING=\"3\" COLOR=\"#c0c0c0\">{''.join(rows)}</TABLE>>"
