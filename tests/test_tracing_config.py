"""One tracing configuration through every entry point: transform -> train -> deploy -> render -> pickle."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrelay

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([3, 5])


def clamp_if_positive(x):
    return x.clamp(max=1) if x.max() > 0 else x  # reason: control flow on a tensor value


class Gain(nn.Module):
    """Scales by a Python float that a schedule changes during training: tracing would bake it in."""

    def __init__(self):
        super().__init__()
        self.gain = 1.0

    def forward(self, x):
        return x * self.gain


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                  nn.ReLU()) for i in range(5))
        self.gain = Gain()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            if i == 2:
                x = self.gain(clamp_if_positive(x))
        return self.fc(x.mean((2, 3)))


CONFIG = fxrelay.TracingConfig(leaf_modules=[Gain], autowrap_functions=[clamp_if_positive])


def test_without_the_configuration_tracing_says_what_to_pass():
    with pytest.raises(fxrelay.TraceError, match="autowrap"):
        fxrelay.transform(Net(), example_input=X)


def test_transform_train_deploy_render_and_pickle_with_one_configuration(tmp_path):
    torch.manual_seed(0)
    model = fxrelay.transform(Net(), "relay", example_input=X, tracing=CONFIG)
    assert fxrelay.plan_of(model).tracing == CONFIG
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(X), Y).backward()
    optimizer.step()
    model.eval()
    gain = next(m for m in model.modules() if isinstance(m, Gain))
    before = model(X)
    gain.gain = 2.0  # reason: a leaf reads the attribute at run time; a trace would not
    assert not torch.equal(model(X), before)
    deployed = fxrelay.deploy(model)
    assert (deployed(X) - model(X)).abs().max() < 1e-5
    assert fxrelay.render(model, tmp_path / "net.dot").read_text().count("cluster_stage_") == 5
    copy = pickle.loads(pickle.dumps(model))  # reason: re-traces the generated code without the configuration
    assert torch.equal(copy(X), model(X))


def test_partition_fold_and_render_accept_the_configuration(tmp_path):
    plan = fxrelay.partition(Net(), example_input=X, tracing=CONFIG)
    assert any(n.op == "call_module" and n.target == "gain" for n in plan.graph_module.graph.nodes)
    assert fxrelay.fold_report(Net().eval(), X, tracing=CONFIG) == []
    folded = fxrelay.fold_bn(Net().eval(), X, tracing=CONFIG)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    fxrelay.render(Net(), tmp_path / "plain.dot", example_input=X, tracing=CONFIG)


@fxrelay.register_autowrap
def halve_if_large(x):
    return x / 2 if x.abs().max() > 10 else x


@fxrelay.register_leaf
class Shift(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift = 0.0

    def forward(self, x):
        return x + self.shift


class UsesRegistered(nn.Module):
    def __init__(self):
        super().__init__()
        self.shift, self.net = Shift(), Net()

    def forward(self, x):
        return self.net(self.shift(halve_if_large(x)))


def test_registered_functions_and_leaves_need_no_configuration():
    model = fxrelay.transform(UsesRegistered(), example_input=X,
                              tracing=fxrelay.TracingConfig(leaf_modules=[Gain],
                                                            autowrap_functions=[clamp_if_positive]))
    targets = {n.target for stage in model.stages for n in stage.graph.nodes}
    assert halve_if_large in targets and "shift" in targets


@fxrelay.register_autowrap
def _double_if_negative(x):
    return x * 2 if x.sum() < 0 else x


class UsesPrivate(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        return self.net(_double_if_negative(x))


def test_bug11_private_autowrap_function_is_one_node():
    plain = UsesPrivate()
    model = fxrelay.transform(plain, example_input=X, tracing=fxrelay.TracingConfig(
        leaf_modules=[Gain], autowrap_functions=[clamp_if_positive]))
    assert _double_if_negative in {n.target for stage in model.stages for n in stage.graph.nodes}
    for x in (X, -X.abs()):  # reason: both branches run at run time, not only the one seen while tracing
        assert torch.equal(model.eval()(x), plain.eval()(x))
    copy = pickle.loads(pickle.dumps(model))
    assert torch.equal(copy.eval()(-X.abs()), plain(-X.abs()))


def test_bug11_private_nested_function_is_refused():
    def _inner(x):
        return x

    with pytest.raises(TypeError, match="module level"):
        fxrelay.register_autowrap(_inner)
