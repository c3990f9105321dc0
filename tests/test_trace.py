"""Tracing: exact graphs, bound default arguments, leaves, caches, errors."""

import inspect
import operator

import pytest
import timm
import torch
import torchvision
from torch import fx, nn

import fxrelay
from fxrelay import TraceError

SEED = torch.Generator().manual_seed(0)


def _assert_traces_exactly(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    model.eval()
    gm = fxrelay.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    return gm


def test_resnet18_graph_shares_parameters_and_is_exact():
    model = torchvision.models.resnet18()
    gm = _assert_traces_exactly(model, torch.randn(2, 3, 64, 64, generator=SEED))
    assert [n.target for n in gm.graph.nodes][:4] == ["x", "conv1", "bn1", "relu"]
    assert gm.conv1.weight is model.conv1.weight
    assert gm.meta["fxrelay_leaves"] == ()


@pytest.mark.parametrize("name", ["efficientformer_l1", "levit_128s"])
def test_tracing_the_same_instance_twice_keeps_caches_clean(name):
    # reason: their attention-bias caches would store a Proxy during tracing (TRACING-NOTES.md)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224, generator=SEED)
    with torch.no_grad():
        before = model(x)
    first, second = fxrelay.trace(model, x), fxrelay.trace(model, x)
    with torch.no_grad():
        for gm in (first, second):
            torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    caches = [v for m in model.modules() for v in vars(m).get("attention_bias_cache", {}).values()]
    assert all(type(v) is torch.Tensor for v in caches)


def test_forward_arguments_with_defaults_are_bound_hiera():
    # reason: hiera's forward(x, mask=None) would otherwise record the mask branch
    model = timm.create_model("hiera_tiny_224", num_classes=10, img_size=128)
    gm = _assert_traces_exactly(model, torch.randn(1, 3, 128, 128, generator=SEED))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]


class OptionalScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, scale=None, shift: float = 1.0):
        y = self.conv(x)
        if scale is not None:
            y = y * scale
        return y + shift


def test_defaults_become_constants_not_inputs():
    gm = _assert_traces_exactly(OptionalScale(), torch.randn(1, 3, 8, 8, generator=SEED))
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [operator.add]
    assert not any(n.target in (torch._assert, fx._symbolic_trace._assert_is_none) for n in gm.graph.nodes)


def clamp_if_positive(x):
    return x.clamp(max=1) if x.max() > 0 else x


class UsesHelper(nn.Module):
    def forward(self, x):
        return clamp_if_positive(x) * 2


def test_autowrap_functions_record_an_untraceable_helper_as_one_call():
    x = torch.randn(1, 3, 4, 4, generator=SEED)
    with pytest.raises(TraceError, match="clamp_if_positive|x.max\\(\\) > 0"):
        fxrelay.trace(UsesHelper(), x)
    gm = fxrelay.trace(UsesHelper(), x, autowrap_functions=[clamp_if_positive])
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] is clamp_if_positive
    torch.testing.assert_close(gm(x), UsesHelper()(x))


def test_leaf_modules_are_kept_whole():
    model = torchvision.models.resnet18()
    gm = fxrelay.trace(model, leaf_modules=[torchvision.models.resnet.BasicBlock])
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called[4:8] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]


def test_timm_norm_act_layers_are_leaves():
    gm = fxrelay.trace(timm.create_model("test_efficientnet"))
    types = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert "BatchNormAct2d" in types and "BatchNorm2d" not in types


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 3, 1), DataDependentGate()

    def forward(self, x):
        return self.gate(self.conv(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x) + 1


def test_the_innermost_untraceable_submodule_becomes_the_leaf():
    model = Outer()
    gm = _assert_traces_exactly(model, torch.randn(1, 3, 4, 4, generator=SEED))
    assert gm.meta["fxrelay_leaves"] == ("inner.gate",)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner.conv", "inner.gate"]


class UntraceableTopLevel(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_top_level_control_flow_raises_with_location_and_fix():
    lines, first = inspect.getsourcelines(UntraceableTopLevel.forward)
    line = first + next(i for i, text in enumerate(lines) if "x.sum() > 0" in text)
    with pytest.raises(TraceError) as error:
        fxrelay.trace(UntraceableTopLevel(), torch.randn(1, 3))
    e = error.value
    assert (e.model_name, e.location) == ("UntraceableTopLevel", f"{__file__}:{line}")
    assert "symbolically traced variables cannot be used as inputs to control flow" in e.reason
    assert str(e).startswith(f"cannot trace UntraceableTopLevel: {__file__}:{line}: `if x.sum() > 0:`")
    assert "Fix:" in str(e)


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="fxrelay.trace expects an nn.Module, got function"):
        fxrelay.trace(lambda x: x)


def test_default_example_input_follows_the_pretrained_cfg():
    assert fxrelay.default_example_input(timm.create_model("test_resnet")).shape == (1, 3, 160, 160)
    assert fxrelay.default_example_input(torchvision.models.resnet18()).shape == (1, 3, 224, 224)
    assert torch.equal(fxrelay.default_example_input(nn.Linear(1, 1)),
                       fxrelay.default_example_input(nn.Linear(1, 1)))  # reason: seeded
