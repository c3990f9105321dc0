"""The training rewrite against an independent gradient oracle (tests/oracle.py)."""

import copy
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fxrelay
from fxrelay.core.outputs import HeadOutputs
from oracle import assert_close, one_line_grads, oracle_grads


class VGGChain(nn.Module):
    """A plain conv chain with a max-pool opening each stage."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, c = [], 3
        for width in (8, 16, 16, 32, 32):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * 2 * 2, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


MODELS = {
    "vgg_chain": (lambda: VGGChain(), 64),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "resnet26d": (lambda: timm.create_model("resnet26d", num_classes=10), 32),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 32),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), 32),
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10), 224),
}


def _batch(size: int, n: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["relay", "greedy", "deep"])
def test_gradients_match_oracle(name, mode):
    build, size = MODELS[name]
    torch.manual_seed(0)
    x, y = _batch(size)
    x = x.double()  # reason: float64 makes the 1e-5 comparison sharp (conv biases before BN have ~0 grads)
    model = fxrelay.transform(build().double(), mode, example_input=x)
    assert len(fxrelay.plan_of(model).heads) >= 2
    assert_close(one_line_grads(model, x, y), oracle_grads(model, x, y))


@pytest.mark.parametrize("window", [1, 2, 3])
def test_relay_windows_match_oracle(window):
    torch.manual_seed(0)
    x, y = _batch(64)
    x = x.double()
    model = fxrelay.transform(torchvision.models.resnet18(num_classes=10).double(), "relay", window=window,
                              head_stages=[1, 2, 3], example_input=x)
    plan = fxrelay.plan_of(model)
    assert plan.heads[0].span == (0, 1)  # reason: the lowest head's window reaches stage 0
    assert [h.span[0] for h in plan.heads[1:]] == [max(0, a - window + 1) for a in (2, 3, 4)]
    assert_close(one_line_grads(model, x, y), oracle_grads(model, x, y))


def test_relay_differs_from_deep():
    """The oracle comparison is sharp: relay's scopes change the gradients of low stages."""
    torch.manual_seed(0)
    x, y = _batch(64)
    base = torchvision.models.resnet18(num_classes=10)
    relay = fxrelay.transform(base, "relay", example_input=x)
    deep = fxrelay.transform(base, "deep", example_input=x)
    deep.heads.load_state_dict(relay.heads.state_dict())
    conv1 = [n for n, _ in relay.named_parameters()].index("stages.stem.conv1.weight")
    g_relay, g_deep = one_line_grads(relay, x, y)[conv1], one_line_grads(deep, x, y)[conv1]
    assert (g_relay - g_deep).abs().max() > 1e-3 * g_deep.abs().max()


@pytest.mark.parametrize("name", list(MODELS))
def test_standard_is_identical_to_original(name):
    build, size = MODELS[name]
    torch.manual_seed(0)
    x, y = _batch(size)
    original = build()
    model = fxrelay.transform(copy.deepcopy(original), "standard", example_input=x)
    assert fxrelay.plan_of(model).heads[0].is_main
    out_t, out_o = model(x), original(x)
    assert torch.equal(out_t, out_o)
    F.cross_entropy(out_t, y).backward()
    F.cross_entropy(out_o, y).backward()
    theirs = dict(original.named_parameters())
    mine = {p.data_ptr(): p for p in model.parameters()}  # reason: original_state_dict aliases the parameters
    for key, value in fxrelay.original_state_dict(model).items():
        if key in theirs:
            assert torch.equal(mine[value.data_ptr()].grad, theirs[key].grad), key


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_outputs_equal_original(name):
    build, size = MODELS[name]
    x, _ = _batch(size)
    original = build().eval()
    model = fxrelay.transform(original, "relay", example_input=x).eval()
    out = model(x)
    assert type(out) is torch.Tensor
    assert torch.equal(out, original(x))


def test_each_stage_runs_forward_once():
    x, y = _batch(64)
    model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), "relay", example_input=x)
    calls = []
    for i in range(len(fxrelay.plan_of(model).stages)):
        model.stages[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    F.cross_entropy(model(x), y).backward()
    assert calls == sorted(set(calls)) == list(range(5))


@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet18", num_classes=10),
                                   lambda: torchvision.models.mobilenet_v3_small(num_classes=10)])
@pytest.mark.parametrize("autocast", [False, True])
def test_user_training_loop(build, autocast):
    """A loop as users write it; the only change is the transform line."""
    torch.manual_seed(0)
    model = build()
    model = fxrelay.transform(model, example_input=torch.randn(1, 3, 64, 64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    x, y = _batch(64, n=8)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            loss = criterion(out, y)
        loss.backward()
        accuracy = (out.argmax(dim=1) == y).float().mean().item()
        losses.append(loss.item())
        assert 0.0 <= accuracy <= 1.0
        for p in model.heads.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        optimizer.step()
    assert all(isinstance(v, float) for v in losses) and losses[-1] < losses[0]


def test_output_behaves_as_main_logits():
    x, y = _batch(64)
    model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), example_input=x)
    out = model(x)
    per_head = fxrelay.head_outputs(out)
    assert isinstance(out, HeadOutputs) and len(per_head) == len(fxrelay.plan_of(model).heads) == 3
    assert torch.equal(out.argmax(1), per_head[-1].argmax(1))
    assert out.tolist() == per_head[-1].tolist() and out.shape == (2, 10)
    soft = torch.sum(-F.one_hot(y, 10) * F.log_softmax(out, dim=-1), dim=-1).mean()  # timm SoftTargetCE
    gathered = -torch.log_softmax(out, 1).gather(1, y[:, None]).mean()
    bce = F.binary_cross_entropy_with_logits(out, F.one_hot(y, 10).float())
    for loss in (soft, gathered, bce):
        values = fxrelay.head_losses(loss)
        assert len(values) == 3 and values[-1] == pytest.approx(loss.item())
    want = [F.cross_entropy(h, y).item() for h in per_head]
    assert fxrelay.head_losses(F.cross_entropy(out, y)) == pytest.approx(want)


def test_backward_weights_losses():
    x, y = _batch(64)
    model = fxrelay.transform(VGGChain(), "deep", aux_weight=0.5, example_input=x)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    got = [p.grad.clone() for p in model.heads.parameters()]
    model.zero_grad()
    out = model(x)
    sum(h.weight * F.cross_entropy(v, y) for h, v in zip(fxrelay.plan_of(model).heads,
                                                         fxrelay.head_outputs(out))).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(got, model.heads.parameters()))


@pytest.mark.parametrize("mode, weight", [("relay", 1.0), ("greedy", 1.0), ("deep", 0.3)])
def test_default_aux_weight_is_the_modes(mode, weight):
    # reason: a greedy stage's only gradient is its head's: its weight is the stage's learning rate
    x, _ = _batch(64)
    heads = fxrelay.plan_of(fxrelay.transform(VGGChain(), mode, example_input=x)).heads
    assert [h.weight for h in heads] == [weight] * (len(heads) - 1) + [1.0]
    chosen = fxrelay.plan_of(fxrelay.transform(VGGChain(), mode, aux_weight=0.5, example_input=x)).heads
    assert [h.weight for h in chosen] == [0.5] * (len(heads) - 1) + [1.0]


def test_heads_options():
    x, _ = _batch(64)
    base = torchvision.models.resnet18(num_classes=10)
    for kind in ("auto", "linear", "layercnn", "dgl"):
        model = fxrelay.transform(base, head_stages=[1, 3], head_kind=kind, example_input=x)
        plan = fxrelay.plan_of(model)
        assert [(h.stage, h.kind) for h in plan.heads] == [(1, kind), (3, kind), (4, "main")]
        assert all(v.shape == (2, 10) for v in fxrelay.head_outputs(model(x)))

    def tiny(shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    model = fxrelay.transform(base, head_stages=[2], head_kind=tiny, example_input=x)
    assert fxrelay.plan_of(model).heads[0].kind == "tiny"
    greedy = fxrelay.plan_of(fxrelay.transform(base, "greedy", example_input=x))
    assert [h.span for h in greedy.heads] == [(s, s) for s in range(5)]


def test_token_features_get_token_heads():
    x, y = _batch(224)
    model = fxrelay.transform(timm.create_model("vit_tiny_patch16_224", num_classes=7), example_input=x)
    assert all(v.shape == (2, 7) for v in fxrelay.head_outputs(model(x)))


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "realy"}, "did you mean 'relay'"),
    ({"window": 0}, "window must be an integer >= 1"),
    ({"head_stages": [4]}, "head stages must be in 0..3"),
    ({"head_kind": "mlp"}, "head_kind must be one of"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fxrelay.transform(torchvision.models.resnet18(), example_input=torch.randn(1, 3, 64, 64), **kwargs)


def test_num_classes_needed_when_not_inferable():
    features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3), nn.MaxPool2d(2),
                             nn.Conv2d(8, 8, 3), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="pass num_classes"):
        fxrelay.transform(features, head_stages=[1], skip_first=0, example_input=x)
    model = fxrelay.transform(features, head_stages=[1], num_classes=5, example_input=x)
    assert fxrelay.head_outputs(model(x))[0].shape == (1, 5)


def test_transforming_twice_is_an_error():
    model = fxrelay.transform(VGGChain(), example_input=torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="already transformed"):
        fxrelay.transform(model)


def test_original_state_dict_loads_strictly():
    x, y = _batch(64)
    model = fxrelay.transform(timm.create_model("resnet26d", num_classes=10), example_input=x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    fresh = timm.create_model("resnet26d", num_classes=10)
    fresh.load_state_dict(fxrelay.original_state_dict(model), strict=True)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))])
def test_copies_train_the_same(clone):
    x, y = _batch(64)
    torch.manual_seed(0)
    model = fxrelay.transform(torchvision.models.resnet18(num_classes=10), example_input=x)
    twin = clone(model)
    assert fxrelay.plan_of(twin).heads == fxrelay.plan_of(model).heads
    for m in (model, twin):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        F.cross_entropy(m(x), y).backward()
        optimizer.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert not set(map(id, model.parameters())) & set(map(id, twin.parameters()))


def test_a_head_pickled_before_window_was_renamed_span_loads_with_its_span():
    head = fxrelay.Head(0, 2, (1, 2), 0.3, "auto", flops=5, params=7)
    new = pickle.dumps(head, protocol=0)
    assert b"Vspan\n" in new  # reason: a Head pickles its fields by name
    old = new.replace(b"Vspan\n", b"Vwindow\n")  # reason: the bytes a pickle from before the rename holds
    assert pickle.loads(old) == head


@pytest.mark.parametrize("kind", ["auto", "layercnn", "dgl"])
def test_head_relu_gives_relus_gradients_and_holds_one_map_fewer(kind):
    """Heads use ``HeadReLU``: the same gradients as ``nn.ReLU(inplace=True)`` (also of second
    order, and under an expanded incoming gradient); an ``auto`` head's backward at 32x32 holds one
    map fewer (less a bool mask)."""
    from fxrelay.core.modules import HeadReLU
    from fxrelay.passes.heads import make_head

    torch.manual_seed(0)
    lean = make_head(kind, (16, 32, 32), 5).double()
    plain = copy.deepcopy(lean)
    for name, m in list(plain.named_modules()):
        if isinstance(m, HeadReLU):
            plain.get_submodule(name.rpartition(".")[0]).register_module(name.rpartition(".")[2], nn.ReLU(inplace=True))
    assert any(isinstance(m, HeadReLU) for m in lean.modules())
    assert not any(isinstance(m, HeadReLU) for m in plain.modules())
    x = torch.randn(4, 16, 32, 32, dtype=torch.float64)

    def grads(body, create_graph=False):
        inp = x.clone().requires_grad_()
        out = body(inp * 1.0)
        g = torch.autograd.grad(out.square().sum(), [inp, *body.parameters()], create_graph=create_graph)
        if create_graph:  # reason: a second derivative through the ReLU's backward
            return torch.autograd.grad(g[0].square().sum(), inp)
        return g

    for a, b in zip(grads(lean), grads(plain)):
        assert torch.equal(a, b)
    for a, b in zip(grads(lean, True), grads(plain, True)):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    inp = x.clone().requires_grad_()
    lean(inp * 1.0).sum().backward()  # reason: an expanded incoming gradient is not overwritten
    reference = x.clone().requires_grad_()
    plain(reference * 1.0).sum().backward()
    assert torch.equal(inp.grad, reference.grad)
    if kind == "auto":
        made = []
        for body in (lean, plain):
            out = body(x.clone().requires_grad_() * 1.0)
            with _NewBytes() as new:
                out.square().sum().backward()
            made.append(new.total)
        map_bytes = 4 * 16 * 32 * 32 * 8
        assert made[1] - made[0] == map_bytes - map_bytes // 8, made  # reason: no map, a bool mask instead


class _NewBytes(TorchDispatchMode):
    """Bytes of the storages the ops inside the block create (not their peak: their sum)."""

    def __enter__(self):
        self.total = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self.total += sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


def test_head_conv1x1_is_the_convolution():
    """``auto`` and ``dgl`` heads compute their 1x1 convolutions as matrix products (``Conv1x1``): the
    convolution's values and gradients (float64, to rounding), the same parameters (old head weights load)."""
    from fxrelay.core.modules import Conv1x1
    from fxrelay.passes.heads import describe_head, make_head

    torch.manual_seed(0)
    conv = Conv1x1(16, 8).double()
    x = torch.randn(4, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    want = F.conv2d(x, conv.weight)
    assert torch.allclose(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, conv.weight], g)
    want_grads = torch.autograd.grad(want, [x, conv.weight], g)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got_grads, want_grads))
    small = torch.randn(4, 16, 2, 2, dtype=torch.float64)  # reason: fewer positions than outputs: the convolution
    assert torch.allclose(conv(small), F.conv2d(small, conv.weight), rtol=1e-12, atol=1e-12)
    head = make_head("auto", (16, 8, 8), 5)
    assert isinstance(head[0], Conv1x1) and describe_head(head) == "conv1x1-BN-ReLU-pool2x2-linear"
    plain = nn.Sequential(nn.Conv2d(16, 16, 1, bias=False), *list(head)[1:])
    head.load_state_dict(plain.state_dict())  # reason: a head saved with nn.Conv2d loads
