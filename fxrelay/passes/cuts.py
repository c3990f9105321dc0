"""The cut index of a traced graph: its compute nodes in execution order and what crosses each gap.

Position ``b`` is the gap before ``order[b]``; stages are separated at positions
``1 .. len(order) - 1``. :func:`cut_index` counts, for every position, the values that
cross it (computed before it, read at or after it), in one pass with difference arrays.
Values computed from parameters alone (*constants*) never cross: the stage that reads
one recomputes it.

Example:
    >>> import torchvision, fxrelay
    >>> from fxrelay.passes.analysis import analyse
    >>> gm = fxrelay.trace(torchvision.models.resnet18())
    >>> index = cut_index(gm, analyse(gm, fxrelay.default_example_input(gm)))
    >>> index.crossings.tensors[index.position["layer1_0_conv1"]]   # the block input
    1
    >>> index.crossings.tensors[index.position["layer1_0_bn2"]]     # its conv branch and the skip
    2
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx

from .analysis import Analysis, data_dependent_nodes
from .tracing import module_path

__all__ = ["Crossings", "CutIndex", "cut_index", "constant_nodes", "prefix_sums"]


@dataclass(frozen=True)
class Crossings:
    """Per position, what crosses it.

    Attributes:
        tensors: values with a tensor shape.
        values: all values (tensors, sizes, tuples).
        numel: elements of the crossing tensors at the analysis batch size.
        bytes: bytes of the crossing values at the analysis batch size.
        data: tensors whose values depend on the input's values (not only on its shape).
    """

    tensors: list[int]
    values: list[int]
    numel: list[int]
    bytes: list[int]
    data: list[int]


@dataclass(frozen=True)
class CutIndex:
    """The compute nodes of a graph in order, their positions, and the crossings of every position.

    Attributes:
        graph_module: the traced graph.
        analysis: its :class:`~fxrelay.passes.analysis.Analysis`.
        order: compute nodes (not inputs, output or constants) in execution order.
        position: ``order`` index of each of them, by name.
        constants: names of the nodes that depend on no input.
        crossings: what crosses each position.
    """

    graph_module: fx.GraphModule
    analysis: Analysis
    order: list[fx.Node]
    position: dict[str, int]
    constants: frozenset[str]
    crossings: Crossings

    def single_tensor_cuts(self) -> set[int]:
        """Positions a single data tensor crosses: where stages may be split or blocks cut.

        Tensors computed from the input's shape alone (rotary tables, masks) may cross
        too: a ViT with rotary embeddings is cut between blocks with them as extra inputs.
        """
        return {b for b in range(1, len(self.order)) if self.crossings.data[b] == 1}

    def first_positions(self) -> dict[tuple[str, ...], int]:
        """Position of the first node of every module (by module path)."""
        first: dict[tuple[str, ...], int] = {}
        for i, n in enumerate(self.order):
            path = module_path(n)
            for k in range(1, len(path) + 1):
                first.setdefault(path[:k], i)
        return first

    def module_depth(self, b: int) -> int:
        """How deep in the module tree position ``b`` falls (0: between top-level modules)."""
        common = 0
        for x, y in zip(module_path(self.order[b - 1]), module_path(self.order[b])):
            if x != y:
                break
            common += 1
        return common

    def costs(self, balance: str = "flops") -> list[int]:
        """What each node of ``order`` costs when stages are balanced by ``balance``, plus one so that node
        counts break all-zero ties: ``"flops"``; ``"memory"`` (or ``"recompute"``): bytes saved for
        backward; ``"auto"``: its share of the FLOPs plus its share of the saved bytes (in 1e-9)."""
        flops = [self.analysis.info[n.name].flops for n in self.order]
        saved = [self.analysis.info[n.name].saved_bytes for n in self.order]
        if balance == "flops":
            return [f + 1 for f in flops]
        if balance != "auto":
            return [s + 1 for s in saved]
        total_flops, total_saved = max(sum(flops), 1), max(sum(saved), 1)
        return [round(1e9 * (f / total_flops + s / total_saved)) + 1 for f, s in zip(flops, saved)]


def cut_index(gm: fx.GraphModule, analysis: Analysis) -> CutIndex:
    """The :class:`CutIndex` of an analysed graph."""
    constants = constant_nodes(gm.graph)
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n.name not in constants]
    position = {n.name: i for i, n in enumerate(order)}
    data = data_dependent_nodes(gm.graph)
    diffs = {field: [0] * (len(order) + 2) for field in ("tensors", "values", "numel", "bytes", "data")}
    for n in gm.graph.nodes:
        if n.name in constants or n.op == "output" or not n.users:
            continue
        start = position.get(n.name, -1) + 1
        last = max(position.get(u.name, len(order)) for u in n.users)
        if last < start:
            continue
        shape = analysis.info[n.name].shape
        amounts = {"tensors": shape is not None, "values": 1, "numel": math.prod(shape or ()),
                   "bytes": analysis.info[n.name].bytes, "data": shape is not None and n.name in data}
        for field, amount in amounts.items():
            diffs[field][start] += amount
            diffs[field][last + 1] -= amount
    crossings = Crossings(**{field: prefix_sums(diff) for field, diff in diffs.items()})
    return CutIndex(gm, analysis, order, position, frozenset(constants), crossings)


def constant_nodes(graph: fx.Graph) -> set[str]:
    """Nodes that do not depend on any input: parameters and what is computed from them alone."""
    dependent = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(s.name in dependent for s in n.all_input_nodes):
            dependent.add(n.name)
    return {n.name for n in graph.nodes if n.name not in dependent and n.op != "output"}


def prefix_sums(values: list[int]) -> list[int]:
    """Running totals: ``prefix_sums([1, 2, 3]) == [1, 3, 6]``."""
    out, running = [], 0
    for v in values:
        running += v
        out.append(running)
    return out
