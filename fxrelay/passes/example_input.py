"""The example input fxrelay makes for a model when none is given: its declared size, dtype and device."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["default_example_input"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A seeded random batch of one in the size, dtype and device ``model`` declares.

    The channels are timm's ``in_chans``, else the first convolution's, else 3; the
    spatial size comes from, in order: a timm ``patch_embed.img_size`` (models built with
    ``img_size=...``), a torchvision ``image_size``, timm's ``pretrained_cfg["input_size"]``,
    else 224. A model that declares none of these and has no convolution but a ``Linear``
    gets ``(1, in_features)`` of its first one. The dtype and device are those of the first
    floating-point parameter.

    >>> default_example_input(nn.Sequential(nn.Linear(5, 2))).shape
    torch.Size([1, 5])
    """
    size = _declared_input_size(model)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    sample = torch.randn(1, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return sample.to(device=param.device if param is not None else "cpu", dtype=dtype)


def _declared_input_size(model: nn.Module) -> tuple[int, ...]:
    spatial = _declared_spatial_size(model)
    # reason: timm's in_chans, not the first convolution's, when a stem rearranges pixels into channels (tresnet)
    channels = getattr(model, "in_chans", None)
    first = next((m for m in model.modules() if isinstance(m, _CONVS)), None)
    if first is None and spatial is None and not isinstance(channels, int):
        linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if linear is not None:
            return (linear.in_features,)
    if not isinstance(channels, int):
        channels = first.in_channels if first is not None else 3
    dims = first.weight.dim() - 2 if first is not None else 2
    return (channels, *(spatial or (224,) * dims))


def _declared_spatial_size(model: nn.Module) -> tuple[int, ...] | None:
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:  # reason: timm models built with img_size=... keep their pretrained_cfg's size
        return tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if isinstance(getattr(model, "image_size", None), int):  # reason: torchvision's VisionTransformer
        return (model.image_size,) * 2
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return tuple(cfg["input_size"][1:]) if "input_size" in cfg else None
