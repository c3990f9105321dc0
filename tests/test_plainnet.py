"""The plain VGG-style CNNs of the depth study: layers, no skips, stages, timm registration."""

import operator

import pytest
import timm
import torch
from torch import nn

import fxrelay
from fxrelay.models import PlainNet, plain_cnn
from fxrelay.models.plainnet import DEPTHS


@pytest.mark.parametrize("depth, per_stage", [(5, [1] * 5), (10, [2] * 5), (12, [2, 2, 2, 3, 3]),
                                              (29, [5, 6, 6, 6, 6]), (30, [6] * 5)])
def test_depth_is_split_over_the_stages(depth, per_stage):
    model = plain_cnn(depth)
    assert model.layers_per_stage == per_stage
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth and all(c.kernel_size == (3, 3) for c in convs)
    assert [c.out_channels for c in convs] == [w for w, n in zip((8, 16, 32, 64, 64), per_stage) for _ in range(n)]


def test_no_skip_connections_and_one_stage_per_resolution():
    model = PlainNet(10, num_classes=10)
    graph = fxrelay.trace(model).graph
    assert not [n for n in graph.nodes if n.target in (operator.add, torch.add, torch.cat)]
    plan = fxrelay.partition(model)
    assert [s.reduction for s in plan.stages] == [1, 2, 4, 8, 16]
    assert all(len(s.inputs) == 1 for s in plan.stages)


def test_registered_with_timm_any_depth():
    assert timm.list_models("plainnet*") == [f"plainnet{d}" for d in DEPTHS]
    assert timm.create_model("plainnet30").layers_per_stage == [6] * 5
    model = timm.create_model("plainnet10", depth=7, num_classes=3)
    assert model.depth == 7 and model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="^plainnet10 has no pretrained weights; use pretrained=False$"):
        timm.create_model("plainnet10", pretrained=True)
    with pytest.raises(ValueError, match=r"^depth must be at least the number of stages \(5\), got 4$"):
        PlainNet(4)


def test_standard_transform_computes_the_plain_model():
    torch.manual_seed(0)
    model = PlainNet(12, num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    staged = fxrelay.transform(model, "standard").eval()
    torch.testing.assert_close(staged(x), model(x), rtol=0, atol=0)
