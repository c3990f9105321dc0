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

from typing import Callable, Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.choices import HEAD_KINDS, MODES, default_aux_weight
from ..core.ir import MAIN, Head
from ..core.modules import Conv1x1, HeadReLU, training_mode
from .tracing import did_you_mean

__all__ = ["HeadFactory", "ChannelsLast", "TokenMean", "make_head", "kind_name", "head_flops",
           "describe_head", "assign_heads", "check_mode"]

HeadFactory = Callable[[tuple, int], nn.Module]
_AUTO_WIDTH = 256


class ChannelsLast(nn.Module):
    """NHWC to NCHW (timm Swin-style stage outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class TokenMean(nn.Module):
    """Mean over the tokens of ``(B, N, C)`` features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def kind_name(head: Union[str, HeadFactory]) -> str:
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
    if head not in HEAD_KINDS:
        raise ValueError(f"head_kind must be one of {', '.join(HEAD_KINDS)} or a callable, got {head!r}"
                         f"{did_you_mean(head, HEAD_KINDS)}")
    shape = tuple(feature_shape)
    if len(shape) == 1:
        return nn.Linear(shape[0], num_classes)
    if len(shape) == 2:
        return nn.Sequential(TokenMean(), nn.LayerNorm(shape[1]), nn.Linear(shape[1], num_classes))
    if head == "downstream":
        raise ValueError("a downstream head is built from the model's later layers: pass head_kind='downstream' "
                         "to fxrelay.transform, not to make_head")
    prefix, channels = _to_nchw(shape)
    body = {"auto": _auto, "linear": _linear, "layercnn": _layercnn, "dgl": _dgl}[head]
    return nn.Sequential(*prefix, *body(channels, num_classes, depth))


def head_flops(head: nn.Module, feature_shape: tuple) -> int:
    """Forward FLOPs of ``head`` for one sample of ``feature_shape``."""
    p = next(head.parameters(), None)
    sample = torch.zeros(1, *feature_shape, device=p.device if p is not None else None,
                         dtype=p.dtype if p is not None else None)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), training_mode(head, False):
        head(sample)
    return counter.get_total_flops()


_SHORT_NAMES = {nn.BatchNorm1d: "BN", nn.BatchNorm2d: "BN", nn.LayerNorm: "LN", nn.ReLU: "ReLU", HeadReLU: "ReLU",
                nn.Linear: "linear",
                TokenMean: "TokenMean", ChannelsLast: "ChannelsLast"}


def describe_head(head: nn.Module) -> str:
    """What a head computes, layer by layer: ``"conv1x1-BN-ReLU-pool2x2-linear"``.

    >>> describe_head(make_head("auto", (64, 8, 8), 10)), describe_head(make_head("linear", (64, 8, 8), 10))
    ('conv1x1-BN-ReLU-pool2x2-linear', 'pool-linear')
    """
    if isinstance(getattr(head, "description", None), str):
        return head.description
    leaves = [m for m in head.modules() if not any(True for _ in m.children())] or [head]
    return "-".join(name for name in map(_layer_name, leaves) if name)


def _layer_name(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv" + "x".join(map(str, module.kernel_size))
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        size = module.output_size if isinstance(module.output_size, tuple) else (module.output_size,) * 2
        return "pool" if size == (1, 1) else "pool" + "x".join(map(str, size))
    if isinstance(module, (nn.Flatten, nn.Identity)):
        return ""
    return _SHORT_NAMES.get(type(module), type(module).__name__.lstrip("_"))


def check_mode(mode: str) -> None:
    """Raise a ``ValueError`` with a hint unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}{did_you_mean(mode, MODES)}")


def assign_heads(num_stages: int, mode: str, *, window: int = 2, head_stages: Union[str, Sequence[int]] = "auto",
                 skip_first: int = 2, aux_weight: float | None = None, kind: str = "auto") -> tuple[Head, ...]:
    """Place the heads and their windows: the pure heart of :func:`fxrelay.transform`.

    ``aux_weight=None`` is the mode's default (:func:`fxrelay.core.choices.default_aux_weight`).

    Example:
        >>> [h.span for h in assign_heads(5, "relay", window=2)]
        [(0, 2), (2, 3), (3, 4)]
        >>> [h.span for h in assign_heads(5, "greedy")]
        [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    """
    check_mode(mode)
    aux_weight = default_aux_weight(mode) if aux_weight is None else aux_weight
    stages = _aux_stages(num_stages, mode, head_stages, skip_first)
    lows = []
    for rank, a in enumerate(stages + [num_stages - 1]):
        lo = {"relay": max(0, a - window + 1), "greedy": a, "deep": 0, "standard": 0}[mode]
        lows.append(0 if mode == "relay" and rank == 0 else lo)
    return tuple(
        Head(index=j, stage=a, span=(lo, a), weight=1.0 if j == len(stages) else aux_weight,
             kind=MAIN if j == len(stages) else kind)
        for j, (a, lo) in enumerate(zip(stages + [num_stages - 1], lows))
    )


def _aux_stages(num_stages: int, mode: str, head_stages: Union[str, Sequence[int]], skip_first: int) -> list[int]:
    if mode == "standard":
        return []
    if head_stages == "auto":
        first = 0 if mode == "greedy" else skip_first
        return list(range(first, num_stages - 1))
    if isinstance(head_stages, str):  # reason: "model" is resolved to stage indices by transform
        raise ValueError(f"head_stages must be 'auto' or a list of stage indices here, got {head_stages!r}")
    chosen = sorted(set(head_stages))
    bad = [h for h in chosen if not 0 <= h < num_stages - 1]
    if bad:
        raise ValueError(f"head stages must be in 0..{num_stages - 2} (the last stage, {num_stages - 1}, "
                         f"has the model's own classifier), got {bad}")
    return chosen


def _to_nchw(shape: tuple) -> tuple[list[nn.Module], int]:
    a, b, c = shape[-3:]
    if a == b != c:  # reason: (H, W, C) maps (timm Swin, MaxViT stages) show two equal leading dims
        return [ChannelsLast()], c
    return [], a


def _auto(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    width = min(channels, _AUTO_WIDTH)
    return [Conv1x1(channels, width), nn.BatchNorm2d(width), HeadReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes)]


def _linear(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]


def _layercnn(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                   HeadReLU()]
    return layers + [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, num_classes)]


def _dgl(channels: int, num_classes: int, depth: int) -> list[nn.Module]:
    width = min(channels, _AUTO_WIDTH)
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(2)]
    for i in range(depth):
        layers += [Conv1x1(channels if i == 0 else width, width), nn.BatchNorm2d(width),
                   HeadReLU()]
    return layers + [nn.Flatten(), nn.Linear(4 * width, num_classes)]
