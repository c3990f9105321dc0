"""StageParallel: decoupled stage-parallel steps on spawned gloo processes against the
single-process one-line step (tests/oracle.py's comparison)."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxrelay
from fxrelay.train.parallel import StageParallel, balance, split_batch
from fxrelay.train.stagerun import wiring
from nets import SkipNet, _block
from oracle import assert_close

MICROBATCHES = 3


def _batch(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g).double(), torch.randint(0, 10, (n,), generator=g)


class CrossNet(nn.Module):
    """Five resolution levels; stage 3 reads stage 0's output too (a skip edge over three cuts)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = _block(3, width, 1)
        self.downs = nn.ModuleList(_block(width, width, 2) for _ in range(4))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        a = self.stem(x)
        c = self.downs[1](self.downs[0](a))
        d = self.downs[2](c) + F.avg_pool2d(a, 8)
        return self.fc(self.downs[3](d).mean((2, 3)))


def _mixup(logits, target):
    ya, yb, lam = target
    return lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)


def _micro(y, i):
    """Micro-batch ``i`` of a target, written out for the two kinds the tests use."""
    if isinstance(y, tuple):
        ya, yb, lam = y
        return ya.tensor_split(MICROBATCHES)[i], yb.tensor_split(MICROBATCHES)[i], lam
    return y.tensor_split(MICROBATCHES)[i]


def _reference(model, shards, criterion=F.cross_entropy):
    """The synchronous schedule's definition: per replica shard, the one-line step accumulated over
    the micro-batches with each loss scaled by 1/M, averaged over replicas (BN per micro-batch)."""
    model.zero_grad(set_to_none=True)
    for x, y in shards:
        for i, xs in enumerate(x.tensor_split(MICROBATCHES)):
            (criterion(model(xs), _micro(y, i)) / (MICROBATCHES * len(shards))).backward()
    return dict(model.named_parameters())


def _check(build, mode, kwargs, shards, replicas=1, stages_per_rank=None, criterion=F.cross_entropy):
    torch.manual_seed(0)
    model = fxrelay.transform(build().double(), mode, example_input=shards[0][0][:1], **kwargs)
    want = _reference(copy.deepcopy(model), shards, criterion)
    parallel = StageParallel(model, lambda params: torch.optim.SGD(params, lr=0.0), microbatches=MICROBATCHES,
                             replicas=replicas, stages_per_rank=stages_per_rank, criterion=criterion,
                             verbose=False)
    parallel.step(*shards[parallel.replica])
    stats = parallel.step(*shards[parallel.replica])  # reason: a second step overlaps the first's messages
    names = {id(p): n for n, p in model.named_parameters()}
    local = [p for group in parallel.optimizer.param_groups for p in group["params"]]
    expected = {n for n, _ in model.named_parameters()
                if n.split(".")[1] in {str(s) for s in parallel.stages} and n.startswith("stages.")}
    assert expected <= {names[id(p)] for p in local}  # reason: every local stage's parameter is trained here
    assert_close([p.grad for p in local], [want[names[id(p)]].grad for p in local])
    assert 0.0 < stats.busy <= 1.0
    return parallel, stats


def _pipeline_worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)  # reason: several processes share the cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        shards = [_batch(6)]
        parallel, stats = _check(SkipNet, "greedy", {}, shards)  # reason: FLOPs-balanced placement
        assert parallel.placement == [range(0, 1), range(1, 4)]
        assert (stats.logits is not None) == (rank == 1) and set(stats.losses) == \
            {h.index for h in parallel.plan.heads if h.stage in parallel.stages}
        # reason: window (1, 2) spans the boundary 1|2; stage 3 reads stage 1's output and an int across it
        parallel, _ = _check(SkipNet, "relay", {"head_stages": [1, 2], "window": 2}, shards, stages_per_rank=[2, 2])
        assert [h.span for h in parallel.plan.heads] == [(0, 1), (1, 2), (2, 3)]
        # reason: windows (0, 1), (0, 2) and (1, 3) all span the boundary 0|1
        parallel, _ = _check(SkipNet, "relay", {"head_stages": [1, 2], "window": 3}, shards, stages_per_rank=[1, 3])
        assert [h.span for h in parallel.plan.heads] == [(0, 1), (0, 2), (1, 3)]
        parallel = StageParallel(fxrelay.transform(SkipNet(), "greedy", example_input=shards[0][0][:1].float()),
                                 lambda params: torch.optim.SGD(params, lr=0.5), verbose=False)
        parallel.step(shards[0][0].float(), shards[0][1])
        assert not _same_everywhere(parallel.model)  # reason: each rank trained only its own stages
        assert _same_everywhere(parallel.gather_model())
    finally:
        dist.destroy_process_group()


def _same_everywhere(model) -> bool:
    flat = torch.cat([t.flatten().double() for t in model.state_dict().values()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    return all(torch.equal(copies[0], c) for c in copies)


def test_pipeline_of_two_matches_single_process(tmp_path):
    mp.spawn(_pipeline_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)


def _bug10_worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)  # reason: several processes share the cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        x, y = _batch(7)
        target = (y, y.roll(1), 0.3)  # reason: mixup's target: two label tensors and a float
        for mode, kwargs in (("greedy", {}), ("relay", {"head_stages": [1, 2], "window": 2})):
            parallel, _ = _check(SkipNet, mode, kwargs, [(x, target)], stages_per_rank=[2, 2], criterion=_mixup)
            parallel.gather_model()  # reason: waits for the sends in flight before the next model's messages
    finally:
        dist.destroy_process_group()


def test_bug10_tuple_target_matches_single_process(tmp_path):
    mp.spawn(_bug10_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)


def test_split_batch_splits_batch_tensors_only():
    y, w = torch.arange(5), torch.ones(3)
    parts = split_batch({"y": y, "w": w, "lam": 0.5, "none": None}, 5, 2)
    assert [p["y"].tolist() for p in parts] == [[0, 1, 2], [3, 4]]
    assert all(p["w"] is w and p["lam"] == 0.5 and p["none"] is None for p in parts)


def _order_worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)  # reason: several processes share the cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        shards = [_batch(6)]
        for window, heads, crossing in ((4, [3], "BBA"), (3, [2, 3], "BB")):
            parallel, _ = _check(CrossNet, "relay", {"head_stages": heads, "window": window}, shards,
                                 stages_per_rank=[2, 3])
            parallel.gather_model()  # reason: waits for the sends in flight before the next model's messages
            w = wiring(parallel.model)
            a, b = w.plan.stages[0].outputs[0], w.plan.stages[1].outputs[0]
            # reason: rank 1 reads B at stage 2 before A at stage 3; the canonical order sends A first
            assert w.readers[b] == (2,) and w.readers[a] == (1, 3)
            # reason: the cotangents crossing back, in read order (B's first); window 4 makes stage 3
            # send A's before stage 2 sends B's
            names = {a: "A", b: "B"}
            assert "".join(names[r.value] for r in w.reads if r.stage >= 2 and r.value in names) == crossing
    finally:
        dist.destroy_process_group()


def test_p2p_order_discipline_without_tags(tmp_path):
    """Every message has tag 0 (NCCL's matching): values and cotangents crossing out of the
    canonical order are matched by the per-pair order alone."""
    mp.spawn(_order_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=2)


def _grid_worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)  # reason: several processes share the cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=4)
    try:
        x, y = _batch(12)
        parallel, _ = _check(SkipNet, "relay", {"head_stages": [1, 2], "window": 2},
                             list(zip(x.chunk(2), y.chunk(2))), replicas=2, stages_per_rank=[2, 2])
        assert (parallel.replica, parallel.rank_in_pipeline) == divmod(rank, 2)
    finally:
        dist.destroy_process_group()


def test_two_by_two_grid_matches_single_process(tmp_path):
    mp.spawn(_grid_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=4)


def test_bad_input(tmp_path):
    example = torch.randn(1, 3, 32, 32)
    greedy = fxrelay.transform(SkipNet(), "greedy", example_input=example)
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    with pytest.raises(RuntimeError, match="init_process_group"):
        StageParallel(greedy, sgd)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        for mode in ("standard", "deep"):
            with pytest.raises(ValueError, match="no decoupling possible.*torch.distributed.pipelining"):
                StageParallel(fxrelay.transform(SkipNet(), mode, example_input=example), sgd)
        with pytest.raises(ValueError, match="pipeline of 5 ranks but the model has only 4 stages"):
            StageParallel(greedy, sgd, pipeline=5)
        with pytest.raises(ValueError, match=r"world size 1 != pipeline 2 x replicas 1"):
            StageParallel(greedy, sgd, pipeline=2)
        with pytest.raises(ValueError, match="stages_per_rank"):
            StageParallel(greedy, sgd, stages_per_rank=[3])
        with pytest.raises(TypeError, match="not made by fxrelay.transform"):
            StageParallel(SkipNet(), sgd)
        with pytest.raises(ValueError, match="cannot be split into 4 micro-batches"):
            StageParallel(greedy, sgd, microbatches=4, verbose=False).step(*_batch(3))
    finally:
        dist.destroy_process_group()


def test_balance_minimises_the_largest_group():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 8, (1,), generator=g))
        costs = torch.rand(n, generator=g).tolist()
        for k in range(1, n + 1):
            sizes = balance(costs, k)
            assert len(sizes) == k and sum(sizes) == n and min(sizes) >= 1
            assert _largest(costs, sizes) == pytest.approx(min(_largest(costs, s) for s in _splits(n, k)))


def _largest(costs, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return max(sum(costs[a:a + n]) for a, n in zip(starts, sizes))


def _splits(n, k):
    if k == 1:
        yield [n]
        return
    for first in range(1, n - k + 2):
        for rest in _splits(n - first, k - 1):
            yield [first, *rest]
