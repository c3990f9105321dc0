"""Top-1 accuracy of a model, or of every head of a transformed model, in eval mode."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..core.modules import training_mode
from ..core.outputs import head_outputs
from ..passes.rewrite import is_transformed

__all__ = ["evaluate", "evaluate_heads"]


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` in eval mode (the main head of a transformed model)."""
    return _accuracies(model, loader, device, heads=False)[-1]


def evaluate_heads(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> list[float]:
    """Top-1 accuracy of every head of a transformed model in eval mode, aligned with ``plan.heads``.

    The aux heads run on the eval-mode stages (BatchNorm with running statistics, no
    dropout); the last entry is :func:`evaluate`'s. A model without aux heads gives one entry.
    """
    return _accuracies(model, loader, device, heads=True)


def _accuracies(model: nn.Module, loader: Iterable, device: str | torch.device, heads: bool) -> list[float]:
    hits: torch.Tensor | None = None
    total = 0
    with training_mode(model, False), torch.no_grad():
        if heads and is_transformed(model):
            for aux in model.heads:
                aux.training = True  # reason: the wrapper runs its body (which stays in eval mode)
        for x, y in loader:
            x, y = x.to(device), torch.as_tensor(y).to(device)
            correct = torch.stack([(o.argmax(dim=1) == y).sum() for o in head_outputs(model(x))])
            hits = correct if hits is None else hits + correct
            total += len(y)
    return [0.0] if hits is None else (hits.double() / total).tolist()
