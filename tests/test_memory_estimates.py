"""The plan's memory estimate against the bytes autograd really saves (``fxrelay.SavedBytes``), per execution.

Every execution whose saved tensors the hooks can see: the one-line step (greedy and relay), ``LocalStep``
(greedy, relay, deep) and the sequential schedule training each stage; small inputs (64 px, batch 2).
Checkpointed steps hide their saved tensors inside ``torch.utils.checkpoint``; their estimate is the kept
boundaries plus the largest of the per-stage terms checked here (``tests/test_checkpoint.py`` bounds the
measured peak).
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import fxrelay
from fxrelay.core.channels import sequential_peaks
from fxrelay.train.memory import SavedBytes
from fxrelay.train.sequential import train_stage
from test_transform import VGGChain

TOLERANCE = 0.08
LOSS_BYTES = 256  # reason: the criterion saves its own inputs (batch 2 x 10 logits), outside the plan


def _saved(model: torch.nn.Module, step) -> int:
    step()  # reason: gradients exist before the measured step, as in training
    with SavedBytes([*model.parameters(), *model.buffers()]) as saved:
        step()
    return saved.peak


def _rows(make, num_stages: int | None) -> list[tuple[str, int, int]]:
    """``(execution, estimate, measured)`` for every execution of greedy, relay and deep transforms."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 10, (2,), generator=g)
    rows = []
    for mode in ("greedy", "relay", "deep"):
        torch.manual_seed(0)
        model = fxrelay.transform(make(), mode, num_stages=num_stages, example_input=x[:1]).train()
        plan = fxrelay.plan_of(model)
        estimate = plan.memory_estimate(len(x))
        if mode != "deep":
            rows.append((f"one-line {mode}", estimate["one-line"],
                         _saved(model, lambda: F.cross_entropy(model(x), y).backward())))
        local = fxrelay.LocalStep(model, F.cross_entropy)
        rows.append((f"LocalStep {mode}", estimate["local"], _saved(model, lambda: local(x, y))))
        if mode == "greedy":
            for k, peak in enumerate(sequential_peaks(plan.stages, plan.heads)):
                with train_stage(model, k) as step:
                    measured = _saved(model, lambda: (step.weight * F.cross_entropy(step(x), y)).backward())
                rows.append((f"sequential stage {k}", peak * len(x), measured))
    return rows


def _check(rows: list[tuple[str, int, int]]) -> None:
    off = [(name, estimate, measured, round(estimate / measured, 3)) for name, estimate, measured in rows
           if abs(estimate / measured - 1) > TOLERANCE and abs(estimate - measured) > LOSS_BYTES]
    assert not off, off


def test_six_stage_plain_chain_every_execution():
    """A conv chain whose stages open with a max pool: greedy's detached inputs make the pool save nothing,
    and a head keeps the pooled output its stage does not save."""
    plan = fxrelay.partition(VGGChain(), example_input=torch.randn(1, 3, 64, 64))
    assert len(plan.stages) == 6
    _check(_rows(VGGChain, None))


@pytest.mark.parametrize("name, num_stages", [
    ("resnet50", 8), ("resnet50", None),
    pytest.param("vgg16_bn", 8, marks=pytest.mark.slow),  # reason: about 50 s each on 2 CPU cores
    pytest.param("vgg16_bn", None, marks=pytest.mark.slow)])
def test_timm_models_every_execution(name, num_stages):
    _check(_rows(lambda: timm.create_model(name, num_classes=10), num_stages))
