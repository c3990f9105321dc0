"""fxrelay.save / fxrelay.load: files that load under weights_only=True and reproduce the model exactly."""

import io
import zipfile
from fractions import Fraction

import pytest
import torch
from torch import nn

import fxrelay
import fxrelay.io.saving as saving
from fxrelay import ModelSpec

SIZE = 32


@pytest.fixture(scope="module")
def trained():
    """A relay resnet10t after one SGD step, so that nothing is at its initial value (BN stats included)."""
    recipe = ModelSpec("resnet10t", "relay", model_kwargs={"num_classes": 5}, transform_kwargs={"window": 3},
                    input_shape=(3, SIZE, SIZE))
    torch.manual_seed(0)
    model = recipe.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, 3, SIZE, SIZE)), torch.arange(8) % 5).backward()
    optimizer.step()
    return recipe, model


def heads_of(model):
    return [h.span for h in fxrelay.plan_of(model).heads]


def test_trained_model_reloads_strictly_and_exactly(trained, tmp_path):
    recipe, model = trained
    path = fxrelay.save(model, tmp_path / "sub" / "relay.pt", recipe=recipe)
    payload = torch.load(path, weights_only=True)  # reason: the file is only tensors and plain values
    assert payload["recipe"] == {"model": "resnet10t", "mode": "relay", "model_kwargs": {"num_classes": 5},
                                 "transform_kwargs": {"window": 3}, "input_shape": (3, SIZE, SIZE)}
    torch.manual_seed(1)  # reason: a different initialisation, every value of which load must replace
    again = fxrelay.load(path)
    assert again.training and heads_of(again) == heads_of(model) == [(0, 2), (1, 3), (2, 4)]
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in
                   zip(fxrelay.head_outputs(again(x)), fxrelay.head_outputs(model.train()(x))))
        assert torch.equal(again.eval()(x), model.eval()(x))


def test_load_rebuilds_the_heads_the_file_was_trained_with(trained, tmp_path):
    recipe, model = trained
    path = fxrelay.save(model, tmp_path / "relay.pt", recipe=recipe)
    payload = torch.load(path, weights_only=True)
    assert payload["heads"] == [[2, 0, 2, 1.0, "auto"], [3, 1, 3, 1.0, "auto"], [4, 2, 4, 1.0, "main"]]
    # reason: a file written before aux_weight defaulted to the mode's records no heads: weight 0.3
    legacy = {k: v for k, v in payload.items() if k != "heads"}
    torch.save(legacy, tmp_path / "legacy.pt")
    weights = [h.weight for h in fxrelay.plan_of(fxrelay.load(tmp_path / "legacy.pt")).heads]
    assert weights == [0.3, 0.3, 1.0]
    payload["heads"][0][3] = 0.5
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"the recipe rebuilds heads .* the file holds"):
        fxrelay.load(tmp_path / "other.pt")


def test_deployed_model_round_trips_through_torch_export(trained, tmp_path):
    _, model = trained
    deployed = fxrelay.deploy(model.eval())
    path = fxrelay.save(deployed, tmp_path / "deployed.pt2")
    loaded = fxrelay.load(path)
    for batch in (1, 2, 7):  # reason: the batch size is dynamic; the traced 32x32 size is kept
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            assert torch.equal(loaded(x), deployed(x))


def test_own_model_reloads_with_model_argument(tmp_path):
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    recipe = ModelSpec("", "greedy", input_shape=(3, 32, 32))
    model = recipe.build(net())
    path = fxrelay.save(model, tmp_path / "own.pt", recipe=recipe)
    again = fxrelay.load(path, model=net())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.eval()(x), model.eval()(x)) and heads_of(again) == heads_of(model)
    with pytest.raises(ValueError, match="needs model=... exactly when it names no zoo model"):
        fxrelay.load(path)


def test_misuse_is_refused_with_the_fix(trained, tmp_path):
    recipe, model = trained
    with pytest.raises(ValueError, match=r"deploy it first: fxrelay.save\(fxrelay.deploy\(model\), ...\)"):
        fxrelay.save(model, tmp_path / "x.pt2")
    with pytest.raises(ValueError, match="needs recipe=fxrelay.ModelSpec"):
        fxrelay.save(model, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="saved with torch.export to a .pt2 path"):
        fxrelay.save(nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"recipe.transform_kwargs.head_kind = <function .*> cannot be stored safely"):
        fxrelay.save(model, tmp_path / "x.pt", recipe=ModelSpec("resnet10t", transform_kwargs={"head_kind": heads_of}))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a trained model written by fxrelay.save"):
        fxrelay.load(tmp_path / "other.pt")


def test_a_pt2_archive_needing_unsafe_unpickling_is_refused(tmp_path):
    linear, x = nn.Linear(4, 2), torch.randn(3, 4)
    path = fxrelay.save(linear, tmp_path / "linear.pt2", example_input=torch.randn(2, 4))
    assert torch.equal(fxrelay.load(path)(x), linear(x))
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith(".pt"):  # reason: a pickle of a class outside torch's safe list
                buffer = io.BytesIO()
                torch.save((Fraction(1, 3),), buffer)
                data = buffer.getvalue()
            dst.writestr(item, data)
    with pytest.raises(ValueError, match=r"refusing to load .*tampered.pt2: its part '.*\.pt' does not load with "
                                         r"weights_only=True \(UnpicklingError\)"):
        fxrelay.load(tampered)


def test_bug12_recipe_that_does_not_rebuild_the_model_is_refused(trained, tmp_path):
    recipe, model = trained
    wrong = ModelSpec("resnet10t", "relay", model_kwargs={"num_classes": 5}, input_shape=(3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"does not rebuild this model \(heads .*\(1, 3\).*the recipe's .*\(2, 3\)"):
        fxrelay.save(model, tmp_path / "w.pt", recipe=wrong)
    own = nn.Sequential(*[m for c in (3, 8, 8, 8) for m in (nn.Conv2d(c, 8, 3, 2, 1), nn.ReLU())],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    checkpointed = fxrelay.transform(own, "relay", window=3, checkpoint=True, example_input=torch.randn(1, 3, 32, 32))
    for recipe, difference in ((ModelSpec("", "relay", transform_kwargs={"window": 3}), "recompute True"),
                               (ModelSpec("", "greedy", transform_kwargs={"checkpoint": True}), "mode 'relay'"),
                               (ModelSpec("", "relay", transform_kwargs={"checkpoint": True}), "heads")):
        with pytest.raises(ValueError, match=difference):
            fxrelay.save(checkpointed, tmp_path / "c.pt", recipe=recipe)
    right = ModelSpec("", "relay", transform_kwargs={"window": 3, "checkpoint": True}, input_shape=(3, 32, 32))
    again = fxrelay.load(fxrelay.save(checkpointed, tmp_path / "c.pt", recipe=right), model=own)
    assert heads_of(again) == heads_of(checkpointed) == [(0, 2), (1, 3)] and fxrelay.plan_of(again).checkpoint


def test_model_recipe_is_a_deprecated_alias_of_model_spec():
    with pytest.warns(DeprecationWarning, match="ModelRecipe is renamed fxrelay.ModelSpec"):
        assert saving.ModelRecipe is ModelSpec
