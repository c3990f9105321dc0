"""Regression tests of the bugs the differential random-graph suite (test_random_graphs.py) found.

Each ``test_diff_...`` failed before its fix; the cases are the suite's, shrunk by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
import torch.multiprocessing as mp
from torch import nn

import fxrelay
from executions import StepOptions, restore, run_step, snapshot
from fxrelay.passes.downstream import Unit, _graph_copy
from graphgen import GraphCase, build
from test_random_graphs import Tally, _free_port, _stage_parallel_worker, check_mode

_HEADER = "import torch\nimport torch.nn.functional as F\nfrom torch import nn\n"

PAIR_STAGE = GraphCase(_HEADER + '''

class Pair(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, v):
        return F.relu(self.a(v)), self.b(v)


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
