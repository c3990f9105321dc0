"""Build one GraphModule per stage of a Plan, and run them one after the other.

Each stage module takes the stage's input cut values as positional arguments (in
``stage.inputs`` order) and returns its output cut values (one value, or a tuple in
``stage.outputs`` order). Submodules and parameters are shared with the traced graph,
so they are shared with the user's model too.

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.partition(torchvision.models.vgg11())
    >>> stage = split_stages(plan)[1]
    >>> print(stage.code.strip().splitlines()[0])
    def forward(self, features_1):
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..core.ir import Stage
from ..core.plan import Plan
from .tracing import GeneratedCodeTracer, mutates_input

__all__ = ["split_stages", "stage_module", "run_stages"]


def split_stages(plan: Plan) -> list[fx.GraphModule]:
    """The GraphModule of every stage of ``plan``, in order."""
    nodes = {n.name: n for n in plan.graph_module.graph.nodes}
    return [stage_module(plan.graph_module, stage, nodes) for stage in plan.stages]


def stage_module(gm: fx.GraphModule, stage: Stage, nodes: dict[str, fx.Node]) -> fx.GraphModule:
    """The GraphModule computing ``stage`` of ``gm`` from its input cut values.

    An input that the stage modifies in place is cloned first, so that the stage never
    writes into a tensor a head also reads (later stages read the modified value: the
    trace makes every read after an in-place op read that op's result).
    """
    graph = fx.Graph(tracer_cls=GeneratedCodeTracer)
    env: dict[str, fx.Node] = {}
    members, modules = set(stage.nodes), dict(gm.named_modules())
    for name in stage.inputs:
        placeholder = graph.placeholder(name)
        placeholder.meta = dict(nodes[name].meta)
        mutated = any(u.name in members and mutates_input(u, modules) for u in nodes[name].users)
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


def run_stages(plan: Plan, *inputs: Any) -> Any:
    """Run the stages of ``plan`` one after the other and return the model's output.

    Equal to ``plan.graph_module(*inputs)``: the proof that the partition is complete.
    """
    env = dict(zip(plan.input_names, inputs))
    for stage, module in zip(plan.stages, split_stages(plan)):
        result = module(*(env[name] for name in stage.inputs))
        env.update(zip(stage.outputs, result if len(stage.outputs) > 1 else (result,)))
    return fx.node.map_arg(plan.output_node.args[0], lambda n: env[n.name])
