"""Plain VGG-style CNNs of any depth, without residual connections, as timm models.

Relay Backpropagation (Shen, Lin, Huang, ECCV 2016) is about deep *plain* networks
(VGG-style), where the top loss's gradient is a poor signal for the lowest layers and
adding layers stops helping. :class:`PlainNet` is that family at a configurable depth and
small widths: ``depth`` 3x3 conv-BN-ReLU layers split evenly over the stages (the
later stages take the remainder), a 2x2 max pool after every stage but the last, global
average pooling and a linear classifier. Nothing skips a layer, so ``fxrelay.partition``
cuts one tensor per stage, one stage per resolution level.

Variants (``timm.create_model(name)`` once ``fxrelay.models`` is imported; any other
depth: ``timm.create_model("plainnet10", depth=d)`` or :func:`plain_cnn`): ``plainnet5``,
``plainnet10``, ``plainnet20``, ``plainnet30``, ``plainnet40``, ``plainnet60`` with the
default widths ``(8, 16, 32, 64, 64)``: five stages, for 32x32 inputs (32, 16, 8, 4, 2).

Example:
    >>> import timm, torch, fxrelay, fxrelay.models
    >>> model = timm.create_model("plainnet10", num_classes=10)
    >>> model(torch.randn(2, 3, 32, 32)).shape, model.layers_per_stage
    (torch.Size([2, 10]), [2, 2, 2, 2, 2])
    >>> [s.reduction for s in fxrelay.partition(model).stages]
    [1, 2, 4, 8, 16]
    >>> plain_cnn(12).layers_per_stage
    [2, 2, 2, 3, 3]
"""

from __future__ import annotations

from typing import Any, Sequence

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["PlainNet", "plain_cnn", "DEPTHS"]

DEPTHS = (5, 10, 20, 30, 40, 60)
"""The depths registered with timm as ``plainnet{depth}``."""

WIDTHS = (8, 16, 32, 64, 64)


class PlainNet(nn.Module):
    """A plain (no skip connection) VGG-style CNN: conv-BN-ReLU stages, max pools, average pool, linear.

    Args:
        depth: 3x3 convolutions in all, at least one per stage.
        widths: output channels of each stage's convolutions (one stage each).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        drop_rate: dropout before the classifier.

    Attributes:
        layers_per_stage: convolutions of each stage (``depth // stages``, the last
            ``depth % stages`` stages one more).
        feature_info: timm's per-stage channels, reductions and module names.
    """

    def __init__(self, depth: int = 10, widths: Sequence[int] = WIDTHS, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        if depth < len(widths):
            raise ValueError(f"depth must be at least the number of stages ({len(widths)}), got {depth}")
        self.depth, self.num_classes, self.drop_rate = depth, num_classes, drop_rate
        count = len(widths)
        self.layers_per_stage = [depth // count + (i >= count - depth % count) for i in range(count)]
        self.stages = nn.Sequential()
        self.feature_info = []
        channels = in_chans
        for i, (width, layers) in enumerate(zip(widths, self.layers_per_stage)):
            stage = nn.Sequential(nn.MaxPool2d(2)) if i else nn.Sequential()
            for _ in range(layers):
                stage.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                           nn.ReLU(inplace=True)))
                channels = width
            self.stages.append(stage)
            self.feature_info.append(dict(num_chs=width, reduction=2 ** i, module=f"stages.{i}"))
        self.num_features = self.head_hidden_size = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``global_pool`` is accepted for timm's API; pooling is average)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: Any) -> Any:
        return self.stages(x)

    def forward_head(self, x: Any, pre_logits: bool = False) -> Any:
        x = self.head_drop(self.pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Any) -> Any:
        return self.forward_head(self.forward_features(x))


def plain_cnn(depth: int, **kwargs: Any) -> PlainNet:
    """A :class:`PlainNet` of ``depth`` convolutions (``kwargs`` go to its constructor)."""
    return PlainNet(depth, **kwargs)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> PlainNet:
    if pretrained:
        raise ValueError(f"{variant} has no pretrained weights; use pretrained=False")
    return build_model_with_cfg(PlainNet, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    f"plainnet{d}": dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=None, crop_pct=1.0,
                         interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                         first_conv="stages.0.0.0", classifier="fc", license="mit")
    for d in DEPTHS
})


def _register(depth: int) -> None:
    def create(pretrained: bool = False, **kwargs: Any) -> PlainNet:
        return _create(f"plainnet{depth}", pretrained, **dict(dict(depth=depth), **kwargs))

    create.__name__ = create.__qualname__ = f"plainnet{depth}"
    create.__doc__ = f"A plain VGG-style CNN of {depth} 3x3 conv-BN-ReLU layers in five stages, 32x32 input."
    create.__module__ = __name__
    register_model(create)


for _depth in DEPTHS:
    _register(_depth)
