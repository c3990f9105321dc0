"""Bad input is a one-line error, and a request fxrelay cannot honour as asked is a warning with the fix.

Issue 10 item 8 (input checks) and issue 15 items 1-3 (silent traps of a first hour).
"""

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxrelay

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 7])


class Chain(nn.Module):
    """``levels`` conv levels, each opened by a max-pool, then a linear classifier."""

    def __init__(self, levels: int = 5, num_classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                  nn.ReLU()) for i in range(levels))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("kwargs, message", [
    ({"skip_first": -1}, "skip_first must be an integer >= 0, got -1"),
    ({"head_stages": 3}, "head_stages must be 'auto', 'model' or a list of integer stage indices, got 3"),
    ({"head_stages": [1.5]}, "a list of integer stage indices, got \\[1.5\\]"),
    ({"aux_weight": -0.1}, "aux_weight must be a finite number >= 0 or None, got -0.1"),
    ({"aux_weight": math.nan}, "aux_weight must be a finite number >= 0 or None, got nan"),
    ({"num_classes": 0}, "num_classes must be an integer >= 1 or None, got 0"),
    ({"window": True}, "window must be an integer >= 1, got True"),
    ({"mode": "RELAY"}, "did you mean 'relay'"),
    ({"head_kind": 3}, "head_kind must be a head name or a callable, got 3"),
])
def test_bad_transform_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        fxrelay.transform(Chain(), example_input=X, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("entry", [fxrelay.transform, fxrelay.partition, fxrelay.trace, fxrelay.deploy,
                                   fxrelay.render])
def test_a_non_module_is_a_type_error_everywhere(entry):
    args = ("model",) if entry is not fxrelay.render else ("model", "out.svg")
    with pytest.raises(TypeError, match="expects an nn.Module, got str"):
        entry(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_default_example_input_takes_the_models_dtype(dtype):
    model = fxrelay.transform(Chain().to(dtype), "relay")
    assert fxrelay.default_example_input(model).dtype == dtype
    assert fxrelay.plan_of(model).stages[0].shape == (8, 224, 224)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, scale):
        return self.conv(x) * scale


def test_a_required_second_argument_is_named():
    with pytest.raises(ValueError, match="needs the argument 'scale'.*example_input=\\(x, scale\\)"):
        fxrelay.partition(TwoInputs())
    plan = fxrelay.partition(TwoInputs(), example_input=(X, torch.ones(1, 4, 1, 1)))
    assert plan.input_names == ("x", "scale")


@pytest.mark.parametrize("mode, head_stages, untrained", [("relay", [0], "[1, 2]"), ("greedy", [2], "[0, 1, 3]")])
def test_heads_that_leave_stages_untrained_warn(mode, head_stages, untrained):
    with pytest.warns(UserWarning, match=rf"no loss trains stage\(s\) {re_escape(untrained)}"):
        fxrelay.transform(Chain(), mode, head_stages=head_stages, example_input=X)


def re_escape(text):
    return text.replace("[", r"\[").replace("]", r"\]")


def test_relay_without_room_for_heads_warns():
    with pytest.warns(UserWarning, match="no stage for an aux head.*trains like mode='standard'"):
        model = fxrelay.transform(Chain(levels=3), "relay", example_input=X)
    assert not fxrelay.plan_of(model).aux_heads


def test_a_window_reaching_the_input_everywhere_warns_that_it_is_deep():
    with pytest.warns(UserWarning, match="window=5 on 5 stages.*mode='deep'"):
        fxrelay.transform(Chain(), "relay", window=5, example_input=X)


def test_aux_classes_other_than_the_main_heads_warn():
    with pytest.warns(UserWarning, match="10 classes next to a 1000-way main head"):
        fxrelay.transform(Chain(num_classes=1000), "relay", num_classes=10, example_input=X)


def test_an_mlp_gets_stages_that_all_compute():
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10))
    plan = fxrelay.partition(mlp)
    assert fxrelay.default_example_input(mlp).shape == (1, 20)
    assert len(plan.stages) == 4 and all(s.flops > 0 for s in plan.stages)
    with pytest.raises(ValueError, match="num_stages must be between 1 and 4"):
        fxrelay.partition(mlp, num_stages=5)


@pytest.mark.parametrize("model, size", [
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=128), 128),
    (lambda: torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=4, num_heads=2,
                                                  hidden_dim=32, mlp_dim=32), 64),
])
def test_the_example_input_follows_the_size_the_model_declares(model, size):
    model = model()
    assert fxrelay.default_example_input(model).shape == (1, 3, size, size)
    assert len(fxrelay.partition(model).stages) == 4


class _SpaceToDepthStem(nn.Module):
    """tresnet's stem: 4x4 pixel blocks become channels, so the first convolution reads 48 of them."""

    in_chans = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(48, 8, 3)

    def forward(self, x):
        return self.conv(F.pixel_unshuffle(x, 4))


class _LinearPatchEmbed(nn.Module):
    """naflexvit's stem: patches through a Linear, with timm's declared input size."""

    pretrained_cfg = {"input_size": (3, 32, 32)}

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16 * 16, 8)

    def forward(self, x):
        return self.proj(F.unfold(x, 16, stride=16).transpose(1, 2))


@pytest.mark.parametrize("model, shape", [(_SpaceToDepthStem, (1, 3, 224, 224)), (_LinearPatchEmbed, (1, 3, 32, 32))])
def test_declared_channels_and_size_win_over_the_first_layer(model, shape):
    x = fxrelay.default_example_input(model())
    assert x.shape == shape
    model()(x)


def test_an_input_the_model_rejects_says_what_was_assumed():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8 * 30 * 30, 10)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    with pytest.raises(ValueError, match=r"assumed example input of shape \(1, 3, 224, 224\).*pass example_input="):
        fxrelay.transform(Fixed())


def test_a_small_input_that_keeps_its_levels_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = fxrelay.partition(timm.create_model("resnet10t"), example_input=torch.randn(1, 3, 32, 32))
    assert len(plan.stages) == 5


def test_a_tiny_input_that_collapses_levels_warns():
    with pytest.warns(UserWarning, match="8x8 example input shrinks the feature maps to 1 pixel before layer3.0.conv2 "
                                         "downsamples"):
        plan = fxrelay.partition(torchvision.models.resnet50(), example_input=torch.randn(1, 3, 8, 8))
    assert len(plan.stages) == 3


def _train(model, optimizer, steps=2):
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        optimizer.step()


def test_an_optimizer_built_before_transform_warns_once():
    base = Chain()
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    model = fxrelay.transform(base, "relay", example_input=X)
    with pytest.warns(UserWarning, match="aux heads .* are in no optimizer.*transform\\(model, optimizer=opt\\)"):
        _train(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, optimizer)


def test_transform_adds_the_heads_to_a_given_optimizer():
    base = Chain()
    optimizer = torch.optim.SGD(base.parameters(), lr=0.1)
    model = fxrelay.transform(base, "relay", example_input=X, optimizer=optimizer)
    before = [p.detach().clone() for p in fxrelay.head_parameters(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, optimizer)
    assert optimizer.param_groups[-1]["params"] == fxrelay.head_parameters(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, fxrelay.head_parameters(model)))


def test_original_state_dict_returns_live_values_of_unused_buffers():
    base = Chain()
    base.register_buffer("calibration", torch.ones(3))  # reason: a buffer the forward never reads
    model = fxrelay.transform(base, "relay", example_input=X).double()
    state = fxrelay.original_state_dict(model)
    assert state["calibration"].dtype == torch.float64
    model.load_state_dict({**model.state_dict(), "unused_state.t0": torch.full((3,), 2.0, dtype=torch.float64)})
    assert fxrelay.original_state_dict(model)["calibration"].tolist() == [2.0, 2.0, 2.0]
    fresh = Chain().double()
    fresh.register_buffer("calibration", torch.zeros(3, dtype=torch.float64))
    fresh.load_state_dict(fxrelay.original_state_dict(model), strict=True)
