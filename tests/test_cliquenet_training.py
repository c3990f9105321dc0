"""CliqueNet through the whole pipeline: exact gradients in every mode, exact deployment."""

import pytest
import timm
import torch

import fxrelay
import fxrelay.models  # noqa: F401  (registers cliquenet_* with timm)
from fxrelay.deployment.deploy import deploy
from fxrelay.deployment.fold import count_batchnorms
from oracle import assert_close, one_line_grads, oracle_grads


def _cliquenet():
    torch.manual_seed(0)
    return timm.create_model("cliquenet_s0", num_classes=10)


@pytest.mark.parametrize("mode", ["relay", "greedy", "deep"])
def test_cliquenet_gradients_match_oracle(mode):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([3, 5])
    model = fxrelay.transform(_cliquenet().double(), mode, head_stages=[0, 1], example_input=x)
    plan = fxrelay.plan_of(model)
    assert len(plan.stages) == 3 and len(plan.stages[-1].inputs) >= 2
    assert_close(one_line_grads(model, x, y), oracle_grads(model, x, y))


def test_cliquenet_deploys_exactly():
    model = _cliquenet()
    x = torch.randn(2, 3, 32, 32)
    transformed = fxrelay.transform(model, example_input=x[:1])
    transformed(x).sum().backward()  # reason: one train step's forward moves the BN statistics
    deployed = deploy(transformed)
    want = model.eval()(x)
    assert (deployed(x) - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    assert count_batchnorms(deployed) < count_batchnorms(fxrelay.plan_of(transformed).graph_module)
