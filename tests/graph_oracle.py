"""An independent gradient oracle on the plan's original traced graph.

It reads only the Plan's data (which nodes each stage holds, each head's window and
weight) and the original traced GraphModule; it does not use fxrelay's stage
modules, gradient scopes or rewrite. For head ``j`` with window ``[lo, a]`` it runs
the original graph with a :class:`torch.fx.Interpreter` in which every value that
depends on the model input and is produced by a node of a stage below ``lo`` is
detached (values computed from parameters and constants alone never are: a parameter
used inside the window gets its gradient there), takes stage ``a``'s main output
through aux head ``j``'s body (or, for the main head, the model's output), and
differentiates ``w_j * cross_entropy`` with ``torch.autograd.grad``. The reference
gradient of the one-line loss is the sum over heads.

Parameters are shared between the transformed model and the plan's graph (the same
tensor objects), so gradients are keyed by parameter object.

The few fxrelay internals read here go through the small functions at the top, to
be re-pointed when the runtime is restructured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

import fxrelay

__all__ = ["RTOL", "original_graph", "run_stages", "stage_module", "aux_body", "is_main", "main_leaf",
           "head_grads", "reference_grads", "one_line_grads", "max_rel_error", "assert_grads_close"]

RTOL = 1e-6
"""Relative tolerance of gradient comparisons in float64."""


# -- the fxrelay internals this oracle reads ---------------------------------------------
def original_graph(plan: fxrelay.Plan) -> fx.GraphModule:
    """The plan's original traced graph."""
    return plan.graph_module


def run_stages(plan: fxrelay.Plan, *inputs: torch.Tensor) -> Any:
    """The plan's stages run one after the other."""
    return fxrelay.run_stages(plan, *inputs)


def stage_module(model: nn.Module, i: int) -> nn.Module:
    """Stage ``i``'s module of a transformed model."""
    return model.stages[i]


def aux_body(model: nn.Module, k: int) -> nn.Module:
    """The classifier of the ``k``-th aux head."""
    return model.heads[k].body


def is_main(head: fxrelay.Head) -> bool:
    """Whether ``head`` is the model's own classifier."""
    return head.is_main


def main_leaf(output: Any, path: tuple = ()) -> torch.Tensor:
    """The output leaf the main head's loss reads: the one at ``plan.output`` (keys and indices)."""
    for key in path:
        output = output[key] if isinstance(output, (dict, list, tuple)) and not hasattr(output, "_fields") \
            else getattr(output, key)
    return output


# -- the oracle -------------------------------------------------------------------------
def _input_dependent(gm: fx.GraphModule) -> set[str]:
    dependent: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(s.name in dependent for s in n.all_input_nodes):
            dependent.add(n.name)
    return dependent


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if any(isinstance(v, torch.Tensor) for v in tree_flatten(value)[0]):
        return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, value)
    return value  # reason: torch.Size, ints, None pass unchanged (pytree would rebuild a Size as a tuple)


class _MaskedInterpreter(fx.Interpreter):
    """Runs the chosen nodes of a graph, detaching the values of ``detached`` nodes."""

    def __init__(self, gm: fx.GraphModule, detached: set[str]):
        super().__init__(gm, garbage_collect_values=False)
        self.detached = detached

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        return _detach(value) if n.name in self.detached else value

    def run_only(self, inputs: tuple, keep: set[str]) -> dict[str, Any]:
        """Run the placeholders and the ``keep`` nodes in graph order; their values by name."""
        self.env = {}
        self.args_iter = iter(inputs)
        for node in self.graph.nodes:
            if node.op == "placeholder" or node.name in keep:
                self.env[node] = self.run_node(node)
        return {n.name: v for n, v in self.env.items()}


def _head_logits(model: nn.Module, x: torch.Tensor, j: int) -> torch.Tensor:
    """Head ``j``'s logits with every input-dependent value below its window detached."""
    plan = fxrelay.plan_of(model)
    gm = original_graph(plan)
    head = plan.heads[j]
    lo, a = head.span
    stage_of = {name: s.index for s in plan.stages for name in s.nodes}
    missing = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n.name not in stage_of]
    assert not missing, f"oracle: nodes in no stage: {missing}"
    detached = {name for name in _input_dependent(gm) if stage_of.get(name, lo) < lo}
    interpreter = _MaskedInterpreter(gm, detached)
    if is_main(head):
        keep = set(stage_of) | {n.name for n in gm.graph.nodes if n.op == "output"}
        values = interpreter.run_only((x,), keep)
        return main_leaf(values[next(n.name for n in gm.graph.nodes if n.op == "output")], plan.output)
    # reason: the head reads stage a's output as it is when stage a ends (a later stage may mutate it in place)
    values = interpreter.run_only((x,), {name for name, s in stage_of.items() if s <= a})
    k = sum(1 for h in plan.heads[:j] if not is_main(h))
    features = values[plan.stages[a].outputs[-1]]
    if not isinstance(features, torch.Tensor):  # reason: a head on a stage ending in a tuple reads its first tensor
        features = next(v for v in tree_flatten(features)[0] if isinstance(v, torch.Tensor))
    return aux_body(model, k)(features)


def head_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
               create_graph: bool = False) -> list[dict[int, torch.Tensor]]:
    """Per head (aligned with ``plan.heads``): ``d L_j / d p`` within the head's window, unweighted,
    keyed by ``id(p)``; parameters the head does not reach are absent."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for j in range(len(fxrelay.plan_of(model).heads)):
        loss = F.cross_entropy(_head_logits(model, x, j), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True, create_graph=create_graph)
        out.append({id(p): g for p, g in zip(params, grads) if g is not None})
    return out


def reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    create_graph: bool = False) -> dict[int, torch.Tensor]:
    """The reference gradient of ``sum_j w_j L_j`` per parameter (keyed by ``id(p)``, zeros included)."""
    heads = fxrelay.plan_of(model).heads
    total = {id(p): torch.zeros_like(p) for p in model.parameters() if p.requires_grad}
    for head, grads in zip(heads, head_grads(model, x, y, create_graph=create_graph)):
        for key, g in grads.items():
            total[key] = total[key] + head.weight * g
    return total


def one_line_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    """The gradients of the README's one-line loss, ``cross_entropy(model(x), y).backward()``."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(main_leaf(model(x), fxrelay.plan_of(model).output), y).backward()
    return {id(p): p.grad if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters() if p.requires_grad}


def max_rel_error(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor],
                  names: dict[int, str]) -> tuple[float, str]:
    """The worst relative error over parameters and the parameter it is at.

    Each parameter's error is scaled by its own largest reference value, floored at
    1e-6 of the largest reference value overall, so gradients that are zero in exact
    arithmetic (a conv bias before BN) are compared against that floor, not their noise.
    """
    floor = 1e-6 * max((w.abs().max().item() for w in want.values()), default=0.0)
    worst, where = 0.0, ""
    for key, w in want.items():
        scale = max(w.abs().max().item(), floor) or 1.0
        error = (got[key] - w).abs().max().item() / scale
        if not error <= worst:  # reason: NaN counts as the worst
            worst, where = error, names[key]
    return worst, where


def assert_grads_close(got: dict[int, torch.Tensor], want: dict[int, torch.Tensor], model: nn.Module,
                       rtol: float = RTOL, what: str = "") -> None:
    """Every parameter's gradient within ``rtol`` (see :func:`max_rel_error`); ``what`` prefixes the message."""
    names = {id(p): n for n, p in model.named_parameters()}
    assert got.keys() == want.keys()
    error, where = max_rel_error(got, want, names)
    assert error <= rtol, f"{what}gradient of {where} differs from the oracle: relative error {error:.3g} > {rtol:g}"
