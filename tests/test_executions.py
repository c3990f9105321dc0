"""Every execution of a training step computes the same step: one line, recompute, LocalStep, sequential.

Each ``test_bug<N>_...`` is the regression test of bug N of issue 20 (it failed before the fix).
Gradients are compared in float64.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxrelay
from nets import _block


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want, rtol=1e-9):
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=rtol, atol=1e-12), name


def _one_line(model, x, y, criterion=F.cross_entropy, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    criterion(model(x), y).backward()
    return _grads(model)


def _local(model, x, y, criterion=F.cross_entropy, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    fxrelay.LocalStep(model, criterion)(x, y)
    return _grads(model)


def _data(n=4, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


# --- bug 1: a tuple of tensors crossing a cut ---

class Pair(nn.Module):
    """A block taking and returning a pair of tensors (registered as a leaf)."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = _block(c, c, 2), _block(c, c, 2)

    def forward(self, pair):
        a, b = pair
        return self.a(a) + self.b(b), self.b(a)


class PairNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = _block(3, width, 1)
        self.pairs = nn.ModuleList(Pair(width) for _ in range(3))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        s = self.stem(x)
        pair = (s, s * 0.5)
        for p in self.pairs:
            pair = p(pair)
        return self.fc((pair[0] + pair[1]).mean((2, 3)))


@pytest.mark.parametrize("mode", ["standard", "deep"])
def test_bug1_tuple_across_a_cut_gets_its_gradient(mode):
    x, y = _data()
    torch.manual_seed(0)
    model = fxrelay.transform(PairNet().double(), mode, tracing=fxrelay.TracingConfig(leaf_modules=[Pair]),
                              example_input=x, boundaries="blocks", head_stages=[0], skip_first=0)
    plan = fxrelay.plan_of(model)
    assert any(s.inputs and s.inputs[0].startswith("pairs") for s in plan.stages)  # reason: a pair crosses a cut
    want = _one_line(model, x, y)
    assert any(n.startswith("stages.stem") for n in want)
    _assert_same(_local(model, x, y), want)


# --- bugs 2 and 3: structured outputs, intermediate outputs ---

class Outputs(nn.Module):
    """Five stages; returns the logits and features of the last (``"last"``) or a middle stage."""

    def __init__(self, kind, where, width=8):
        super().__init__()
        self.kind, self.where = kind, where
        self.stem = _block(3, width, 1)
        self.downs = nn.ModuleList(_block(width, width, 2) for _ in range(4))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        v = self.stem(x)
        values = []
        for d in self.downs:
            v = d(v)
            values.append(v)
        logits = self.fc(v.mean((2, 3)))
        features = (values[-1] if self.where == "last" else values[1]).mean((2, 3))
        return (logits, features) if self.kind == "tuple" else {"logits": logits, "features": features}


def _structured_criterion(kind):
    def criterion(out, target):
        labels, features = target
        logits, feats = (out[0], out[1]) if kind == "tuple" else (out["logits"], out["features"])
        return F.cross_entropy(logits, labels) + F.mse_loss(feats, features)
    return criterion


@pytest.mark.parametrize("kind", ["tuple", "dict"])
@pytest.mark.parametrize("mode", ["greedy", "relay", "deep"])
def test_bug2_structured_output_every_head_sees_the_whole_output(kind, mode):
    x, labels = _data()
    torch.manual_seed(0)
    model = fxrelay.transform(Outputs(kind, "last").double(), mode, example_input=x, output=0 if kind == "tuple"
                              else "logits", skip_first=1)
    y = (labels, torch.randn(4, 8, dtype=torch.float64))
    criterion = _structured_criterion(kind)
    want = _one_line(model, x, y, criterion)
    _assert_same(_local(model, x, y, criterion), want)


@pytest.mark.parametrize("mode", ["greedy", "relay", "deep"])
def test_bug3_intermediate_output_read_in_the_same_channel_everywhere(mode):
    x, labels = _data()
    torch.manual_seed(0)
    model = fxrelay.transform(Outputs("tuple", "middle").double(), mode, example_input=x, output=0, skip_first=1)
    y = (labels, torch.randn(4, 8, dtype=torch.float64))
    criterion = _structured_criterion("tuple")
    want = _one_line(model, x, y, criterion)
    _assert_same(_local(model, x, y, criterion), want)
    plain = _one_line(model, x, labels, lambda out, t: F.cross_entropy(out[0], t))
    moved = [n for n in want if not torch.allclose(want[n], plain[n])]
    # reason: the features' stage is in a window only in deep mode (elsewhere the main head reads them detached)
    assert bool(moved) == (mode == "deep")


def test_bug3_the_wiring_rule_detaches_below_and_above_a_window():
    x, _ = _data()
    model = fxrelay.transform(Outputs("tuple", "middle").double(), "greedy", example_input=x, output=0, skip_first=1)
    wiring = fxrelay.core.wiring.plan_wiring(fxrelay.plan_of(model))
    plan = wiring.plan
    features = wiring.head_values[plan.heads[-1].index][1]
    t = wiring.producer[features]
    for h in plan.heads:
        pos = wiring.head_values[h.index].index(features)
        assert wiring.head_channel(h.index, pos) == (h.span[0] if h.span[0] <= t <= h.stage else None)


# --- bug 4: no gradients ---

@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_bug4_localstep_under_no_grad_raises(context):
    x, y = _data()
    model = fxrelay.transform(Outputs("tuple", "last").double(), "greedy", example_input=x, output=0)
    bn = next(m for m in model.stages[0].modules() if isinstance(m, nn.BatchNorm2d))
    running = bn.running_mean.clone()
    step = fxrelay.LocalStep(model, lambda o, t: F.cross_entropy(o[0], t))
    with context(), pytest.raises(RuntimeError, match="no_grad"):
        step(x, y)
    assert torch.equal(bn.running_mean, running)


# --- bug 5: a DDP-wrapped model ---

def test_bug5_localstep_refuses_a_ddp_wrapped_model_with_the_fix():
    x, _ = _data()
    model = fxrelay.transform(Outputs("tuple", "last").double(), "greedy", example_input=x, output=0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(TypeError, match=r"LocalStep\(model.module, criterion, process_group=...\)"):
            fxrelay.LocalStep(wrapped, F.cross_entropy)
    finally:
        dist.destroy_process_group()


# --- bug 6: dropout masks ---

class DropNet(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = _block(3, width, 1)
        self.downs = nn.ModuleList(nn.Sequential(_block(width, width, 2), nn.Dropout(0.3)) for _ in range(4))
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(width, 10))

    def forward(self, x):
        v = self.stem(x)
        for d in self.downs:
            v = d(v)
        return self.fc(v.mean((2, 3)))


def _dropout_head(shape, classes):
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(math.prod(shape), classes))


@pytest.mark.parametrize("mode", ["greedy", "relay", "deep"])
def test_bug6_same_seed_same_dropout_masks_same_gradients(mode):
    x, y = _data()
    torch.manual_seed(0)
    net = DropNet().double()
    model = fxrelay.transform(net, mode, example_input=x, head_kind=_dropout_head, skip_first=1)
    want = _one_line(model, x, y, seed=3)
    _assert_same(_local(model, x, y, seed=3), want)
    recompute = fxrelay.transform(net, mode, example_input=x, head_kind=_dropout_head, skip_first=1,
                                  recompute=True)
    recompute.load_state_dict(model.state_dict())
    _assert_same(_one_line(recompute, x, y, seed=3), {n: g for n, g in want.items()})


# --- bug 9: a non-leaf model input read by two stages ---

class InputSkip(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = _block(3, width, 1)
        self.downs = nn.ModuleList(_block(width, width, 2) for _ in range(2))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        v = self.downs[1](self.downs[0](self.stem(x)))
        v = v + F.avg_pool2d(x, 4).mean(1, keepdim=True)
        return self.fc(v.mean((2, 3)))


def test_bug9_non_leaf_input_read_by_two_stages():
    x0, y = _data()
    torch.manual_seed(0)
    model = fxrelay.transform(InputSkip().double(), "deep", example_input=x0, head_stages=[0, 1], skip_first=0)
    plan = fxrelay.plan_of(model)
    assert sum(plan.input_names[0] in s.inputs for s in plan.stages) >= 2
    leaf = x0.clone().requires_grad_()
    want = _one_line(model, leaf * 2, y)
    want_x, leaf.grad = leaf.grad.clone(), None
    _assert_same(_local(model, leaf * 2, y), want)
    assert torch.allclose(leaf.grad, want_x, rtol=1e-9)


# --- bug 7: recompute and create_graph under autocast ---

def test_bug7_recompute_of_an_overlap_stage_runs_under_the_forwards_autocast():
    x, y = _data()
    x = x.float()
    torch.manual_seed(0)
    net = DropNet()
    grads, state = [], None
    for recompute in (False, True):
        model = fxrelay.transform(net, "relay", example_input=x, skip_first=1, recompute=recompute)
        assert any(scope.overlap for scope in fxrelay.plan_of(model).scopes())
        state = state or model.state_dict()
        model.load_state_dict(state)  # reason: the same heads
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append(_grads(model))
    _assert_same(grads[1], grads[0], rtol=1e-6)


def test_bug7_create_graph_under_autocast_without_recompute():
    x, y = _data()
    x = x.float()
    torch.manual_seed(0)
    model = fxrelay.transform(DropNet().eval(), "relay", example_input=x, skip_first=1).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    params = [p for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    first = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    penalty = sum((g.float() ** 2).sum() for g in first if g is not None)
    penalty.backward()
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)
    assert [g is None for g in first] == [g is None for g in plain]


# --- bug 8: torch.compile of a recompute model ---

def _compiled_grads(backend):
    x, y = _data()
    x = x.float()
    torch.manual_seed(0)
    model = fxrelay.transform(DropNet(), "greedy", example_input=x, recompute=True)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # reason: compiled code draws its own random numbers
    want = _one_line(model, x, y)
    got = _one_line(torch.compile(model, backend=backend), x, y)
    got = {n.removeprefix("_orig_mod."): g for n, g in got.items()}
    _assert_same(got, want, rtol=1e-5)


def test_bug8_compile_aot_eager_of_a_recompute_model():
    _compiled_grads("aot_eager")


@pytest.mark.slow
def test_bug8_compile_inductor_of_a_recompute_model():
    _compiled_grads("inductor")


# --- every execution through the training loop ---

def _resnet10t(dtype=torch.float32):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10).to(dtype)
    return fxrelay.transform(net, "greedy", example_input=torch.randn(1, 3, 32, 32, dtype=dtype))


def test_first_step_gradients_are_the_same_for_every_execution():
    from fxrelay.train.executions import TrainingStep
    from fxrelay.train.sequential import train_stage

    model = _resnet10t(torch.float64)
    x, y = _data(n=4, size=32)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = {n: v.clone() for n, v in model.state_dict().items()}
    grads, buffers = {}, {}
    for execution in ("one-line", "recompute", "local"):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        outcome = TrainingStep(model, criterion, execution)(x, y)
        assert all(torch.isfinite(v) for v in outcome.losses)
        grads[execution], buffers[execution] = _grads(model), {n: b.clone() for n, b in model.named_buffers()}
    for execution in ("recompute", "local"):
        _assert_same(grads[execution], grads["one-line"])
        _assert_same(buffers[execution], buffers["one-line"], rtol=1e-12)
    model.load_state_dict(start)
    model.zero_grad(set_to_none=True)
    with train_stage(model, 0):
        TrainingStep(model, criterion, "sequential", stage=0)(x, y)
    stage0 = _grads(model)
    name = fxrelay.plan_of(model).stages[0].name
    assert stage0 and all(n.startswith((f"stages.{name}.", f"heads.{name}.")) for n in stage0)
    _assert_same(stage0, {n: g for n, g in grads["one-line"].items() if n in stage0})


@pytest.mark.parametrize("execution", ["one-line", "recompute", "local", "sequential"])
def test_fit_trains_resnet10t_with_every_execution(execution):
    from torch.utils.data import DataLoader

    from fxrelay.train.loop import fit
    from fxrelay.train.recipe import Recipe

    model = _resnet10t()
    stages = len(fxrelay.plan_of(model).stages)
    data = fxrelay.Shapes(16, 32, 10, seed=0)
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    epochs = stages if execution == "sequential" else 1
    history = fit(model, loader, DataLoader(data, batch_size=8), epochs,
                  recipe=Recipe(execution=execution, lr=0.01, ema_decay=0.9), progress=False)
    main = [losses[-1] for losses in history.head_loss]
    assert len(history.head_loss) == epochs and math.isfinite(main[-1])
    if execution != "sequential":
        assert all(math.isfinite(v) for v in history.head_loss[0])


def test_recompute_is_the_new_name_of_checkpoint_and_removed_aliases_say_their_names():
    x, _ = _data()
    with pytest.warns(DeprecationWarning, match="recompute="):
        model = fxrelay.transform(DropNet().double(), "greedy", example_input=x, checkpoint=True)
    assert fxrelay.plan_of(model).recompute
    with pytest.raises(TypeError, match=r"head_stages="):
        fxrelay.transform(DropNet().double(), "greedy", example_input=x, heads=[1])
    with pytest.raises(TypeError, match=r"head_kind="):
        fxrelay.transform(DropNet().double(), "greedy", example_input=x, head="linear")


def test_transform_for_a_memory_execution_partitions_for_it_and_the_recipe_runs_it():
    """``transform(execution=...)``: with ``num_stages`` and the default balance, a memory execution gets
    the recompute boundaries (resnet50, 8 stages: a LocalStep estimate below the one-line partition's);
    the plan records it; ``Recipe()`` trains with it; a named Recipe execution wins."""
    import timm
    import torchvision
    from torch.utils.data import DataLoader

    from fxrelay.train.loop import Trainer
    from fxrelay.train.recipe import Recipe

    x = torch.randn(1, 3, 128, 128)
    base = torchvision.models.resnet50(num_classes=10)
    plans = {execution: fxrelay.plan_of(fxrelay.transform(base, "greedy", num_stages=8, example_input=x,
                                                          execution=execution))
             for execution in ("one-line", "local", "sequential", "recompute")}
    by_recompute = fxrelay.partition(base, num_stages=8, balance="recompute", example_input=x)
    for execution in ("local", "sequential", "recompute"):
        assert [s.nodes for s in plans[execution].stages] == [s.nodes for s in by_recompute.stages]
        assert plans[execution].execution == execution
    assert plans["recompute"].recompute and not plans["local"].recompute
    local = {e: plans[e].memory_estimate(16)["local"] for e in ("one-line", "local")}
    assert local["local"] < 0.8 * local["one-line"], local
    model = fxrelay.transform(timm.create_model("resnet10t", num_classes=10), "greedy",
                              example_input=x[:, :, :32, :32], execution="local")
    loader = DataLoader(fxrelay.Shapes(8, 32, 10, seed=0), batch_size=4)
    assert Trainer(model, loader, 1).recipe.execution == "local"
    assert Trainer(model, loader, 1, Recipe(execution="one-line")).recipe.execution == "one-line"
    assert Trainer(timm.create_model("resnet10t", num_classes=10), loader, 1).recipe.execution == "one-line"


def test_transform_execution_is_checked_and_recompute_is_the_recompute_execution():
    x, _ = _data()
    assert fxrelay.plan_of(fxrelay.transform(DropNet().double(), "greedy", example_input=x,
                                             recompute=True)).execution == "recompute"
    with pytest.raises(ValueError, match=r"execution must be one of one-line, recompute, local, sequential, "
                                         r"got 'locl'.*did you mean 'local'"):
        fxrelay.transform(DropNet().double(), "greedy", example_input=x, execution="locl")
    with pytest.raises(ValueError, match=r"recompute=True is execution='recompute'; execution='local' runs"):
        fxrelay.transform(DropNet().double(), "greedy", example_input=x, execution="local", recompute=True)
    with pytest.raises(ValueError, match=r"execution='sequential' trains stage by stage.*use mode='greedy' "
                                         r"\(got 'relay'\), or execution='local'"):
        fxrelay.transform(DropNet().double(), "relay", example_input=x, execution="sequential")
