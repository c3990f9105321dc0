"""Pass 3: partition a traced graph into stages, one per resolution level.

The stages are contiguous runs of the graph's nodes in execution order. A boundary is
placed before every *main-path downsampling*: a node whose measured spatial reduction
exceeds its inputs' and stays at least that coarse on some path to the output (so
spatial-reduction attention in PVT-like models, whose keys are pooled and whose
output is not, opens no stage). Among the positions between the previous boundary
and that node, the boundary goes to the one the fewest tensors cross (see
:func:`pool_cut_key` for the tie-breaks): the block input in a ResNet (also
pre-activation) or a MobileNet, the activation before the pool in a VGG, and a
multi-tensor cut where skip edges cross (CliqueNet's multi-scale features, HRNet's
branches, long U-Net-like skips). A stage is only closed once it computed something at
its level (no stage of a lone pool or of bare reshapes), and where it can, a tenth of
its level's FLOPs.

Models that downsample fewer than twice (ViT, Mixer) are split instead into groups of
roughly equal FLOPs at single-tensor cuts, preferring block boundaries.

The mechanism (:mod:`fxrelay.passes.cuts`: what crosses where) is apart from the
policies here: where levels open, which position closes a level, how stages are
merged or split to a wanted count, and how stages are named.

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.partition(torchvision.models.vgg19_bn())
    >>> [s.reduction for s in plan.stages]
    [1, 2, 4, 8, 16, 32]
    >>> plan.stages[1].inputs, plan.stages[1].nodes[0]
    (('features_5',), 'features_6')
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Sequence

import torch.fx as fx
from torch import nn

from ..core.choices import BALANCES, BOUNDARIES
from ..core.ir import Stage, TracingConfig
from ..core.plan import Plan
from .analysis import Analysis, analyse, owned_parameters
from .cuts import CutIndex, cut_index, prefix_sums
from .tracing import ExampleInput, as_inputs, check_module, default_example_input, did_you_mean, module_path, \
    trace, tracing_config

__all__ = ["partition", "plan_stages", "BOUNDARIES", "BALANCES", "pool_cut_key", "stage_names", "recompute_bounds"]

_DEFAULT_BLOCKS = 4
_NEAR_MIDDLE = 0.15
_SUBSTANTIAL = 10  # reason: a stage closes after at least 1/10 of its level's FLOPs
_DOWNSAMPLING = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def partition(
    model: nn.Module,
    boundaries: str = "auto",
    num_stages: int | None = None,
    example_input: ExampleInput | None = None,
    *,
    balance: str = "auto",
    tracing: TracingConfig | None = None,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    cut_after: Sequence[str] = (),
) -> Plan:
    """Trace, analyse and partition ``model`` into stages.

    Args:
        model: any ``nn.Module`` (timm, torchvision or your own).
        boundaries: ``"pool"`` (a stage per resolution level, boundaries found from
            propagated shapes), ``"blocks"`` (``num_stages`` groups of about equal
            FLOPs at single-tensor cuts) or ``"auto"`` (``"pool"`` when the model
            downsamples at least twice, else ``"blocks"``).
        num_stages: the number of stages wanted: adjacent stages are merged (cheapest
            pair first) or the most expensive ones split at single-tensor cuts to reach it.
        balance: what "expensive" means for merging and splitting to ``num_stages``:
            ``"flops"`` (even compute), ``"memory"`` (even bytes saved for backward: the
            smallest peak of a local step), ``"auto"`` (each node's share of the FLOPs plus
            its share of the saved bytes: both within a few percent of their own optimum,
            see docs/performance.md) or ``"recompute"`` (the boundaries that minimise the
            peak of a recomputing step: :func:`recompute_bounds`; ``transform(checkpoint=True)``
            picks it for ``"auto"``).
        example_input: an input of the size the model is used at (default:
            :func:`fxrelay.default_example_input`, the size the model declares).
        tracing: the tracing configuration (see :class:`fxrelay.TracingConfig`).
        leaf_modules, autowrap_functions: shorthands added to ``tracing``.
        cut_after: fx node names after which a stage must end, besides the found
            boundaries (where a model's own aux classifier reads its features).

    Returns:
        The :class:`~fxrelay.Plan`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``boundaries``, ``num_stages`` outside what the model's
            cuts allow (the message gives the valid range), or a model that rejects
            the assumed example input.
        TraceError: the model's own ``forward`` cannot be traced.
    """
    check_module(model, "partition")
    _check_choices(boundaries, balance)
    config = tracing_config(tracing, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    assumed = example_input is None
    if assumed:
        example_input = default_example_input(model)
    gm = trace(model, example_input, tracing=config)
    analysis = _analyse(model, gm, example_input, assumed)
    _warn_collapsed_maps(gm, analysis, example_input)
    return plan_stages(gm, analysis, boundaries, num_stages, cut_after, balance=balance, tracing=config)


def _check_choices(boundaries: str, balance: str) -> None:
    """A one-line ``ValueError`` with a "did you mean" for an unknown ``boundaries`` or ``balance``."""
    if boundaries not in BOUNDARIES:
        raise ValueError(f"boundaries must be one of {', '.join(BOUNDARIES)}, got {boundaries!r}"
                         f"{did_you_mean(boundaries, BOUNDARIES)}")
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}"
                         f"{did_you_mean(balance, BALANCES)}")


def _analyse(model: nn.Module, gm: fx.GraphModule, example_input: ExampleInput, assumed: bool) -> Analysis:
    """Pass 2 on ``gm``; a model that fails on the input fxrelay assumed gets an error asking for its own."""
    try:
        return analyse(gm, example_input, memory=True)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        if not assumed:
            raise
        raise ValueError(f"{type(model).__name__} does not run on the assumed example input of shape "
                         f"{tuple(example_input.shape)} ({_first_line(e)}); pass example_input= with an input "
                         "of the size the model is used at") from None


def _warn_collapsed_maps(gm: fx.GraphModule, analysis: Analysis, example_input: ExampleInput) -> None:
    """Warn when the example input is too small: a downsampling layer sees a 1-pixel map, so the
    levels from it on (and their stages) cannot be found."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        module = modules[node.target] if node.op == "call_module" else None
        stride = getattr(module, "stride", 1) if isinstance(module, _DOWNSAMPLING) else 1
        if max(stride if isinstance(stride, tuple) else (stride,)) < 2:
            continue
        shape = analysis.info[node.args[0].name].shape if isinstance(node.args[0], fx.Node) else None
        if shape is not None and len(shape) == 4 and min(shape[-2:]) == 1:
            size = "x".join(map(str, as_inputs(example_input)[0].shape[-2:]))
            warnings.warn(f"the {size} example input shrinks the feature maps to 1 pixel before {node.target} "
                          "downsamples, so the resolution levels from there on cannot be found (fewer stages); "
                          "pass example_input= of the size the model is used at", UserWarning, stacklevel=3)
            return


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def plan_stages(gm: fx.GraphModule, analysis: Analysis, boundaries: str = "auto",
                num_stages: int | None = None, cut_after: Sequence[str] = (), *, balance: str = "auto",
                tracing: TracingConfig = TracingConfig()) -> Plan:
    """The pure heart of :func:`partition`: stages of an analysed graph."""
    index = cut_index(gm, analysis)
    transitions = main_path_transitions(index)
    if boundaries == "auto":
        boundaries = "pool" if len(transitions) >= 2 else "blocks"
    cuts = index.single_tensor_cuts()
    chosen = pool_cuts(index, transitions) if boundaries == "pool" else []
    most = _most_stages(index, cuts | set(chosen))
    if num_stages is not None and not 1 <= num_stages <= most:
        raise ValueError(f"num_stages must be between 1 and {most} for {type(gm).__name__} "
                         f"(boundaries={boundaries!r}), got {num_stages}")
    wanted = num_stages if num_stages is not None else (None if boundaries == "pool" else min(_DEFAULT_BLOCKS, most))
    if wanted is not None:
        chosen = resize(index, chosen, wanted, cuts, balance)
    chosen = sorted(set(chosen) | {index.position[name] + 1 for name in cut_after})
    stages = build_stages(index, chosen, transitions)
    return Plan(graph_module=gm, stages=stages, boundaries=boundaries, leaves=gm.meta.get("fxrelay_leaves", ()),
                tracing=tracing)


def main_path_transitions(index: CutIndex) -> list[int]:
    """Positions of the nodes that open a new, coarser resolution level on the main path."""
    info = index.analysis.info
    through = _coarsest_path_to_output(index.graph_module.graph, info)
    transitions, level = [], 1
    for i, n in enumerate(index.order):
        r = info[n.name].reduction
        inputs = max((info[s.name].level for s in n.all_input_nodes), default=1)
        if r is not None and r > inputs and r > level and through[n.name] >= r:
            transitions.append(i)
            level = r
    return transitions


def pool_cuts(index: CutIndex, transitions: list[int]) -> list[int]:
    """A boundary before every transition, at the best position by :func:`pool_cut_key`.

    The stage a boundary closes must compute something (FLOPs or parameters) after the
    previous transition: no stage of a lone pool, of bare reshapes or of a dropout
    before the stem; and, where it can, at least a tenth of its level's FLOPs.
    """
    info = index.analysis.info
    computing = prefix_sums([0] + [int(bool(info[n.name].flops or info[n.name].params)) for n in index.order])
    flops = _flops_prefix(index)
    first = index.first_positions()
    cuts, previous = [], 0
    for level_start, t in zip([0] + transitions, transitions):
        window = [b for b in range(max(previous, level_start) + 1, t + 1) if computing[b] > computing[level_start]]
        # reason: a stage holds its level's work; CliqueNet's stem is a single-tensor cut
        # but its clique block (the level's FLOPs) ends at a multi-tensor one
        level = flops[t] - flops[level_start]
        window = [b for b in window if _SUBSTANTIAL * (flops[b] - flops[level_start]) >= level] or window
        path = module_path(index.order[t])
        enclosing = {first[path[:k]] for k in range(1, len(path) + 1)}
        if window:
            previous = min(window, key=lambda b: pool_cut_key(index, b, enclosing))
            cuts.append(previous)
    return cuts


def pool_cut_key(index: CutIndex, b: int, enclosing: set[int]) -> tuple:
    """Sort key of a candidate position for a level's boundary: smaller is better.

    Fewest tensors crossing, then fewest values of any kind; then the input of a module
    enclosing the downsampling (a block or stage input, or the downsampling itself);
    then fewest crossing elements (before an expansion conv, not after); then the latest.
    """
    c = index.crossings
    return c.tensors[b], c.values[b], b not in enclosing, c.numel[b], -b


def resize(index: CutIndex, chosen: list[int], wanted: int, cuts: set[int], balance: str = "auto") -> list[int]:
    """Merge the cheapest adjacent stages or split the most expensive to ``wanted``, by ``balance``
    (``"recompute"``: the boundaries of :func:`recompute_bounds` instead).

    A split never leaves a stage without FLOPs (a bare activation between two layers).
    """
    if balance == "recompute":
        return recompute_bounds(index, cuts | set(chosen), wanted)
    prefix = prefix_sums([0] + index.costs(balance))
    flops = _flops_prefix(index)
    bounds = sorted(chosen)
    while len(bounds) + 1 > wanted:
        edges = [0] + bounds + [len(index.order)]
        pair_cost = [prefix[edges[k + 2]] - prefix[edges[k]] for k in range(len(bounds))]
        bounds.pop(min(range(len(bounds)), key=pair_cost.__getitem__))
    while len(bounds) + 1 < wanted:
        edges = [0] + bounds + [len(index.order)]
        inside = {k: [c for c in cuts if edges[k] < c < edges[k + 1]
                      and flops[c] > flops[edges[k]] and flops[edges[k + 1]] > flops[c]] for k in range(len(edges) - 1)}
        k = max((k for k in inside if inside[k]), key=lambda k: prefix[edges[k + 1]] - prefix[edges[k]])
        bounds = sorted(bounds + [_split_point(index, edges[k], edges[k + 1], inside[k], prefix)])
    return bounds


def recompute_bounds(index: CutIndex, cuts: set[int], wanted: int) -> list[int]:
    """The ``wanted - 1`` boundaries, among ``cuts``, with the smallest peak of a recomputing step.

    Such a step keeps every boundary and, while one stage recomputes and backpropagates, that
    stage's saved activations and about as many bytes of their gradients: the peak is modelled as
    the boundaries' bytes plus twice the largest stage's saved bytes (resnet50 at 8 stages:
    measured 0.583x of the untouched step where this model says 0.59x). For each bound on the
    largest stage (quantiles of the stage sizes possible), a dynamic programme finds the
    boundaries of least bytes; the best bound wins. Every stage keeps some FLOPs.
    """
    info, n = index.analysis.info, len(index.order)
    saved = prefix_sums([0] + [info[node.name].saved_bytes for node in index.order])
    flops = _flops_prefix(index)
    points = [0] + sorted(c for c in cuts if 0 < flops[c] < flops[-1]) + [n]
    sizes = sorted({saved[j] - saved[i] for i in points for j in points if saved[j] - saved[i] >= saved[-1] / wanted})
    best: tuple[float, list[int]] | None = None
    for bound in sizes[:: max(1, len(sizes) // 48)] + sizes[-1:]:
        cost = _least_boundary_bytes(index, points, saved, flops, bound, wanted)
        if cost is not None and (best is None or cost[0] + 2 * bound < best[0]):
            best = (cost[0] + 2 * bound, cost[1])
    if best is None:  # reason: cannot happen while wanted <= _most_stages; keep the FLOPs policy as the net
        return resize(index, [], wanted, cuts, "flops")
    return best[1]


def _least_boundary_bytes(index: CutIndex, points: list[int], saved: list[int], flops: list[int], bound: int,
                          wanted: int) -> tuple[int, list[int]] | None:
    """Boundaries (and their bytes) splitting ``[0, n)`` into ``wanted`` stages of at most ``bound`` saved
    bytes and some FLOPs each, with the fewest bytes crossing them; None if there are none."""
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(0, 0): (0, [])}
    for j in points[1:]:
        crossing = index.crossings.bytes[j] if j < points[-1] else 0
        for k in range(1, wanted + 1):
            options = [(best[i, k - 1][0] + crossing, best[i, k - 1][1] + [j]) for i in points
                       if i < j and (i, k - 1) in best and saved[j] - saved[i] <= bound and flops[j] > flops[i]]
            if options:
                best[j, k] = min(options)
    found = best.get((points[-1], wanted))
    return (found[0], found[1][:-1]) if found else None


def _flops_prefix(index: CutIndex) -> list[int]:
    return prefix_sums([0] + [index.analysis.info[n.name].flops for n in index.order])


def _most_stages(index: CutIndex, cuts: set[int]) -> int:
    """The most stages ``cuts`` allow with some FLOPs in every stage."""
    flops, kept, last = _flops_prefix(index), 0, 0
    for c in sorted(cuts):
        if flops[c] > flops[last] and flops[-1] > flops[c]:
            kept, last = kept + 1, c
    return kept + 1


def _split_point(index: CutIndex, lo: int, hi: int, inside: list[int], prefix: list[int]) -> int:
    """The cut near the cost midpoint of ``[lo, hi)``, preferring block boundaries."""
    total = prefix[hi] - prefix[lo]
    middle = prefix[lo] + total / 2
    distance = {c: abs(prefix[c] - middle) for c in inside}
    near = [c for c in inside if distance[c] <= _NEAR_MIDDLE * total] or [min(inside, key=distance.get)]
    return min(near, key=lambda c: (index.module_depth(c), distance[c]))


def build_stages(index: CutIndex, bounds: list[int], transitions: list[int]) -> tuple[Stage, ...]:
    """The :class:`~fxrelay.Stage` values between ``bounds``."""
    gm, info = index.graph_module, index.analysis.info
    edges = [0] + sorted(bounds) + [len(index.order)]
    last = len(edges) - 2
    stage_of = {n.name: k for k in range(last + 1) for n in index.order[edges[k]:edges[k + 1]]}
    for n in reversed(gm.graph.nodes):  # reason: a constant goes to the stage of its first user
        if n.name in index.constants:
            stage_of[n.name] = min((stage_of.get(u.name, last) for u in n.users), default=0)
    members = [[n for n in gm.graph.nodes if stage_of.get(n.name) == k] for k in range(last + 1)]
    names = stage_names([[n for n in nodes if n.name not in index.constants] for nodes in members], info)
    modules = dict(gm.named_modules())
    levels = [(t, info[index.order[t].name].reduction) for t in transitions]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stages = []
    for k, nodes in enumerate(members):
        inputs = {s.name for n in nodes for s in n.all_input_nodes
                  if s.name not in index.constants and stage_of.get(s.name, -1) != k}
        # reason: the last output is the main one heads read: the last tensor, after sizes and ints
        outputs = sorted({n.name for n in nodes if n.name not in index.constants
                          and any(stage_of.get(u.name, len(index.order)) != k for u in n.users)},
                         key=lambda name: (info[name].shape is not None, order[name]))
        main = info[outputs[-1]] if outputs else info[nodes[-1].name]
        params = {id(p): p.numel() for n in nodes for p in owned_parameters(n, modules)}
        detached, inputs_saved = _detached_saved_bytes(modules, nodes, info)
        stages.append(Stage(
            index=k, name=names[k], nodes=tuple(n.name for n in nodes),
            inputs=tuple(sorted(inputs, key=order.__getitem__)), outputs=tuple(outputs),
            shape=_per_sample(main.shape, index.analysis.batch),
            reduction=max((r for t, r in levels if t < edges[k + 1]), default=1),
            params=sum(params.values()), flops=sum(info[n.name].flops for n in nodes),
            saved_bytes=sum(info[n.name].saved_bytes for n in nodes) // index.analysis.batch,
            boundary_bytes=sum(info[name].bytes for name in outputs) // index.analysis.batch,
            detached_saved_bytes=detached // index.analysis.batch,
            input_saved_bytes=inputs_saved // index.analysis.batch,
            unsaved_output_bytes=0 if main.saver in {n.name for n in nodes} else main.bytes // index.analysis.batch,
        ))
    return tuple(stages)


def _detached_saved_bytes(modules: Mapping[str, nn.Module], nodes: Sequence[fx.Node], info) -> tuple[int, int]:
    """Bytes the stage's ``nodes`` save when its inputs do not require grad, and of those, the bytes of
    storages made outside the stage (its inputs): only nodes with parameters or a grad-requiring input save.
    """
    members = {n.name for n in nodes}
    grad = {n.name for n in nodes if any(p.is_floating_point() for p in owned_parameters(n, modules))}
    for n in nodes:
        if any(s.name in grad for s in n.all_input_nodes):
            grad.add(n.name)
    own = sum(info[name].saved_bytes for name in grad)
    # reason: a storage first saved by a node that now saves nothing, or made outside, counts for its next saver
    inside = {r for name in grad for r in info[name].reused if r[0] in members and r[0] not in grad}
    outside = {r for name in grad for r in info[name].reused if r[0] not in members}
    return own + sum(r[2] for r in inside) + sum(r[2] for r in outside), sum(r[2] for r in outside)


def stage_names(stages: Sequence[Sequence[fx.Node]], info) -> list[str]:
    """A readable, unique Python identifier per stage: the module that holds most of it.

    A stage is named after the module holding most of its FLOPs and at least half of
    its nodes, at the shallowest module depth where that name is unique among the
    stages (``layer2``, ``denseblock3``); otherwise the first stage is ``stem`` and
    any other ``stage<i>``.
    """
    names: list[str | None] = [None] * len(stages)
    for depth in (1, 2):
        candidates = [_dominant_module(nodes, info, depth) for nodes in stages]
        for k, name in enumerate(candidates):
            if names[k] is None and _usable(name) and candidates.count(name) == 1 and name not in names:
                names[k] = name
    fallback = [("stem" if k == 0 and "stem" not in names else f"stage{k}") for k in range(len(stages))]
    return [name or default for name, default in zip(names, fallback)]


def _dominant_module(nodes: Sequence[fx.Node], info, depth: int) -> str | None:
    weight: dict[tuple[str, ...], tuple[int, int]] = {}
    for n in nodes:
        path = module_path(n)[:depth]
        if len(path) == depth:
            flops, count = weight.get(path, (0, 0))
            weight[path] = (flops + info[n.name].flops, count + 1)
    majority = {path: w for path, w in weight.items() if 2 * w[1] >= len(nodes)}
    return max(majority, key=majority.__getitem__)[-1] if majority else None


def _usable(name: str | None) -> bool:
    # reason: stage names become attributes of a module container
    return name is not None and name.isidentifier() and not name.startswith("_") and not hasattr(nn.Module, name)


def _coarsest_path_to_output(graph: fx.Graph, info) -> dict[str, float]:
    """For each node, the coarsest resolution some path from it to the output keeps throughout."""
    best: dict[str, float] = {}
    through: dict[str, float] = {}
    for n in reversed(graph.nodes):
        if n.op == "output":
            best[n.name] = float("inf")
            continue
        through[n.name] = max((best[u.name] for u in n.users), default=float("-inf"))
        r = info[n.name].reduction
        best[n.name] = min(r if r is not None else float("inf"), through[n.name])
    return through


def _per_sample(shape: tuple[int, ...] | None, batch: int) -> tuple[int, ...]:
    if not shape:
        return ()
    return tuple(shape[1:]) if shape[0] == batch else tuple(shape)
