"""Standard PyTorch launchers and wrappers around a transformed model train exactly like the model itself.

DistributedDataParallel (2 gloo processes, every option), torch.compile, torch.utils.checkpoint,
timm's grad checkpointing, torch.func.functional_call, GradScaler and gradient accumulation.
"""

import copy
import socket
import warnings

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import fxrelay

MODES = ("relay", "greedy", "deep")
DDP_OPTIONS = {"default": {}, "find_unused_parameters": {"find_unused_parameters": True},
               "static_graph": {"static_graph": True}, "gradient_as_bucket_view": {"gradient_as_bucket_view": True}}


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                  nn.ReLU()) for i in range(5))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        return self.fc(x.mean((2, 3)))


def _model(mode):
    torch.manual_seed(0)
    return fxrelay.transform(Chain().double(), mode, example_input=torch.zeros(1, 3, 16, 16, dtype=torch.float64))


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _one_line(model, x, y):
    F.cross_entropy(model(x), y).backward()


def _assert_same(got, want, rtol=1e-9):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-12)


def _ddp_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    x, y = _data()
    chunks = list(zip(x.chunk(4), y.chunk(4)))
    results = {}
    for mode in MODES:
        for name, options in DDP_OPTIONS.items():
            model = _model(mode)
            ddp = DistributedDataParallel(model, **options)
            for _ in range(2):  # reason: static_graph and find_unused_parameters settle on the second step
                model.zero_grad()
                _one_line(ddp, *chunks[rank])
            results[(mode, name)] = _grads(model)
        model = _model(mode)
        ddp = DistributedDataParallel(model)
        with ddp.no_sync():
            _one_line(ddp, *chunks[2 * rank])
        _one_line(ddp, *chunks[2 * rank + 1])
        results[(mode, "no_sync")] = _grads(model)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_with_every_option_equals_a_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    x, y = _data()
    chunks = list(zip(x.chunk(4), y.chunk(4)))
    for mode in MODES:
        per_rank = []
        for rank in range(2):
            model = _model(mode)
            _one_line(model, *chunks[rank])
            per_rank.append(_grads(model))
        mean = [(a + b) / 2 for a, b in zip(*per_rank)]
        for name in DDP_OPTIONS:
            _assert_same(results[(mode, name)], mean)
        accumulated = []
        for rank in range(2):
            model = _model(mode)
            _one_line(model, *chunks[2 * rank])
            _one_line(model, *chunks[2 * rank + 1])
            accumulated.append(_grads(model))
        _assert_same(results[(mode, "no_sync")], [(a + b) / 2 for a, b in zip(*accumulated)])


def _reference(mode):
    x, y = _data()
    model = _model(mode)
    _one_line(model, x, y)
    return model, x, y, _grads(model)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_utils_checkpoint_around_the_model(mode, use_reentrant):
    model, x, y, want = _reference(mode)
    model.zero_grad()
    F.cross_entropy(checkpoint(model, x.requires_grad_(use_reentrant), use_reentrant=use_reentrant), y).backward()
    _assert_same(_grads(model), want)


@pytest.mark.parametrize("mode", ["relay", "greedy"])
def test_torch_compile_aot_eager_trains_like_eager(mode):
    model, x, y, want = _reference(mode)
    model.zero_grad()
    loss = F.cross_entropy(torch.compile(model, backend="aot_eager")(x), y)
    loss.backward()
    _assert_same(_grads(model), want, rtol=1e-7)
    assert fxrelay.head_losses(loss) == pytest.approx(fxrelay.head_losses(F.cross_entropy(model(x), y)), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["relay", "greedy"])
def test_torch_compile_inductor_trains_like_eager(mode):
    model, x, y, want = _reference(mode)
    model.zero_grad()
    F.cross_entropy(torch.compile(model)(x), y).backward()
    _assert_same(_grads(model), want, rtol=1e-6)


def test_timm_grad_checkpointing_set_before_transform():
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    plain = timm.create_model("resnet18", num_classes=10)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    transformed = []
    for m in (plain, checkpointed):
        torch.manual_seed(0)  # reason: the same aux heads
        transformed.append(fxrelay.transform(m, "relay", example_input=x[:1]))
        _one_line(transformed[-1], x, y)
    a, b = transformed
    _assert_same(_grads(b), _grads(a), rtol=1e-5)


def test_functional_call_with_other_parameters():
    model, x, y, _ = _reference("relay")
    doubled = {k: v.detach() * 2 for k, v in model.named_parameters()}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(2)
    model.train(), twin.train()
    got = torch.func.functional_call(model, doubled, (x,))
    assert torch.allclose(got, twin(x)) and len(fxrelay.head_outputs(got)) == 3


def test_grad_scaler_scales_every_head():
    model, x, y, want = _reference("relay")
    model.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    _assert_same([g / 1024.0 for g in _grads(model)], want)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.unscale_(optimizer)
    _assert_same(_grads(model), want)


def test_gradient_accumulation_sums_microbatches():
    model, x, y, _ = _reference("relay")
    model.zero_grad()
    halves = list(zip(x.chunk(2), y.chunk(2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for xs, ys in halves:
            (F.cross_entropy(model(xs), ys) / 2).backward()
    accumulated = _grads(model)
    want = [torch.zeros_like(g) for g in accumulated]
    for xs, ys in halves:
        ref = _model("relay")
        (F.cross_entropy(ref(xs), ys) / 2).backward()
        want = [w + g for w, g in zip(want, _grads(ref))]
    _assert_same(accumulated, want)



def test_torch_func_grad_is_refused_not_wrong():
    chain = Chain()
    for block in chain.blocks:
        block[1] = nn.Identity()  # reason: BatchNorm's buffer updates are refused by torch.func on their own
    x, y = _data()
    model = fxrelay.transform(chain.double(), "greedy", example_input=x[:1], head_kind="linear")
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(RuntimeError, match="torch.func transforms .* use torch.autograd.grad"):
        torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y))(params)
