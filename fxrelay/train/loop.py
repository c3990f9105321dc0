"""A plain training loop with per-head logging, shared by the examples and the demo.

The loop is the one users already have (SGD, cross-entropy with label smoothing,
``loss.backward()``, accuracy via argmax); the only fxrelay-specific lines read the
per-head values for logging. :func:`fit` trains and validates for some epochs and
returns the :class:`History`.

Example:
    >>> model = fxrelay.transform(timm.create_model("resnet10t", num_classes=10))  # doctest: +SKIP
    >>> history = fit(model, train_loader, val_loader, epochs=3)                  # doctest: +SKIP
    >>> history.val_accuracy[-1]                                                  # doctest: +SKIP
    0.71
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.outputs import head_losses, head_outputs
from ..passes.rewrite import plan_of
from .local import greedy_schedule, train_only

__all__ = ["History", "fit", "evaluate"]


@dataclass
class History:
    """Per-epoch figures: ``head_loss[e][j]`` and ``head_accuracy[e][j]`` follow ``plan.heads``."""

    head_loss: list[list[float]] = field(default_factory=list)
    head_accuracy: list[list[float]] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(dim=1) == y).sum().item()
            total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable, epochs: int, *, lr: float = 0.05,
        label_smoothing: float = 0.1, local_step: bool = False, device: str | torch.device = "cpu",
        progress: bool = True, start_epoch: int = 0, history: History | None = None,
        on_epoch_end=None) -> History:
    """Train ``model`` (a transformed or plain model) with SGD and cosine decay.

    Args:
        local_step: the sequential greedy schedule (:mod:`fxrelay.local`): one stage
            at a time, the ones below frozen.
        start_epoch, history: resume from a checkpoint.
        on_epoch_end: ``callback(epoch, history)`` (checkpointing).
    """
    history = history or History()
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    schedule = greedy_schedule(len(plan_of(model).stages), epochs) if local_step else [None] * epochs
    model.to(device).train()
    for epoch in range(start_epoch, epochs):
        epoch_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        desc = f"epoch {epoch + 1}/{epochs}" + (f" stage {schedule[epoch]}" if local_step else "")
        tic = time.perf_counter()
        with _trainable(model, schedule[epoch]) as params:
            optimizer = torch.optim.SGD(params, lr=epoch_lr, momentum=0.9, weight_decay=5e-4)
            losses, accs = _epoch(model, optimizer, train_loader, criterion, device, progress, desc)
        history.seconds.append(time.perf_counter() - tic)
        history.head_loss.append(losses)
        history.head_accuracy.append(accs)
        history.val_accuracy.append(evaluate(model, val_loader, device))
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
    return history


def _trainable(model: nn.Module, stage: int | None):
    return train_only(model, stage) if stage is not None else contextlib.nullcontext(list(model.parameters()))


def _epoch(model, optimizer, loader, criterion, device, progress, desc) -> tuple[list[float], list[float]]:
    sums: list[float] = []
    hits: list[float] = []
    seen = 0
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False)
    for x, y in bar:
        x, y = x.to(device), y.to(device)
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        values = head_losses(loss)
        correct = [(o.argmax(dim=1) == y).sum().item() for o in head_outputs(out)]
        sums = [a + v * len(y) for a, v in zip(sums, values)] if sums else [v * len(y) for v in values]
        hits = [a + c for a, c in zip(hits, correct)] if hits else [float(c) for c in correct]
        seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return [s / seen for s in sums], [h / seen for h in hits]
