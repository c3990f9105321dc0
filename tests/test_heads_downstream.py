"""Downstream heads (issue 21): aux heads made of fresh copies of the model's own later layers."""

import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxrelay
from fxrelay.passes.downstream import Downstream, DownstreamHead, default_depth, later_units
from fxrelay.passes.heads import make_head
from fxrelay.passes.tracing import module_path
from executions import restore, run_step, snapshot
from graph_oracle import assert_grads_close, one_line_grads, reference_grads


class UserCNN(nn.Module):
    """A user CNN with named layers and functional activations (no block modules)."""

    def __init__(self, num_classes: int = 5, width: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3, self.bn3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width)
        self.conv4, self.bn4 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False), \
            nn.BatchNorm2d(4 * width)
        self.conv5 = nn.Conv2d(4 * width, 4 * width, 3, padding=1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.bn4(self.conv4(x)))
        x = F.relu(self.conv5(x))
        return self.fc(x.mean((2, 3)))


def _transform(model, x, mode="greedy", **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxrelay.transform(model, mode, example_input=x, **kwargs)


def _later_types(model: nn.Module, plan: fxrelay.Plan, stage: int) -> set[str]:
    """Types of the modules (blocks and their parts) that the stages after ``stage`` call."""
    nodes = {n.name: n for n in plan.graph_module.graph.nodes}
    paths = {module_path(nodes[name]) for s in plan.stages[stage + 1:] for name in s.nodes}
    return {type(model.get_submodule(".".join(p[:k]))).__name__ for p in paths for k in range(1, len(p) + 1)}


def _types(head: nn.Module) -> set[str]:
    return {type(m).__name__ for m in head.layers.modules()}


CASES = {  # name: (model, input shape, module types the lowest head must hold)
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), {"BasicBlock"}),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), (3, 32, 32), {"ConvNeXtBlock"}),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), (3, 32, 32),
                        {"InvertedResidual"}),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8),
                 (3, 32, 32), {"Block"}),
    "user_cnn": (UserCNN, (3, 16, 16), {"Conv2d", "BatchNorm2d"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_head_holds_the_later_stages_module_types(name):
    build, shape, want = CASES[name]
    torch.manual_seed(0)
    x = torch.randn(2, *shape)
    original = build()
    model = _transform(original, x, head_kind="downstream")
    plan = fxrelay.plan_of(model)
    assert plan.aux_heads and all(h.kind == "downstream" for h in plan.aux_heads)
    for k, h in enumerate(plan.aux_heads):
        body = model.heads[k].body
        assert isinstance(body, DownstreamHead) and h.layers == body.description
        assert h.layers.startswith("downstream: ") and "conv in place" not in h.layers, h.layers
        assert h.params == sum(p.numel() for p in body.parameters()) and h.flops > 0
        copies = _types(body) - {"Sequential", "Module", "GraphModule", "Identity", "AvgPool2d"}
        later = _later_types(original, plan, h.stage) | {"Conv2d", "Linear"}  # reason: adapters
        assert copies <= later, (copies - later, h.layers)
    assert want <= _types(model.heads[0].body), (_types(model.heads[0].body), plan.aux_heads[0].layers)
    model.train()
    values = fxrelay.head_outputs(model(x))
    assert [tuple(v.shape) for v in values] == [(2, 10 if name != "user_cnn" else 5)] * len(plan.heads)


def test_resnet18_heads_copy_blocks_at_half_width_with_the_pyramid_depth():
    x = torch.randn(2, 3, 32, 32)
    model = _transform(torchvision.models.resnet18(num_classes=10), x, head_kind="downstream")
    plan = fxrelay.plan_of(model)
    assert [len(model.heads[k].body.description.split(", ")) for k in range(4)] == [3, 3, 2, 1]
    assert [default_depth(s, 5) for s in range(4)] == [3, 3, 2, 1]
    assert plan.aux_heads[2].layers == ("downstream: layer3.1(BasicBlock)x0.5, "
                                        "layer4.1..avgpool(BasicBlock+AdaptiveAvgPool2d)x0.5 - pool - linear")
    block = next(m for m in model.heads[2].body.modules() if isinstance(m, torchvision.models.resnet.BasicBlock))
    assert block.conv1.in_channels == 128 and block.conv1.out_channels == 128  # reason: layer3's 256 at x0.5
    assert plan.step_flops() == sum(s.flops for s in plan.stages) + sum(h.flops for h in plan.heads) + \
        fxrelay.core.channels.backward_flops(plan.stages, plan.heads)


def test_depth_and_width_options_and_the_vit_width_that_a_reshape_pins():
    x = torch.randn(2, 3, 32, 32)
    model = _transform(torchvision.models.resnet18(num_classes=10), x, head_kind=Downstream(depth=1, width=1.0))
    assert fxrelay.plan_of(model).aux_heads[0].layers.count("x1") == 1
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    model = _transform(vit, x, head_kind=Downstream(depth=2))
    assert "(Block)x1," in fxrelay.plan_of(model).aux_heads[0].layers  # reason: qkv reshape pins head_dim


class TwoReads(nn.Module):
    """Stage 3's first layer reads two tensors from below (the add reads stage 1's output): not copyable."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU()) for _ in range(3))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        b = self.downs[0](self.stem(x))
        d = self.downs[2](self.downs[1](b))
        return self.fc((d + F.avg_pool2d(b, 4)).mean((2, 3)))


def test_a_layer_that_reads_two_tensors_falls_back_to_a_conv_and_says_so():
    x = torch.randn(2, 3, 32, 32)
    model = _transform(TwoReads(), x, head_kind="downstream", num_stages=4)
    plan = fxrelay.plan_of(model)
    assert plan.stages[3].inputs[-2:] == ("downs_0_1", "downs_1_1"), plan.stages[3].inputs
    text = plan.aux_heads[2].layers
    assert text.startswith("downstream: downs.2.0..downs.2.1(conv in place of Conv2d+ReLU: it reads downs_0_1 "), text
    conv = model.heads[2].body.layers[0][0]
    assert isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.out_channels == 4


def test_make_head_refuses_downstream_and_the_factory_needs_transform():
    with pytest.raises(ValueError, match="transform"):
        make_head("downstream", (8, 4, 4), 3)
    with pytest.raises(TypeError, match="transform"):
        Downstream()((8, 4, 4), 3)
    with pytest.raises(ValueError, match="depth"):
        Downstream(depth=0)


@pytest.mark.parametrize("mode", ["relay", "greedy", "deep"])
def test_gradients_exact_under_the_oracle(mode):
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (4,))
    kwargs = {"head_stages": [1, 2]} if mode == "relay" else {}
    model = _transform(UserCNN().double(), x, mode, head_kind="downstream", num_stages=4, **kwargs)
    model.train()
    assert_grads_close(one_line_grads(model, x, y), reference_grads(model, x, y), model, what=f"{mode}: ")
    local = copy.deepcopy(model)
    local.zero_grad(set_to_none=True)
    fxrelay.LocalStep(local, F.cross_entropy)(x, y)
    got = {id(p): (q.grad if q.grad is not None else torch.zeros_like(q))
           for p, q in zip(model.parameters(), local.parameters())}
    assert_grads_close(got, reference_grads(model, x, y), model, what=f"{mode} LocalStep: ")


def _assert_same_grads(got: dict, want: dict, what: str) -> None:
    for name in sorted(got.keys() | want.keys()):
        a, b = got.get(name), want.get(name)
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), f"{what}: {name} differs by {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("mode", ["relay", "greedy", "deep"])
def test_every_execution_gives_the_one_line_gradients(mode):
    # reason: a downstream head is just another head: recompute, LocalStep and (greedy) the
    # sequential step of each stage must give the one-line step's gradients
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (4,))
    kwargs = {"head_stages": [1, 2]} if mode == "relay" else {}
    model = _transform(UserCNN().double(), x, mode, head_kind="downstream", num_stages=4, **kwargs).train()
    state = snapshot(model)
    want = run_step(model, x, y, "one-line")
    assert any(name.startswith("heads.") for name in want.grads)
    for execution in ("recompute", "local"):
        restore(model, state)
        _assert_same_grads(run_step(model, x, y, execution).grads, want.grads, f"{mode} {execution}")
    if mode == "greedy":
        for k, head in enumerate(fxrelay.plan_of(model).heads):
            restore(model, state)
            alone = run_step(model, x, y, "one-line", head=k)
            assert alone.grads, f"head {k} trains nothing"
            restore(model, state)
            _assert_same_grads(run_step(model, x, y, "sequential", stage=head.stage).grads, alone.grads,
                               f"sequential stage {head.stage}")


def test_deploy_equals_eval_and_head_parameters_are_independent():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    original = torchvision.models.resnet18(num_classes=10)
    model = _transform(original, x, "relay", head_kind="downstream")
    model_storage = {p.untyped_storage().data_ptr() for p in original.state_dict().values()}
    head_storage = {p.untyped_storage().data_ptr() for p in model.heads.state_dict().values()}
    assert head_storage and not head_storage & model_storage
    for head in model.heads:
        head.body.layers.apply(lambda m: isinstance(m, nn.BatchNorm2d) and m.running_var.fill_(2.0))
    model.eval()
    deployed = fxrelay.deploy(model)
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)
    assert not any("heads" in name for name, _ in deployed.named_parameters())


def test_densenet_and_plain_cnn_layers():
    x = torch.randn(2, 3, 32, 32)
    model = _transform(torchvision.models.densenet121(num_classes=10), x, head_kind="downstream")
    layers = [h.layers for h in fxrelay.plan_of(model).aux_heads]
    assert all("_DenseBlock" in text or "transition" in text for text in layers), layers
    assert not any("conv in place" in text for text in layers), layers
    plain = fxrelay.models.PlainNet(10, num_classes=10)
    model = _transform(plain, x, head_kind="downstream")
    layers = fxrelay.plan_of(model).aux_heads[0].layers
    assert "(MaxPool2d+Conv2d+BatchNorm2d+ReLU)x0.5" in layers, layers


def test_plan_table_and_inspect_show_head_cost_relative_to_its_stage(capsys):
    from fxrelay.apps.cli import main
    from fxrelay.core.plan import si, times

    assert main(["inspect", "tv:resnet18", "--input-size", "32", "--mode", "greedy", "--head-kind", "downstream"]) == 0
    out = capsys.readouterr().out
    model = _transform(torchvision.models.resnet18(num_classes=1000), torch.randn(2, 3, 32, 32),
                       head_kind="downstream")
    plan = fxrelay.plan_of(model)
    rows = out.split("head  stage  trains")[1].splitlines()[1:5]
    for row, h in zip(rows, plan.aux_heads):
        stage = plan.stages[h.stage]
        assert row.split()[4:8] == ["downstream", si(h.params), f"{h.flops / 1e9:.3g}",
                                    f"{times(h.params, stage.params)}/{times(h.flops, stage.flops)}"]
        assert row.endswith(h.layers)
    assert str(plan).split("head  stage  trains")[1].splitlines()[1:5] == rows


def test_compare_run_specs_name_the_head_kind():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "compare.py"
    spec = importlib.util.spec_from_file_location("compare_for_heads", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    assert compare.parse_run("greedy") == ("greedy", 2, "auto")
    assert compare.parse_run("relay-w1:downstream") == ("relay", 1, "downstream")
    mode, window, head = compare.parse_run("greedy:downstream-d2-x0.25")
    assert (mode, window, head.depth, head.width) == ("greedy", 2, 2, 0.25)
    with pytest.raises(ValueError, match="unknown head kind"):
        compare.parse_run("greedy:downstreem")
    with pytest.raises(ValueError, match="width"):
        compare.parse_run("greedy:downstream-x0")
