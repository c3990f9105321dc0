"""The training loop: one optimizer and schedule per run, exact resume, EMA, per-head metrics, the examples."""

import argparse
import csv
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fxrelay
from fxrelay.train.checkpoints import load_checkpoint
from fxrelay.train.evaluation import evaluate, evaluate_heads
from fxrelay.train.history import History
from fxrelay.train.loop import Trainer, fit
from fxrelay.train.optimizers import no_weight_decay_names
from fxrelay.train.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Four conv-BN-ReLU-pool stages, dropout (it draws from the global RNG) and a classifier."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        layers, c = [], 3
        for w in (4, 8, 8, 8):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(c, num_classes)
        self.pos = nn.Parameter(torch.zeros(3, 1, 1))  # reason: a listed no-weight-decay parameter

    def forward(self, x):
        return self.fc(self.drop(torch.flatten(self.features(x + self.pos), 1)))

    def no_weight_decay(self):
        return {"pos"}


def _model(mode="relay", **kwargs):
    torch.manual_seed(0)
    return fxrelay.transform(Net(), mode, example_input=torch.randn(1, 3, 16, 16), **kwargs)


def _data(n=48, sampler=False):
    train, val = fxrelay.Shapes(n, 16, 4, seed=0), fxrelay.Shapes(32, 16, 4, seed=1)
    if sampler:
        loader = DataLoader(train, batch_size=16, sampler=fxrelay.ClassAwareSampler(train.targets, seed=3))
    else:
        loader = DataLoader(train, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    return loader, DataLoader(val, batch_size=32)


def test_one_optimizer_whose_momentum_persists():
    original = Net()
    model = fxrelay.transform(original, "relay", example_input=torch.randn(1, 3, 16, 16))
    loader, _ = _data()
    trainer = Trainer(model, loader, 3, no_weight_decay=no_weight_decay_names(original, model))
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.SGD) and all(g["nesterov"] for g in optimizer.param_groups)
    trainer.train_epoch(progress=False)
    after_one = {p: s["momentum_buffer"].clone() for p, s in optimizer.state.items()}
    trainer.train_epoch(progress=False)
    assert trainer.optimizer is optimizer and trainer.updates == 2 * len(loader)
    params = [p for p in model.parameters()]
    assert set(optimizer.state) == set(params) and len(after_one) == len(params)
    assert all(not torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in after_one.items())
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.0 if p.ndim <= 1 or name.endswith("pos") else 5e-4), name


def _lr_trace(trainer, epochs):
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(opt.param_groups[0]["lr"]))
    for _ in range(epochs):
        trainer.train_epoch(progress=False)
    return seen


def test_lr_is_per_update_warmup_then_cosine():
    loader, _ = _data()  # reason: 3 updates per epoch, 12 in all, warm-up 2 updates
    trainer = Trainer(_model(), loader, 4, Recipe(lr=0.1, warmup_epochs=2 / 3, warmup_start=0.1))
    lrs = _lr_trace(trainer, 4)
    expected = [0.01, 0.055] + [0.05 * (1 + math.cos(math.pi * u / 12)) for u in range(2, 12)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[2] == pytest.approx(0.0933012701892219) and lrs[-1] == pytest.approx(0.0017037086855465844)


def test_sequential_lr_restarts_with_every_stage():
    loader, _ = _data()  # reason: 4 stages of 1 epoch: 3 updates per cosine cycle
    trainer = Trainer(_model("greedy"), loader, 4, Recipe(lr=0.1, warmup_epochs=1 / 3, execution="sequential"))
    lrs = _lr_trace(trainer, 4)
    cycle = [0.05 * (1 + math.cos(math.pi * t / 3)) for t in range(3)]
    assert lrs == pytest.approx([0.01] + cycle[1:] + cycle * 3, rel=1e-12)


def _equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


RUNS = {
    "relay, EMA, AMP, shuffled": (lambda: _model("relay", head_stages=[1, 2]), Recipe(ema_decay=0.9, amp=True), False),
    "deep, AdamW, class-aware sampler": (lambda: _model("deep"), Recipe(opt="adamw", lr=1e-3), True),
    "sequential greedy, prefix cache": (lambda: _model("greedy"), Recipe(execution="sequential", cache_prefix=True), False),
}


class _Stop(Exception):
    pass


@pytest.mark.parametrize("run", list(RUNS))
def test_resume_is_bitwise_the_uninterrupted_run(run, tmp_path):
    build, recipe, sampler = RUNS[run]
    epochs, stop_after = 4, 1 if "sequential" in run else 2
    torch.manual_seed(5)
    model = build()
    trainer = Trainer(model, _data(sampler=sampler)[0], epochs, recipe)
    trainer.fit(_data(sampler=sampler)[1], progress=False)

    torch.manual_seed(5)
    path = tmp_path / "checkpoint.pt"

    def stop(epoch, history):
        if epoch + 1 == stop_after:
            raise _Stop

    loader, val_loader = _data(sampler=sampler)
    with pytest.raises(_Stop):
        fit(build(), loader, val_loader, epochs, recipe=recipe, progress=False, checkpoint=path, on_epoch_end=stop)
    torch.manual_seed(123)  # reason: the resumed run must restore every random state itself
    state = load_checkpoint(path)
    assert state["epoch"] == stop_after
    loader, val_loader = _data(sampler=sampler)
    resumed = Trainer(build(), loader, epochs, recipe)
    resumed.load_state_dict(state)
    history = resumed.fit(val_loader, progress=False, checkpoint=path)

    _equal_states(resumed.model.state_dict(), model.state_dict())
    for p, q in zip(resumed.model.parameters(), model.parameters()):
        _equal_states(resumed.optimizer.state[p], trainer.optimizer.state[q])
    if trainer.ema is not None:
        _equal_states(resumed.ema.module.state_dict(), trainer.ema.module.state_dict())
    ours, theirs = dataclasses.asdict(history), dataclasses.asdict(trainer.history)
    ours.pop("seconds"), theirs.pop("seconds")
    assert repr(ours) == repr(theirs)  # reason: repr compares NaN (heads that did not run) as equal


def test_checkpoint_is_plain_data_and_metrics_csv_follows_history(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    loader, val_loader = _data()
    model = _model("relay", head_stages=[1, 2])
    history = fit(model, loader, val_loader, 2, recipe=Recipe(ema_decay=0.5), progress=False, checkpoint=path,
                  extra={"args": {"model": "net", "lr": 0.05, "data": None}})
    state = torch.load(path, weights_only=True)
    assert History(**state["history"]) == history and state["extra"]["args"]["data"] is None
    assert state["plan"]["mode"] == "relay" and [h[:3] for h in state["plan"]["heads"]] == [[1, 0, 1], [2, 1, 2],
                                                                                           [3, 2, 3]]
    with open(path.with_name("metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 and [r["head_stage"] for r in rows[:3]] == ["1", "2", "3"]
    for row in rows:
        e, j = int(row["epoch"]) - 1, int(row["head"])
        assert float(row["train_loss"]) == pytest.approx(history.head_loss[e][j], rel=1e-5)
        assert float(row["val_accuracy"]) == pytest.approx(history.val_head_accuracy[e][j], rel=1e-5)
        assert float(row["ema_val_accuracy"]) == pytest.approx(history.ema_val_head_accuracy[e][j], rel=1e-5)
        assert float(row["lr"]) == pytest.approx(history.lr[e], rel=1e-5) and row["main"] == str(int(j == 2))


def test_resume_refuses_another_plan_or_recipe_and_warns_on_new_length(tmp_path):
    path = tmp_path / "checkpoint.pt"
    loader, val_loader = _data()
    fit(_model("greedy"), loader, val_loader, 1, progress=False, checkpoint=path)
    state = load_checkpoint(path)
    with pytest.raises(ValueError, match="different plan .*mode: 'greedy' in the checkpoint, 'relay' now"):
        Trainer(_model("relay"), loader, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="different recipe .*lr: 0.05 in the checkpoint, 0.1 now"):
        Trainer(_model("greedy"), loader, 1, Recipe(lr=0.1)).load_state_dict(state)
    old = tmp_path / "pickled.pt"
    torch.save({"args": argparse.Namespace(lr=0.05)}, old)  # reason: what train.py wrote before
    with pytest.raises(ValueError, match="not an fxrelay training checkpoint"):
        load_checkpoint(old)
    longer = Trainer(_model("greedy"), loader, 3)
    with pytest.warns(UserWarning, match="resuming a 1-epoch run for 3 epochs"):
        longer.load_state_dict(state)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(0.025 * (1 + math.cos(math.pi * 3 / 9)))


def test_evaluate_heads_against_the_stages_run_by_hand():
    model = _model("greedy")
    _, val_loader = _data()
    accs = evaluate_heads(model, val_loader)
    assert accs[-1] == evaluate(model, val_loader) and model.training
    plan = fxrelay.plan_of(model)
    x, y = next(iter(val_loader))
    model.eval()
    with torch.no_grad():
        for k in range(len(plan.stages) - 1):
            features = x
            for i in range(k + 1):
                features = model.stages[i](features)
            logits = model.heads[k].body(features)
            assert accs[k] == (logits.argmax(1) == y).double().mean().item()


def test_ema_model_deploys():
    loader, val_loader = _data()
    trainer = Trainer(_model(), loader, 2, Recipe(ema_decay=0.9))
    trainer.fit(val_loader, progress=False)
    ema = trainer.final_model
    assert ema is trainer.ema.module
    assert not all(torch.equal(p, q) for p, q in zip(ema.parameters(), trainer.model.parameters()))
    deployed = fxrelay.deploy(ema)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), ema.eval()(x), rtol=1e-4, atol=1e-5)


def _example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--model", "resnet10t", "--image-size", "16", "--train-size", "32", "--val-size", "16", "--batch-size",
        "16", "--no-progress"]


def test_train_py_resumes_bitwise_to_the_checkpoints_epochs(tmp_path, capsys, monkeypatch):
    """An interrupted train.py run, resumed without --epochs, ends where the uninterrupted one does."""
    train = _example("train")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.main(TINY + ["--epochs", "2", "--ema", "--out", str(whole)]) == 0
    report = train.report

    def interrupt(epoch, history, epochs):
        report(epoch, history, epochs)
        raise _Stop

    monkeypatch.setattr(train, "report", interrupt)
    with pytest.raises(_Stop):
        train.main(TINY + ["--epochs", "2", "--ema", "--out", str(cut)])
    monkeypatch.setattr(train, "report", report)
    capsys.readouterr()
    assert train.main(["--resume", str(cut / "checkpoint.pt")]) == 0
    printed = capsys.readouterr().out
    assert (f"resuming {cut / 'checkpoint.pt'} after epoch 1 of 2; training to epoch 2 (the checkpoint's --epochs)"
            in printed and "epoch 2/2" in printed and "deployed (EMA weights)" in printed)
    ours, theirs = load_checkpoint(cut / "checkpoint.pt"), load_checkpoint(whole / "checkpoint.pt")
    _equal_states(ours["model"], theirs["model"])
    _equal_states(ours["ema"], theirs["ema"])

    assert train.main(["--resume", str(cut / "checkpoint.pt"), "--epochs", "3"]) == 0
    printed = capsys.readouterr().out
    assert "training to epoch 3 (--epochs given)" in printed and "epoch 3/3" in printed
    assert "note: resuming a 2-epoch run for 3 epochs: the learning-rate schedule is recomputed" in printed
    assert train.main(["--resume", str(cut / "checkpoint.pt"), "--lr", "0.1"]) == 2
    assert capsys.readouterr().err == ("train.py: error: --resume continues the checkpointed run with its settings; "
                                       "it cannot change --lr (start a new run with another --out)\n")


def test_train_py_sequential_with_too_few_epochs_is_one_line(tmp_path):
    # reason: the tiny 16 px images trigger fxrelay's (right) warning that levels are lost; not what this checks
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::UserWarning"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), *TINY, "--mode", "greedy",
                             "--execution", "sequential", "--epochs", "3", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr == ("train.py: error: the sequential greedy schedule trains each of the 4 stages for the "
                             "same number of epochs: epochs must be a positive multiple of 4, got 3\n")


def test_train_py_local_step_says_it_is_renamed(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--local-step", "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stderr) == (2, "train.py: error: --local-step is renamed --execution "
                                                     "sequential (fxrelay.LocalStep is --execution local)\n")


def test_train_py_local_execution_trains(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::UserWarning"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), *TINY, "--mode", "greedy",
                             "--execution", "local", "--epochs", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "training: greedy" in result.stdout and "(equal)" in result.stdout


@pytest.mark.parametrize("name", ["train", "compare"])
def test_example_options_have_help_and_defaults(name):
    parser = _example(name).parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
    text = " ".join(parser.format_help().split())
    assert "(default: 64)" in text and "(default: resnet10t)" in text


def test_compare_py_reads_the_metrics(tmp_path, capsys):
    compare = _example("compare")
    assert compare.main(TINY + ["--epochs", "1", "--modes", "standard,relay", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compare.csv", newline="") as f:
        rows = {r["mode"]: float(r["epoch1"]) for r in csv.DictReader(f)}
    for mode in ("standard", "relay"):
        with open(tmp_path / mode / "seed0" / "metrics.csv", newline="") as f:
            main = [float(r["val_accuracy"]) for r in csv.DictReader(f) if r["main"] == "1"]
        assert rows[mode] == pytest.approx(main[0], abs=5e-5)
    assert (tmp_path / "compare.png").stat().st_size > 0 and "relay " in capsys.readouterr().out
