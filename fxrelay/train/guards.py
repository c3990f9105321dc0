"""Run-time guards against silent wrong training that only show once training runs.

A global optimizer step pre-hook warns, once per model, when the aux heads of a
transformed model get gradients but no optimizer steps them (the optimizer was built
before :func:`fxrelay.transform`, so relay's lower stages would learn from random heads).
Importing this module subscribes :func:`watch_heads` to every transform
(:mod:`fxrelay.core.events`); the hook is registered with the first transformed model, so
``import fxrelay`` touches no optimizer (``fxrelay.transform`` reached through the
package imports this module first).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ..core.events import on_transform

__all__ = ["watch_heads"]

_live_models: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def watch_heads(model: nn.Module) -> None:
    """Check, from the second step of any optimizer that trains ``model``'s stages on, that some
    optimizer also steps its aux heads."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_step_pre_hook)
    _live_models.add(model)


def _step_pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Warn once per model when a transformed model's aux heads have gradients that no optimizer steps."""
    _steps[optimizer] = _steps.get(optimizer, 0) + 1
    if _steps[optimizer] < 2 or not _live_models:
        return  # reason: on a first step, the heads may be in another optimizer not yet stepped
    stepped = {id(p) for opt in _steps for group in opt.param_groups for p in group["params"]}
    mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model in list(_live_models):
        heads = list(model.heads.parameters())
        if model in _warned or not heads or not any(id(p) in mine for p in model.stages.parameters()):
            continue
        if any(p.grad is not None for p in heads) and not any(id(p) in stepped for p in heads):
            _warned.add(model)
            warnings.warn("fxrelay: the aux heads of a transformed model get gradients but are in no optimizer, "
                          "so they never train: build the optimizer after fxrelay.transform(model), or pass "
                          "transform(model, optimizer=opt), or add fxrelay.head_parameters(model) to it",
                          UserWarning, stacklevel=3)


_steps: "weakref.WeakKeyDictionary[torch.optim.Optimizer, int]" = weakref.WeakKeyDictionary()
_warned: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_hook: RemovableHandle | None = None
on_transform(watch_heads)
