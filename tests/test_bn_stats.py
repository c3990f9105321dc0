"""recalibrate_bn: exact population statistics (BN paper, Algorithm 2), state restored."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from fxrelay.deployment.bn_stats import recalibrate_bn

BATCH, BATCHES = 4, 6


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm2d(3),  # reason: first layer, so its input is the data itself
        nn.Conv2d(3, 8, 3),
        BatchNormAct2d(8, momentum=0.3, drop_layer=lambda: nn.Dropout(0.5)),
        nn.Dropout(0.5),
        nn.Conv2d(8, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
    )


def _batches(count: int = BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 7, 7, generator=g) * 3 + 2, torch.zeros(BATCH)) for _ in range(count)]


def _reference_statistics(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Algorithm 2 computed directly from the BN inputs of the training network."""
    model = copy.deepcopy(model).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs = {bn: [] for bn in norms}
    for bn in norms:
        bn.training = True
        bn.register_forward_pre_hook(lambda m, args: inputs[m].append(args[0]))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    stats = []
    for bn in norms:
        xs = torch.stack(inputs[bn]).double()  # (batches, N, C, H, W)
        m = xs[0].numel() // xs.shape[2]
        means = xs.mean(dim=(1, 3, 4))
        biased_vars = xs.var(dim=(1, 3, 4), unbiased=False)
        stats.append((means.mean(0), m / (m - 1) * biased_vars.mean(0)))
    return stats


def _norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_matches_directly_computed_population_statistics():
    model, batches = _model(), _batches()
    expected = _reference_statistics(model, batches)
    recalibrate_bn(model, batches, progress=False)
    for bn, (mean, var) in zip(_norms(model), expected, strict=True):
        torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, atol=1e-5, rtol=1e-5)
        assert bn.num_batches_tracked.item() == BATCHES


def test_first_layer_statistics_are_the_dataset_statistics():
    model, batches = _model(), _batches()
    recalibrate_bn(model, batches, progress=False)
    data = torch.stack([x for x, _ in batches]).double()
    m = BATCH * 7 * 7
    dataset_mean = data.mean(dim=(0, 1, 3, 4))
    mean_of_batch_vars = data.var(dim=(1, 3, 4), unbiased=False).mean(0)
    torch.testing.assert_close(model[0].running_mean.double(), dataset_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[0].running_var.double(), m / (m - 1) * mean_of_batch_vars, atol=1e-5, rtol=1e-5)


def test_modes_momenta_and_parameters_are_restored():
    model = _model().train()
    model[1].eval()
    model[2].drop.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    params = copy.deepcopy(dict(model.named_parameters()))
    recalibrate_bn(model, _batches(), progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert [bn.momentum for bn in _norms(model)] == [0.1, 0.3, None]
    for name, p in model.named_parameters():
        assert torch.equal(p, params[name]) and p.grad is None


def test_num_batches_and_plain_tensor_items():
    model, batches = _model(), _batches()
    expected = _model()
    recalibrate_bn(expected, batches[:2], progress=False)
    recalibrate_bn(model, iter([x for x, _ in batches]), num_batches=2, progress=False)
    for bn, ref in zip(_norms(model), _norms(expected), strict=True):
        torch.testing.assert_close(bn.running_var, ref.running_var, atol=1e-6, rtol=1e-6)
        assert bn.num_batches_tracked.item() == 2


def test_empty_loader_raises_and_keeps_statistics():
    model = _model()
    recalibrate_bn(model, _batches(), progress=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [bn.momentum for bn in _norms(model)] == [0.1, 0.3, None]


def test_bn_without_running_stats_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert recalibrate_bn(model, _batches(), progress=False)[1].running_mean is None
