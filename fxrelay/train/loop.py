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

:func:`fit` is the one-call form. The run's parts live one concern a module beside this
one: the :class:`~fxrelay.train.recipe.Recipe`, the optimizer and schedule factories
(:mod:`fxrelay.train.optimizers`), :mod:`~fxrelay.train.evaluation`, the
:class:`~fxrelay.train.history.History` and its CSV, and the checkpoint files and random
states (:mod:`fxrelay.train.checkpoints`).

Example:
    >>> model = fxrelay.transform(timm.create_model("resnet10t", num_classes=10))    # doctest: +SKIP
    >>> history = fit(model, train_loader, val_loader, epochs=3, checkpoint="out/run/checkpoint.pt")  # doctest: +SKIP
    >>> history.val_accuracy[-1]                                                    # doctest: +SKIP
    0.71
    >>> fit(model, train_loader, val_loader, epochs=3, checkpoint="out/run/checkpoint.pt",
    ...     resume=fxrelay.train.checkpoints.load_checkpoint("out/run/checkpoint.pt"))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Iterable

import torch
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.plan import Plan
from ..passes.rewrite import is_transformed, plan_of
from .checkpoints import CHECKPOINT_FORMAT, check_resumable, plan_settings, rng_state, save_checkpoint, set_rng_state
from .evaluation import evaluate_heads
from .executions import StepOutcome, TrainingStep, check_execution
from .history import History, write_metrics
from .optimizers import lr_schedule, make_optimizer
from .recipe import Recipe
from .sequential import StageStep, check_sequential, greedy_schedule, prefix_cache, train_stage

__all__ = ["Trainer", "fit"]


class Trainer:
    """One training run: the model, one optimizer and one LR schedule for all epochs, EMA.

    Args:
        model: a transformed model (any mode) or a plain one.
        train_loader: a DataLoader with a length (the schedule counts updates).
            Its sampler's ``set_epoch(epoch)`` is called before each epoch when it has one.
        epochs: the run's length (the schedule spans it).
        recipe: the :class:`~fxrelay.train.recipe.Recipe` (default: ``Recipe()``).
        device: where the model, its EMA and the batches go.
        no_weight_decay: parameter names of ``model`` without weight decay, besides
            norms and biases (see :func:`~fxrelay.train.optimizers.no_weight_decay_names`).

    Attributes:
        optimizer, scheduler: built once; ``scheduler.step_update`` runs after every update.
        ema: timm's ``ModelEmaV3`` or None; ``ema.module`` is the averaged model.
        history: the :class:`~fxrelay.train.history.History` so far.
        epoch: epochs completed; updates: optimizer steps taken.

    Raises:
        ValueError: a sequential recipe on a model that cannot train stage by stage, or
            ``epochs`` not a positive multiple of its stages.
    """

    def __init__(self, model: nn.Module, train_loader: DataLoader, epochs: int, recipe: Recipe | None = None, *,
                 device: str | torch.device = "cpu", no_weight_decay: Collection[str] = ()):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.plan: Plan | None = plan_of(model) if is_transformed(model) else None
        self.recipe = _with_execution(recipe or Recipe(), self.plan)
        self.model, self.loader, self.epochs, self.device = model.to(device), train_loader, epochs, torch.device(device)
        self.steps_per_epoch = len(train_loader)
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
            "rng": rng_state(self.loader),
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
        check_resumable(state, self.model, self.recipe, self.steps_per_epoch, self.epochs)
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
        set_rng_state(state["rng"], self.loader)



def _with_execution(recipe: Recipe, plan: Plan | None) -> Recipe:
    """``recipe`` with its execution named: the plan's (one-line for a plain model) when it gives none."""
    if recipe.execution is not None:
        return recipe
    return dataclasses.replace(recipe, execution=plan.execution if plan is not None else "one-line")


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
        resume: a checkpoint (:func:`~fxrelay.train.checkpoints.load_checkpoint`) to continue from.
        extra, on_epoch_end: see :meth:`Trainer.fit`.
    """
    trainer = Trainer(model, train_loader, epochs, recipe, device=device, no_weight_decay=no_weight_decay)
    if resume is not None:
        trainer.load_state_dict(resume)
    return trainer.fit(val_loader, progress=progress, checkpoint=checkpoint, metrics=metrics, extra=extra,
                       on_epoch_end=on_epoch_end)
