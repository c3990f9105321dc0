"""Deploy: one plain inference GraphModule, without heads, scopes, no-ops or foldable BNs.

:func:`deploy` starts from the model's traced original graph: for a model made by
:func:`fxrelay.transform` that is ``plan_of(model).graph`` (the stages inlined, no
heads, no relay scopes), for any other model a trace of an eval-mode copy. It then

* strips the calls that are the identity at inference (:func:`is_noop`): ``nn.Identity``,
  dropout modules and functions, timm's ``DropPath``/``DropBlock2d``, torchvision's
  stochastic depth;
* folds BatchNorm into the conv/linear before it (:func:`fxrelay.fold_bn`).

The result has readable node names, parameters independent of the model's, and is in
eval mode; it runs under ``torch.export``, ``torch.jit.trace`` and ``torch.compile``.
The model itself is never modified, not even its train/eval flag.

Example:
    >>> import torch, torchvision
    >>> from fxrelay.deploy import deploy
    >>> model = torchvision.models.resnet18()
    >>> deployed = deploy(model)
    >>> [n.name for n in deployed.graph.nodes][:4]
    ['x', 'conv1', 'relu', 'maxpool']
    >>> x = torch.randn(1, 3, 64, 64)
    >>> torch.allclose(deployed(x), model.eval()(x), atol=1e-4)
    True
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from .fold import fold_bn
from .trace import trace

__all__ = ["deploy", "strip_noops", "is_noop"]

_NOOP_FUNCTIONS = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
})


def _noop_module_types() -> tuple[type, ...]:
    """Module types whose eval-mode forward returns their input."""
    from torchvision.ops import StochasticDepth

    types = (nn.Identity, nn.modules.dropout._DropoutNd, StochasticDepth)
    try:
        from timm.layers import DropBlock2d, DropPath
    except ImportError:  # reason: timm is optional
        return types
    return (*types, DropPath, DropBlock2d)


def _noop_functions() -> frozenset:
    from torchvision.ops import stochastic_depth

    return _NOOP_FUNCTIONS | {stochastic_depth}


def deploy(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor] | None = None) -> fx.GraphModule:
    """The inference GraphModule of ``model``: original graph, no-ops stripped, BN folded.

    Args:
        model: a model made by :func:`fxrelay.transform`, or any traceable ``nn.Module``.
        example_input: only needed for models whose arity is not one tensor, or to
            fold a Linear into a BatchNorm1d when the graph carries no shapes.

    Returns:
        A GraphModule in eval mode equal to ``model`` in eval mode; BNs that could not
        be folded are listed by :func:`fxrelay.fold_report` on it.

    >>> import torchvision
    >>> from fxrelay.fold import count_batchnorms
    >>> count_batchnorms(deploy(torchvision.models.mobilenet_v3_small()))
    0
    """
    gm = _inference_graph(model, example_input)
    strip_noops(gm)
    return fold_bn(gm, example_input, inplace=True).eval()


def _inference_graph(model: nn.Module, example_input) -> fx.GraphModule:
    """An eval-mode GraphModule of the original model with its own copy of the parameters."""
    try:
        from .rewrite import is_transformed, plan_of
    except ImportError:  # reason: rewrite.py is optional for deploying plain models
        is_transformed = None
    if is_transformed is not None and is_transformed(model):
        return copy.deepcopy(plan_of(model).graph).eval()
    return trace(copy.deepcopy(model).eval(), example_input)


def is_noop(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` returns its first input unchanged at inference.

    Dropout functions count whatever their ``training`` argument: a graph traced in
    train mode bakes ``training=True`` in, and deploy is inference.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Dropout(), nn.ReLU()))
    >>> [is_noop(n, gm) for n in gm.graph.nodes]
    [False, True, False, False]
    """
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _noop_module_types())
    return node.op == "call_function" and node.target in _noop_functions()


def strip_noops(gm: fx.GraphModule) -> list[str]:
    """Remove the no-op calls of ``gm`` in place (see :func:`is_noop`); returns their names.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Identity(), nn.ReLU()))
    >>> strip_noops(gm), [n.name for n in gm.graph.nodes]
    (['_0'], ['input_1', '_1', 'output'])
    """
    removed = []
    for node in list(gm.graph.nodes):
        if is_noop(node, gm):
            source = node.args[0] if node.args else next(iter(node.kwargs.values()))
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            removed.append(node.name)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return removed
