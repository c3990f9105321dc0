"""Tests for fxrelay.diagrams.render: stage- and node-level drawings parsed back from SVG/JSON."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxrelay
from fxrelay import Head, Plan
from fxrelay.diagrams.render import DEFAULT_DEPTH, GraphvizNotFound, render, render_graph

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz 'dot' is not installed")
MODELS = {"vgg19_bn": 64, "resnet50": 64, "densenet121": 64, "vit_tiny_patch16_224": 224}
SVG = "{http://www.w3.org/2000/svg}"


def relay_heads(num_stages: int, window: int = 2, aux_weight: float = 0.3) -> tuple[Head, ...]:
    """Relay BP: aux heads on every stage but the first two and the last, the lowest reaching stage 0."""
    stages = list(range(2, num_stages - 1)) + [num_stages - 1]
    return tuple(
        Head(j, a, (0 if j == 0 else a - window + 1, a), 1.0 if a == num_stages - 1 else aux_weight,
             "main" if a == num_stages - 1 else "auto")
        for j, a in enumerate(stages)
    )


def greedy_heads(num_stages: int) -> tuple[Head, ...]:
    """Greedy: a head on every stage, each training its own stage only."""
    return tuple(Head(k, k, (k, k), 1.0 if k == num_stages - 1 else 0.3, "main" if k == num_stages - 1 else "linear")
                 for k in range(num_stages))


def with_heads(plan: Plan, mode: str) -> Plan:
    heads = relay_heads if mode == "relay" else greedy_heads
    return dataclasses.replace(plan, heads=heads(len(plan.stages)), mode=mode)


def svg_items(svg: bytes) -> dict[str, list[str]]:
    """Titles of the SVG's clusters, nodes and edges, and all its text."""
    root = ET.fromstring(svg)
    items: dict[str, list[str]] = {"cluster": [], "node": [], "edge": []}
    for g in root.iter(f"{SVG}g"):
        if g.get("class") in items:
            items[g.get("class")].append(g.find(f"{SVG}title").text)
    items["text"] = [t.text or "" for t in root.iter(f"{SVG}text")]
    return items


class LongSkip(nn.Module):
    """Four resolution levels; the classifier also reads stage 1's output (a two-tensor cut)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.downs = nn.ModuleList(nn.Conv2d(8, 8, 3, stride=2, padding=1) for _ in range(3))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = self.stem(x).relu()
        b = self.downs[0](a).relu()
        d = self.downs[2](self.downs[1](b).relu()).relu()
        return self.fc(torch.cat([F.adaptive_avg_pool2d(b, 1).flatten(1), d.mean((2, 3))], 1))


@pytest.fixture(scope="module", params=list(MODELS))
def plan(request) -> Plan:
    size = MODELS[request.param]
    return fxrelay.partition(timm.create_model(request.param), example_input=torch.randn(2, 3, size, size))


@needs_dot
def test_stage_level_relay(plan):
    relay = with_heads(plan, "relay")
    items = svg_items(render_graph(relay, "stage").pipe(format="svg"))
    num_stages = len(plan.stages)
    assert sorted(items["cluster"]) == sorted(f"cluster_stage_{i}" for i in range(num_stages))
    assert {f"stage_{i}" for i in range(num_stages)} | {f"head_{h.index}" for h in relay.heads} | {"legend"} \
        <= set(items["node"])
    text = " ".join(items["text"])
    lo, hi = relay.heads[0].span
    assert f"loss 0 (head at stage {hi}, auto, w=0.3) trains stages {lo}–{hi}" in text
    assert f"loss {len(relay.heads) - 1} (head at stage {num_stages - 1}, main, w=1)" in text
    # reason: single-tensor cuts; windows start at 0, 2, 3, ..., S-2: one scope per start above 0
    assert all(len(s.inputs) == 1 for s in plan.stages)
    assert sum(n.startswith("scope_") for n in items["node"]) == num_stages - 3
    chips = [n for n in items["node"] if n.startswith("window_")]
    assert len(chips) == sum(h.span[1] - h.span[0] + 1 for h in relay.heads)


@needs_dot
def test_node_level_accounts_for_every_live_node(plan):
    relay = with_heads(plan, "relay")
    items = svg_items(render_graph(relay, "node").pipe(format="svg"))
    assert sorted(items["cluster"]) == sorted(f"cluster_stage_{i}" for i in range(len(plan.stages)))
    assert {f"head_{h.index}" for h in relay.heads} | {"legend"} <= set(items["node"])
    live, frontier = set(), [plan.output_node]
    while frontier:  # reason: every node the output depends on, found independently of render's own walk
        frontier = [s for n in frontier for s in n.all_input_nodes if s.name not in live]
        live |= {n.name for n in frontier}
    live -= set(plan.input_names)
    grouped = sum(int(m) for t in items["text"] for m in re.findall(r"^(\d+) ops", t))
    single = sum(n.startswith("node_") for n in items["node"])
    assert grouped + single == len(live)
    assert len(items["node"]) < 400


@needs_dot
@pytest.mark.parametrize("mode", ["relay", "greedy"])
def test_stage_layout_columns(plan, mode):
    """Window chips left of their stage in loss order, heads right of it, each window one straight bar."""
    drawn = with_heads(plan, mode)
    layout = json.loads(render_graph(drawn, "stage").pipe(format="json"))
    x = {o["name"]: float(o["pos"].split(",")[0]) for o in layout["objects"] if "pos" in o}
    for stage in drawn.stages:
        chips = [x[f"window_{h.index}_{stage.index}"] for h in drawn.heads if h.span[0] <= stage.index <= h.span[1]]
        heads = [x[f"head_{h.index}"] for h in drawn.heads if h.stage == stage.index]
        row = chips + [x[f"stage_{stage.index}"]] + heads
        assert row == sorted(row)
    for h in drawn.heads:
        assert len({x[f"window_{h.index}_{k}"] for k in range(h.span[0], h.span[1] + 1)}) == 1
    width_px = float(layout["bb"].split(",")[2]) * 96 / 72
    assert width_px < 800


@needs_dot
def test_multi_tensor_cut_draws_one_edge_per_tensor():
    plan = fxrelay.partition(LongSkip(), example_input=torch.randn(2, 3, 32, 32))
    assert plan.stages[3].inputs == ("relu_1", "relu_2")
    items = svg_items(render_graph(with_heads(plan, "greedy"), "stage").pipe(format="svg"))
    edges = [tuple(title.split("->")) for title in items["edge"]]
    scopes_into_3 = {tail for tail, head in edges if head == "stage_3" and tail.startswith("scope_")}
    producers = sorted(tail for tail, head in edges if head in scopes_into_3)
    assert producers == ["stage_1", "stage_2"]
    assert "✕ scope: L3 stops" in items["text"]


@needs_dot
def test_files_by_suffix(tmp_path):
    model = torchvision.models.resnet18()
    example = torch.randn(2, 3, 64, 64)
    magic = {".svg": b"<?xml", ".png": b"\x89PNG", ".pdf": b"%PDF", ".dot": b"digraph"}
    for suffix, head in magic.items():
        path = render(model, tmp_path / f"r{suffix}", example_input=example)
        assert path == tmp_path / f"r{suffix}" and path.read_bytes().startswith(head)
    png = (tmp_path / "r.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") < 1600  # reason: a 5-stage picture fits a screen
    with pytest.raises(ValueError, match=r"\.jpg"):
        render(model, tmp_path / "r.jpg")
    with pytest.raises(ValueError, match="level"):
        render_graph(fxrelay.partition(model, example_input=example), "module")


def test_without_dot_only_dot_files(tmp_path, monkeypatch):
    plan = fxrelay.partition(torchvision.models.resnet18(), example_input=torch.randn(2, 3, 64, 64))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert render(plan, tmp_path / "plan.dot").read_text().count("subgraph cluster_stage_") == 5
    with pytest.raises(GraphvizNotFound, match="apt-get install graphviz") as error:
        render(plan, tmp_path / "plan.svg")
    assert isinstance(error.value, RuntimeError) and "brew install graphviz" in str(error.value)
    assert not (tmp_path / "plan.svg").exists()


@needs_dot
def test_plain_and_deployed_models_have_no_heads(tmp_path):
    deploy = pytest.importorskip("fxrelay.deploy").deploy
    model, example = torchvision.models.resnet18(), torch.randn(2, 3, 64, 64)
    for name, m in (("plain", model), ("deployed", deploy(model, example))):
        items = svg_items(render(m, tmp_path / f"{name}.svg", level="node", example_input=example).read_bytes())
        assert len(items["cluster"]) == 5
        assert not any(n.startswith(("head_", "scope_")) for n in items["node"])
        assert "no heads: fxrelay.transform adds the losses" in " ".join(items["text"])
    assert "BatchNorm2d" not in " ".join(items["text"])


@needs_dot
def test_transformed_model_draws_its_plan(tmp_path):
    rewrite = pytest.importorskip("fxrelay.passes.rewrite")
    model = rewrite.transform(torchvision.models.resnet18(num_classes=10), "relay",
                              example_input=torch.randn(2, 3, 64, 64))
    plan = rewrite.plan_of(model)
    items = svg_items(render(model, tmp_path / "relay.svg").read_bytes())
    assert len(items["cluster"]) == len(plan.stages) == 5
    assert sorted(n for n in items["node"] if n.startswith("head_")) == [f"head_{h.index}" for h in plan.heads]
    text = " ".join(items["text"])
    assert all(f"loss {h.index} (head at stage {h.stage}" in text for h in plan.heads)


def test_depth_collapses_modules():
    plan = fxrelay.partition(torchvision.models.resnet18(), example_input=torch.randn(2, 3, 64, 64))
    source = {d: render_graph(plan, "node", d).source for d in (1, DEFAULT_DEPTH, 3)}
    assert [source[d].count("<B>layer") for d in (1, 2, 3)] == [4, 8, 11]
    assert "<B>layer2</B> · Sequential<BR/><FONT POINT-SIZE=\"8\">16 ops" in source[1]
    assert "<B>layer2.0</B> · BasicBlock<BR/><FONT POINT-SIZE=\"8\">9 ops" in source[2]
    # reason: depth 3 opens the blocks: 8 two-call relus and 3 conv+bn downsamples, the rest single nodes
    assert "<B>layer2.0.downsample</B> · Sequential" in source[3] and "node_layer2_0_conv1" in source[3]
    with pytest.raises(ValueError, match="depth"):
        render_graph(plan, "node", 0)


@needs_dot
def test_head_boxes_say_what_was_built_and_the_title_is_the_given_name(tmp_path):
    from fxrelay.core.plan import si as _si
    from fxrelay.core.plan import times

    model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "relay",
                              example_input=torch.randn(2, 3, 64, 64))
    plan = fxrelay.plan_of(model)
    text = svg_items(render(model, tmp_path / "relay.svg", title="tv:resnet18").read_bytes())["text"]
    aux = [h for h in plan.heads if not h.is_main]
    for k, head in enumerate(aux):
        params = sum(p.numel() for p in model.heads[k].body.parameters())
        assert text[text.index(f"head {head.index}") + 1] == " · auto: conv1x1-BN-ReLU-pool2x2-linear"
        stage = plan.stages[head.stage]
        assert (f"{_si(params)} params ({times(params, stage.params)} stage) · {_si(head.flops)} FLOPs "
                f"({times(head.flops, stage.flops)}) · w=1 → L{head.index}") in text
    assert text[text.index(f"head {plan.heads[-1].index}") + 1] == " · main"
    assert "tv:resnet18" in text and "ResNet" not in text
    assert "ResNet" in svg_items(render(model, tmp_path / "untitled.svg").read_bytes())["text"]


@pytest.mark.parametrize("kind, shape, built", [
    ("auto", (64, 8, 8), "conv1x1-BN-ReLU-pool2x2-linear"),
    ("linear", (64, 8, 8), "pool-linear"),
    ("layercnn", (64, 8, 8), "conv3x3-BN-ReLU-conv3x3-BN-ReLU-pool2x2-linear"),
    ("dgl", (64, 8, 8), "pool2x2-conv1x1-BN-ReLU-conv1x1-BN-ReLU-linear"),
    ("auto", (8, 8, 64), "ChannelsLast-conv1x1-BN-ReLU-pool2x2-linear"),
    ("auto", (16, 64), "TokenMean-LN-linear"),
])
def test_head_layers_are_named_briefly(kind, shape, built):
    from fxrelay.passes.heads import describe_head, make_head

    assert describe_head(make_head(kind, shape, 10)) == built


@needs_dot
def test_png_is_rendered_at_png_dpi(tmp_path):
    from fxrelay.diagrams.render import PNG_DPI

    plan = fxrelay.partition(torchvision.models.resnet18(), example_input=torch.randn(2, 3, 64, 64))
    svg_width_pt = float(ET.fromstring(render(plan, tmp_path / "r.svg").read_bytes()).get("width").removesuffix("pt"))
    png_width_px = int.from_bytes(render(plan, tmp_path / "r.png").read_bytes()[16:20], "big")
    assert PNG_DPI == 192 and png_width_px == pytest.approx(svg_width_pt * PNG_DPI / 72, rel=0.02)
