"""Sequential greedy layer-wise training (Belilovsky et al., layerCNN).

Decoupled greedy training (``mode="greedy"``) trains every stage at once, each with its
own head. The *sequential* schedule of Belilovsky et al. trains stage 0 with its head,
then freezes it and trains stage 1, and so on. :func:`greedy_schedule` says which stage
trains in each epoch; :func:`train_only` freezes everything else (parameters stop
requiring grad, frozen stages run in eval mode so their BN statistics stay fixed).

Example:
    >>> greedy_schedule(num_stages=3, epochs=7)
    [0, 0, 1, 1, 2, 2, 2]
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..passes.rewrite import plan_of

__all__ = ["greedy_schedule", "train_only"]


def greedy_schedule(num_stages: int, epochs: int) -> list[int]:
    """The stage trained in each epoch: equal shares, the top stage takes the remainder."""
    if epochs < num_stages:
        raise ValueError(f"the sequential greedy schedule needs at least one epoch per stage "
                         f"({num_stages}), got {epochs}")
    share = epochs // num_stages
    return [min(e // share, num_stages - 1) for e in range(epochs)]


@contextlib.contextmanager
def train_only(model: nn.Module, stage: int) -> Iterator[list[nn.Parameter]]:
    """Train only ``stage`` of a transformed model and the heads reading it.

    Yields the trainable parameters (give them to the optimizer). Restores every
    parameter's ``requires_grad`` and every module's train/eval flag on exit.
    """
    plan = plan_of(model)
    active = [model.stages[stage]]
    active += [model.heads[k] for k, h in enumerate(plan.aux_heads) if h.stage == stage]
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}
    trainable = {id(p) for m in active for p in m.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable and flags[p])
        for i, module in enumerate(model.stages):
            if i != stage:
                module.eval()
        yield [p for m in active for p in m.parameters() if p.requires_grad]
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
