"""Models with aux classifiers of their own (GoogLeNet, Inception-v3) and mode-dependent ops."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import fxrelay
from fxrelay.deployment.deploy import deploy

AUX_MODELS = {"googlenet": (224, ["aux1", "aux2"]), "inception_v3": (299, ["AuxLogits"])}


def _aux_model(name):
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=True, num_classes=10)


@pytest.mark.parametrize("name", list(AUX_MODELS))
@pytest.mark.parametrize("heads", ["auto", "model"])
def test_aux_logit_models_train_and_deploy(name, heads):
    size, own = AUX_MODELS[name]
    model = _aux_model(name)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    transformed = fxrelay.transform(model, head_stages=heads, example_input=x[:1])
    plan = fxrelay.plan_of(transformed)
    if heads == "model":
        assert [h.kind for h in plan.heads] == ["model"] * len(own) + ["main"]
        assert [n for n, m in model.named_children() if any(m is b.body for b in transformed.heads.children())] == own
    optimizer = torch.optim.SGD(transformed.parameters(), lr=0.01)
    loss = F.cross_entropy(transformed(x), y)
    loss.backward()
    optimizer.step()
    assert len(fxrelay.head_losses(loss)) == len(plan.heads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in transformed.heads.parameters())
    model.eval()
    deployed = deploy(transformed)
    want = model(x)
    assert torch.equal(transformed.eval()(x), want)
    assert (deployed(x) - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    assert model.training is False and transformed.training is False


def test_heads_model_needs_aux_classifiers():
    with pytest.raises(ValueError, match="no aux classifiers"):
        fxrelay.transform(torchvision.models.resnet18(), head_stages="model", example_input=torch.randn(1, 3, 64, 64))


def test_dropout_and_drop_path_follow_the_mode():
    """Traced in eval mode, dropout and drop-path still act in train mode (and not in eval)."""
    model = timm.create_model("resnet18", num_classes=10, drop_rate=0.5, drop_path_rate=0.2).eval()
    x = torch.randn(4, 3, 64, 64)
    transformed = fxrelay.transform(model, "standard", example_input=x[:1])
    assert torch.equal(transformed.eval()(x), model(x))
    transformed.train()
    model.train()
    torch.manual_seed(1)
    a = transformed(x)
    torch.manual_seed(1)
    b = model(x)
    assert torch.equal(a, b) and not torch.equal(a, model.eval()(x))
