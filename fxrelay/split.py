"""Build one GraphModule per stage of a Plan.

Each stage module takes the stage's input cut values as positional arguments (in
``stage.inputs`` order) and returns its output cut values (one value, or a tuple in
``stage.outputs`` order). Submodules and parameters are shared with the traced graph,
so they are shared with the user's model too.

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.partition(torchvision.models.vgg11())
    >>> stage = plan.stage_modules()[1]
    >>> print(stage.code.strip().splitlines()[0])
    def forward(self, features_1):
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from .plan import Plan, Stage
from .trace import Tracer

__all__ = ["split_stages", "stage_module", "mutates_input"]


def split_stages(plan: Plan) -> list[fx.GraphModule]:
    """The GraphModule of every stage of ``plan``, in order."""
    nodes = {n.name: n for n in plan.graph.graph.nodes}
    return [stage_module(plan.graph, stage, nodes) for stage in plan.stages]


def stage_module(gm: fx.GraphModule, stage: Stage, nodes: dict[str, fx.Node]) -> fx.GraphModule:
    """The GraphModule computing ``stage`` of ``gm`` from its input cut values.

    An input that the stage modifies in place is cloned first, so that the stage never
    writes into a tensor another stage or a head also reads.
    """
    graph = fx.Graph(tracer_cls=Tracer)
    env: dict[str, fx.Node] = {}
    members = set(stage.nodes)
    for name in stage.inputs:
        placeholder = graph.placeholder(name)
        placeholder.meta = dict(nodes[name].meta)
        mutated = any(u.name in members and mutates_input(u, gm) for u in nodes[name].users)
        env[name] = graph.call_method("clone", (placeholder,)) if mutated else placeholder
    for name in stage.nodes:
        _copy_with_constants(graph, nodes[name], env)
    outputs = [env[name] for name in stage.outputs]
    graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return fx.GraphModule(gm, graph, f"Stage{stage.index}")


def _copy_with_constants(graph: fx.Graph, node: fx.Node, env: dict[str, fx.Node]) -> None:
    # reason: values that do not depend on the input (parameters, buffers and what is
    # computed from them alone) are recomputed in every stage that reads them, not cut
    for src in node.all_input_nodes:
        if src.name not in env:
            _copy_with_constants(graph, src, env)
    env[node.name] = graph.node_copy(node, lambda n: env[n.name])


def mutates_input(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` writes into its first argument (``relu_``, ``inplace=True``, ...)."""
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "inplace", False) is True
    if node.kwargs.get("inplace") is True:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")
