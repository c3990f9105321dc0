"""Auxiliary heads: small classifiers that read one stage's output.

:func:`make_head` builds a head for a per-sample feature shape: ``(C, H, W)`` maps
(NCHW; NHWC stage outputs such as timm's Swin are permuted first), ``(N, C)`` tokens,
or ``(C,)`` vectors. Kinds:

* ``"auto"``: maps get 1x1 conv to at most 256 channels + BN + ReLU + adaptive
  average pool to 2x2 + linear; tokens get mean over tokens + LayerNorm + linear;
* ``"linear"``: global average pool + linear;
* ``"layercnn"``: ``depth`` conv3x3-BN-ReLU, average pool to 2x2, linear (the
  auxiliary problem of Belilovsky et al., layerCNN);
* ``"dgl"``: DGL's MLP-SR: average pool to 2x2 (spatial reduction), then an MLP of
  1x1 conv-BN-ReLU layers, then linear;
* any callable ``factory(feature_shape, num_classes) -> nn.Module``.

Example:
    >>> head = make_head("auto", (512, 28, 28), 10)
    >>> head(torch.randn(2, 512, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
from typing import Callable, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["HEADS", "HeadFactory", "make_head", "head_kind", "head_flops", "AuxHead"]

HeadFactory = Callable[[tuple, int], nn.Module]
HEADS = ("auto", "linear", "layercnn", "dgl")
_AUTO_WIDTH = 256


class AuxHead(nn.Module):
    """An aux head that runs only in training mode (returns ``None`` in eval)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, features: torch.Tensor) -> torch.Tensor | None:
        return self.body(features) if self.training else None


class _ChannelsLast(nn.Module):
    """NHWC to NCHW (timm Swin-style stage outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class _TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def head_kind(head: Union[str, HeadFactory]) -> str:
    """The name a head spec is listed under in ``plan.heads``."""
    return head if isinstance(head, str) else getattr(head, "__name__", type(head).__name__)


def make_head(head: Union[str, HeadFactory], feature_shape: tuple, num_classes: int,
              depth: int = 2) -> nn.Module:
    """A head of kind ``head`` for per-sample features of ``feature_shape``.

    Raises:
        ValueError: unknown head name (with the closest valid one).
    """
    if callable(head):
        return head(tuple(feature_shape), num_classes)
    if head not in HEADS:
        close = difflib.get_close_matches(str(head), HEADS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"head must be one of {', '.join(HEADS)} or a callable, got {head!r}{hint}")
    shape = tuple(feature_shape)
    if len(shape) == 1:
        return nn.Linear(shape[0], num_classes)
    if len(shape) == 2:
        return nn.Sequential(_TokenMean(), nn.LayerNorm(shape[1]), nn.Linear(shape[1], num_classes))
    prefix, channels = _to_nchw(shape)
    body = {"auto": _auto, "linear": _linear, "layercnn": _layercnn, "dgl": _dgl}[head]
    return nn.Sequential(*prefix, *body(channels, num_classes, depth))


def head_flops(head: nn.Module, feature_shape: tuple) -> int:
    """Forward FLOPs of ``head`` for one sample of ``feature_shape``."""
    p = next(head.parameters(), None)
    sample = torch.zeros(1, *feature_shape, device=p.device if p is not None else None,
                         dtype=p.dtype if p is not None else None)
    training = head.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        head.eval()(sample)
    head.train(training)
    return counter.get_total_flops()


def _to_nchw(shape: tuple) -> tuple[list[nn.Module], int]:
    a, b, c = shape[-3:]
    if a == b != c:  # reason: (H, W, C) maps (timm Swin, MaxViT stages) show two equal leading dims
        return [_ChannelsLast()], c
    return [], a


def _auto(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    width = min(channels, _AUTO_WIDTH)
    return [nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes)]


def _linear(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]


def _layercnn(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                   nn.ReLU(inplace=True)]
    return layers + [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, num_classes)]


def _dgl(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    width = min(channels, _AUTO_WIDTH)
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(2)]
    for i in range(depth):
        layers += [nn.Conv2d(channels if i == 0 else width, width, 1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
    return layers + [nn.Flatten(), nn.Linear(4 * width, num_classes)]
