"""One training step (forward and backward, no optimizer step), run by any execution.

The names are :data:`fxrelay.core.choices.EXECUTIONS`; every execution computes the
gradient of the same loss (the one-line ``criterion(model(x), y).backward()``) and
reports the same figures:

* ``"one-line"``: ``criterion(model(x), y).backward()``;
* ``"recompute"``: the same on the model's recompute view
  (:func:`fxrelay.passes.rewrite.recompute_view`: the same modules, stage recompute on),
  so a model transformed without recompute need not be transformed again;
* ``"local"``: :class:`fxrelay.LocalStep` (each head's loss backpropagated early);
* ``"sequential"``: the sequential greedy schedule's step for one stage ``k``
  (:class:`~fxrelay.train.stagerun.StageRunner` with ``only=k``; call it inside
  :func:`~fxrelay.train.sequential.train_stage`).

Example:
    >>> import fxrelay, torch, torchvision
    >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "greedy")
    >>> step = TrainingStep(model, torch.nn.CrossEntropyLoss(), "local")
    >>> outcome = step(torch.randn(2, 3, 32, 32), torch.tensor([3, 7]))
    >>> outcome.heads, len(outcome.losses)
    ([0, 1, 2, 3, 4], 5)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, NamedTuple

import torch
from torch import nn

from ..core.choices import EXECUTIONS
from ..core.outputs import head_outputs
from ..passes.rewrite import check_execution_name, is_transformed, plan_of, recompute_view
from .localstep import LocalStep
from .stagerun import StageRunner

__all__ = ["EXECUTIONS", "StepOutcome", "TrainingStep", "check_execution"]


class StepOutcome(NamedTuple):
    """What one step computed, per head that ran.

    Attributes:
        heads: the indices (in ``plan.heads``) of the heads that ran.
        losses: their unweighted losses, detached.
        logits: their logits, detached.
    """

    heads: list[int]
    losses: list[torch.Tensor]
    logits: list[torch.Tensor]


def check_execution(execution: str, model: nn.Module | None = None) -> None:
    """Raise unless ``execution`` is a name of :data:`EXECUTIONS` that can run ``model``.

    Raises:
        ValueError: an unknown name, or an execution other than one-line on a model not
            made by :func:`fxrelay.transform`.
    """
    check_execution_name(execution)
    if model is not None and execution != "one-line" and not is_transformed(model):
        raise ValueError(f"execution={execution!r} runs the stages of a model made by fxrelay.transform: "
                         "transform the model, or use execution='one-line'")


class TrainingStep:
    """Forward and backward of one batch with the chosen execution (gradients into ``.grad``).

    Args:
        model: the model (a plain model only with ``"one-line"``).
        criterion: ``criterion(output, target) -> scalar``, applied to every head.
        execution: a name of :data:`EXECUTIONS`.
        stage: the stage the sequential step trains (``"sequential"`` only).
        autocast: a context manager factory for the forward and the loss (mixed precision).
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Any, Any], torch.Tensor], execution: str = "one-line",
                 *, stage: int | None = None, autocast: Callable[[], ContextManager] = contextlib.nullcontext):
        check_execution(execution, model)
        if (stage is None) != (execution != "sequential"):
            raise ValueError("stage= is the stage the sequential step trains: give it with execution='sequential' "
                             "only")
        self.model, self.criterion, self.execution, self.autocast = model, criterion, execution, autocast
        self._forward = recompute_view(model) if execution == "recompute" else model
        self._engine: Any = None
        if execution == "local":
            self._engine = LocalStep(model, criterion)
        elif execution == "sequential":
            self._engine = StageRunner(model, criterion, only=stage)

    def __call__(self, x: Any, y: Any) -> StepOutcome:
        """One forward and backward on ``(x, y)``."""
        if self.execution in ("one-line", "recompute"):
            self._forward.train(self.model.training)
            with self.autocast():
                out = self._forward(x)
                loss = self.criterion(out, y)
            loss.backward()
            losses, logits = head_outputs(loss), head_outputs(out)
            return StepOutcome(list(range(len(losses))), [v.detach() for v in losses],
                               [v.detach() for v in logits])
        with self.autocast():
            if self.execution == "local":
                result = self._engine(x, y)
                heads = [h.index for h in plan_of(self.model).heads]
                return StepOutcome(heads, list(result.losses), [result.head_logits[j] for j in heads])
            runner: StageRunner = self._engine
            inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            result = runner.finish(runner.forward(runner.micro_batch(inputs, y)))
        heads = sorted(result.losses)
        return StepOutcome(heads, [result.losses[j] for j in heads], [result.logits[j] for j in heads])
