"""Regression tests for the bugs of issue 10 (and those the property suite found), against the oracle.

Each test builds the smallest model that triggers its bug, in float64, and asserts the
numbers the documented semantics give: gradients from tests/graph_oracle.py (the
plan's original graph, each head's loss backpropagated within its window), outputs
from the original model. Tests of bugs not fixed yet are ``xfail(strict=True)``: they
flip to XPASS (a failure) with the fix, and the fix removes the mark.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import fxrelay
from graph_oracle import (assert_grads_close, head_grads, main_leaf, one_line_grads, reference_grads, run_stages,
                          stage_module)

NUM_CLASSES = 5


def _batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, NUM_CLASSES, (2,), generator=g))


def _level(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))


def _grads(model: nn.Module) -> dict[int, torch.Tensor]:
    return {id(p): p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()}


def _transform(net: nn.Module, mode: str = "relay", **options) -> tuple[nn.Module, nn.Module, torch.Tensor,
                                                                       torch.Tensor]:
    torch.manual_seed(0)
    base = net.double()
    x, y = _batch()
    return base, fxrelay.transform(base, mode, example_input=x, **options), x, y


class Pyramid(nn.Module):
    """Five conv-BN-ReLU-pool levels (32x32 -> 1x1) and a linear classifier."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(*(_level(3 if i == 0 else 8) for i in range(5)))
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.f(x).flatten(1))


# -- bug 1 ------------------------------------------------------------------------------
class Output(NamedTuple):
    logits: torch.Tensor


@dataclasses.dataclass
class DataOutput:
    logits: torch.Tensor


_OUTPUTS = {"dict": lambda z: {"logits": z}, "tuple": lambda z: (z,), "namedtuple": Output,
            "dataclass": DataOutput}


class StructuredPyramid(Pyramid):
    """:class:`Pyramid` returning its logits inside a dict, tuple, namedtuple or dataclass."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor):
        return _OUTPUTS[self.kind](super().forward(x))


@pytest.mark.parametrize("kind", list(_OUTPUTS))
def test_bug1_dict_output_keeps_heads(kind):
    base, model, x, y = _transform(StructuredPyramid(kind), num_classes=NUM_CLASSES)
    assert len(fxrelay.head_outputs(main_leaf(model(x), fxrelay.plan_of(model).output))) == len(fxrelay.plan_of(model).heads) == 3
    got = one_line_grads(model, x, y)
    assert base.f[0][0].weight.grad is not None
    assert_grads_close(got, reference_grads(model, x, y), model)


# -- bug 2 ------------------------------------------------------------------------------
class TwoScaleNet(Pyramid):
    """The issue's trigger: ``fc(gap(x4)) + fc2(gap(x2))`` over five conv+pool stages."""

    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = []
        for level in self.f:
            x = level(x)
            levels.append(x)
        return self.fc(levels[4].mean((2, 3))) + self.fc2(levels[2].mean((2, 3)))


def test_bug2_scoped_output_feeds_beyond_window():
    _, model, x, y = _transform(TwoScaleNet(), "relay")
    assert_grads_close(one_line_grads(model, x, y), reference_grads(model, x, y), model)


# -- bug 3 ------------------------------------------------------------------------------
class MutatingDown(nn.Module):
    """Doubles its input in place, then conv-ReLU-pool (a module, so the cut falls before ``mul_``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u.mul_(2.0)
        return F.max_pool2d(F.relu(self.conv(u)), 2)


class InplaceOnCutNet(nn.Module):
    """Stage 2 runs ``u.mul_(2.0)`` on stage 1's output ``u``; stage 3 reads ``u`` too."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.down = MutatingDown()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.conv1(F.max_pool2d(F.relu(self.conv0(x)), 2))
        c = F.max_pool2d(F.relu(self.conv3(self.down(u))), 2)
        return self.fc((c + F.adaptive_avg_pool2d(u, c.shape[-2:])).mean((2, 3)))


def test_bug3_inplace_on_cut_tensor():
    base, model, x, y = _transform(InplaceOnCutNet(), "standard")
    plan = fxrelay.plan_of(model)
    mutating = next(s for s in plan.stages if any(n.startswith("mul_") for n in s.nodes))
    assert set(mutating.inputs) & set(plan.stages[mutating.index - 1].outputs)  # the trigger: a cut tensor...
    # ...mutated in place and read again by a later stage, which now reads the in-place op's result
    assert any(name.startswith("mul_") for s in plan.stages[mutating.index + 1:] for name in s.inputs)
    assert torch.equal(run_stages(plan, x), base(x))
    assert_grads_close(one_line_grads(model, x, y), reference_grads(model, x, y), model)
    with torch.no_grad():
        want = base.eval()(x)
        assert torch.allclose(model.eval()(x), want, rtol=1e-12, atol=0)
        assert torch.allclose(fxrelay.deploy(model)(x), want, rtol=1e-9, atol=1e-12)


# -- bug 4 ------------------------------------------------------------------------------
def test_bug4_ddp_find_unused_and_reentrant_checkpoint(tmp_path):
    """Reentrant checkpoint and one-process DDP (the 2-process launcher tests are separate)."""
    _, model, x, y = _transform(Pyramid(), "relay")
    want = reference_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    # reason: reentrant checkpoint only backpropagates when an input requires grad
    F.cross_entropy(checkpoint(model, x.clone().requires_grad_(True), use_reentrant=True), y).backward()
    assert_grads_close(_grads(model), want, model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for options in ({"find_unused_parameters": True}, {"static_graph": True}):
            _, model, x, y = _transform(Pyramid(), "relay")  # reason: one DDP wrapper per model
            ddp = DistributedDataParallel(model, **options)
            F.cross_entropy(ddp(x), y).backward()
            assert_grads_close(_grads(model), reference_grads(model, x, y), model)
    finally:
        dist.destroy_process_group()


# -- bug 5 ------------------------------------------------------------------------------
def test_bug5_autograd_grad_equals_backward():
    for mode in ("relay", "greedy", "deep"):
        _, model, x, y = _transform(Pyramid(), mode)
        params = list(model.parameters())
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
        got = {id(p): g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)}
        assert_grads_close(got, reference_grads(model, x, y), model)


# -- bug 6 ------------------------------------------------------------------------------
def _overlap_stages(plan: fxrelay.Plan) -> list[int]:
    """The stages that windows with different lower ends cover (relay's overlaps)."""
    overlap = [s for s in range(len(plan.stages))
               if len({h.span[0] for h in plan.heads if h.span[0] <= s <= h.span[1]}) > 1]
    assert overlap, "the test model needs overlapping windows"
    return overlap


def _overlap_params(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for s in _overlap_stages(fxrelay.plan_of(model)) for p in stage_module(model, s).parameters()]


def test_bug6_per_head_grads_retain_and_create_graph():
    _, model, x, y = _transform(Pyramid(), "relay")
    params = list(model.parameters())
    zeros = {id(p): torch.zeros_like(p) for p in params}
    # per-head gradients (GradNorm, PCGrad, per-head gradient norms)
    loss = F.cross_entropy(model(x), y)
    for head_loss, want in zip(fxrelay.head_outputs(loss), head_grads(model, x, y)):
        grads = torch.autograd.grad(head_loss, params, retain_graph=True, allow_unused=True)
        got = {id(p): g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)}
        assert_grads_close(got, zeros | want, model)
    # two backward passes over one graph accumulate twice the gradient
    reference = reference_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    assert_grads_close(_grads(model), {k: 2 * v for k, v in reference.items()}, model)
    # create_graph: differentiable gradients, and the gradient of a gradient penalty is exact
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward(create_graph=True)
    assert all(p.grad.requires_grad for p in _overlap_params(model))
    penalty = sum((p.grad ** 2).sum() for p in params)
    got = dict(zip(map(id, params), torch.autograd.grad(penalty, params, allow_unused=True)))
    symbolic = reference_grads(model, x, y, create_graph=True)
    want = torch.autograd.grad(sum((g ** 2).sum() for g in symbolic.values()), params, allow_unused=True)
    assert_grads_close({k: v if v is not None else zeros[k] for k, v in got.items()},
                       {id(p): w if w is not None else zeros[id(p)] for p, w in zip(params, want)}, model)


# -- bug 7 ------------------------------------------------------------------------------
class SizeCrossingNet(Pyramid):
    """``n = a.shape[1]`` and ``hw = a.shape[-2:]`` taken early, used in every later stage."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.f[0](x)
        n, hw = d.shape[1], d.shape[-2:]
        for level in self.f[1:]:
            d = level(d) * (n / 8)
        return self.fc(F.adaptive_avg_pool2d(d, (hw[0] // 16, hw[1] // 16)).flatten(1))


def test_bug7_non_tensor_crossing_overlap_boundary():
    _, model, x, y = _transform(SizeCrossingNet(), "relay")
    plan = fxrelay.plan_of(model)
    # the trigger: the int enters the overlap stages, the size the last stage
    assert all("getitem" in plan.stages[s].inputs for s in _overlap_stages(plan))
    assert {"getitem", "getitem_1"} <= set(plan.stages[-1].inputs)
    assert_grads_close(one_line_grads(model, x, y), reference_grads(model, x, y), model)


# -- found by the property suite (tests/test_random_graphs.py) ---------------------------
class SizeAtStageEndNet(nn.Module):
    """One downsampling (``blocks`` partition); ``hw = v.shape[-2:]`` is the last value of stage 1."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.w3 = nn.Parameter(torch.randn(6, 6, 3, 3) * 0.2)
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.relu_(self.bn1(self.conv1(x)))
        hw = v.shape[-2:]
        v = F.relu(F.conv2d(torch.relu_(self.conv2(v)), self.w3, padding=1))
        return self.fc(F.interpolate(v, size=hw).mean((2, 3)))


def test_finding_a_size_as_last_stage_output():
    _, model, x, y = _transform(SizeAtStageEndNet(), "greedy")
    plan = fxrelay.plan_of(model)
    assert all(len(s.shape) == 3 for s in plan.stages[:-1])  # every head reads a feature map
    assert_grads_close(one_line_grads(model, x, y), reference_grads(model, x, y), model)
