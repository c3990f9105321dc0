"""Regression tests of the bugs the differential random-graph suite (test_random_graphs.py) found.

Each ``test_diff_...`` failed before its fix; the cases are the suite's, shrunk by hand.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.fx as fx
import torch.multiprocessing as mp
from torch import nn

import fxrelay
from executions import StepOptions, restore, run_step, snapshot
from fxrelay.passes.downstream import Unit, _graph_copy
from graphgen import PAIR_LINES, GraphCase, build
from test_random_graphs import (AUTOCAST, Tally, _free_port, _stage_parallel_worker, assert_same_step,
                                check_graph, check_mode, float64_steps)

_HEADER = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"
_PAIR = "\n".join(PAIR_LINES) + "\n"  # reason: the leaf class the generator writes, as it writes it

PAIR_STAGE = GraphCase(_HEADER + _PAIR + '''

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.pair3 = Pair(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        v1 = torch.relu_(self.bn1(self.conv1(x)))
        v4 = F.max_pool2d(v1, 2)
        p6 = self.pair3(v4)
        v7 = p6[0] + p6[1]
        return self.fc(v7.mean((2, 3)))
''', (2, 3, 20, 17), 0, leaves=("Pair",))

NAMEDTUPLE_OUTPUT = GraphCase(_HEADER + '''from typing import NamedTuple


class Output(NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        v1 = F.relu(self.conv1(x))
        v2 = F.relu(self.conv2(F.max_pool2d(v1, 2)))
        return Output(self.fc(v2.mean((2, 3))), v2)
''', (2, 3, 16, 16), 0)

SHARED_CONV = GraphCase(_HEADER + '''

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        v1 = F.relu(self.conv1(x))
        v2 = F.relu(self.conv2(F.max_pool2d(v1, 2)))
        v3 = F.relu(self.conv2(F.max_pool2d(v2, 2)))
        return self.fc(v3.mean((2, 3)))
''', (2, 3, 16, 16), 0)

CANCELLING_BIAS = GraphCase(_HEADER + _PAIR + '''

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.scale3 = nn.Parameter(1 + 0.1 * torch.randn(1, 4, 1, 1))
        self.conv4 = nn.Conv2d(4, 6, 3, stride=1, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(6)
        self.act4 = nn.ReLU(inplace=True)
        self.conv5 = nn.Conv2d(6, 4, 1, stride=1, padding=0, bias=False)
        self.bn5 = nn.BatchNorm2d(4)
        self.conv6 = nn.Conv2d(4, 6, 1, stride=1, padding=0, bias=True)
        self.pair7 = Pair(6)
        self.conv8 = nn.Conv2d(10, 8, 1, stride=1, padding=0, bias=False)
        self.bn8 = nn.BatchNorm2d(8)
        self.conv9 = nn.Conv2d(8, 4, 3, stride=2, padding=1, bias=True)
        self.conv10 = nn.Conv2d(4, 6, 3, stride=1, padding=1, bias=True)
        self.conv11 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
        self.bn11 = nn.BatchNorm2d(8)
        self.conv12 = nn.Conv2d(8, 6, 3, stride=1, padding=1, bias=True)
        self.scale13 = nn.Parameter(1 + 0.1 * torch.randn(1, 6, 1, 1))
        self.conv15 = nn.Conv2d(6, 6, 3, stride=1, padding=1, bias=False)
        self.bn15 = nn.BatchNorm2d(6)
        self.conv16 = nn.Conv2d(8, 6, 1, stride=1, padding=0, bias=False)
        self.bn16 = nn.BatchNorm2d(6)
        self.conv17 = nn.Conv2d(6, 8, 3, stride=1, padding=1, bias=False)
        self.bn17 = nn.BatchNorm2d(8)
        self.conv18 = nn.Conv2d(12, 8, 1, stride=1, padding=0, bias=True)
        self.fc = nn.Linear(8, 5)
        self.fc2 = nn.Linear(4, 5)

    def forward(self, x):
        v1 = F.relu(self.conv1(x), inplace=True)
        v4 = F.relu(self.bn2(self.conv2(v1)), inplace=True)
        v5 = v4 * self.scale3
        t6 = v5.chunk(2, 1)
        v7 = self.act4(self.bn4(self.conv4(v5)))
        v8 = self.bn5(self.conv5(v7))
        v10 = F.max_pool2d(v7, 2)
        hw11 = v10.shape[-2:]
        v12 = torch.relu_(v8)
        v13 = F.adaptive_avg_pool2d(v12, v10.shape[-2:])
        v14 = self.conv6(v13)
        v15 = v10 + v14
        p16 = self.pair7(v15)
        v17 = p16[0] + p16[1]
        v18 = torch.cat([t6[1], t6[0]], 1)
        v19 = F.adaptive_avg_pool2d(v18, v17.shape[-2:])
        v20 = torch.cat([v17, v19], 1)
        v21 = self.bn8(self.conv8(v20)).relu_()
        v23 = F.relu(self.conv9(v21))
        v25 = F.relu(self.conv10(v23))
        v28 = F.relu(self.bn11(self.conv11(v25)))
        v30 = self.conv12(v28)
        v31 = v30 * self.scale13
        v35 = F.interpolate(v31, size=v25.shape[-2:])
        v36 = v35 + v25
        v37 = torch.relu_(self.bn15(self.conv15(v36)))
        v38 = F.interpolate(v37, size=hw11)
        v39 = self.bn16(self.conv16(v21))
        v40 = v38 + v39
        v41 = torch.relu_(self.bn17(self.conv17(v40)))
        v42 = F.adaptive_avg_pool2d(v8, v41.shape[-2:])
        v43 = torch.cat([v41, v42], 1)
        v44 = self.conv18(v43)
        v45 = F.interpolate(v44, size=hw11)
        logits46 = self.fc(v45.mean((2, 3))) + self.fc2(v1.mean((2, 3)))
        return logits46
''', (2, 3, 24, 29), 1437, leaves=("Pair",))

DEEP_CANCELLING_BIAS = GraphCase(_HEADER + '''

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=True)
        self.conv3 = nn.Conv2d(6, 6, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)
        self.act3 = nn.ReLU(inplace=True)
        self.w4 = nn.Parameter(torch.randn(12, 12, 3, 3) * 0.136)
        self.conv5 = nn.Conv2d(12, 4, 3, stride=1, padding=1, bias=False)
        self.bn5 = nn.BatchNorm2d(4)
        self.conv6 = nn.Conv2d(16, 6, 1, stride=1, padding=0, bias=True)
        self.act7 = nn.ReLU(inplace=True)
        self.conv8 = nn.Conv2d(22, 6, 1, stride=1, padding=0, bias=False)
        self.bn8 = nn.BatchNorm2d(6)
        self.act8 = nn.ReLU()
        self.fc = nn.Linear(6, 5)
        self.fc2 = nn.Linear(4, 5)
        self.conv5.requires_grad_(False)
        self.conv3.requires_grad_(False)

    def forward(self, x):
        v1 = self.conv1(x)
        v4 = torch.relu_(self.conv2(v1))
        v5 = self.act3(self.bn3(self.conv3(v4)))
        v6 = torch.cat([v4, v5], 1)
        v7 = F.relu(F.conv2d(v6, self.w4, padding=1))
        v9 = F.avg_pool2d(v7, 2)
        hw10 = v9.shape[-2:]
        v12 = torch.relu_(self.bn5(self.conv5(v9)))
        v13 = torch.cat([v9, v12], 1)
        v14 = self.conv6(v13)
        v15 = F.max_pool2d(v13, 2)
        v17 = self.act7(v14)
        v18 = F.interpolate(v17, size=v15.shape[-2:])
        v19 = torch.cat([v15, v18], 1)
        v20 = self.act8(self.bn8(self.conv8(v19)))
        v22 = F.adaptive_avg_pool2d(v14, v20.shape[-2:])
        v23 = v20 + v22
        v24 = F.interpolate(v23, size=hw10, mode='bilinear', align_corners=False)
        logits25 = self.fc(v24.mean((2, 3))) + self.fc2(v1.mean((2, 3)))
        return logits25
''', (2, 3, 22, 28), 6072, frozenset({
    "avg_pool", "batchnorm", "dense_cat", "frozen", "inplace_act", "inplace_on_cut", "max_pool", "raw_param",
    "size_crossing", "strided_conv", "two_outputs"}))


@pytest.mark.parametrize("mode", ["greedy", "relay", "deep"])
def test_diff_aux_head_on_a_tuple_stage_reads_its_first_tensor(mode):
    model, x, y = build(PAIR_STAGE)
    plan = fxrelay.partition(model, example_input=x, tracing=fxrelay.TracingConfig(leaf_modules=model.leaf_modules))
    assert plan.stages[1].outputs[-1] == "pair3"  # reason: stage 1 ends in the pair; its head reads a tuple
    check_mode(model, x, y, PAIR_STAGE, mode, {"head_kind": "dgl", "skip_first": 0}, StepOptions(), Tally())


def test_diff_sequential_refuses_a_namedtuple_output():
    model, x, y = build(NAMEDTUPLE_OUTPUT)
    transformed = fxrelay.transform(model, "greedy", example_input=x, skip_first=0)
    with pytest.raises(ValueError, match=r"namedtuple output\): return the logits alone, or use execution='local'"):
        run_step(transformed, x, y, "sequential", stage=0)
    run_step(transformed, x, y, "local")  # reason: the execution the message names works


def test_diff_sequential_trains_a_shared_parameter_with_its_own_head_alone():
    """conv2 is used by stages 1 and 2: the one-line greedy step gives it both heads' shares, the
    sequential step of stage 2 only head 2's (its stage-1 use runs in the frozen prefix)."""
    model, x, y = build(SHARED_CONV)
    transformed = fxrelay.transform(model, "greedy", example_input=x, skip_first=0)
    start = snapshot(transformed)
    owner = next(n for n, p in transformed.named_parameters() if p is model.conv2.weight)
    both = run_step(transformed, x, y, "one-line").grads[owner]
    restore(transformed, start)
    head = fxrelay.train.sequential.StageStep(transformed, 2).head
    alone = run_step(transformed, x, y, "one-line", head=head).grads[owner]
    restore(transformed, start)
    sequential = run_step(transformed, x, y, "sequential", stage=2).grads[owner]
    assert torch.allclose(sequential, alone, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(sequential, both, rtol=1e-3)


class _ReluThenConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu_(self.conv(x)))


def test_diff_downstream_head_copies_an_in_place_function_out_of_place():
    """A downstream head's copy of a layer starting with ``torch.relu_`` must not mutate its input
    (the stage output the next stage still reads)."""
    gm = fx.symbolic_trace(_ReluThenConv())
    conv, relu, conv2 = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    copy = _graph_copy(gm, Unit((relu, conv2), conv, (), 0, ()))
    features = torch.randn(2, 4, 8, 8)
    before = features.clone()
    copy(features)
    assert torch.equal(features, before)


def test_diff_stage_parallel_refuses_a_head_view_made_on_a_later_rank(tmp_path):
    """relay, 2 ranks: head 0's criterion sees the namedtuple output, whose features leaf stage 1
    makes on rank 1, while rank 1 sends rank 0 cotangents: refused with the fix, on both ranks
    (the greedy case, with no cotangents, runs and matches the one-line step)."""
    cases = [(NAMEDTUPLE_OUTPUT, "relay", {"skip_first": 0, "window": 2}, 2),
             (NAMEDTUPLE_OUTPUT, "greedy", {"skip_first": 0}, 1)]
    mp.spawn(_stage_parallel_worker, args=(_free_port(), cases, str(tmp_path)), nprocs=2)
    for rank in range(2):
        refused, greedy = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert refused.startswith("refused: rank 1 sends rank 0 values and cotangents; a head on rank 0 reads"), refused
        assert "return the logits alone, or use LocalStep" in refused and greedy == "ok", (refused, greedy)


@pytest.mark.filterwarnings("ignore:relay with window=3:UserWarning")  # reason: the case as the suite drew it
def test_diff_autocast_executions_round_as_far_as_the_one_line_step():
    """The long runs' two autocast failures (seed 1437: relay, window 3, DGL heads, 2 micro-batches;
    seed 6072: deep, window 1, DGL heads), each on the first conv's bias, where the sum over every
    position cancels: ``LocalStep``'s gradient is 3.4% / 5.2% from the one-line step's under
    bfloat16, while each is as far from the float64 step as the other (the one-line step 40% /
    2.0% of the value, ``LocalStep`` 35% / 6.0%): two roundings, not a wrong gradient. The suite
    accepts an execution within ``ROUNDING_FACTOR`` times the one-line step's own error."""
    model, x, y = build(CANCELLING_BIAS)
    x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y.roll(1)])
    options = {"window": 3, "head_stages": "auto", "skip_first": 0, "head_kind": "dgl", "aux_weight": 1.0}
    step = StepOptions(micro_batches=2, autocast=True, seed=CANCELLING_BIAS.seed)
    torch.manual_seed(0)  # reason: the heads' initial weights of the suite's run
    transformed = fxrelay.transform(model, "relay", example_input=x, **options,
                                    tracing=fxrelay.TracingConfig(leaf_modules=model.leaf_modules))
    float64 = float64_steps(transformed, x, y, step, None)[None]
    transformed.float()
    start = snapshot(transformed)
    records = {}
    for execution in ("one-line", "local"):
        restore(transformed, start)
        records[execution] = run_step(transformed, x.float(), y, execution, step)
    one_line, local = records["one-line"], records["local"]
    bias = "stages.conv1.conv1.bias"
    exact = float64.grads[bias]
    apart = (local.grads[bias] - one_line.grads[bias]).abs().max().item()
    assert apart > AUTOCAST * one_line.grads[bias].abs().max().item()  # reason: beyond the flat tolerance
    errors = [(g.grads[bias].double() - exact).abs().max().item() / exact.abs().max().item() for g in records.values()]
    assert 0.3 < min(errors) and max(errors) < 0.45, errors
    assert_same_step(local, one_line, AUTOCAST, "local vs one-line: ", float64=float64)


class _Drawn:
    """A ``st.data()`` that gives back the values a long run recorded, in order."""

    def __init__(self, draws: list[tuple[str, object]]):
        self.draws = list(draws)

    def draw(self, strategy: object, label: str) -> object:
        recorded, value = self.draws.pop(0)
        assert recorded == label, (recorded, label)
        return value


def test_diff_autocast_deep_case_replayed_passes():
    """The second failure (seed 6072, every mode with the options the run drew): deep, window 1, DGL
    heads, autocast: ``LocalStep``'s gradient of the first conv's bias 5.2% from the one-line step's,
    6.0% from the float64 step's against the one-line step's 2.0% (within ``ROUNDING_FACTOR``)."""
    drawn = [("micro_batches", 1), ("autocast", 7)]
    for mode, window, heads, skip, kind, weight in (("relay", 1, [0, 1], 3, "dgl", 1.0),
                                                     ("greedy", 2, "auto", 3, "auto", 1.0),
                                                     ("deep", 1, "auto", 0, "dgl", 0.3)):
        drawn += [(f"{mode} window", window), (f"{mode} heads", heads), (f"{mode} skip_first", skip),
                  (f"{mode} head", kind), (f"{mode} aux_weight", weight)]
    check_graph(DEEP_CANCELLING_BIAS, _Drawn(drawn), Tally())
