"""The recipe's optimizer and learning-rate schedule (timm's), and the parameters without weight decay."""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from .recipe import Recipe

__all__ = ["make_optimizer", "lr_schedule", "no_weight_decay_names"]


def make_optimizer(recipe: Recipe, params: Iterable[nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The recipe's timm optimizer over ``params`` (parameters, or parameter groups); a plain list
    of parameters gets timm's rule: no weight decay on biases and norms (1-D parameters)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return create_optimizer_v2(params, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               momentum=recipe.momentum)



def lr_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, updates: int, updates_per_epoch: int,
                cycles: int = 1) -> CosineLRScheduler:
    """The recipe's per-update schedule: linear warm-up, then cosine, ``cycles`` times over ``updates``.

    Raises:
        ValueError: the warm-up is not shorter than a cycle.
    """
    warmup = round(recipe.warmup_epochs * updates_per_epoch)
    if warmup >= updates // cycles:
        raise ValueError(f"the warm-up ({warmup} updates) must be shorter than the cosine "
                         f"({updates // cycles} updates{' per stage' if cycles > 1 else ''}): "
                         f"lower warmup_epochs ({recipe.warmup_epochs})")
    # reason: warmup_prefix=False keeps the warm-up inside the first cycle, so cycles start with the stages
    return CosineLRScheduler(optimizer, t_initial=updates // cycles, lr_min=recipe.min_lr, cycle_limit=cycles,
                             warmup_t=warmup, warmup_lr_init=recipe.warmup_start * recipe.lr, t_in_epochs=False)



def no_weight_decay_names(original: nn.Module, model: nn.Module) -> list[str]:
    """``model``'s names of the parameters ``original.no_weight_decay()`` lists (timm ViTs' position embeddings).

    Names or shell-style patterns, as timm's own optimizer factory reads them.

    ``model`` shares parameters with ``original`` (a transform of it); pass the result
    to :class:`~fxrelay.train.loop.Trainer` as ``no_weight_decay``. Empty when ``original`` lists none.
    """
    listed = set(getattr(original, "no_weight_decay", lambda: ())())
    exempt = {id(p) for name, p in original.named_parameters() if any(fnmatch.fnmatch(name, x) for x in listed)}
    return [name for name, p in model.named_parameters() if id(p) in exempt]
