"""A training step that backpropagates each head's loss as soon as its window is complete.

The one-line step keeps the whole forward for one backward at the end, so local
learning saves no memory with it. :class:`LocalStep` runs the same step stage by stage
(:mod:`fxrelay.train.stagerun`) and frees every activation that no remaining window needs:

* ``greedy``: a stage's activations are freed right after its own head's loss was
  backpropagated; at most one stage (plus its head) is alive;
* ``relay``: a stage's activations live until the last window containing it was
  backpropagated (the stages of one window and the next);
* ``deep`` (and ``standard``): every loss reaches stage 0, so everything lives until the
  end, as in the one-line step.

Gradients equal the one-line ``criterion(model(x), y).backward()`` of the same model, in
the same backward FLOPs (an overlap stage of relay: one parameter pass with the sum of
its channels, one input pass per channel continuing below).

Example:
    >>> import fxrelay, torch, torchvision
    >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "greedy")
    >>> step = fxrelay.LocalStep(model, torch.nn.CrossEntropyLoss())
    >>> result = step(torch.randn(2, 3, 32, 32), torch.tensor([3, 7]))   # then optimizer.step()
    >>> len(result.losses), tuple(result.logits.shape)
    (5, (2, 10))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..passes.rewrite import is_transformed, plan_of
from .stagerun import AllReduceSink, StageRunner

__all__ = ["LocalStep", "LocalStepResult"]


@dataclass(frozen=True)
class LocalStepResult:
    """What one :class:`LocalStep` call computed.

    Attributes:
        losses: per head (aligned with ``plan.heads``, main head last), its unweighted
            loss, detached.
        logits: the main head's output, detached.
        head_logits: per head (aligned with ``losses``), its logits, detached.
    """

    losses: tuple[torch.Tensor, ...]
    logits: Any
    head_logits: tuple[torch.Tensor, ...] = ()

    @property
    def loss(self) -> float:
        """The main head's loss (what ``loss.item()`` shows in the one-line loop)."""
        return float(self.losses[-1])


class LocalStep:
    """Forward and backward of a transformed model with each head's loss backpropagated early.

    ``result = step(x, y)`` replaces ``loss = criterion(model(x), y); loss.backward()``:
    parameter gradients are accumulated into ``.grad`` (through autograd, so gradient
    accumulation over several calls, ``post_accumulate_grad`` hooks and
    ``optimizer.step()`` work as usual) and equal the one-line step's. Call
    ``optimizer.zero_grad()`` and ``optimizer.step()`` around it as before.

    Mixed precision: call it under ``torch.autocast`` like the one-line forward; with
    ``grad_scaler`` each head's weighted loss is scaled before its backward, then use
    ``grad_scaler.step(optimizer)`` and ``grad_scaler.update()`` as usual.

    Data parallelism (instead of ``DistributedDataParallel``, whose hooks expect one
    backward per forward): pass ``process_group`` (e.g. ``torch.distributed.group.WORLD``)
    and give every process its own shard of the batch. Each stage's (and head's)
    parameter gradients are all-reduced asynchronously right after that stage's backward,
    overlapping with the backward of the stages that follow; the step waits at its end and
    adds the averages to ``.grad``, so after the call every process holds the gradient of
    the whole batch (the mean over processes, as DDP). Gradient accumulation works (each
    call all-reduces its own contribution). Start from identical parameters (broadcast
    them, as DDP does at construction); BN running statistics stay per process.

    Args:
        model: a model made by :func:`fxrelay.transform` (any mode; ``greedy`` and
            ``relay`` save memory), in train mode.
        criterion: ``criterion(logits, target) -> scalar``, applied to every head.
        grad_scaler: a ``torch.amp.GradScaler``.
        process_group: all-reduce gradients over this group (data parallelism).

    Raises:
        TypeError: ``model`` was not made by :func:`fxrelay.transform`, or wraps one
            (``DistributedDataParallel``: pass the model itself and ``process_group=``).
    """

    def __init__(self, model: nn.Module, criterion: Callable[[Any, Any], torch.Tensor], *,
                 grad_scaler: Any = None, process_group: dist.ProcessGroup | None = None):
        if isinstance(getattr(model, "module", None), nn.Module) and is_transformed(model.module):
            raise TypeError(f"LocalStep runs its own backward, which {type(model).__name__}'s hooks do not see "
                            "(gradients would not be all-reduced): use LocalStep(model.module, criterion, "
                            "process_group=...)")
        self.plan = plan_of(model)
        self._sink = AllReduceSink(process_group) if process_group is not None else None
        self._runner = StageRunner(model, criterion, grad_scaler=grad_scaler, grad_sink=self._sink)

    def __call__(self, x: torch.Tensor | Sequence[torch.Tensor], y: Any) -> LocalStepResult:
        """One forward and backward on the batch ``x`` with targets ``y``.

        Raises:
            ValueError: the model is in eval mode, or the criterion is not a scalar.
            RuntimeError: called under ``torch.no_grad()`` or ``torch.inference_mode()``.
        """
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        micro_batch = self._runner.forward(self._runner.micro_batch(inputs, y))
        result = self._runner.finish(micro_batch)
        if self._sink is not None:
            self._sink.finish()
        return LocalStepResult(tuple(result.losses[h.index] for h in self.plan.heads), result.output,
                               tuple(result.logits[h.index] for h in self.plan.heads))
