"""CliqueNet: the alternate-update recurrence, its parameters, timm API, tracing and partition."""

import pytest
import timm
import torch
import torch.nn.functional as F

import fxrelay
from fxrelay.models import CliqueBlock, CliqueNet
from fxrelay.models.cliquenet import STAGE_I, STAGE_II


def _randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval mode is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)


def _reference_block(block: CliqueBlock, x: torch.Tensor, in_chs: int, growth: int) -> torch.Tensor:
    """The paper's recurrence written with one convolution per pair (i <- j), from the same weights."""
    num_layers = len(block.layers)

    def w(i: int, j: int) -> torch.Tensor:  # W_ji, layers 1-based, j = 0 is the block input
        weight = block.layers[i - 1].weight
        start = 0 if j == 0 else in_chs + (j - 1 if j < i else j - 2) * growth
        return weight[:, start:start + (in_chs if j == 0 else growth)]

    def update(i: int, sources: dict[int, torch.Tensor], stage: int) -> torch.Tensor:
        layer = block.layers[i - 1]
        activated = layer.norms[stage](torch.cat(list(sources.values()), 1))
        chunks = activated.split([s.shape[1] for s in sources.values()], 1)
        mid = sum(F.conv2d(chunk, w(i, j)) for j, chunk in zip(sources, chunks))
        return layer.conv(layer.mid_norms[stage](mid))

    X = {0: x}
    for i in range(1, num_layers + 1):  # Stage-I: X_i from X_0 .. X_{i-1}
        X[i] = update(i, {j: X[j] for j in range(i)}, STAGE_I)
    for i in range(1, num_layers + 1):  # Stage-II: X_i from the latest X_j, j != i
        X[i] = update(i, {j: X[j] for j in range(1, num_layers + 1) if j != i}, STAGE_II)
    return torch.cat([X[i] for i in range(1, num_layers + 1)], 1)


def test_stage_two_recomputes_layers_with_the_stage_one_weights():
    torch.manual_seed(0)
    block = CliqueBlock(in_chs=5, growth=3, num_layers=4).eval()
    _randomise_norms(block)
    x = torch.randn(2, 5, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference_block(block, x, 5, 3), rtol=1e-5, atol=1e-5)
    assert [p.shape for p in block.layers[1].parameters() if p.ndim == 4] == [(3, 5 + 3 * 3, 1, 1), (3, 3, 3, 3)]


def test_weights_get_gradient_from_both_stages():
    torch.manual_seed(0)
    block = CliqueBlock(in_chs=5, growth=3, num_layers=3)
    block(torch.randn(2, 5, 4, 4)).sum().backward()
    grad = block.layers[0].weight.grad  # reason: columns of X_0 feed X_1 in Stage-I, of X_2, X_3 in Stage-II
    assert grad[:, :5].abs().sum() > 0 and grad[:, 5:].abs().sum() > 0


def _block_params(in_chs: int, k: int, layers: int, bottleneck: bool) -> int:
    kernel = 1 if bottleneck else 9
    weights = layers * k * (in_chs + (layers - 1) * k) * kernel
    norms = 2 * (layers * in_chs + k * layers * (layers - 1) // 2) + layers * 2 * (layers - 1) * k
    return weights + norms + (layers * (9 * k * k + 2 * 2 * k) if bottleneck else 0)


def _cliquenet_params(k: int, layers: int, num_classes: int, attention: bool, bottleneck: bool,
                      compression: bool) -> int:
    """CIFAR CliqueNet parameters from the spec: stem, 3 blocks, 2 transitions, 3 poolings, fc."""
    total, in_chs, features = 3 * 64 * 9, 64, 0
    for b in range(3):
        if b:
            total += 2 * in_chs + in_chs * in_chs + (in_chs * in_chs + in_chs // 2 + in_chs if attention else 0)
        total += _block_params(in_chs, k, layers, bottleneck)
        pooled_in = in_chs + layers * k
        pooled = pooled_in // 2 if compression else pooled_in
        total += (2 * pooled_in + pooled_in * pooled if compression else 0) + 2 * pooled
        features += pooled
        in_chs = layers * k
    return total + (features + 1) * num_classes


@pytest.mark.parametrize("name, k, layers", [("cliquenet_s0", 36, 4), ("cliquenet_s3", 80, 6)])
def test_parameter_count_matches_the_formula(name, k, layers):
    model = timm.create_model(name, num_classes=10)
    expected = _cliquenet_params(k, layers, 10, attention=True, bottleneck=True, compression=True)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_parameter_count_without_the_techniques():
    model = CliqueNet((12, 12, 12), (3, 3, 3), num_classes=5, attention=False, bottleneck=False, compression=False)
    expected = _cliquenet_params(12, 3, 5, attention=False, bottleneck=False, compression=False)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("name, params", [("cliquenet_s0", 0.94), ("cliquenet_s1", 4.49),
                                          ("cliquenet_s2", 6.94), ("cliquenet_s3", 10.14)])
def test_plain_variants_match_the_published_table(name, params):
    """Without attention, bottleneck and compression: the authors' (k, T) table, in millions."""
    model = timm.create_model(name, attention=False, bottleneck=False, compression=False)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params
    if name == "cliquenet_s0":
        assert round(sum(s.flops for s in fxrelay.partition(model).stages) / 1e9, 2) == 0.91


def test_timm_interface():
    assert {"cliquenet_s0", "cliquenet_s3", "cliquenet_imagenet_s3"} <= set(timm.list_models("cliquenet*"))
    model = timm.create_model("cliquenet_s0", num_classes=7, in_chans=1)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    assert [f["num_chs"] for f in model.feature_info] == [144, 144, 144]
    assert [f["reduction"] for f in model.feature_info] == [1, 2, 4]
    assert model.num_features == (64 + 144) // 2 + 2 * (144 + 144) // 2
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert timm.create_model("cliquenet_imagenet_s0").pretrained_cfg["input_size"] == (3, 224, 224)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("cliquenet_s0", pretrained=True)


@pytest.mark.parametrize("train", [False, True])
def test_traced_equals_eager(train):
    torch.manual_seed(0)
    model = timm.create_model("cliquenet_s0").train(train)
    _randomise_norms(model)
    x = torch.randn(2, 3, 32, 32)
    gm = fxrelay.trace(model)
    assert gm.meta["fxrelay_leaves"] == ()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_cliquenet_s3_partitions_into_three_stages_with_multi_tensor_cuts():
    torch.manual_seed(0)
    model = timm.create_model("cliquenet_s3").eval()
    _randomise_norms(model)
    plan = fxrelay.partition(model)
    assert len(plan.stages) == 3 and [s.reduction for s in plan.stages] == [1, 2, 4]
    pooled = [n.name for n in plan.graph_module.graph.nodes if n.op == "call_method" and n.target == "mean"
              and "pools" in str(n.meta.get("nn_module_stack", ""))]
    assert len(pooled) == 3
    last = plan.stages[-1]
    assert len(last.inputs) >= 3 and set(pooled[:2]) <= set(last.inputs)  # main input + 2 pooled features
    for block in range(3):  # reason: no clique block is split between stages
        stages = {s.index for s in plan.stages for n in s.nodes if n.startswith(f"blocks_{block}_")}
        assert len(stages) == 1
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fxrelay.run_stages(plan, x), model(x))


def test_imagenet_variant_partitions_into_stem_and_one_stage_per_block():
    model = timm.create_model("cliquenet_imagenet_s0").eval()
    plan = fxrelay.partition(model, example_input=torch.randn(1, 3, 64, 64))
    assert [s.reduction for s in plan.stages] == [2, 4, 8, 16, 32]
    block_stage = [{s.index for s in plan.stages for n in s.nodes if n.startswith(f"blocks_{b}_")} for b in range(4)]
    assert block_stage == [{1}, {2}, {3}, {4}]
    assert len(plan.stages[-1].inputs) == 4  # reason: the last block's input + 3 pooled block features
    assert all(len(s.outputs) == 2 for s in plan.stages[1:-1])
