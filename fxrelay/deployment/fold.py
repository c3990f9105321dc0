"""Fold BatchNorm into the convolution or linear layer that feeds it.

In eval mode a BatchNorm is a per-channel affine map ``y = x * scale + shift``; when
its input is the output of a Conv/ConvTranspose/Linear used by nothing else, the map
is absorbed into that layer's weight and bias and the BN node disappears. The pure
heart is :func:`folded_weights`; :func:`fold_bn` applies it to every foldable pair.

Folded: ``BatchNorm{1,2,3}d`` and subclasses (``affine=False`` too), torchvision's
``FrozenBatchNorm2d`` (which timm re-exports), and timm's ``BatchNormAct2d`` /
``FrozenBatchNormAct2d``, whose ``drop`` and ``act`` stay as nodes after the folded
layer (``bn1`` becomes ``bn1_act``). Not folded (see :func:`fold_report`): a BN in
training mode or without running statistics, a BN whose input is not a conv/linear,
whose conv output has other users, or whose conv module is called more than once
(``torch.fx.experimental.optimization.fuse`` folds wrongly there: pytorch#104593).

Example:
    >>> import torchvision
    >>> from fxrelay.deployment.fold import count_batchnorms, fold_bn
    >>> model = torchvision.models.resnet18().eval()
    >>> count_batchnorms(model), count_batchnorms(fold_bn(model))
    (20, 0)
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from timm.layers import Conv2dSame
from timm.layers.norm_act import FrozenBatchNormAct2d
from torchvision.ops import FrozenBatchNorm2d

from ..core._compat import BatchNormBase
from ..core.ir import TracingConfig
from ..passes.analysis import analyse, data_dependent_nodes
from ..passes.tracing import ExampleInput, default_example_input, trace
from .inline import inline_leaves, tidy

__all__ = [
    "fold_bn", "fold_report", "folded_weights", "bn_scale_shift", "count_batchnorms", "is_batchnorm",
    "has_inner_eval_batchnorm",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_PLAIN_FORWARDS = frozenset(t.forward for t in (*_CONVS, nn.Linear))
_BN_FUNCTIONS = frozenset({F.batch_norm, torch.batch_norm})


_FROZEN_BATCHNORMS = (FrozenBatchNorm2d, FrozenBatchNormAct2d)
_WEIGHT_LINEAR_SUBCLASSES = (Conv2dSame,)  # reason: custom forwards that stay linear in weight and bias


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm: ``_BatchNorm`` subclasses and the frozen variants."""
    return isinstance(module, (BatchNormBase, *_FROZEN_BATCHNORMS))


def count_batchnorms(module: nn.Module) -> int:
    """The number of BatchNorms ``module`` computes.

    For a GraphModule: its BN calls (BN modules, BNs inside called leaf modules, and
    ``F.batch_norm`` of activations, which is what ``fx.symbolic_trace`` leaves of timm's
    ``BatchNormAct2d``); else its BN submodules.

    >>> import torchvision
    >>> count_batchnorms(torchvision.models.vgg11_bn())
    8
    """
    if not isinstance(module, fx.GraphModule):
        return sum(map(is_batchnorm, module.modules()))
    data = data_dependent_nodes(module.graph)
    count = 0
    for node in module.graph.nodes:
        if node.op == "call_module":  # reason: a BN module or a leaf with BNs inside
            count += sum(map(is_batchnorm, module.get_submodule(node.target).modules()))
        # reason: F.batch_norm of weights alone is weight standardization (NFNet), not a BN layer
        count += node.op == "call_function" and node.target in _BN_FUNCTIONS and node.args[0].name in data
    return count


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(x) == x * scale + shift`` in eval mode, in float64.

    >>> bn = nn.BatchNorm1d(2, affine=False).eval()
    >>> bn_scale_shift(bn)[0].tolist()
    [0.9999950000374997, 0.9999950000374997]
    """
    mean, var = bn.running_mean.double(), bn.running_var.double()
    weight = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    bias = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = weight * torch.rsqrt(var + bn.eps)
    return scale, bias - mean * scale


def folded_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a conv/linear followed by ``x * scale + shift`` per output channel.

    Args:
        weight: ``(out, in/groups, *k)`` for Conv and Linear, ``(in, out/groups, *k)``
            for ConvTranspose (``transposed=True``).
        bias: the layer's bias, or None.
        scale, shift: ``(out,)``, see :func:`bn_scale_shift`.
        transposed: ``weight`` has the ConvTranspose layout.
        groups: the layer's groups (ConvTranspose only needs it).

    >>> w, b = folded_weights(torch.ones(2, 3), None, torch.tensor([2., 3.]), torch.tensor([1., 0.]))
    >>> w[:, 0].tolist(), b.tolist()
    ([2.0, 3.0], [1.0, 0.0])
    """
    trailing = [1] * (weight.dim() - 2)
    if transposed:
        per_group = weight.unflatten(0, (groups, -1))  # (groups, in/groups, out/groups, *k)
        new_weight = (per_group * scale.view(groups, 1, -1, *trailing)).flatten(0, 1)
    else:
        new_weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    new_bias = shift if bias is None else bias * scale + shift
    return new_weight, new_bias


def fold_bn(
    module: nn.Module,
    example_input: ExampleInput | None = None,
    *,
    inplace: bool = False,
    tracing: TracingConfig | None = None,
) -> fx.GraphModule:
    """Fold every foldable BatchNorm of ``module`` into the layer before it.

    Args:
        module: a GraphModule, or any module (traced from an eval-mode copy).
        example_input: only used for models whose arity is not one tensor, and to learn
            the rank of Linear outputs feeding a BatchNorm1d (2-D: foldable).
        inplace: fold into ``module`` itself (a GraphModule) instead of a copy.
        tracing: the tracing configuration (see :class:`fxrelay.TracingConfig`).

    Returns:
        A GraphModule computing the same function; BNs that stay are listed by
        :func:`fold_report`. Its parameters are independent of ``module``'s unless
        ``inplace``.

    >>> import torchvision
    >>> gm = fold_bn(torchvision.models.vgg11_bn().eval())
    >>> count_batchnorms(gm), gm.get_submodule("features.0").bias.shape
    (0, torch.Size([64]))
    """
    gm = _inlined_graph_module(module, example_input, inplace, tracing)
    pairs, _ = _fold_plan(gm, example_input)
    for conv_node, bn_node in pairs:
        _fold_pair(gm, conv_node, bn_node)
    _strip_folded_norms(gm, {bn.target for _, bn in pairs})
    tidy(gm)
    return gm


def fold_report(module: nn.Module, example_input: ExampleInput | None = None, *,
                tracing: TracingConfig | None = None) -> list[tuple[str, str]]:
    """``(node name, reason)`` for every BatchNorm :func:`fold_bn` would leave in ``module``.

    >>> import torchvision
    >>> fold_report(torchvision.models.densenet121())[:1]
    [('features_denseblock1_denselayer1_norm1', 'input is not a conv/linear')]
    """
    return _fold_plan(_inlined_graph_module(module, example_input, False, tracing), example_input)[1]


def _inlined_graph_module(module: nn.Module, example_input, inplace: bool,
                          tracing: TracingConfig | None) -> fx.GraphModule:
    """``module`` as a GraphModule of its own, with the leaves that hold eval-mode BNs inlined."""
    if isinstance(module, fx.GraphModule):
        gm = module if inplace else copy.deepcopy(module)
    else:
        gm = trace(copy.deepcopy(module).eval(), example_input, tracing=tracing)
    inline_leaves(gm, has_inner_eval_batchnorm, tracing=tracing)
    return gm


def has_inner_eval_batchnorm(leaf: nn.Module) -> bool:
    """Whether ``leaf`` is an eval-mode module, not a BN, with BNs inside: one to inline before folding."""
    # reason: a training-mode leaf may branch on self.training; its BNs cannot fold anyway
    return not is_batchnorm(leaf) and not leaf.training and any(map(is_batchnorm, leaf.modules()))


def _fold_plan(gm: fx.GraphModule, example_input) -> tuple[list[tuple[fx.Node, fx.Node]], list[tuple[str, str]]]:
    """The foldable ``(conv node, bn node)`` pairs and the ``(bn name, reason)`` of the others."""
    calls = Counter(id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module")
    ranks = _LazyRanks(gm, example_input)
    pairs, report = [], []
    for node in (n for n in gm.graph.nodes if n.op == "call_module"):
        module = gm.get_submodule(node.target)
        if not is_batchnorm(module):
            report += [(f"{node.name}.{path}", "inside a leaf module that cannot be inlined")
                       for path, m in module.named_modules() if is_batchnorm(m)]
            continue
        reason = _reason_not_foldable(gm, node, calls, ranks)
        if reason:
            report.append((node.name, reason))
        else:
            pairs.append((node.args[0], node))
    return pairs, report


def _reason_not_foldable(gm: fx.GraphModule, bn_node: fx.Node, calls: Counter, ranks: "_LazyRanks") -> str | None:
    bn = gm.get_submodule(bn_node.target)
    if getattr(bn, "training", False) and isinstance(bn, BatchNormBase):
        return "BN in training mode"
    if bn.running_mean is None:
        return "BN has no running statistics (track_running_stats=False)"
    source = bn_node.args[0] if len(bn_node.args) == 1 and not bn_node.kwargs else None
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return "input is not a conv/linear"
    layer = gm.get_submodule(source.target)
    if not isinstance(layer, (*_CONVS, nn.Linear)):
        return "input is not a conv/linear"
    if type(layer).forward not in _PLAIN_FORWARDS and not isinstance(layer, _WEIGHT_LINEAR_SUBCLASSES):
        return "conv/linear subclass with a custom forward"
    if len(source.users) > 1:
        return "conv output has other users"
    if calls[id(layer)] > 1:
        return "conv module called more than once"
    if getattr(layer, "out_channels", getattr(layer, "out_features", None)) != bn.running_mean.numel():
        return "BN channels differ from the conv/linear output channels"
    if isinstance(layer, nn.Linear):
        # reason: BatchNorm1d on (B, C, L) normalizes dim 1, not the Linear's features
        rank = ranks.get(source)
        if rank is None:
            return "Linear output is not known to be 2-D (pass example_input)"
        if rank != 2:
            return f"Linear output is {rank}-D: the BatchNorm normalizes dim 1, not the Linear's features"
    return None


class _LazyRanks:
    """Output ranks of nodes, from the graph's metadata or, once needed, shape propagation."""

    def __init__(self, gm: fx.GraphModule, example_input):
        self.gm, self.example_input, self.propagated = gm, example_input, False

    def get(self, node: fx.Node) -> int | None:
        rank = _meta_rank(node)
        if rank is None and not self.propagated:
            self.propagated = True
            self._propagate()
            rank = _meta_rank(node)
        return rank

    def _propagate(self) -> None:
        example = self.example_input if self.example_input is not None else default_example_input(self.gm)
        try:
            analyse(self.gm, example)
        except (RuntimeError, ValueError, TypeError, IndexError):  # reason: wrong default input size
            pass


def _meta_rank(node: fx.Node) -> int | None:
    info = node.meta.get("fxrelay")
    if info is not None and info.shape is not None:
        return len(info.shape)
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    return len(value.shape) if hasattr(value, "shape") else None


def _fold_pair(gm: fx.GraphModule, layer_node: fx.Node, bn_node: fx.Node) -> None:
    layer, bn = gm.get_submodule(layer_node.target), gm.get_submodule(bn_node.target)
    dtype, requires_grad = layer.weight.dtype, layer.weight.requires_grad
    with torch.no_grad():
        weight, bias = folded_weights(  # reason: in float64, rounded once at the end
            layer.weight.double(), None if layer.bias is None else layer.bias.double(), *bn_scale_shift(bn),
            transposed=getattr(layer, "transposed", False), groups=getattr(layer, "groups", 1),
        )
    layer.weight = nn.Parameter(weight.to(dtype), requires_grad=requires_grad)
    layer.bias = nn.Parameter(bias.to(dtype), requires_grad=requires_grad)
    result = layer_node
    for part in ("drop", "act"):  # reason: BatchNormAct2d computes bn, then drop, then act
        if not isinstance(getattr(bn, part, nn.Identity()), nn.Identity):
            with gm.graph.inserting_before(bn_node):
                result = gm.graph.call_module(f"{bn_node.target}.{part}", (result,))
    bn_node.replace_all_uses_with(result)
    gm.graph.erase_node(bn_node)


def _strip_folded_norms(gm: fx.GraphModule, targets: set[str]) -> None:
    """Replace folded norm+act modules by a container of their ``drop``/``act``, dropping the BN state."""
    still_called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for target in targets - still_called:
        bn = gm.get_submodule(target)
        tail = {p: getattr(bn, p) for p in ("drop", "act") if not isinstance(getattr(bn, p, nn.Identity()), nn.Identity)}
        if tail:
            parent, _, name = target.rpartition(".")
            setattr(gm.get_submodule(parent), name, nn.ModuleDict(tail))
