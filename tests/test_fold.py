"""BatchNorm folding: every foldable pattern, and the cases that must stay (and be reported)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from timm.layers import BatchNormAct2d, Conv2dSame, DropPath, StdConv2dSame, freeze_batch_norm_2d
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from fxrelay.deployment.fold import bn_scale_shift, count_batchnorms, fold_bn, fold_report, folded_weights


def randomize_batchnorms(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, and eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if getattr(m, "running_var", None) is not None:
                n = m.running_var.numel()
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return module.eval()


def _assert_same_function(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = a(x), b(x)
    assert (expected - actual).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def _assert_folds(model: nn.Module, x: torch.Tensor, **kwargs) -> fx.GraphModule:
    randomize_batchnorms(model)
    folded = fold_bn(model, **kwargs)
    _assert_same_function(model, folded, x)
    assert count_batchnorms(model) >= 1
    assert count_batchnorms(folded) == 0
    assert fold_report(folded) == []
    return folded


CONV_CASES = [
    (nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), (2, 4, 7, 7)),
    (nn.Conv3d(4, 6, 3, padding=1), nn.BatchNorm3d(6), (2, 4, 5, 5, 5)),
    (nn.Conv2d(4, 8, 3, groups=2), nn.BatchNorm2d(8), (2, 4, 7, 7)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 9)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm2d(6), (2, 4, 5, 5)),
    (nn.ConvTranspose3d(6, 9, 3, groups=3), nn.BatchNorm3d(9), (2, 6, 4, 4, 4)),
    (nn.ConvTranspose2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), (2, 4, 5, 5)),
    (nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, affine=False), (2, 4, 7, 7)),
    (nn.Conv2d(4, 6, 3), FrozenBatchNorm2d(6), (2, 4, 7, 7)),
    (Conv2dSame(4, 6, 3, stride=2), nn.BatchNorm2d(6), (2, 4, 8, 8)),
]


@pytest.mark.parametrize("conv, bn, shape", CONV_CASES, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_conv_bn_folds(conv, bn, shape):
    folded = _assert_folds(nn.Sequential(conv, bn), torch.randn(shape))
    assert [n.op for n in folded.graph.nodes] == ["placeholder", "call_module", "output"]


def test_folded_weights_transposed_groups_match_module():
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    weight, bias = folded_weights(conv.weight, conv.bias, scale, shift, transposed=True, groups=2)
    x = torch.randn(2, 4, 5, 5)
    expected = conv(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    actual = nn.functional.conv_transpose2d(x, weight, bias, groups=2)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_bn_scale_shift_is_the_eval_map():
    bn = randomize_batchnorms(nn.BatchNorm2d(5))
    x = torch.randn(3, 5, 4, 4)
    scale, shift = bn_scale_shift(bn)
    assert scale.dtype == shift.dtype == torch.float64
    torch.testing.assert_close(bn(x).double(), x.double() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))


def test_linear_bn1d_folds_on_2d_input():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    x = torch.randn(4, 5)
    _assert_folds(model, x, example_input=x)


def test_linear_bn1d_on_3d_input_stays():
    # reason: BatchNorm1d on (B, C, L) normalizes dim 1, not the Linear's output features
    model = randomize_batchnorms(nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)))
    x = torch.randn(2, 6, 6)
    folded = fold_bn(model, example_input=x)
    _assert_same_function(model, folded, x)
    # reason: issue 10 bug 8, the reason named example_input although it was passed
    assert fold_report(folded, example_input=x) == [
        ("_1", "Linear output is 3-D: the BatchNorm normalizes dim 1, not the Linear's features")]


class _Shift(nn.Module):
    """A drop layer with a visible effect, to check it stays and runs before the activation."""

    def forward(self, x):
        return x - 0.3


@pytest.mark.parametrize("drop_layer", [None, _Shift], ids=["act", "drop+act"])
def test_batchnorm_act2d_keeps_drop_and_act(drop_layer):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=drop_layer))
    folded = _assert_folds(model, torch.randn(2, 3, 8, 8))
    expected_ops = ["_0"] + (["_1_drop"] if drop_layer else []) + ["_1_act"]
    assert [n.name for n in folded.graph.nodes][1:-1] == expected_ops
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_timm_frozen_batchnorms_fold():
    model = freeze_batch_norm_2d(nn.Sequential(
        nn.Conv2d(3, 6, 3), BatchNormAct2d(6, act_layer=nn.Hardswish), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4),
    ))
    assert type(model[1]).__name__ == "FrozenBatchNormAct2d" and isinstance(model[3], FrozenBatchNorm2d)
    folded = _assert_folds(model, torch.randn(2, 3, 8, 8))
    assert isinstance(folded.get_submodule("1.act"), nn.Hardswish)


def test_input_module_is_unchanged():
    model = randomize_batchnorms(nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)))
    before = copy.deepcopy(model.state_dict())
    folded = fold_bn(model)
    assert model[0].bias is None and isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    own = {p.data_ptr() for p in folded.parameters()}
    assert own.isdisjoint(p.data_ptr() for p in model.parameters())


class _SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _ConvCalledTwice(nn.Module):
    """pytorch#104593: fx's fuse folds ``bn`` into ``conv`` and corrupts the second call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


@pytest.mark.parametrize("model, reason", [
    (_SharedOutput(), "conv output has other users"),
    (_ConvCalledTwice(), "conv module called more than once"),
], ids=["other-users", "called-twice"])
def test_must_not_fold(model, reason):
    x = torch.randn(2, 3, 8, 8)
    randomize_batchnorms(model)
    folded = fold_bn(model)
    _assert_same_function(model, folded, x)
    assert count_batchnorms(folded) == 1
    assert fold_report(model) == fold_report(folded) == [("bn", reason)]


def test_fx_fuse_is_wrong_where_fold_bn_declines():
    from torch.fx.experimental.optimization import fuse

    model = randomize_batchnorms(_ConvCalledTwice())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert (fuse(model)(x) - model(x)).abs().max() > 1e-2


class _AfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x).relu())


@pytest.mark.parametrize("model, reason", [
    (_AfterRelu(), "input is not a conv/linear"),
    (nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)),
     "BN has no running statistics (track_running_stats=False)"),
    (nn.Sequential(StdConv2dSame(3, 6, 3), nn.BatchNorm2d(6)), "conv/linear subclass with a custom forward"),
], ids=["after-relu", "no-running-stats", "std-conv"])
def test_unfoldable_bn_stays_and_is_reported(model, reason):
    randomize_batchnorms(model)
    x = torch.randn(2, 3, 8, 8)
    folded = fold_bn(model)
    _assert_same_function(model, folded, x)
    (name, why), = fold_report(model)
    assert why == reason and count_batchnorms(folded) == 1


def test_training_mode_bn_is_reported_on_a_graph_module():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))).train()
    assert fold_report(gm) == [("_1", "BN in training mode")]
    assert count_batchnorms(fold_bn(gm)) == 1
    assert count_batchnorms(fold_bn(gm.eval())) == 0


class _SharedBn(nn.Module):
    """One BN module after two convs: both pairs fold, each with its own conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))[..., 1:-1, 1:-1]


def test_shared_bn_module_folds_into_each_conv():
    _assert_folds(_SharedBn(), torch.randn(2, 3, 8, 8))


def test_bn_inside_torchvision_leaf_is_folded():
    from torchvision.ops import Conv2dNormActivation

    model = nn.Sequential(Conv2dNormActivation(3, 8), DropPath(0.1), Conv2dNormActivation(8, 4))
    folded = _assert_folds(model, torch.randn(2, 3, 8, 8))
    assert "_0_0" in {n.name for n in folded.graph.nodes}
