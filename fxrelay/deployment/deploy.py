"""Deploy: one plain inference GraphModule, without heads, scopes, no-ops or foldable BNs.

:func:`deploy` starts from the model's traced original graph: for a model made by
:func:`fxrelay.transform` that is ``plan_of(model).graph_module`` (the stages inlined, no
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
    >>> from fxrelay.deployment.deploy import deploy
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

import torch.fx as fx
from timm.layers import DropBlock2d, DropPath
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from ..core._compat import DropoutBase
from ..core.ir import TracingConfig
from ..passes.rewrite import is_transformed, plan_of
from ..passes.tracing import DROPOUT_FUNCTIONS, ExampleInput, check_module, trace
from .fold import fold_bn, has_inner_eval_batchnorm
from .inline import inline_leaves, tidy

__all__ = ["deploy", "strip_noops", "is_noop"]

_NOOP_MODULES = (nn.Identity, DropoutBase, StochasticDepth, DropPath, DropBlock2d)  # reason: identity in eval
_NOOP_FUNCTIONS = DROPOUT_FUNCTIONS | {stochastic_depth}


def deploy(model: nn.Module, example_input: ExampleInput | None = None, *,
           tracing: TracingConfig | None = None) -> fx.GraphModule:
    """The inference GraphModule of ``model``: original graph, no-ops stripped, BN folded.

    Args:
        model: a model made by :func:`fxrelay.transform`, or any traceable ``nn.Module``.
        example_input: only needed for models whose arity is not one tensor, or to
            fold a Linear into a BatchNorm1d when the graph carries no shapes.
        tracing: the tracing configuration for a model not made by :func:`fxrelay.transform`
            (a transformed model re-uses the one it was made with).

    Returns:
        A GraphModule in eval mode equal to ``model`` in eval mode; BNs that could not
        be folded are listed by :func:`fxrelay.fold_report` on it.

    >>> import torchvision
    >>> from fxrelay.deployment.fold import count_batchnorms
    >>> count_batchnorms(deploy(torchvision.models.mobilenet_v3_small()))
    0
    """
    check_module(model, "deploy")
    if is_transformed(model):
        tracing = plan_of(model).tracing
        gm = copy.deepcopy(plan_of(model).graph_module).eval()
    else:
        gm = trace(copy.deepcopy(model).eval(), example_input, tracing=tracing)
    inline_leaves(gm, has_inner_eval_batchnorm, tracing=tracing)  # reason: no-ops inside them go before folding
    strip_noops(gm)
    return fold_bn(gm, example_input, inplace=True, tracing=tracing).eval()


def is_noop(node: fx.Node, root: nn.Module) -> bool:
    """Whether ``node`` returns its first input unchanged at inference.

    Dropout functions count whatever their ``training`` argument: a graph traced in
    train mode bakes ``training=True`` in, and deploy is inference.

    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Dropout(), nn.ReLU()))
    >>> [is_noop(n, gm) for n in gm.graph.nodes]
    [False, True, False, False]
    """
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _NOOP_MODULES)
    return node.op == "call_function" and node.target in _NOOP_FUNCTIONS


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
        elif (chain := _random_mask(node)) is not None:
            removed += _strip_random_mask(gm.graph, chain)
    tidy(gm)
    return removed


def _random_mask(node: fx.Node) -> list[fx.Node] | None:
    """A ``bernoulli_``/``bernoulli`` mask and its in-place scalings, if all their other users are products."""
    if not (node.op in ("call_method", "call_function") and _name(node) in ("bernoulli", "bernoulli_")):
        return None
    chain = [node]
    for member in chain:  # reason: grows while scanning, the trace reads the mask after each in-place scaling
        for user in member.users:
            if _is_product(user):
                continue
            if not (user.args and user.args[0] is member and _name(user).endswith("_")):
                return None
            chain.append(user)
    return chain if any(_is_product(u) for m in chain for u in m.users) else None


def _strip_random_mask(graph: fx.Graph, chain: list[fx.Node]) -> list[str]:
    """Replace every ``x * mask`` by ``x`` (a drop-path at inference), then erase the mask's code."""
    products = [u for m in chain for u in m.users if _is_product(u)]
    for product in products:
        other = product.args[1] if product.args[0] in chain else product.args[0]
        product.replace_all_uses_with(other)
        graph.erase_node(product)
    for scaling in reversed(chain[1:]):
        graph.erase_node(scaling)
    _erase_unused(graph, chain[0])
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
