"""Models by name: timm names (``resnet50``) and torchvision ones (``tv:resnet18``), random weights.

The command line, the demo, :class:`fxrelay.ModelSpec` and the examples build models
here. Importing this module is cheap: timm, torchvision and torch are imported by the
functions that need them (``fxrelay --help`` must not wait for them).

Example:
    >>> model = load_model("tv:resnet18", num_classes=10)
    >>> example_input(model, 64).shape
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TORCHVISION_PREFIX", "UnknownModelError", "known_models", "check_model_name", "load_model",
           "example_input"]

TORCHVISION_PREFIX = "tv:"


class UnknownModelError(ValueError):
    """A model name that neither timm nor torchvision (``tv:NAME``) knows."""


def known_models() -> list[str]:
    """Every name :func:`load_model` accepts: timm names and ``tv:`` torchvision names."""
    import timm
    import torchvision.models as tvm

    return timm.list_models() + [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError`, listing close matches, unless :func:`load_model` knows ``name``.

    Example:
        >>> check_model_name("resnet_10t")
        Traceback (most recent call last):
        ...
        fxrelay.io.zoo.UnknownModelError: unknown model 'resnet_10t'; did you mean resnet10t, ...
    """
    if _torchvision_name(name) is not None:
        return
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, known_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (timm names, or tv:NAME for torchvision)"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def load_model(name: str, input_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model, or a torchvision one for ``tv:NAME``, with random weights, in eval mode.

    A timm model with a fixed input size is built for ``input_size`` when it takes an
    ``img_size`` argument. ``kwargs`` (``num_classes=10``) go to the model's constructor.

    Raises:
        UnknownModelError: unknown name (the message lists close matches).

    Example:
        >>> type(load_model("tv:resnet18")).__name__
        'ResNet'
    """
    check_model_name(name)
    tv_name = _torchvision_name(name)
    if tv_name is not None:
        import torchvision.models as tvm

        return tvm.get_model(tv_name, weights=None, **kwargs).eval()
    import timm

    default = timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    if input_size is not None and input_size != default[-1]:
        try:
            return timm.create_model(name, pretrained=False, img_size=input_size, **kwargs).eval()
        except TypeError:  # reason: models without img_size take any size or only their own
            pass
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def example_input(model: nn.Module, input_size: int | None = None) -> torch.Tensor:
    """A seeded random batch of one: ``input_size`` px square, else the model's default size."""
    import torch

    from ..passes.tracing import default_example_input

    if input_size is None:
        return default_example_input(model)
    channels = default_example_input(model).shape[1]
    return torch.randn(1, channels, input_size, input_size, generator=torch.Generator().manual_seed(0))


def _torchvision_name(name: str) -> str | None:
    """``resnet18`` for ``tv:resnet18`` when torchvision has it, else None."""
    if not name.startswith(TORCHVISION_PREFIX):
        return None
    import torchvision.models as tvm

    tv_name = name[len(TORCHVISION_PREFIX):]
    return tv_name if tv_name in tvm.list_models(module=tvm) else None
