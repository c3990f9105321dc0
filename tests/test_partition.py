"""Partition: stages at resolution levels, multi-tensor cuts, merge/split, bad inputs."""

import inspect

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxrelay
from fxrelay import TraceError

SMALL = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _exact(plan: fxrelay.Plan, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(plan.graph_module(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(fxrelay.run_stages(plan, x), expected, rtol=0, atol=0)


def _module_output(plan: fxrelay.Plan, module: str) -> str:
    """The last graph node computed inside ``module`` (its output)."""
    inside = [n.name for n in plan.graph_module.graph.nodes
              if any(path == module for path, _ in n.meta.get("nn_module_stack", {}).values())]
    return inside[-1]


def test_vgg19_bn_has_a_stage_per_conv_block_and_the_classifier():
    with torch.device("meta"):  # reason: 144M parameters; partition only reads shapes
        model = torchvision.models.vgg19_bn()
    plan = fxrelay.partition(model, example_input=SMALL)
    assert [s.reduction for s in plan.stages] == [1, 2, 4, 8, 16, 32]
    # reason: each max-pool opens the next stage, as timm's feature_info ends each block at the ReLU before it
    pools = [n.target for n in plan.graph_module.graph.nodes if n.op == "call_module"
             and isinstance(model.get_submodule(n.target), nn.MaxPool2d)]
    assert [plan.graph_module.graph.find_nodes(op="call_module", target=p)[0].name for p in pools] == \
        [s.nodes[0] for s in plan.stages[1:]]
    timm_ends = [f["module"].replace(".", "_") for f in timm.create_model("vgg19_bn").feature_info][:5]
    assert [s.outputs[-1] for s in plan.stages[:5]] == timm_ends == \
        ["features_5", "features_12", "features_25", "features_38", "features_51"]
    assert plan.stages[-1].outputs == ("classifier_6",) and plan.stages[-1].shape == (1000,)
    assert plan.stages[1].shape == (128, 32, 32)
    assert plan.stages[-1].params == 512 * 7 * 7 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000


@pytest.mark.parametrize("make", [torchvision.models.resnet50, lambda: timm.create_model("resnet50")],
                         ids=["torchvision", "timm"])
def test_resnet50_stages_end_at_timm_feature_info_modules(make):
    model = make()
    plan = fxrelay.partition(model, example_input=SMALL)
    assert [s.reduction for s in plan.stages] == [2, 4, 8, 16, 32]
    modules = [f["module"] for f in timm.create_model("resnet50").feature_info]
    assert modules == ["act1", "layer1", "layer2", "layer3", "layer4"]
    modules[0] = "act1" if isinstance(model, timm.models.ResNet) else "relu"
    ends = [_module_output(plan, m) for m in modules]
    assert [s.outputs[-1] for s in plan.stages[:4]] == ends[:4]
    assert ends[4] in plan.stages[4].nodes and plan.stages[4].outputs == ("fc",)  # reason: last stage holds the classifier
    assert [s.shape for s in plan.stages] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4), (1000,)]
    assert sum(s.params for s in plan.stages) == sum(p.numel() for p in model.parameters())
    _exact(plan, model, SMALL)


class LongSkip(nn.Module):
    """Four levels; the input of stage 1 is pooled and concatenated into stage 3."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.block3 = nn.Sequential(nn.Conv2d(40, 64, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        a = self.stem(x)
        b = self.block1(F.max_pool2d(a, 2))
        c = F.max_pool2d(self.block2(F.max_pool2d(b, 2)), 2)
        d = self.block3(torch.cat([c, F.avg_pool2d(a, 8)], 1))
        return self.fc(d.mean((2, 3)))


def test_long_skip_gives_a_two_tensor_cut_and_runs_exactly():
    model = LongSkip()
    plan = fxrelay.partition(model, example_input=SMALL)
    assert [s.reduction for s in plan.stages] == [1, 2, 4, 8]
    assert plan.stages[1].inputs == ("stem_1",)
    assert set(plan.stages[3].inputs) == {"stem_1", "block2_1"}  # reason: the skip crosses stages 1 and 2
    assert plan.stages[0].outputs == ("stem_1",)
    _exact(plan, model, SMALL)


def test_densenet121_stages_reproduce_the_model():
    model = torchvision.models.densenet121()
    plan = fxrelay.partition(model, example_input=SMALL)
    assert [s.reduction for s in plan.stages] == [2, 4, 8, 16, 32]
    # reason: each stage ends at its transition's conv, before the pool (half the channels of the block)
    assert [s.outputs[-1] for s in plan.stages[1:4]] == [f"features_transition{i}_conv" for i in (1, 2, 3)]
    assert [s.shape for s in plan.stages[1:4]] == [(128, 16, 16), (256, 8, 8), (512, 4, 4)]
    _exact(plan, model, SMALL)


def test_vit_tiny_gets_four_block_stages_of_similar_flops():
    model = timm.create_model("vit_tiny_patch16_224")
    plan = fxrelay.partition(model)
    assert plan.boundaries == "blocks" and len(plan.stages) == 4
    flops = [s.flops for s in plan.stages]
    assert max(flops) <= 2 * min(flops), flops
    assert sum(flops) == pytest.approx(2 * 1.26e9, rel=0.01)  # reason: timm lists 1.26 GMACs, 2 FLOPs each
    assert {s.reduction for s in plan.stages} == {16}


@pytest.mark.parametrize("num_stages", [3, 8])
def test_num_stages_merges_or_splits_resnet18(num_stages):
    model = torchvision.models.resnet18()
    pool = fxrelay.partition(model, example_input=SMALL)
    plan = fxrelay.partition(model, num_stages=num_stages, example_input=SMALL)
    assert len(plan.stages) == num_stages
    firsts, pool_firsts = {s.nodes[0] for s in plan.stages}, {s.nodes[0] for s in pool.stages}
    # reason: merging keeps a subset of the resolution boundaries, splitting keeps all of them
    assert firsts < pool_firsts if num_stages < 5 else firsts > pool_firsts
    reductions = [s.reduction for s in plan.stages]
    assert reductions == sorted(reductions) and reductions[-1] == 32
    assert sum(s.flops for s in plan.stages) == sum(s.flops for s in pool.stages)
    _exact(plan, model, SMALL)


def test_blocks_boundaries_on_a_cnn_split_into_equal_flops():
    # reason: balance="flops" asked for: the default ("auto") also weighs the saved bytes, larger at high resolution
    plan = fxrelay.partition(torchvision.models.resnet18(), boundaries="blocks", num_stages=3, example_input=SMALL,
                             balance="flops")
    flops = [s.flops for s in plan.stages]
    assert plan.boundaries == "blocks" and len(flops) == 3 and max(flops) <= 2.5 * min(flops), flops
    assert [s.outputs[-1] for s in plan.stages[:2]] == ["layer1_1_relu_1", "layer2_1_relu_1"]  # reason: block ends


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class DataDependentWidth(nn.Module):
    def __init__(self, ratio: float = 0.5):
        super().__init__()
        self.ratio = ratio

    def forward(self, x):
        return x[:, : int(x.size(1) * self.ratio)].repeat(1, 2, 1, 1)


class WithUntraceableSubmodules(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gate = DataDependentGate()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.width = DataDependentWidth()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv2(self.gate(self.conv1(x)))
        return self.fc(self.width(x).mean((2, 3)))


class UntraceableTopLevel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return x


def test_untraceable_submodules_become_leaves():
    model = WithUntraceableSubmodules()
    plan = fxrelay.partition(model, example_input=SMALL)
    assert plan.leaves == ("gate", "width")
    assert [n.target for n in plan.graph_module.graph.nodes if n.op == "call_module"] == \
        ["conv1", "gate", "conv2", "width", "fc"]
    assert [s.reduction for s in plan.stages] == [2, 4]
    assert "traced as leaves (untraceable code): gate, width" in str(plan)
    _exact(plan, model, SMALL)


def test_untraceable_top_level_forward_names_the_line():
    lines, first = inspect.getsourcelines(UntraceableTopLevel.forward)
    line = first + next(i for i, text in enumerate(lines) if "if x.sum() > 0" in text)
    with pytest.raises(TraceError) as error:
        fxrelay.partition(UntraceableTopLevel(), example_input=SMALL)
    assert error.value.location == f"{__file__}:{line}"
    assert f"test_partition.py:{line}" in str(error.value) and "if x.sum() > 0:" in str(error.value)


def test_bad_arguments():
    with pytest.raises(TypeError, match="expects an nn.Module, got function"):
        fxrelay.partition(torchvision.models.resnet18)
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match=r"boundaries must be one of auto, pool, blocks, got 'pools' \(did you mean 'pool'\?\)"):
        fxrelay.partition(model, boundaries="pools", example_input=SMALL)
    for wrong in (0, 10_000):
        with pytest.raises(ValueError, match=rf"num_stages must be between 1 and \d+ .*got {wrong}"):
            fxrelay.partition(model, num_stages=wrong, example_input=SMALL)


def test_plan_prints_a_table_of_stages():
    plan = fxrelay.partition(torchvision.models.resnet18(), example_input=SMALL)
    lines = str(plan).splitlines()
    assert lines[0] == "Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, 0.297 GFLOPs/sample"
    assert lines[1].split() == ["stage", "name", "red", "shape", "params", "GFLOPs", "share", "nodes", "saved", "MB",
                                "in", "->", "out"]
    assert lines[2].split() == ["0", "stem", "2", "64x32x32", "9.54K", "0.0193", "6.5%", "3", "0.55", "x", "->", "relu"]
    assert len(lines) == 7
    assert repr(plan) == "Plan(ResNet, stages=5, heads=0, mode='standard', boundaries='pool')"


# Timm CNN families whose "pool" plan has one stage per feature_info level: the list of stage
# reductions equals feature_info's reductions exactly (the last stage holds the deepest level and
# the classifier, so there are as many stages as levels). Smallest variants, 96 px.
FEATURE_INFO_FAMILIES = {
    "byobnet": "gernet_s",
    "convnext": "convnext_atto",
    "cspnet": "cs3darknet_focus_s",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "edgenext": "edgenext_xx_small",
    "efficientnet": "mnasnet_small",
    "fasternet": "fasternet_t0",
    "ghostnet": "ghostnetv3_050",
    "hardcorenas": "hardcorenas_b",
    "hrnet": "hrnet_w18_small",
    "inception_next": "inception_next_atto",
    "metaformer": "poolformerv2_s12",
    "mobilenetv3": "mobilenetv3_small_050",
    "nfnet": "test_nfnet",
    "rdnet": "rdnet_tiny",
    "regnet": "regnetx_002",
    "repghost": "repghostnet_050",
    "resnest": "resnest14d",
    "resnet": "test_resnet",
    "resnetv2": "resnetv2_18",
    "rexnet": "rexnet_100",
    "senet": "legacy_seresnet18",
    "sknet": "skresnet18",
    "vgg": "vgg11",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception_aligned": "xception41p",
}
FEATURE_INFO_EXCLUDED = {
    # a stem that computes at reduction 2 gets a stage of its own; timm lists features from 4 only
    "efficientvit_mit": "stride-2 stem level not in feature_info",
    "hgnet": "stride-2 stem level not in feature_info",
    "lcnetv2": "stride-2 stem level not in feature_info",
    "mambaout": "stride-2 stem level not in feature_info",
    "repvit": "stride-2 stem level not in feature_info",
    "starnet": "stride-2 stem level not in feature_info",
    "tresnet": "feature_info claims reduction 2 for a space-to-depth stem that reduces by 4",
    "convmixer": "isotropic: one feature_info entry per block, partitioned by FLOPs instead",
    # match in examples/zoo_sweep.py, but too slow or need too large an input for this test
    "inception_v3": "valid convs: needs >= 224 px (at 96 px its last level is 3x3 -> 1x1)",
    "inception_v4": "as inception_v3, 43M params",
    "inception_resnet_v2": "as inception_v3, 56M params",
    "selecsls": "its stride-2 head conv needs >= 224 px to measure 64 (3x3 -> 2x2 at 96 px)",
    "nasnet": "nasnetalarge only: 89M params at 331 px",
    "pnasnet": "pnasnet5large only: 86M params at 331 px",
    "xception": "legacy_xception; xception_aligned covers the family in less time",
    "res2net": "res2next50 only: 25M params, covered by resnet/resnest/sknet",
}


def test_feature_info_families_are_many_and_disjoint_from_exclusions():
    assert len(FEATURE_INFO_FAMILIES) >= 20 and not set(FEATURE_INFO_FAMILIES) & set(FEATURE_INFO_EXCLUDED)


@pytest.mark.parametrize("name", FEATURE_INFO_FAMILIES.values(), ids=FEATURE_INFO_FAMILIES.keys())
def test_pool_plan_reductions_equal_timm_feature_info(name):
    # reason: exactness of run_stages is checked on every family by examples/zoo_sweep.py
    model = timm.create_model(name).eval()
    plan = fxrelay.partition(model, boundaries="pool", example_input=torch.randn(1, 3, 96, 96))
    assert [s.reduction for s in plan.stages] == [f["reduction"] for f in model.feature_info]


def test_balance_by_memory_splits_where_activations_are_largest():
    model = torchvision.models.resnet50()
    by_flops = fxrelay.partition(model, num_stages=8, balance="flops", example_input=SMALL)
    by_memory = fxrelay.partition(model, num_stages=8, balance="memory", example_input=SMALL)
    assert len(by_memory.stages) == len(by_flops.stages) == 8
    assert max(s.saved_bytes for s in by_memory.stages) < 0.6 * max(s.saved_bytes for s in by_flops.stages)
    with pytest.raises(ValueError, match="balance must be one of auto, flops, memory, recompute, got 'mem'.*"
                                         "did you mean 'memory'"):
        fxrelay.partition(model, balance="mem", example_input=SMALL)


def test_auto_balance_serves_compute_and_memory_and_recompute_keeps_the_least():
    """auto: FLOPs as even as by FLOPs, the largest stage's saved bytes far below; recompute: the smallest
    boundaries-plus-largest-stage of all (resnet50 at 224 px, 8 stages: 29.9 MB per sample against 36.8)."""
    model = torchvision.models.resnet50()
    x = torch.randn(1, 3, 224, 224)
    plans = {b: fxrelay.partition(model, num_stages=8, balance=b, example_input=x)
             for b in ("flops", "memory", "auto", "recompute")}
    assert all(len(p.stages) == 8 for p in plans.values())
    most_flops = {b: max(s.flops for s in p.stages) for b, p in plans.items()}
    most_saved = {b: max(s.saved_bytes for s in p.stages) for b, p in plans.items()}
    assert most_flops["auto"] <= 1.05 * most_flops["flops"] and most_saved["auto"] < 0.65 * most_saved["flops"]
    peak = {b: sum(s.boundary_bytes for s in p.stages) + 2 * most_saved[b] for b, p in plans.items()}
    assert peak["recompute"] == min(peak.values()) and peak["recompute"] < 0.85 * peak["memory"]
    _exact(plans["recompute"], model, torch.randn(2, 3, 64, 64))
