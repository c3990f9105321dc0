"""Channel-width scaling of a copied module: every conv, linear and norm ``width`` times as wide.

Used by downstream heads (:mod:`fxrelay.passes.downstream`) to bound the cost of the
later layers they copy. Parameters are re-initialised; parameters of other modules
(layer scales, tokens) are sliced where a dimension is a channel count; in a traced
GraphModule, channel counts inside tuple arguments (``layer_norm``'s ``(320,)``) are
scaled too. What scaling cannot reach (a reshape to a fixed head dimension) shows when
the scaled copy runs.

Example:
    >>> block = scale_width(nn.Sequential(nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128)), 0.5)
    >>> block[0].weight.shape, block[1].num_features
    (torch.Size([64, 32, 3, 3]), 64)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

__all__ = ["scaled", "scale_width"]


def scaled(channels: int, width: float) -> int:
    """``channels`` times ``width``, rounded, at least 1."""
    return max(1, round(channels * width))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def scale_width(body: nn.Module, width: float) -> nn.Module:
    """``body`` with every conv, linear and norm ``width`` times as wide (re-initialised), in place."""
    if width == 1.0:
        return body
    channels = set()
    for m in body.modules():
        channels.update(getattr(m, a) for a in ("in_channels", "out_channels", "in_features", "out_features",
                                                "num_features", "num_channels") if isinstance(getattr(m, a, None), int))
    for m in body.modules():
        if isinstance(m, _CONVS):
            _scale_conv(m, width)
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = scaled(m.in_features, width), scaled(m.out_features, width)
            _renew(m, "weight", (m.out_features, m.in_features))
            _renew(m, "bias", (m.out_features,))
        elif isinstance(m, _BATCH_NORMS + (nn.GroupNorm, nn.LayerNorm)):
            _scale_norm(m, width)
        else:
            for name, p in list(m.named_parameters(recurse=False)):  # reason: layer scales, tokens: sliced copies
                index = tuple(slice(0, scaled(d, width)) if d in channels else slice(None) for d in p.shape)
                setattr(m, name, nn.Parameter(p.detach()[index].clone(), requires_grad=p.requires_grad))
            continue
        m.reset_parameters()
    if isinstance(body, fx.GraphModule):  # reason: traced shapes such as layer_norm's (320,) pin the width
        for n in body.graph.nodes:
            n.args = tuple(_scale_sizes(a, channels, width) for a in n.args)
            n.kwargs = {k: _scale_sizes(a, channels, width) for k, a in n.kwargs.items()}
        body.recompile()
    return body


def _scale_sizes(arg: object, channels: set[int], width: float) -> object:
    """Channel counts inside a tuple or list argument, scaled by ``width``."""
    if not isinstance(arg, (tuple, list)):
        return arg
    return type(arg)(scaled(a, width) if type(a) is int and a in channels else _scale_sizes(a, channels, width)
                     for a in arg)


def _renew(m: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    old = getattr(m, name, None)
    if isinstance(old, nn.Parameter):
        setattr(m, name, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad))
    elif isinstance(old, torch.Tensor):
        setattr(m, name, old.new_zeros(shape))


def _scale_conv(m: nn.Module, width: float) -> None:
    cin, cout, groups = m.in_channels, m.out_channels, m.groups
    m.in_channels, m.out_channels = scaled(cin, width), scaled(cout, width)
    m.groups = m.in_channels if groups == cin else groups  # reason: depthwise stays depthwise
    if m.in_channels % m.groups or m.out_channels % m.groups:
        raise ValueError(f"groups={groups} of a conv do not divide width {width:g}")
    _renew(m, "weight", (m.out_channels, m.in_channels // m.groups, *m.kernel_size))
    _renew(m, "bias", (m.out_channels,))


def _scale_norm(m: nn.Module, width: float) -> None:
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {m.normalized_shape}")
        m.normalized_shape = (scaled(m.normalized_shape[0], width),)
        n = m.normalized_shape[0]
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = n = scaled(m.num_channels, width)
        if n % m.num_groups:
            raise ValueError(f"GroupNorm of {m.num_groups} groups at width {width:g}")
    else:
        m.num_features = n = scaled(m.num_features, width)
    for name in ("weight", "bias", "running_mean", "running_var"):
        _renew(m, name, (n,))
