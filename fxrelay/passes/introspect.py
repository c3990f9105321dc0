"""What :func:`fxrelay.transform` reads off a model: its own aux classifiers, which leaf of a
structured output is the classifier output, and how many classes it has."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Union

import torch.fx as fx
from torch import nn

from ..core.ir import TracingConfig
from ..core.modules import training_mode
from ..core.outputs import OutputPath, output_leaves
from ..core.plan import Plan
from .tracing import ExampleInput, module_path, trace

__all__ = ["model_aux_heads", "output_path", "num_classes_of"]


def model_aux_heads(model: nn.Module, example_input: ExampleInput, *,
                    tracing: TracingConfig | None = None) -> dict[str, str]:
    """The model's own aux classifiers (GoogLeNet, Inception-v3): module name -> fx node it reads.

    They are the top-level submodules its train-mode graph calls and its eval-mode
    graph does not.

    Raises:
        ValueError: the model has none.
    """
    with training_mode(model, True):
        train_graph = trace(model, example_input, tracing=tracing).graph
    with training_mode(model, False):
        eval_graph = trace(model, example_input, tracing=tracing).graph
    used = {_top_module(n) for n in eval_graph.nodes}
    members: dict[str, set[str]] = {}
    for n in train_graph.nodes:
        if _top_module(n) not in used:
            members.setdefault(_top_module(n), set()).add(n.name)
    reads = {name: next(a.name for n in train_graph.nodes if n.name in nodes for a in n.all_input_nodes
                        if a.name not in nodes) for name, nodes in members.items()}
    if not reads:
        raise ValueError(f"head_stages='model': {type(model).__name__} has no aux classifiers of its own "
                         "(its train-mode graph calls no module its eval-mode graph does not)")
    return reads


def _top_module(node: fx.Node) -> str | None:
    path = module_path(node) if node.meta.get("nn_module_stack") else ()
    return path[0] if path else None


def output_path(plan: Plan, output: Union[str, int, OutputPath, None]) -> OutputPath:
    """Where in the model's output the classifier's logits are (see ``transform(output=...)``)."""
    structure = plan.output_node.args[0]
    leaves = output_leaves(_output_structure(structure))
    if leaves == [((), structure)] and output is None:
        return ()
    paths = {path: node for path, node in leaves}
    if output is not None:
        path = tuple(output) if isinstance(output, tuple) else (output,)
        if path not in paths:
            raise ValueError(f"output={output!r} is not a leaf of {plan.model_name}'s output; its leaves are "
                             f"{_describe_leaves(paths)}")
        return path
    logits = [path for path, node in paths.items() if _is_2d(node)]
    if len(logits) != 1:
        raise ValueError(f"{plan.model_name} returns a structure with {len(logits)} 2-D tensors among "
                         f"{_describe_leaves(paths)}: pass output= (a key, index or tuple of them) to say which "
                         "one is the classifier output that carries the heads")
    return logits[0]


def _output_structure(structure: Any) -> Any:
    """The model output's structure with fx nodes as leaves; a namedtuple or dataclass the last
    node builds is opened up (its fields are the node's arguments)."""
    if not (isinstance(structure, fx.Node) and structure.op == "call_function" and isinstance(structure.target, type)):
        return structure
    cls = structure.target
    fields = list(getattr(cls, "_fields", ())) or (
        [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else [])
    values = [*structure.args, *(structure.kwargs[f] for f in fields[len(structure.args):] if f in structure.kwargs)]
    return dict(zip(fields, values)) if fields else structure


def _is_2d(node: Any) -> bool:
    info = node.meta.get("fxrelay") if isinstance(node, fx.Node) else None
    return info is not None and info.shape is not None and len(info.shape) == 2


def _describe_leaves(paths: dict) -> str:
    def shape(node):
        info = node.meta.get("fxrelay") if isinstance(node, fx.Node) else None
        return "x".join(map(str, info.shape)) if info is not None and info.shape else type(node).__name__
    return ", ".join(f"{'/'.join(map(str, p)) or '(whole)'}: {shape(n)}" for p, n in paths.items())


def num_classes_of(model: nn.Module, plan: Plan, num_classes: int | None) -> int:
    """The aux heads' class count: ``num_classes``, else the model's, else its classifier output's."""
    main_classes = _main_classes(plan)
    if num_classes is not None:
        if main_classes is not None and num_classes != main_classes:
            warnings.warn(f"num_classes={num_classes} gives the aux heads {num_classes} classes next to a "
                          f"{main_classes}-way main head: the aux losses then need other labels than the main "
                          f"one; build the model with num_classes={num_classes} instead", UserWarning, stacklevel=4)
        return num_classes
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    if main_classes is not None:
        return main_classes
    raise ValueError(f"cannot infer num_classes of {type(model).__name__} (its output has shape "
                     f"{plan.stages[-1].shape}); pass num_classes=...")


def _main_classes(plan: Plan) -> int | None:
    node = dict(output_leaves(_output_structure(plan.output_node.args[0]))).get(plan.output)
    info = node.meta.get("fxrelay") if isinstance(node, fx.Node) else None
    return info.shape[-1] if info is not None and info.shape is not None and len(info.shape) == 2 else None
