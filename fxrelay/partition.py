"""Pass 3: partition a traced graph into stages, one per resolution level.

The stages are contiguous runs of the graph's nodes in execution order. A boundary is
placed before every *main-path downsampling*: a node whose measured spatial reduction
exceeds its inputs' and stays at least that coarse on some path to the output (so
spatial-reduction attention in PVT-like models, whose keys are pooled and whose
output is not, opens no stage). Among the positions between the previous boundary
and that node, the boundary goes to the one the fewest tensors cross, on ties the
input of a module enclosing the downsampling, then the smallest, then the latest: the block input in a ResNet (also pre-activation) or
a MobileNet, the activation before the pool in a VGG, and a multi-tensor cut where skip
edges cross (CliqueNet's multi-scale features, HRNet's branches, long U-Net-like
skips). A stage is only closed once it computed something at its level (no stage of a
lone pool or of bare reshapes).

Models that downsample fewer than twice (ViT, Mixer) are split instead into groups of
roughly equal FLOPs at clean cuts, preferring block boundaries.

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.partition(torchvision.models.vgg19_bn())
    >>> [s.reduction for s in plan.stages]
    [1, 2, 4, 8, 16, 32]
    >>> plan.stages[1].inputs, plan.stages[1].nodes[0]
    (('features_5',), 'features_6')
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .analysis import Analysis, analyse, data_dependent_nodes, owned_parameters
from .plan import Plan, Stage
from .trace import default_example_input, trace

__all__ = ["partition", "plan_stages", "BOUNDARIES"]

BOUNDARIES = ("auto", "pool", "blocks")
_DEFAULT_BLOCKS = 4
_NEAR_MIDDLE = 0.15
_SUBSTANTIAL = 10  # reason: a stage closes after at least 1/10 of its level's FLOPs


def partition(
    model: nn.Module,
    boundaries: str = "auto",
    num_stages: int | None = None,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
    cut_after: Sequence[str] = (),
) -> Plan:
    """Trace, analyse and partition ``model`` into stages.

    Args:
        model: any ``nn.Module`` (timm, torchvision or your own).
        boundaries: ``"pool"`` (a stage per resolution level, boundaries found from
            propagated shapes), ``"blocks"`` (``num_stages`` groups of about equal
            FLOPs at clean cuts) or ``"auto"`` (``"pool"`` when the model downsamples
            at least twice, else ``"blocks"``).
        num_stages: the number of stages wanted: adjacent stages are merged (cheapest
            pair first) or the most expensive ones split at clean cuts to reach it.
        example_input: an input of the size the model is used at (default: timm's
            ``pretrained_cfg["input_size"]``, else 3x224x224).
        leaf_modules, autowrap_functions: passed to :func:`fxrelay.trace`.
        cut_after: fx node names after which a stage must end, besides the found
            boundaries (where a model's own aux classifier reads its features).

    Returns:
        The :class:`~fxrelay.Plan`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: unknown ``boundaries``, or ``num_stages`` outside what the
            model's cuts allow (the message gives the valid range).
        TraceError: the model's own ``forward`` cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxrelay.partition expects an nn.Module, got {type(model).__name__}")
    if boundaries not in BOUNDARIES:
        close = difflib.get_close_matches(str(boundaries), BOUNDARIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"boundaries must be one of {', '.join(BOUNDARIES)}, got {boundaries!r}{hint}")
    if example_input is None:
        example_input = default_example_input(model)
    gm = trace(model, example_input, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    return plan_stages(gm, analyse(gm, example_input), boundaries, num_stages, cut_after)


def plan_stages(gm: fx.GraphModule, analysis: Analysis, boundaries: str = "auto",
                num_stages: int | None = None, cut_after: Sequence[str] = ()) -> Plan:
    """The pure heart of :func:`partition`: stages of an analysed graph."""
    layout = _Layout.of(gm, analysis)
    transitions = layout.main_path_transitions()
    if boundaries == "auto":
        boundaries = "pool" if len(transitions) >= 2 else "blocks"
    cuts = layout.candidate_cuts()
    chosen = layout.pool_cuts(transitions) if boundaries == "pool" else []
    most = len(cuts | set(chosen)) + 1
    if num_stages is not None and not 1 <= num_stages <= most:
        raise ValueError(
            f"num_stages must be between 1 and {most} for {type(gm).__name__} "
            f"(boundaries={boundaries!r}), got {num_stages}"
        )
    wanted = num_stages if num_stages is not None else (None if boundaries == "pool" else min(_DEFAULT_BLOCKS, most))
    if wanted is not None:
        chosen = layout.resize(chosen, wanted, cuts)
    chosen = sorted(set(chosen) | {layout.position[name] + 1 for name in cut_after})
    stages = layout.stages(chosen, transitions)
    return Plan(graph=gm, stages=stages, boundaries=boundaries, leaves=gm.meta.get("fxrelay_leaves", ()))


@dataclass
class _Layout:
    """The graph's compute nodes in execution order and what crosses each position.

    Position ``b`` is the boundary before ``order[b]``; valid boundaries are
    ``1 .. len(order) - 1``.
    """

    gm: fx.GraphModule
    analysis: Analysis
    order: list[fx.Node]
    position: dict[str, int]
    constants: set[str]
    tensor_crossings: list[int]
    all_crossings: list[int]
    crossing_numel: list[int]
    data_crossings: list[int]

    @classmethod
    def of(cls, gm: fx.GraphModule, analysis: Analysis) -> "_Layout":
        constants = _constant_nodes(gm.graph)
        order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n.name not in constants]
        position = {n.name: i for i, n in enumerate(order)}
        data = data_dependent_nodes(gm.graph)
        diffs = [[0] * (len(order) + 2) for _ in range(4)]
        for n in gm.graph.nodes:
            if n.name in constants or n.op == "output" or not n.users:
                continue
            start = position.get(n.name, -1) + 1
            last = max(position.get(u.name, len(order)) for u in n.users)
            shape = analysis.info[n.name].shape
            amounts = (shape is not None, 1, math.prod(shape or ()), shape is not None and n.name in data)
            if last >= start:
                for diff, amount in zip(diffs, amounts):
                    diff[start] += amount
                    diff[last + 1] -= amount
        return cls(gm, analysis, order, position, constants, *(_prefix_sums(d) for d in diffs))

    def main_path_transitions(self) -> list[int]:
        """Positions of the nodes that open a new, coarser resolution level on the main path."""
        info = self.analysis.info
        through = _coarsest_path_to_output(self.gm.graph, info)
        transitions, level = [], 1
        for i, n in enumerate(self.order):
            r = info[n.name].reduction
            inputs = max((info[s.name].level for s in n.all_input_nodes), default=1)
            if r is not None and r > inputs and r > level and through[n.name] >= r:
                transitions.append(i)
                level = r
        return transitions

    def pool_cuts(self, transitions: list[int]) -> list[int]:
        """A boundary before every transition, at the position the fewest tensors cross.

        The stage a boundary closes must compute something (FLOPs or parameters) after
        the previous transition: no stage of a lone pool, of bare reshapes or of a
        dropout before the stem; and, where it can, at least a tenth of its level's FLOPs. Ties go to the input of a module enclosing the
        transition (a block or stage input, or the transition itself), then to the
        fewest crossing elements (before an expansion conv, not after), then to the
        latest position.
        """
        info = self.analysis.info
        computing = _prefix_sums([0] + [int(bool(info[n.name].flops or info[n.name].params)) for n in self.order])
        flops = _prefix_sums([0] + [info[n.name].flops for n in self.order])
        first = self._first_positions()
        cuts, previous = [], 0
        for level_start, t in zip([0] + transitions, transitions):
            window = [b for b in range(max(previous, level_start) + 1, t + 1) if computing[b] > computing[level_start]]
            # reason: a stage holds its level's work; CliqueNet's stem is a single-tensor cut
            # but its clique block (the level's FLOPs) ends at a multi-tensor one
            level = flops[t] - flops[level_start]
            window = [b for b in window if _SUBSTANTIAL * (flops[b] - flops[level_start]) >= level] or window
            path = _module_path(self.order[t])
            enclosing = {first[path[:k]] for k in range(1, len(path) + 1)}
            if window:
                previous = min(window, key=lambda b: (self.tensor_crossings[b], self.all_crossings[b],
                                                      b not in enclosing, self.crossing_numel[b], -b))
                cuts.append(previous)
        return cuts

    def _first_positions(self) -> dict[tuple[str, ...], int]:
        """Position of the first node of every module in the graph."""
        first: dict[tuple[str, ...], int] = {}
        for i, n in enumerate(self.order):
            path = _module_path(n)
            for k in range(1, len(path) + 1):
                first.setdefault(path[:k], i)
        return first

    def candidate_cuts(self) -> set[int]:
        """Positions a single data tensor crosses: where stages may be split or blocks cut.

        Tensors computed from the input's shape alone (rotary tables, masks) may cross
        too: a ViT with rotary embeddings is cut between blocks with them as extra inputs.
        """
        return {b for b in range(1, len(self.order)) if self.data_crossings[b] == 1}

    def cost(self, i: int) -> int:
        return self.analysis.info[self.order[i].name].flops + 1  # reason: node count breaks all-zero ties

    def resize(self, chosen: list[int], wanted: int, cuts: set[int]) -> list[int]:
        """Merge the cheapest adjacent stages or split the most expensive to ``wanted``."""
        prefix = _prefix_sums([0] + [self.cost(i) for i in range(len(self.order))])
        bounds = sorted(chosen)
        while len(bounds) + 1 > wanted:
            edges = [0] + bounds + [len(self.order)]
            pair_cost = [prefix[edges[k + 2]] - prefix[edges[k]] for k in range(len(bounds))]
            bounds.pop(min(range(len(bounds)), key=pair_cost.__getitem__))
        while len(bounds) + 1 < wanted:
            edges = [0] + bounds + [len(self.order)]
            splittable = [k for k in range(len(edges) - 1) if any(edges[k] < c < edges[k + 1] for c in cuts)]
            k = max(splittable, key=lambda k: prefix[edges[k + 1]] - prefix[edges[k]])
            bounds = sorted(bounds + [self._split_point(edges[k], edges[k + 1], cuts, prefix)])
        return bounds

    def _split_point(self, lo: int, hi: int, cuts: set[int], prefix: list[int]) -> int:
        """The cut near the cost midpoint of ``[lo, hi)``, preferring block boundaries."""
        inside = [c for c in cuts if lo < c < hi]
        total = prefix[hi] - prefix[lo]
        middle = prefix[lo] + total / 2
        distance = {c: abs(prefix[c] - middle) for c in inside}
        near = [c for c in inside if distance[c] <= _NEAR_MIDDLE * total] or [min(inside, key=distance.get)]
        return min(near, key=lambda c: (self._depth(c), distance[c]))

    def _depth(self, b: int) -> int:
        """How deep in the module tree the boundary before ``order[b]`` falls."""
        before, after = _module_path(self.order[b - 1]), _module_path(self.order[b])
        common = 0
        for x, y in zip(before, after):
            if x != y:
                break
            common += 1
        return common

    def stages(self, bounds: list[int], transitions: list[int]) -> tuple[Stage, ...]:
        edges = [0] + sorted(bounds) + [len(self.order)]
        last = len(edges) - 2
        stage_of = {}
        for k in range(last + 1):
            for n in self.order[edges[k]:edges[k + 1]]:
                stage_of[n.name] = k
        for n in reversed(self.gm.graph.nodes):  # reason: a constant goes to the stage of its first user
            if n.name in self.constants:
                stage_of[n.name] = min((stage_of.get(u.name, last) for u in n.users), default=0)
        index = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        levels = [(t, self.analysis.info[self.order[t].name].reduction) for t in transitions]
        return tuple(
            self._stage(k, stage_of, index, max((r for t, r in levels if t < edges[k + 1]), default=1))
            for k in range(last + 1)
        )

    def _stage(self, k: int, stage_of: dict[str, int], index: dict[str, int], reduction: int) -> Stage:
        info = self.analysis.info
        members = [n for n in self.gm.graph.nodes if stage_of.get(n.name) == k]
        inputs = {s.name for n in members for s in n.all_input_nodes
                  if s.name not in self.constants and stage_of.get(s.name, -1) != k}
        outputs = {n.name for n in members if n.name not in self.constants
                   and any(stage_of.get(u.name, len(self.order)) != k for u in n.users)}
        outputs = tuple(sorted(outputs, key=index.__getitem__))
        main = info[outputs[-1]] if outputs else info[members[-1].name]
        params = {id(p): p.numel() for n in members for p in owned_parameters(n, self.gm)}
        return Stage(
            index=k,
            nodes=tuple(n.name for n in members),
            inputs=tuple(sorted(inputs, key=index.__getitem__)),
            outputs=outputs,
            shape=_per_sample(main.shape, self.analysis.batch),
            reduction=reduction,
            params=sum(params.values()),
            flops=sum(info[n.name].flops for n in members),
        )


def _prefix_sums(diff: list[int]) -> list[int]:
    out, running = [], 0
    for d in diff:
        running += d
        out.append(running)
    return out


def _constant_nodes(graph: fx.Graph) -> set[str]:
    """Nodes that do not depend on any input: parameters and what is computed from them alone."""
    dependent = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(s.name in dependent for s in n.all_input_nodes):
            dependent.add(n.name)
    return {n.name for n in graph.nodes if n.name not in dependent and n.op != "output"}


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


def _module_path(node: fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ()
    qualname = list(stack.values())[-1][0]
    return tuple(qualname.split(".")) if qualname else ()


def _per_sample(shape: tuple[int, ...] | None, batch: int) -> tuple[int, ...]:
    if not shape:
        return ()
    return tuple(shape[1:]) if shape[0] == batch else tuple(shape)
