"""Sequential greedy layer-wise training (Belilovsky et al., layerCNN), lean.

Decoupled greedy training (``mode="greedy"``) trains every stage at once, each with its
own head. The *sequential* schedule trains stage 0 with its head, then freezes it and
trains stage 1, and so on. :func:`greedy_schedule` says which stage trains in each epoch.

Training stage ``k`` runs only what its loss needs: stages ``0..k`` and head ``k``. The
frozen prefix (stages ``0..k-1``) runs under ``no_grad`` in train mode, as the one-line
greedy step runs it (BatchNorm normalizes with batch statistics and updates its running
statistics), and no later stage or other head runs at all. The Trainer's sequential
execution is a :class:`~fxrelay.train.stagerun.StageRunner` run that stops after stage ``k``
(``only=k``). :func:`train_stage` freezes the parameters of everything but stage ``k`` and
its head and yields the :class:`StageStep` that computes head ``k``'s logits;
:func:`prefix_cache` runs the frozen prefix once over a deterministic dataset and serves
its outputs, so the prefix is not recomputed every epoch. The cache is the one
approximation, and opt-in: it computes the prefix once, in eval mode (BatchNorm on its
running statistics, which then stay as they were).

The loss of head ``k`` is scaled by the head's weight, as in the transformed model's
own ``loss.backward()`` (``grad(p) = sum_j w_j dL_j/dp``): stage ``k``'s gradients are
those the one-line greedy model gives it with the other stages frozen. A parameter shared
with another stage (a module called twice, a raw parameter used twice) gets head ``k``'s
share only: its other uses run frozen (or, in later stages, not at all).

Example:
    >>> greedy_schedule(num_stages=3, epochs=6)
    [0, 0, 1, 1, 2, 2]
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..core.modules import training_mode
from ..core.plan import Plan
from ..passes.rewrite import plan_of

__all__ = ["greedy_schedule", "check_sequential", "StageStep", "train_stage", "prefix_cache"]


def greedy_schedule(num_stages: int, epochs: int) -> list[int]:
    """The stage trained in each epoch: every stage gets the same number of epochs.

    Raises:
        ValueError: ``epochs`` is not a positive multiple of ``num_stages``.
    """
    if epochs < 1 or epochs % num_stages:
        raise ValueError(f"the sequential greedy schedule trains each of the {num_stages} stages for the same "
                         f"number of epochs: epochs must be a positive multiple of {num_stages}, got {epochs}")
    share = epochs // num_stages
    return [e // share for e in range(epochs)]


def check_sequential(plan: Plan) -> None:
    """Raise unless ``plan`` can be trained stage by stage: greedy, a head on every stage.

    Raises:
        ValueError: the plan is not greedy, a stage but the last has no aux head, or the
            model's output is not one tensor, the last stage's main output (a namedtuple
            output is refused like a tuple or dict).
    """
    if plan.mode != "greedy":
        raise ValueError(f"the sequential schedule trains greedy transforms (a head per stage, each training its "
                         f"own stage); this model was transformed with mode={plan.mode!r}: use mode='greedy'")
    missing = sorted(set(range(len(plan.stages) - 1)) - {h.stage for h in plan.heads if not h.is_main})
    if missing:
        raise ValueError(f"the sequential schedule needs an aux head on every stage but the last; stages {missing} "
                         "have none: transform with heads='auto'")
    out = plan.output_node.args[0]
    # reason: a namedtuple output is one fx node too; its other leaves come from stages the step does not run
    if plan.output or not (isinstance(out, fx.Node) and out.name == plan.stages[-1].outputs[-1]):
        raise ValueError("the sequential schedule needs a model whose output is one tensor, the last stage's "
                         "output (the criterion of stage k's head could not see the other leaves of a tuple, "
                         "dict or namedtuple output): return the logits alone, or use execution='local'")


class StageStep:
    """The lean training forward of stage ``k``: head ``k``'s logits from the model's inputs.

    Calling it runs :meth:`prefix` (stages ``0..k-1`` under ``no_grad``) and then
    :meth:`from_prefix` (stage ``k`` and its head, with autograd). It sets no module
    modes or ``requires_grad`` flags; :func:`train_stage` does.

    Attributes:
        stage: the stage trained, ``k``.
        head: the index in ``plan.heads`` of the head reading stage ``k``.
        weight: that head's loss weight.
        inputs: names of the values stage ``k`` reads (what the prefix returns).
    """

    def __init__(self, model: nn.Module, stage: int):
        plan = plan_of(model)
        check_sequential(plan)
        if not 0 <= stage < len(plan.stages):
            raise ValueError(f"stage must be in 0..{len(plan.stages) - 1}, got {stage}")
        self.plan, self.stage = plan, stage
        self.head = next(h.index for h in plan.heads if h.stage == stage)
        self.weight = plan.heads[self.head].weight
        aux_rank = [h.index for h in plan.heads if not h.is_main]
        self.head_module = (model.heads[aux_rank.index(self.head)]
                            if self.head in aux_rank else None)
        self.stage_modules = list(model.stages[:stage + 1])
        self.inputs = plan.stages[stage].inputs
        self._last_use = _last_uses(plan, stage)

    def prefix(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The values stage ``k`` reads, computed by stages ``0..k-1`` under ``no_grad``."""
        env = dict(zip(self.plan.input_names, inputs))
        with torch.no_grad():
            for i in range(self.stage):
                spec = self.plan.stages[i]
                result = self.stage_modules[i](*(env[name] for name in spec.inputs))
                env.update(zip(spec.outputs, result if len(spec.outputs) > 1 else (result,)))
                for name in [n for n in env if self._last_use.get(n, -1) <= i]:
                    del env[name]  # reason: free what no later stage up to k reads
        return tuple(env[name] for name in self.inputs)

    def from_prefix(self, *values: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s logits from the values stage ``k`` reads (in :attr:`inputs` order)."""
        spec = self.plan.stages[self.stage]
        result = self.stage_modules[self.stage](*values)
        main = result[-1] if len(spec.outputs) > 1 else result
        return main if self.head_module is None else self.head_module(main)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.from_prefix(*self.prefix(*inputs))

    def trained_modules(self) -> list[nn.Module]:
        """Stage ``k`` and its head: the modules whose parameters train."""
        return [self.stage_modules[self.stage]] + ([self.head_module] if self.head_module is not None else [])


def _last_uses(plan: Plan, stage: int) -> dict[str, int]:
    """Value name -> the last stage in ``0..stage`` reading it (``stage`` for what stage ``k`` reads)."""
    last: dict[str, int] = {}
    for spec in plan.stages[:stage + 1]:
        for name in spec.inputs:
            last[name] = spec.index
    return last


@contextlib.contextmanager
def train_stage(model: nn.Module, stage: int) -> Iterator[StageStep]:
    """Train only stage ``stage`` of a greedy transform and its head; yield the :class:`StageStep`.

    Inside, only the parameters of the stage and its head require grad (parameters the
    user froze stay frozen); module modes stay as they are (call ``model.train()``: the
    prefix then runs as in the one-line greedy step). An optimizer built over all parameters keeps the state of the
    frozen ones untouched (their gradients are ``None``). Restores every flag on exit.

    Example:
        >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "greedy")  # doctest: +SKIP
        >>> with train_stage(model, 2) as step:                                               # doctest: +SKIP
        ...     loss = step.weight * criterion(step(x), y); loss.backward(); optimizer.step()
    """
    step = StageStep(model, stage)
    flags = {p: p.requires_grad for p in model.parameters()}
    trained = step.trained_modules()
    trainable = {id(p) for m in trained for p in m.parameters()}
    try:
        for p, flag in flags.items():
            p.requires_grad_(flag and id(p) in trainable)
        yield step
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


class _Cached(Dataset):
    """Prefix outputs and labels of every sample, served a whole batch at a time."""

    def __init__(self, values: Sequence[torch.Tensor], labels: torch.Tensor):
        self.values, self.labels = tuple(values), labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        rows = torch.as_tensor(indices, device=self.labels.device)
        return tuple(v[rows] for v in self.values), self.labels[rows]


def _whole_batch(batch: Any) -> Any:
    return batch


def prefix_cache(step: StageStep, loader: DataLoader, device: str | torch.device = "cpu") -> DataLoader:
    """A loader of ``(prefix values, labels)`` in the order ``loader`` would give its batches.

    Runs ``step.prefix`` once over ``loader.dataset`` (in order, under ``no_grad``, the
    prefix stages in eval mode: the one approximation of the sequential schedule, opt-in)
    and keeps the outputs on ``device``: memory
    is the dataset's size times what stage ``k`` reads per sample. The returned loader
    shares ``loader``'s batch sampler and generator, so it draws the same random numbers
    and yields the same samples in the same batches as ``loader`` would, as
    ``(tuple of stage inputs, labels)``.

    Only valid for a deterministic dataset (``dataset[i]`` the same every epoch): no
    random augmentation. Reading the first sample twice checks that.

    Raises:
        ValueError: the dataset gives two different first samples, or ``loader`` has no
            batch sampler (``batch_size=None``).
    """
    if loader.batch_sampler is None:
        raise ValueError("prefix_cache needs a batched DataLoader (batch_size or batch_sampler set)")
    first, again = loader.dataset[0][0], loader.dataset[0][0]
    if not (torch.equal(first, again) if isinstance(first, torch.Tensor) else first == again):
        raise ValueError("prefix_cache needs a deterministic dataset, but dataset[0] differs between two reads "
                         "(random augmentation?): train without the cache")
    # reason: its own generator, so that filling the cache draws no number from the global RNG
    fill = DataLoader(loader.dataset, batch_size=loader.batch_size or 256, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, generator=torch.Generator())
    values: list[list[torch.Tensor]] = [[] for _ in step.inputs]
    labels = []
    with contextlib.ExitStack() as stack:
        for m in step.stage_modules[:step.stage]:
            stack.enter_context(training_mode(m, False))
        for x, y in fill:
            for column, v in zip(values, step.prefix(x.to(device))):
                column.append(v)
            labels.append(torch.as_tensor(y).to(device))
    cached = _Cached([torch.cat(column) for column in values], torch.cat(labels))
    return DataLoader(cached, batch_sampler=loader.batch_sampler, generator=loader.generator,
                      collate_fn=_whole_batch)
