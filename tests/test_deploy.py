"""deploy: equivalence on a model zoo, every foldable BN folded, no-ops stripped, export."""

from __future__ import annotations

import copy
import functools
import re

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from test_fold import randomize_batchnorms
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fxrelay
from fxrelay.deployment.deploy import deploy, is_noop
from fxrelay.deployment.fold import count_batchnorms, fold_report

ZOO = {  # name: (factory, input size, BNs that stay: those not fed by a conv/linear)
    "resnet18": (lambda: torchvision.models.resnet18(), 64, 0),
    "resnet50": (lambda: torchvision.models.resnet50(), 64, 0),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), 64, 0),
    "densenet121": (lambda: torchvision.models.densenet121(), 64, 62),
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(), 64, 0),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(), 32, 0),
    "resnet18_frozen_bn": (lambda: torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d), 64, 0),
    "timm_efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), 64, 0),
    "timm_resnet26d": (lambda: timm.create_model("resnet26d"), 64, 0),
    "timm_convnext_atto": (lambda: timm.create_model("convnext_atto"), 64, 0),
    "timm_mobilenetv3_large_100": (lambda: timm.create_model("mobilenetv3_large_100"), 64, 0),
}


def _max_error(reference: torch.Tensor, actual: torch.Tensor) -> tuple[float, float]:
    """The max abs difference and the tolerance 1e-4 * max(1, max|reference|)."""
    return (reference - actual).abs().max().item(), 1e-4 * max(1.0, reference.abs().max().item())


def _eval_outputs(model: nn.Module, deployed: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x), deployed(x)


@functools.cache
def _zoo_deployed(name: str) -> tuple[nn.Module, fx.GraphModule]:
    """A zoo model in train mode with random BN statistics, and its deployment (shared by tests)."""
    torch.manual_seed(0)
    model = randomize_batchnorms(ZOO[name][0]()).train()
    return model, deploy(model)


@pytest.mark.parametrize("name", ZOO)
def test_deploy_equals_eval_model_and_folds_every_foldable_bn(name):
    _, size, staying = ZOO[name]
    model, deployed = _zoo_deployed(name)
    assert model.training and not deployed.training
    error, tolerance = _max_error(*_eval_outputs(model, deployed, torch.randn(2, 3, size, size)))
    assert error <= tolerance
    assert count_batchnorms(deployed) == staying
    assert {reason for _, reason in fold_report(deployed)} <= {"input is not a conv/linear"}
    assert not any(is_noop(n, deployed) for n in deployed.graph.nodes)


def test_model_is_not_modified_and_parameters_are_copies():
    model = randomize_batchnorms(timm.create_model("resnet26d")).train()
    model.layer1.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    deployed = deploy(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    own = {t.data_ptr() for t in deployed.state_dict().values()}
    assert own.isdisjoint(t.data_ptr() for t in model.state_dict().values())


def test_node_names_are_readable():
    deployed = deploy(timm.create_model("mobilenetv3_large_100"))
    names = [n.name for n in deployed.graph.nodes]
    assert names[:4] == ["x", "conv_stem", "bn1_act", "blocks_0_0_conv_dw"]
    tv = deploy(torchvision.models.mobilenet_v3_small())
    assert [n.name for n in tv.graph.nodes][1:4] == ["features_0_0", "features_0_2", "features_1_block_0_0"]


def test_dropout_drop_path_and_stochastic_depth_are_stripped():
    models = [
        timm.create_model("efficientnet_b0", drop_rate=0.5, drop_path_rate=0.5),
        torchvision.models.efficientnet_b0(stochastic_depth_prob=0.5),
    ]
    for model in models:
        deployed = deploy(randomize_batchnorms(model))
        called = [type(deployed.get_submodule(n.target)).__name__ for n in deployed.graph.nodes if n.op == "call_module"]
        assert not {"Dropout", "DropPath", "StochasticDepth", "Identity"} & set(called)
        assert "dropout" not in deployed.code and "stochastic_depth" not in deployed.code
        error, tolerance = _max_error(*_eval_outputs(model, deployed, torch.randn(2, 3, 64, 64)))
        assert error <= tolerance


def test_dropout_and_drop_path_baked_in_by_a_train_mode_trace_are_stripped():
    model = randomize_batchnorms(timm.create_model("resnet18", drop_rate=0.5, drop_path_rate=0.3)).train()
    traced = fx.symbolic_trace(model)  # reason: plain fx bakes training=True and drop_path's mask in
    assert "training = True" in traced.code and "bernoulli_" in traced.code
    deployed = deploy(traced)
    assert not {"dropout", "bernoulli_", "new_empty", "training"} & set(re.findall(r"\w+", deployed.code))
    error, tolerance = _max_error(*_eval_outputs(model, deployed, torch.randn(2, 3, 64, 64)))
    assert error <= tolerance


def test_transformed_model_deploys_without_heads():
    model = randomize_batchnorms(timm.create_model("resnet18", drop_rate=0.5, drop_path_rate=0.3)).train()
    transformed = fxrelay.transform(model, mode="relay")
    deployed = deploy(transformed)
    assert [n for n, _ in transformed.named_children()] == ["stages", "overlaps", "heads"]
    assert not any(name.startswith(("stages", "heads")) for name, _ in deployed.named_modules())
    assert not any(is_noop(n, deployed) for n in deployed.graph.nodes) and "training" not in deployed.code
    assert count_batchnorms(deployed) == 0 and transformed.training and model.training
    own = {t.data_ptr() for t in deployed.state_dict().values()}
    assert own.isdisjoint(t.data_ptr() for t in transformed.state_dict().values())
    error, tolerance = _max_error(*_eval_outputs(model, deployed, torch.randn(2, 3, 64, 64)))
    assert error <= tolerance


@pytest.fixture(scope="module", params=["resnet50", "timm_efficientnet_b0", "densenet121"])
def deployed_and_output(request):
    _, deployed = _zoo_deployed(request.param)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return deployed, x, deployed(x)


def test_torch_export(deployed_and_output):
    deployed, x, expected = deployed_and_output
    program = torch.export.export(deployed, (x,))
    with torch.no_grad():
        error, tolerance = _max_error(expected, program.module()(x))
    assert error <= tolerance


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torch_jit_trace(deployed_and_output):
    deployed, x, expected = deployed_and_output
    with torch.no_grad():
        traced = torch.jit.trace(deployed, (x,), check_trace=False)  # reason: checked below
        error, tolerance = _max_error(expected, traced(x))
    assert error <= tolerance


def test_torch_compile_of_a_small_deployed_model():
    model = randomize_batchnorms(nn.Sequential(
        nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, act_layer=nn.SiLU), nn.Dropout(),
        nn.Conv2d(8, 4, 3, groups=4), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ))
    deployed = deploy(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        error, tolerance = _max_error(deployed(x), torch.compile(deployed)(x))
    assert error <= tolerance and count_batchnorms(deployed) == 0


@pytest.mark.slow
def test_torch_compile_of_deployed_resnet18():
    deployed = deploy(randomize_batchnorms(torchvision.models.resnet18()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        error, tolerance = _max_error(deployed(x), torch.compile(deployed)(x))
    assert error <= tolerance
