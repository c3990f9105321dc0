"""The executions of one training step, each run the same way and recorded in one form.

:func:`run_step` runs one step (forward and backward, no optimizer step) of a
transformed model with a named execution and returns a :class:`StepRecord`: per head
that ran, its loss and logits, and the parameter gradients and buffers after the step.
The executions are fxrelay's (:data:`fxrelay.train.executions.EXECUTIONS`):

* ``"one-line"``: ``criterion(model(x), y).backward()``;
* ``"recompute"``: the same on the model's recompute view;
* ``"local"``: :class:`fxrelay.LocalStep`;
* ``"sequential"``: the sequential greedy step of one stage (inside ``train_stage``).

A :class:`StepOptions` adds what the suite varies around the step: gradient
accumulation over ``micro_batches`` (each loss scaled by ``1 / M``, as ``fit`` does),
CPU ``autocast`` (bfloat16) and the seed set before the step (dropout masks).
:func:`stage_parallel_step` runs the same step under a 2-process ``StageParallel``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import fxrelay
from fxrelay.core.outputs import head_outputs
from fxrelay.passes.rewrite import recompute_view
from fxrelay.train.executions import TrainingStep
from fxrelay.train.sequential import train_stage
from graph_oracle import main_leaf

__all__ = ["EXECUTIONS", "StepOptions", "StepRecord", "criterion_of", "run_step", "stage_parallel_step",
           "snapshot", "restore"]

EXECUTIONS = ("one-line", "recompute", "local", "sequential")


@dataclass(frozen=True)
class StepOptions:
    """What the suite varies around one step.

    Attributes:
        micro_batches: ``M``: the batch is split (``tensor_split``) and the step accumulates
            the gradients of the ``M`` parts, each loss scaled by ``1 / M``.
        autocast: run the forward and the losses under CPU ``torch.autocast`` (bfloat16).
        seed: ``torch.manual_seed`` before the step (the same dropout masks in every execution).
    """

    micro_batches: int = 1
    autocast: bool = False
    seed: int = 0


class StepRecord(NamedTuple):
    """What one step computed, in one form for every execution.

    Attributes:
        heads: the indices (in ``plan.heads``) of the heads that ran.
        losses: per head that ran, its unweighted loss (scaled by ``1 / M``) summed over micro-batches.
        logits: per head that ran, its logits, concatenated over micro-batches (detached).
        grads: parameter name -> gradient, for parameters that got one.
        buffers: buffer name -> value after the step.
    """

    heads: list[int]
    losses: list[torch.Tensor]
    logits: list[torch.Tensor]
    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


def criterion_of(model: nn.Module, micro_batches: int = 1) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """Cross-entropy of the leaf at ``plan.output`` (where every head's logits are), scaled by ``1 / M``."""
    path = fxrelay.plan_of(model).output

    def criterion(out: Any, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(main_leaf(out, path), target) / micro_batches
    return criterion


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state (restore it before each execution)."""
    return copy.deepcopy(model.state_dict())


def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Back to ``state``, gradients cleared."""
    model.load_state_dict(state)
    model.zero_grad(set_to_none=True)


def _one_line(model: nn.Module, criterion: Callable, x: torch.Tensor, y: torch.Tensor,
              head: int | None) -> tuple[list, list]:
    out = model(x)
    loss = criterion(out, y)
    if head is None:
        loss.backward()
    else:  # reason: head ``head``'s own share of the same forward, ``w_j * L_j``
        (fxrelay.plan_of(model).heads[head].weight * head_outputs(loss)[head]).backward()
    path = fxrelay.plan_of(model).output if fxrelay.is_transformed(model) else ()
    return ([v.detach() for v in head_outputs(loss)],
            [v.detach() for v in head_outputs(main_leaf(out, path))])


def _micro_step(model: nn.Module, execution: str, criterion: Callable, stage: int | None,
                autocast: Callable) -> Callable[[torch.Tensor, torch.Tensor], tuple[list[int], list, list]]:
    """One micro-batch's step: ``(x, y) -> (heads, losses, logits)``; ``stage``: the sequential
    step's stage, or for one-line the head whose loss alone is backpropagated."""
    if execution in ("one-line", "recompute"):
        forward = recompute_view(model) if execution == "recompute" else model

        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list, list]:
            forward.train(model.training)
            with autocast():
                losses, logits = _one_line(forward, criterion, x, y, stage)
            return list(range(len(losses))), losses, logits
        return step
    engine = TrainingStep(model, criterion, execution, stage=stage, autocast=autocast)

    def engine_step(x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list, list]:
        outcome = engine(x, y)
        return outcome.heads, list(outcome.losses), list(outcome.logits)
    return engine_step


def run_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, execution: str,
             options: StepOptions = StepOptions(), stage: int | None = None, head: int | None = None) -> StepRecord:
    """One step of ``execution`` from the current gradients (call :func:`restore` first); raises
    what the execution raises (a refusal).

    Args:
        stage: the stage the sequential step trains.
        head: one-line only: backpropagate head ``head``'s weighted loss alone (the reference of
            the sequential step, which trains one head's loss).
    """
    criterion = criterion_of(model, options.micro_batches)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if options.autocast else contextlib.nullcontext
    scope = train_stage(model, stage) if execution == "sequential" else contextlib.nullcontext()
    torch.manual_seed(options.seed)
    with scope:
        step = _micro_step(model, execution, criterion, stage if execution == "sequential" else head, autocast)
        parts = [step(xs, ys) for xs, ys in zip(x.tensor_split(options.micro_batches),
                                                 y.tensor_split(options.micro_batches))]
    heads = parts[0][0]
    losses = [sum(p[1][i].double() for p in parts) for i in range(len(heads))]
    logits = [torch.cat([p[2][i] for p in parts]) for i in range(len(heads))]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return StepRecord(heads, losses, logits, grads, buffers)


def stage_parallel_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        micro_batches: int) -> StepRecord:
    """One ``StageParallel`` step (SGD with lr 0: the parameters stay) on this rank: the losses of
    its heads (averaged over the micro-batches, as :func:`run_step` sums the scaled ones), the
    gradients of its parameters and the buffers of its modules. Call it on every rank of an
    initialised 2-process group; it waits for the step's last messages before returning."""
    parallel = fxrelay.StageParallel(model, lambda params: torch.optim.SGD(params, lr=0.0),
                                     microbatches=micro_batches, criterion=criterion_of(model), verbose=False)
    stats = parallel.step(x, y)
    parallel.gather_model()  # reason: waits for the messages still in flight (it is collective)
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    local = [p for group in parallel.optimizer.param_groups for p in group["params"]]
    modules = parallel._modules(parallel.stages)
    heads = sorted(stats.losses)
    return StepRecord(heads, [torch.tensor(stats.losses[j], dtype=torch.float64) for j in heads],
                      [], {names[id(p)]: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                           for p in local},
                      {names[id(b)]: b.detach().clone() for m in modules for b in m.buffers()})
