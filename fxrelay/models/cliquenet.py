"""CliqueNet (Yang, Zhong, Shen, Lin, "Convolutional Neural Networks with Alternately
Updated Clique", CVPR 2018), as timm models.

A *clique block* of ``L`` layers connects every pair of layers both ways. Layer ``i``
owns one weight ``W_ji`` per source ``j`` (the block input ``X_0`` and every other
layer), and is computed twice with the same weights:

* Stage-I (initialisation): ``X_i = g(W_0i * X_0 + sum_{j<i} W_ji * X_j)``;
* Stage-II (alternate re-update, layers in order): ``X_i = g(sum_{j<i} W_ji * X_j'
  + sum_{j>i} W_ji * X_j)``, where ``X_j'`` are the layers already re-updated.

Here ``W_.i`` is one parameter, ``layers[i].weight``, holding the columns of all
sources in the order ``[X_0, X_1..X_{i-1}, X_{i+1}..X_L]``: Stage-I convolves the
concatenated sources with its first columns, Stage-II with all but the ``X_0`` ones,
so both stages use exactly the same numbers. Each update is pre-activation
BN-ReLU-conv (with *bottleneck*, a 1x1 ``W_ji`` then BN-ReLU-3x3, the 3x3 shared by
both stages too; the BatchNorms are per stage). Only Stage-II features go to the next
block, through a *transition*: BN-ReLU-1x1 conv, SE-style channel attention (global
pool, FC-ReLU-FC-sigmoid, halving in between) and 2x2 average pooling. The
*multi-scale feature strategy* sends every block's ``{X_0, Stage-II}`` straight to the
classifier: *compressed* to half its channels by BN-ReLU-1x1, then BN-ReLU and global
average pooling; the pooled vectors of all blocks are concatenated into the
classifier. So partitioning a CliqueNet cuts several tensors at once: the last stage
reads the pooled features of the earlier blocks besides its main input.

Variants (``timm.create_model(name)`` once ``fxrelay.models`` is imported):

* ``cliquenet_s0`` .. ``cliquenet_s3``: the paper's CIFAR/SVHN networks, three blocks
  at 32x32, 16x16, 8x8 after a 3x3 stem of 64 channels, with the ``(k, T)`` of the
  four CliqueNets of the authors' main CIFAR table, (36, 12), (64, 15), (80, 15),
  (80, 18) (``T`` layers in all, ``T/3`` per block, ``k`` channels per layer), and all
  three techniques (attentional transition, bottleneck, compression) on. That table's
  networks have none of them: ``attention=False, bottleneck=False, compression=False``
  gives them exactly (0.94M, 4.49M, 6.94M, 10.14M parameters; 0.91 and 4.21 GFLOPs
  for the first two). Input 3x32x32, 10 classes. Three resolution levels, so
  ``fxrelay.partition`` makes 3 stages. (These S0..S3 number the CIFAR table by size;
  the authors' code names its ImageNet networks S0..S3: here the next four.)
* ``cliquenet_imagenet_s0`` .. ``cliquenet_imagenet_s3``: the authors' ImageNet
  networks (named S0..S3 in their code): 7x7/2 stem of 64 channels and 3x3/2 max pool,
  four blocks at 56, 28, 14, 7 with ``k`` = (36, 64, 100, 80), (36, 80, 120, 100),
  (36, 80, 150, 120), (40, 80, 160, 160) and (5, 6, 6, 6), (5, 6, 6, 6), (5, 5, 6, 6),
  (6, 6, 6, 6) layers. Input 3x224x224. They partition into 5 stages: the stem
  (at 1/2 resolution), then one per block, each ending after its transition's
  attention; the last stage reads the earlier blocks' pooled features too.

The paper also applies dropout (rate 0.2) after every convolution on CIFAR; here
``drop_rate`` is timm's, before the classifier.

Example:
    >>> import timm, torch, fxrelay, fxrelay.models
    >>> model = timm.create_model("cliquenet_s0", num_classes=10).eval()
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> plan = fxrelay.partition(model)
    >>> [s.reduction for s in plan.stages], len(plan.stages[-1].inputs)
    ([1, 2, 4], 3)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import BatchNormAct2d, SEModule
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["CliqueNet", "CliqueBlock", "CliqueLayer", "Transition", "ScalePool"]

STAGE_I, STAGE_II = 0, 1


class CliqueLayer(nn.Module):
    """Layer ``index`` of a clique block: its weights from every source, used by both stages.

    Args:
        in_chs: channels of the block input ``X_0``.
        growth: channels of every layer (``k``).
        num_layers: layers in the block (``L``).
        index: this layer's position, 0-based.
        bottleneck: 1x1 ``W_ji`` followed by BN-ReLU-3x3, else 3x3 ``W_ji``.

    Attributes:
        weight: ``(k, in_chs + (L-1)k, s, s)``: columns of ``X_0``, then of the other
            layers in order.
        sources: per stage, the ``(start, stop)`` columns of ``weight`` it convolves.
    """

    def __init__(self, in_chs: int, growth: int, num_layers: int, index: int, bottleneck: bool = True):
        super().__init__()
        kernel = 1 if bottleneck else 3
        self.padding = kernel // 2
        self.weight = nn.Parameter(torch.empty(growth, in_chs + (num_layers - 1) * growth, kernel, kernel))
        self.sources = ((0, in_chs + index * growth), (in_chs, in_chs + (num_layers - 1) * growth))
        self.norms = nn.ModuleList([BatchNormAct2d(stop - start) for start, stop in self.sources])
        self.mid_norms = nn.ModuleList([BatchNormAct2d(growth) for _ in self.sources]) if bottleneck else None
        self.conv = nn.Conv2d(growth, growth, 3, padding=1, bias=False) if bottleneck else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, sources: torch.Tensor, stage: int) -> torch.Tensor:
        """This layer's value from its concatenated sources in ``stage`` (``STAGE_I`` or ``STAGE_II``)."""
        start, stop = self.sources[stage]
        x = F.conv2d(self.norms[stage](sources), self.weight[:, start:stop], padding=self.padding)
        if self.conv is not None:
            x = self.conv(self.mid_norms[stage](x))
        return x


class CliqueBlock(nn.Module):
    """A clique block: Stage-I initialisation, then one Stage-II alternate re-update.

    Returns the concatenated Stage-II features (``L * k`` channels).
    """

    def __init__(self, in_chs: int, growth: int, num_layers: int, bottleneck: bool = True):
        super().__init__()
        if num_layers < 2:
            raise ValueError(f"a clique block needs at least 2 layers, got {num_layers}")
        self.layers = nn.ModuleList(
            CliqueLayer(in_chs, growth, num_layers, i, bottleneck) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: list[torch.Tensor] = []
        for layer in self.layers:
            features.append(layer(torch.cat([x, *features], 1) if features else x, STAGE_I))
        for i, layer in enumerate(self.layers):
            features[i] = layer(torch.cat(features[:i] + features[i + 1:], 1), STAGE_II)
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv, SE-style channel attention (or none) and 2x2 average pooling."""

    def __init__(self, channels: int, attention: bool = True):
        super().__init__()
        self.norm = BatchNormAct2d(channels)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.attention = SEModule(channels, rd_channels=channels // 2) if attention else nn.Identity()
        self.pool = nn.AvgPool2d(2)


class ScalePool(nn.Module):
    """A block's multi-scale feature: [compression BN-ReLU-1x1 to half,] BN-ReLU, global average pool."""

    def __init__(self, channels: int, compression: bool = True):
        super().__init__()
        self.out_chs = channels // 2 if compression else channels
        self.compress = nn.Identity()
        if compression:
            self.compress = nn.Sequential(BatchNormAct2d(channels), nn.Conv2d(channels, self.out_chs, 1, bias=False))
        self.norm = BatchNormAct2d(self.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.compress(x)).mean((2, 3))


class CliqueNet(nn.Module):
    """CliqueNet with the multi-scale feature strategy (see the module docstring).

    Args:
        growth_rates: channels per layer ``k`` of each block.
        block_layers: layers per block.
        stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7/2 conv-BN-ReLU, 3x3/2 max pool).
        stem_chs: channels of the stem.
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        attention, bottleneck, compression: the paper's three techniques.
        drop_rate: dropout before the classifier.
    """

    def __init__(self, growth_rates: Sequence[int] = (36, 36, 36), block_layers: Sequence[int] = (4, 4, 4),
                 stem: str = "cifar", stem_chs: int = 64, num_classes: int = 1000, in_chans: int = 3,
                 attention: bool = True, bottleneck: bool = True, compression: bool = True,
                 drop_rate: float = 0.0):
        super().__init__()
        if len(growth_rates) != len(block_layers):
            raise ValueError(f"one growth rate per block: got {len(growth_rates)} and {len(block_layers)} blocks")
        self.num_classes, self.drop_rate = num_classes, drop_rate
        self.stem, reduction = _stem(stem, in_chans, stem_chs)
        self.blocks, self.transitions, self.pools = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.feature_info = []
        channels = stem_chs
        for i, (growth, layers) in enumerate(zip(growth_rates, block_layers)):
            if i:
                self.transitions.append(Transition(channels, attention))
                reduction *= 2
            self.blocks.append(CliqueBlock(channels, growth, layers, bottleneck))
            self.pools.append(ScalePool(channels + growth * layers, compression))
            channels = growth * layers
            self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"blocks.{i}"))
        self.num_features = self.head_hidden_size = sum(p.out_chs for p in self.pools)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        _init_weights(self)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``global_pool`` is accepted for timm's API; pooling is fixed)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The multi-scale feature: every block's pooled ``{X_0, Stage-II}``, concatenated."""
        x = self.stem(x)
        pooled = []
        for i, block in enumerate(self.blocks):
            refined = block(x)
            pooled.append(self.pools[i](torch.cat([x, refined], 1)))
            if i < len(self.transitions):
                x = self.transitions[i](refined)
        return torch.cat(pooled, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _stem(kind: str, in_chans: int, channels: int) -> tuple[nn.Module, int]:
    """The stem and its downsampling factor."""
    if kind == "cifar":
        return nn.Conv2d(in_chans, channels, 3, padding=1, bias=False), 1
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_chans, channels, 7, stride=2, padding=3, bias=False), BatchNormAct2d(channels),
            nn.MaxPool2d(3, stride=2, padding=1)), 4
    raise ValueError(f"stem must be 'cifar' or 'imagenet', got {kind!r}")


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) normal convolutions, as the authors' code; zero biases."""
    for name, p in model.named_parameters():
        if p.ndim == 4:
            nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
        elif name.endswith("bias"):
            nn.init.zeros_(p)


def _create(variant: str, pretrained: bool, growth_rates: tuple[int, ...], block_layers: tuple[int, ...],
            stem: str, **kwargs: Any) -> CliqueNet:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; use pretrained=False")
    args = dict(growth_rates=growth_rates, block_layers=block_layers, stem=stem)
    return build_model_with_cfg(CliqueNet, variant, pretrained, **dict(args, **kwargs))


def _cfg(input_size: tuple[int, int, int], num_classes: int, first_conv: str) -> dict[str, Any]:
    return dict(url="", num_classes=num_classes, input_size=input_size, pool_size=None, crop_pct=0.875,
                interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                first_conv=first_conv, classifier="fc", license="mit")


default_cfgs = generate_default_cfgs({
    **{f"cliquenet_s{i}": _cfg((3, 32, 32), 10, "stem") for i in range(4)},
    **{f"cliquenet_imagenet_s{i}": _cfg((3, 224, 224), 1000, "stem.0") for i in range(4)},
})


@register_model
def cliquenet_s0(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """CliqueNet k=36, T=12 (3 blocks of 4 layers), CIFAR setting, 32x32 input."""
    return _create("cliquenet_s0", pretrained, (36,) * 3, (4,) * 3, "cifar", **kwargs)


@register_model
def cliquenet_s1(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """CliqueNet k=64, T=15 (3 blocks of 5 layers), CIFAR setting, 32x32 input."""
    return _create("cliquenet_s1", pretrained, (64,) * 3, (5,) * 3, "cifar", **kwargs)


@register_model
def cliquenet_s2(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """CliqueNet k=80, T=15 (3 blocks of 5 layers), CIFAR setting, 32x32 input."""
    return _create("cliquenet_s2", pretrained, (80,) * 3, (5,) * 3, "cifar", **kwargs)


@register_model
def cliquenet_s3(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """CliqueNet k=80, T=18 (3 blocks of 6 layers), CIFAR setting, 32x32 input: 3 stages."""
    return _create("cliquenet_s3", pretrained, (80,) * 3, (6,) * 3, "cifar", **kwargs)


@register_model
def cliquenet_imagenet_s0(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """The authors' ImageNet CliqueNet-S0 (4 blocks), 224x224 input."""
    return _create("cliquenet_imagenet_s0", pretrained, (36, 64, 100, 80), (5, 6, 6, 6), "imagenet", **kwargs)


@register_model
def cliquenet_imagenet_s1(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """The authors' ImageNet CliqueNet-S1 (4 blocks), 224x224 input."""
    return _create("cliquenet_imagenet_s1", pretrained, (36, 80, 120, 100), (5, 6, 6, 6), "imagenet", **kwargs)


@register_model
def cliquenet_imagenet_s2(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """The authors' ImageNet CliqueNet-S2 (4 blocks), 224x224 input."""
    return _create("cliquenet_imagenet_s2", pretrained, (36, 80, 150, 120), (5, 5, 6, 6), "imagenet", **kwargs)


@register_model
def cliquenet_imagenet_s3(pretrained: bool = False, **kwargs: Any) -> CliqueNet:
    """The authors' ImageNet CliqueNet-S3 (4 blocks), 224x224 input."""
    return _create("cliquenet_imagenet_s3", pretrained, (40, 80, 160, 160), (6, 6, 6, 6), "imagenet", **kwargs)
