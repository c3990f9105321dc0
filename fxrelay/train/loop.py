"""The training loop behind the demo and the examples: one run, one optimizer, exact resume.

A :class:`Trainer` holds one run: the model, **one** optimizer for all epochs (timm's
``create_optimizer_v2``: SGD with Nesterov momentum or AdamW, no weight decay on norms
and biases), **one** per-iteration schedule (timm's ``CosineLRScheduler``: linear
warm-up, then cosine decay, updated after every optimizer step), cross-entropy with
label smoothing, optional bfloat16 autocast (``amp``) and an optional EMA of the
weights (timm's ``ModelEmaV3``). The loss code is the user's usual one; the only
fxrelay-specific lines read the per-head values for logging.

``Recipe(execution=...)`` picks how each step runs (:mod:`fxrelay.train.executions`: one-line,
recompute, local, sequential), all with the same loss. With ``Recipe(execution="sequential")`` a
greedy transform trains stage by stage
(:mod:`fxrelay.train.sequential`): each stage gets the same number of epochs and its own
cosine cycle (timm's ``cycle_limit``), and only stages ``0..k`` and head ``k`` run.
The stages not training keep their optimizer state (their gradients are ``None``).

:meth:`Trainer.state_dict` is plain data (tensors, lists, dicts, numbers, strings), so a
checkpoint loads with ``torch.load(path, weights_only=True)``: model, optimizer,
scheduler, EMA, epoch, update count, history, the recipe, the fxrelay plan's settings,
and the random states (torch, Python, NumPy, the loader's generators). Resuming after
epoch ``k`` gives bitwise the weights of the uninterrupted run (same machine and
threads, deterministic data). Each epoch appends a row per head to ``metrics.csv``
next to the checkpoint (train loss and accuracy, validation accuracy, EMA validation
accuracy, learning rate).

:func:`fit` is the one-call form.

Example:
    >>> model = fxrelay.transform(timm.create_model("resnet10t", num_classes=10))    # doctest: +SKIP
    >>> history = fit(model, train_loader, val_loader, epochs=3, checkpoint="out/run/checkpoint.pt")  # doctest: +SKIP
    >>> history.val_accuracy[-1]                                                    # doctest: +SKIP
    0.71
    >>> fit(model, train_loader, val_loader, epochs=3, checkpoint="out/run/checkpoint.pt",
    ...     resume=load_checkpoint("out/run/checkpoint.pt"))                         # doctest: +SKIP
"""

from __future__ import annotations

import csv
import fnmatch
import functools
import dataclasses
import math
import os
import pickle
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.modules import training_mode
from ..core.outputs import head_outputs
from ..core.plan import Plan
from ..passes.rewrite import is_transformed, plan_of
from .executions import StepOutcome, TrainingStep, check_execution
from .sequential import StageStep, check_sequential, greedy_schedule, prefix_cache, train_stage

__all__ = ["Recipe", "History", "Trainer", "fit", "evaluate", "evaluate_heads", "save_checkpoint",
           "load_checkpoint", "plan_settings", "no_weight_decay_names", "METRICS_COLUMNS", "write_metrics",
           "make_optimizer", "lr_schedule"]

CHECKPOINT_FORMAT = "fxrelay-training-1"


@dataclass(frozen=True)
class Recipe:
    """How to train: optimizer, schedule, loss, precision, weight averaging, stage schedule.

    Attributes:
        opt: timm optimizer name: ``"sgd"`` (SGD with Nesterov momentum), ``"adamw"``,
            or any other name ``timm.optim.create_optimizer_v2`` knows.
        lr: peak learning rate (after warm-up).
        weight_decay: applied to weights; norms, biases and the names given to
            :class:`Trainer` as ``no_weight_decay`` get none.
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
    execution: str = "one-line"
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
        check_execution(self.execution)
        if self.cache_prefix and self.execution != "sequential":
            raise ValueError("cache_prefix caches the frozen stages of the sequential schedule: set "
                             "execution='sequential'")


@dataclass
class History:
    """Per-epoch figures; per-head lists follow ``plan.heads`` (main head last).

    Plain data: ``History(**dataclasses.asdict(history))`` rebuilds it, and so does
    ``History(**checkpoint["history"])``. Heads that did not run in an epoch (the
    sequential schedule trains one) have NaN train figures.

    Attributes:
        head_stages: the stage each head reads.
        head_loss, head_accuracy: train loss and accuracy of each head, per epoch.
        val_head_accuracy: validation accuracy of each head (aux heads evaluated with
            the model in eval mode), per epoch.
        ema_val_head_accuracy: the same for the EMA weights (empty without EMA).
        stage: the stage trained in each epoch (None: all stages).
        lr: the learning rate of each epoch's last update.
        seconds: training time of each epoch (without validation).
    """

    head_stages: list[int] = field(default_factory=list)
    head_loss: list[list[float]] = field(default_factory=list)
    head_accuracy: list[list[float]] = field(default_factory=list)
    val_head_accuracy: list[list[float]] = field(default_factory=list)
    ema_val_head_accuracy: list[list[float]] = field(default_factory=list)
    stage: list[int | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def val_accuracy(self) -> list[float]:
        """The main head's validation accuracy, per epoch."""
        return [accs[-1] for accs in self.val_head_accuracy]

    @property
    def ema_val_accuracy(self) -> list[float]:
        """The EMA weights' main-head validation accuracy, per epoch (empty without EMA)."""
        return [accs[-1] for accs in self.ema_val_head_accuracy]


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


def plan_settings(model: nn.Module) -> dict[str, Any] | None:
    """The transformed model's plan as plain data (None for a plain model): what a resume must match."""
    if not is_transformed(model):
        return None
    plan = plan_of(model)
    return {"model": plan.model_name, "mode": plan.mode, "boundaries": plan.boundaries,
            "stages": [[list(s.shape), s.reduction] for s in plan.stages],
            "heads": [[h.stage, h.window[0], h.window[1], h.weight, h.kind] for h in plan.heads]}


def no_weight_decay_names(original: nn.Module, model: nn.Module) -> list[str]:
    """``model``'s names of the parameters ``original.no_weight_decay()`` lists (timm ViTs' position embeddings).

    Names or shell-style patterns, as timm's own optimizer factory reads them.

    ``model`` shares parameters with ``original`` (a transform of it); pass the result
    to :class:`Trainer` as ``no_weight_decay``. Empty when ``original`` lists none.
    """
    listed = set(getattr(original, "no_weight_decay", lambda: ())())
    exempt = {id(p) for name, p in original.named_parameters() if any(fnmatch.fnmatch(name, x) for x in listed)}
    return [name for name, p in model.named_parameters() if id(p) in exempt]


class Trainer:
    """One training run: the model, one optimizer and one LR schedule for all epochs, EMA.

    Args:
        model: a transformed model (any mode) or a plain one.
        train_loader: a DataLoader with a length (the schedule counts updates).
            Its sampler's ``set_epoch(epoch)`` is called before each epoch when it has one.
        epochs: the run's length (the schedule spans it).
        recipe: the :class:`Recipe` (default: ``Recipe()``).
        device: where the model, its EMA and the batches go.
        no_weight_decay: parameter names of ``model`` without weight decay, besides
            norms and biases (see :func:`no_weight_decay_names`).

    Attributes:
        optimizer, scheduler: built once; ``scheduler.step_update`` runs after every update.
        ema: timm's ``ModelEmaV3`` or None; ``ema.module`` is the averaged model.
        history: the :class:`History` so far.
        epoch: epochs completed; updates: optimizer steps taken.

    Raises:
        ValueError: a sequential recipe on a model that cannot train stage by stage, or
            ``epochs`` not a positive multiple of its stages.
    """

    def __init__(self, model: nn.Module, train_loader: DataLoader, epochs: int, recipe: Recipe | None = None, *,
                 device: str | torch.device = "cpu", no_weight_decay: Collection[str] = ()):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.recipe = recipe or Recipe()
        self.model, self.loader, self.epochs, self.device = model.to(device), train_loader, epochs, torch.device(device)
        self.steps_per_epoch = len(train_loader)
        self.plan: Plan | None = plan_of(model) if is_transformed(model) else None
        self.schedule = self._stage_schedule()
        self.optimizer = make_optimizer(self.recipe, param_groups_weight_decay(
            model, self.recipe.weight_decay, no_weight_decay_list=no_weight_decay))
        self.scheduler = self._lr_schedule()
        self.ema = ModelEmaV3(model, decay=self.recipe.ema_decay, use_warmup=True) if self.recipe.ema_decay else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.recipe.label_smoothing)
        self.history = History(head_stages=[h.stage for h in self.plan.heads] if self.plan else [0])
        self.epoch = 0
        self.updates = 0
        self._cache: tuple[int, DataLoader] | None = None
        self._step: TrainingStep | None = None

    def _stage_schedule(self) -> list[int] | None:
        check_execution(self.recipe.execution, self.model)
        if self.recipe.execution != "sequential":
            return None
        if self.plan is None:
            raise ValueError("the sequential schedule trains the stages of a model made by fxrelay.transform")
        check_sequential(self.plan)
        return greedy_schedule(len(self.plan.stages), self.epochs)

    def _lr_schedule(self) -> CosineLRScheduler:
        """Per-update warm-up and cosine; sequential: one cosine cycle per stage."""
        cycles = len(self.plan.stages) if self.schedule else 1
        return lr_schedule(self.optimizer, self.recipe, self.epochs * self.steps_per_epoch, self.steps_per_epoch,
                           cycles)

    @property
    def final_model(self) -> nn.Module:
        """The model to evaluate and deploy: the EMA weights when EMA is on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def describe(self) -> str:
        """What trains next, e.g. ``relay epoch 3/10`` or ``greedy stage 1/4, epoch 3/10``."""
        mode = self.plan.mode if self.plan else type(self.model).__name__
        if self.epoch >= self.epochs:
            return f"{mode}, all {self.epochs} epochs trained"
        stage = f" stage {self.schedule[self.epoch]}/{len(self.plan.stages) - 1}," if self.schedule else ""
        return f"{mode}{stage} epoch {self.epoch + 1}/{self.epochs}"

    def train_epoch(self, progress: bool = True) -> tuple[list[float], list[float], float]:
        """Train epoch ``self.epoch`` and advance.

        Returns:
            Each head's train loss and accuracy (NaN: the head did not run), and the
            learning rate of the epoch's last update.
        """
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        desc = self.describe()
        self.model.train()
        if self.schedule is None:
            if self._step is None:
                self._step = TrainingStep(self.model, self.criterion, self.recipe.execution, autocast=self._autocast)
            figures = self._run(self.loader, self._step, desc, progress)
        else:
            k = self.schedule[self.epoch]
            with train_stage(self.model, k) as step:
                if self.recipe.cache_prefix and k > 0:
                    figures = self._run(self._cached(step), functools.partial(self._from_prefix, step), desc, progress)
                else:
                    figures = self._run(self.loader, TrainingStep(self.model, self.criterion, "sequential", stage=k,
                                                                  autocast=self._autocast), desc, progress)
        self.epoch += 1
        return figures

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe.amp)

    def _from_prefix(self, step: StageStep, values: tuple[torch.Tensor, ...], y: torch.Tensor) -> StepOutcome:
        """The sequential step on cached prefix values."""
        with self._autocast():
            out = step.from_prefix(*values)
            loss = self.criterion(out, y)
        (loss if step.weight == 1 else step.weight * loss).backward()
        return StepOutcome([step.head], [loss.detach()], [out.detach()])

    def _cached(self, step: StageStep) -> DataLoader:
        if self._cache is None or self._cache[0] != step.stage:
            self._cache = None  # reason: free the previous stage's cache before filling the next
            self._cache = (step.stage, prefix_cache(step, self.loader, self.device))
        return self._cache[1]

    def _run(self, batches: Iterable, step: Callable[[Any, Any], StepOutcome], desc: str,
             progress: bool) -> tuple[list[float], list[float], float]:
        num_heads = len(self.history.head_stages)
        loss_sum = torch.zeros(num_heads, dtype=torch.float64, device=self.device)
        hits = torch.zeros(num_heads, dtype=torch.float64, device=self.device)
        ran: set[int] = set()
        seen = 0
        bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
        for x, y in bar:
            x = tuple(v.to(self.device) for v in x) if isinstance(x, tuple) else x.to(self.device)
            y = torch.as_tensor(y).to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            lr = self.optimizer.param_groups[0]["lr"]
            outcome = step(x, y)
            self.optimizer.step()
            self.updates += 1
            self.scheduler.step_update(self.updates)
            if self.ema is not None:
                self.ema.update(self.model, step=self.updates)
            rows = torch.tensor(outcome.heads, device=self.device)
            loss_sum[rows] += torch.stack([v.double() for v in outcome.losses]) * len(y)
            hits[rows] += torch.stack([(o.argmax(dim=1) == y).sum().double() for o in outcome.logits])
            ran.update(outcome.heads)
            seen += len(y)
            if progress:
                bar.set_postfix(loss=f"{float(outcome.losses[-1]):.3f}")
        losses, accs = [math.nan] * num_heads, [math.nan] * num_heads
        for row, (total, correct) in enumerate(zip((loss_sum / seen).tolist(), (hits / seen).tolist())):
            if row in ran:
                losses[row], accs[row] = total, correct
        return losses, accs, lr

    def fit(self, val_loader: Iterable, *, progress: bool = True, checkpoint: str | Path | None = None,
            metrics: str | Path | None = None, extra: dict[str, Any] | None = None,
            on_epoch_end: Callable[[int, History], None] | None = None) -> History:
        """Train the remaining epochs, validating after each.

        Args:
            val_loader: validation batches.
            progress: show a progress bar per epoch, labelled with :meth:`describe`.
            checkpoint: write :meth:`state_dict` here after every epoch (atomically).
            metrics: write the per-head CSV here after every epoch (default: ``metrics.csv``
                next to ``checkpoint``; none without either).
            extra: plain data stored in the checkpoint under ``"extra"`` (a script's arguments).
            on_epoch_end: ``callback(epoch, history)`` after each epoch's checkpoint.
        """
        if metrics is None and checkpoint is not None:
            metrics = Path(checkpoint).with_name("metrics.csv")
        while self.epoch < self.epochs:
            stage = self.schedule[self.epoch] if self.schedule else None
            tic = time.perf_counter()
            losses, accs, lr = self.train_epoch(progress)
            seconds = time.perf_counter() - tic
            h = self.history
            h.head_loss.append(losses)
            h.head_accuracy.append(accs)
            h.stage.append(stage)
            h.lr.append(lr)
            h.seconds.append(seconds)
            h.val_head_accuracy.append(evaluate_heads(self.model, val_loader, self.device))
            if self.ema is not None:
                h.ema_val_head_accuracy.append(evaluate_heads(self.ema.module, val_loader, self.device))
            if checkpoint is not None:
                save_checkpoint(self.state_dict(extra), checkpoint)
            if metrics is not None:
                write_metrics(h, metrics)
            if on_epoch_end is not None:
                on_epoch_end(self.epoch - 1, h)
        return self.history

    def state_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole run as plain data (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "epochs": self.epochs,
            "updates": self.updates,
            "steps_per_epoch": self.steps_per_epoch,
            "recipe": dataclasses.asdict(self.recipe),
            "plan": plan_settings(self.model),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "history": dataclasses.asdict(self.history),
            "rng": _rng_state(self.loader),
            "extra": dict(extra or {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run of ``state`` (call right before training: it restores the random states).

        A different ``epochs`` than the checkpoint's is allowed (with a warning): the
        schedule is recomputed for the new length from the update reached.

        Raises:
            ValueError: not a training checkpoint, written for a different plan, recipe
                or number of updates per epoch, or past ``epochs`` already.
        """
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not an fxrelay training checkpoint (format {state.get('format')!r}, "
                             f"expected {CHECKPOINT_FORMAT!r})")
        _require_same("plan", state["plan"], plan_settings(self.model))
        _require_same("recipe", state["recipe"], dataclasses.asdict(self.recipe))
        _require_same("updates per epoch (batch size, dataset)", state["steps_per_epoch"], self.steps_per_epoch)
        if state["epoch"] > self.epochs:
            raise ValueError(f"the checkpoint has trained {state['epoch']} epochs, more than the {self.epochs} "
                             "asked for")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.updates = state["epoch"], state["updates"]
        if state["epochs"] == self.epochs:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            warnings.warn(f"resuming a {state['epochs']}-epoch run for {self.epochs} epochs: the learning-rate "
                          f"schedule{' and the stage schedule are' if self.schedule else ' is'} recomputed for "
                          f"{self.epochs} epochs from update {self.updates}", stacklevel=2)
            self.scheduler.step_update(self.updates)
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.history = History(**state["history"])
        self._cache = None
        _set_rng_state(state["rng"], self.loader)


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


def make_optimizer(recipe: Recipe, params: Iterable[nn.Parameter] | list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The recipe's timm optimizer over ``params`` (parameters, or parameter groups); a plain list
    of parameters gets timm's rule: no weight decay on biases and norms (1-D parameters)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return create_optimizer_v2(params, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                               momentum=recipe.momentum)


def _require_same(what: str, stored: Any, current: Any) -> None:
    if stored == current:
        return
    if isinstance(stored, dict) and isinstance(current, dict):
        diff = ", ".join(f"{k}: {stored.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                         for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k))
    else:
        diff = f"{stored!r} in the checkpoint, {current!r} now"
    raise ValueError(f"the checkpoint is from a run with a different {what} ({diff}); resume with the same "
                     "settings or start a new run")


def fit(model: nn.Module, train_loader: DataLoader, val_loader: Iterable, epochs: int, *,
        recipe: Recipe | None = None, device: str | torch.device = "cpu", progress: bool = True,
        checkpoint: str | Path | None = None, metrics: str | Path | None = None,
        resume: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
        on_epoch_end: Callable[[int, History], None] | None = None,
        no_weight_decay: Collection[str] = ()) -> History:
    """Train ``model`` (transformed or plain) for ``epochs``, validating after each; see :class:`Trainer`.

    Args:
        recipe: optimizer, schedule, AMP, EMA, sequential (default ``Recipe()``).
        checkpoint: write the run here after every epoch, and ``metrics.csv`` next to it.
        metrics: write the per-head CSV here instead (also without a checkpoint).
        resume: a checkpoint (:func:`load_checkpoint`) to continue from.
        extra, on_epoch_end: see :meth:`Trainer.fit`.
    """
    trainer = Trainer(model, train_loader, epochs, recipe, device=device, no_weight_decay=no_weight_decay)
    if resume is not None:
        trainer.load_state_dict(resume)
    return trainer.fit(val_loader, progress=progress, checkpoint=checkpoint, metrics=metrics, extra=extra,
                       on_epoch_end=on_epoch_end)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (a crash mid-write leaves the previous checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :class:`Trainer`, loaded with ``weights_only=True`` onto the CPU.

    Raises:
        ValueError: the file is not a training checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not an fxrelay training checkpoint (it holds objects that only unsafe "
                         "unpickling loads)") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an fxrelay training checkpoint")
    return state


METRICS_COLUMNS = ("epoch", "trained_stage", "head", "head_stage", "main", "train_loss", "train_accuracy",
                   "val_accuracy", "ema_val_accuracy", "lr", "seconds")


def write_metrics(history: History, path: str | Path) -> None:
    """The per-head CSV: one row per epoch and head (:data:`METRICS_COLUMNS`); empty cells: not measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_COLUMNS)
        writer.writerows(_metric_rows(history))


def _metric_rows(h: History) -> Iterator[list[str]]:
    last = len(h.head_stages) - 1
    for e in range(len(h.seconds)):
        ema = h.ema_val_head_accuracy[e] if h.ema_val_head_accuracy else [math.nan] * (last + 1)
        for j, stage in enumerate(h.head_stages):
            yield [str(e + 1), "" if h.stage[e] is None else str(h.stage[e]), str(j), str(stage), str(int(j == last)),
                   *(_cell(v) for v in (h.head_loss[e][j], h.head_accuracy[e][j], h.val_head_accuracy[e][j], ema[j],
                                         h.lr[e])), f"{h.seconds[e]:.2f}"]


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def _generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch generators a loader draws from: its own, its sampler's, its batch sampler's."""
    found: dict[int, torch.Generator] = {}
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


def _rng_state(loader: Any) -> dict[str, Any]:
    np = sys.modules.get("numpy")  # reason: a process that never imported NumPy has not drawn from it
    numpy_state = None
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": numpy_state,
        "loader": [g.get_state() for g in _generators(loader)],
    }


def _set_rng_state(state: dict[str, Any], loader: Any) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, version, gauss = state["python"]
    random.setstate((kind, tuple(version), gauss))
    if state["numpy"] is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generators = _generators(loader)
    if len(generators) != len(state["loader"]):
        raise ValueError(f"the checkpoint holds {len(state['loader'])} data-loader generator states, the loader "
                         f"has {len(generators)} generators: build the loader as in the checkpointed run")
    for g, s in zip(generators, state["loader"]):
        g.set_state(s)

