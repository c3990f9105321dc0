"""Deploy: one plain inference GraphModule, without heads, scopes, no-ops or foldable BNs.

:func:`deploy` starts from the model's traced original graph: for a model made by
:func:`fxrelay.transform` that is ``plan_of(model).graph`` (the stages inlined, no
heads, no relay scopes), for any other model a trace of an eval-mode copy. It then

* strips the calls that are the identity at inference (:func:`is_noop`): ``nn.Identity``,
  dropout modules and functions, timm's ``DropPath``/``DropBlock2d``, torchvision's
  stochastic depth, and the random-mask products ``x * bernoulli_(...)`` that a
  train-mode trace of timm's ``drop_path`` bakes in;
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

from .fold import fold_bn, has_inner_eval_batchnorm
from .inline import inline_leaves
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
    inline_leaves(gm, has_inner_eval_batchnorm)  # reason: no-ops inside them must go before folding
    strip_noops(gm)
    return fold_bn(gm, example_input, inplace=True).eval()


def _inference_graph(model: nn.Module, example_input) -> fx.GraphModule:
    """An eval-mode GraphModule of the original model with its own copy of the parameters."""
    from .rewrite import is_transformed, plan_of  # reason: looked up at call time, rewrite imports much

    if is_transformed(model):
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
            removed.append(node.name)
            _erase_unused(gm.graph, node)  # reason: with the `training` attribute it read, if any
        elif _is_random_mask(node):
            removed += _strip_random_mask(gm.graph, node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return removed


def _is_random_mask(node: fx.Node) -> bool:
    """``bernoulli_``/``bernoulli`` whose users are products with it, or in-place scalings of it."""
    if not (node.op in ("call_method", "call_function") and _name(node) in ("bernoulli", "bernoulli_")):
        return False
    return bool(node.users) and all(_is_product(u) or (_name(u).endswith("_") and not u.users) for u in node.users)


def _strip_random_mask(graph: fx.Graph, mask: fx.Node) -> list[str]:
    """Replace every ``x * mask`` by ``x`` (a drop-path at inference), then erase the mask's code."""
    products = [u for u in mask.users if _is_product(u)]
    for product in products:
        other = product.args[1] if product.args[0] is mask else product.args[0]
        product.replace_all_uses_with(other)
        graph.erase_node(product)
    for scaling in list(mask.users):
        graph.erase_node(scaling)
    _erase_unused(graph, mask)
    return [p.name for p in products]


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and, recursively, the (non in-place) computations and attributes only it used."""
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for source in inputs:
        if not source.users and source.op in ("call_method", "call_function", "get_attr") \
                and not _name(source).endswith("_"):
            _erase_unused(graph, source)


def _is_product(node: fx.Node) -> bool:
    return _name(node) == "mul" and len(node.args) == 2 and not node.kwargs


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
