"""How a run trains: the :class:`Recipe` (optimizer, schedule, loss, precision, EMA, execution).

A recipe is plain settings, checked when made; :class:`~fxrelay.train.loop.Trainer` builds
the run from it and a checkpoint stores it (``dataclasses.asdict``), so a resume can tell a
changed recipe from the same one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .executions import check_execution

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """How to train: optimizer, schedule, loss, precision, weight averaging, stage schedule.

    Attributes:
        opt: timm optimizer name: ``"sgd"`` (SGD with Nesterov momentum), ``"adamw"``,
            or any other name ``timm.optim.create_optimizer_v2`` knows.
        lr: peak learning rate (after warm-up).
        weight_decay: applied to weights; norms, biases and the names given to
            :class:`~fxrelay.train.loop.Trainer` as ``no_weight_decay`` get none.
        momentum: momentum of SGD-type optimizers.
        warmup_epochs: linear warm-up length, from ``warmup_start * lr`` up to ``lr``
            (may be fractional; 0 for none).
        warmup_start: the first update's learning rate, as a fraction of ``lr``.
        min_lr: the learning rate the cosine decays to.
        label_smoothing: of the cross-entropy loss.
        amp: bfloat16 autocast for the forward and the loss (CPU and CUDA; bfloat16
            has float32's range, so no gradient scaling is needed).
        ema_decay: 0 for no EMA; else the decay of timm's ``ModelEmaV3`` (with its
            decay warm-up, so short runs average too).
        execution: how each step runs: ``"one-line"``, ``"recompute"``, ``"local"`` or
            ``"sequential"`` (one stage at a time, greedy transforms,
            :mod:`fxrelay.train.sequential`); see :mod:`fxrelay.train.executions`.
            Default (``None``): the execution the model was transformed for
            (``fxrelay.transform(..., execution=...)``, whose stages serve it); one-line for
            a model fxrelay did not transform.
        sequential: deprecated alias of ``execution="sequential"``.
        cache_prefix: sequential only: compute the frozen prefix's outputs once per
            stage (deterministic data only; memory: the dataset times one stage input).
    """

    opt: str = "sgd"
    lr: float = 0.05
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    warmup_start: float = 0.1
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    amp: bool = False
    ema_decay: float = 0.0
    execution: str | None = None
    sequential: bool = False
    cache_prefix: bool = False

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or not 0 < self.warmup_start <= 1:
            raise ValueError(f"warmup_epochs must be >= 0 and warmup_start in (0, 1], got {self.warmup_epochs} "
                             f"and {self.warmup_start}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.sequential:
            warnings.warn("Recipe(sequential=True) is deprecated; use Recipe(execution='sequential')",
                          DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "execution", "sequential")
            object.__setattr__(self, "sequential", False)  # reason: one field says how steps run
        if self.execution is not None:
            check_execution(self.execution)
        if self.cache_prefix and self.execution not in (None, "sequential"):
            raise ValueError("cache_prefix caches the frozen stages of the sequential schedule: set "
                             "execution='sequential'")
