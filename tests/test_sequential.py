"""The lean sequential greedy schedule: only stages 0..k and head k run, the prefix cache, frozen state kept."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fxrelay
from fxrelay.core.modules import training_mode
from fxrelay.train.sequential import StageStep, greedy_schedule, prefix_cache, train_stage
from fxrelay.train.executions import TrainingStep
from fxrelay.train.loop import Trainer
from fxrelay.train.recipe import Recipe


class Chain(nn.Module):
    """Four conv-BN-ReLU-pool stages (a skip edge from stage 1 into stage 3) and a classifier."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        widths, c = (4, 8, 8, 8), 3
        self.blocks = nn.ModuleList()
        for w in widths:
            self.blocks.append(nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                             nn.MaxPool2d(2)))
            c = w
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        a = self.blocks[1](self.blocks[0](x))
        b = self.blocks[2](a)
        skip = nn.functional.max_pool2d(a, 2)  # reason: a value of stage 1 read by a later stage
        return self.fc(torch.flatten(self.blocks[3](b + skip), 1))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return fxrelay.transform(Chain().to(dtype), "greedy", example_input=torch.randn(1, 3, 16, 16, dtype=dtype))


def _loader(n=48, batch_size=16, seed=0):
    data = fxrelay.Shapes(n, 16, 4, seed=seed)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_greedy_schedule():
    assert greedy_schedule(3, 6) == [0, 0, 1, 1, 2, 2]
    assert greedy_schedule(4, 4) == [0, 1, 2, 3]
    for epochs in (0, 3, 7):
        with pytest.raises(ValueError, match="positive multiple of 4"):
            greedy_schedule(4, epochs)


def _count_forwards(model):
    plan = fxrelay.plan_of(model)
    counts = {}
    modules = {f"stage{i}": model.stages[i] for i in range(len(plan.stages))}
    modules.update({f"head{k}": model.heads[k].body for k in range(len(plan.heads) - 1)})
    for name, module in modules.items():
        counts[name] = 0
        module.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


@pytest.mark.parametrize("cache", [False, True])
def test_only_stages_up_to_k_and_head_k_run(cache):
    """Training stage k runs stages 0..k and head k; with the cache the prefix runs once per fill."""
    model, loader = _model(), _loader()
    stages = len(fxrelay.plan_of(model).stages)
    assert stages == 4
    trainer = Trainer(model, loader, 2 * stages, Recipe(execution="sequential", cache_prefix=cache))
    counts = _count_forwards(model)
    batches = len(loader)
    fill_batches = len(loader.dataset) // loader.batch_size  # reason: the fill reads the dataset once, in order
    for k in range(stages):
        for name in counts:
            counts[name] = 0
        trainer.train_epoch(progress=False)
        trainer.train_epoch(progress=False)
        prefix_runs = fill_batches if cache and k > 0 else 2 * batches
        expected = {f"stage{i}": prefix_runs if i < k else 2 * batches if i == k else 0 for i in range(stages)}
        expected.update({f"head{j}": 2 * batches if j == k else 0 for j in range(stages - 1)})
        assert counts == expected, k


def test_stage_step_gradients_equal_the_one_line_model():
    """Lean stage k's gradients are those of the transformed model's own loss.backward(), other stages frozen."""
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (6,))
    criterion = nn.CrossEntropyLoss()
    for k in range(4):
        model = _model(torch.float64)
        with train_stage(model, k) as step:
            trained = [p for m in step.trained_modules() for p in m.parameters()]
            (step.weight * criterion(step(x), y)).backward()
            lean = [p.grad.clone() for p in trained]
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
            model.zero_grad(set_to_none=True)
            for aux in model.heads.children():
                aux.training = True  # reason: every head runs, as in training; their bodies stay as set
            criterion(model(x), y).backward()
            one_line = [p.grad for p in trained]
        assert len(lean) > 0
        for a, b in zip(lean, one_line):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_train_stage_restores_flags_and_runs_the_prefix_in_train_mode():
    model = _model()
    model.train()
    frozen = next(p for p in model.parameters())
    frozen.requires_grad_(False)  # reason: a parameter the user froze stays frozen
    with train_stage(model, 2) as step:
        assert model.stages[0].training and model.stages[1].training  # reason: as the one-line greedy step
        assert model.stages[2].training and step.head_module.training
        assert not any(p.requires_grad for p in model.stages[1].parameters())
        stats = {k: v.clone() for k, v in model.stages[0].state_dict().items()}
        step(torch.randn(4, 3, 16, 16))
        assert not all(torch.equal(v, model.stages[0].state_dict()[k]) for k, v in stats.items())
    assert all(m.training for m in model.modules())
    assert not frozen.requires_grad and all(p.requires_grad for p in model.parameters() if p is not frozen)


def _buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("k", range(4))
def test_sequential_step_equals_the_one_line_greedy_step_for_stage_k(k):
    """Stage k's gradients and every BN buffer after one sequential step (a StageRunner run stopping after
    stage k) equal those of the one-line greedy step with the other stages frozen."""
    x, y = torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randint(0, 4, (6,))
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    model = _model(torch.float64)
    start = {n: b.clone() for n, b in model.state_dict().items()}
    results = []
    for execution in ("one-line", "sequential"):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        with train_stage(model, k) as step:
            trained = [p for m in step.trained_modules() for p in m.parameters()]
            TrainingStep(model, criterion, execution, stage=k if execution == "sequential" else None)(x, y)
            grads = [p.grad.clone() for p in trained]
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        buffers = _buffers(model)
        # reason: stages above k do not run in the sequential step; the one-line step runs them
        buffers = {n: b for n, b in buffers.items() if not any(n.startswith(f"stages.{s.name}.")
                   for s in fxrelay.plan_of(model).stages[k + 1:]) and not n.startswith("heads.")
                   or n.startswith(f"heads.{fxrelay.plan_of(model).stages[k].name}.")}
        results.append((grads, buffers))
    (want, want_buffers), (got, got_buffers) = results
    assert len(want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got_buffers.keys() == want_buffers.keys()
    for name in want_buffers:
        torch.testing.assert_close(got_buffers[name], want_buffers[name], rtol=1e-12, atol=0, msg=name)


def test_recipe_sequential_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="execution='sequential'"):
        assert Recipe(sequential=True).execution == "sequential"


def test_sequential_keeps_the_state_of_stages_not_training():
    """One optimizer: stage 0's momentum survives (untouched) while stage 1 trains."""
    model = _model()
    trainer = Trainer(model, _loader(), 4, Recipe(execution="sequential"))
    optimizer = trainer.optimizer
    stage0 = list(model.stages[0].parameters()) + list(model.heads[0].parameters())
    stage1 = list(model.stages[1].parameters())
    trainer.train_epoch(progress=False)
    before = {p: (p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone()) for p in stage0}
    assert not any(p in optimizer.state for p in stage1)
    trainer.train_epoch(progress=False)
    assert trainer.optimizer is optimizer
    for p, (value, momentum) in before.items():
        assert torch.equal(p, value) and torch.equal(optimizer.state[p]["momentum_buffer"], momentum)
    assert all(optimizer.state[p]["momentum_buffer"].abs().sum() > 0 for p in stage1)


def test_prefix_cache_serves_what_the_loader_would():
    """Same batches (samples and order) as the loader, the prefix's values, no global random draw."""
    model, loader = _model(), _loader()
    with train_stage(model, 3) as step:
        state, rng = loader.generator.get_state(), torch.get_rng_state()
        cached = prefix_cache(step, loader)
        assert torch.equal(torch.get_rng_state(), rng)
        loader.generator.set_state(state)
        with training_mode(model, False):  # reason: the cache's one approximation: the prefix in eval mode
            expected = [(step.prefix(x), y) for x, y in loader]
        loader.generator.set_state(state)
        served = list(cached)
    assert len(served) == len(expected) == len(loader)
    for (values, labels), (want, want_labels) in zip(served, expected):
        assert torch.equal(labels, want_labels)
        assert len(values) == len(want) == 2  # reason: stage 3 reads stage 2's output and the skip value
        for v, w in zip(values, want):
            torch.testing.assert_close(v, w)


class _Noisy(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.randn(3, 16, 16), 0


def test_prefix_cache_refuses_random_data():
    model = _model()
    with train_stage(model, 1) as step, pytest.raises(ValueError, match="deterministic dataset"):
        prefix_cache(step, DataLoader(_Noisy(), batch_size=4))


def test_sequential_needs_a_greedy_model_with_every_head():
    base = Chain()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="mode='greedy'"):
        StageStep(fxrelay.transform(base, "relay", example_input=x), 0)
    with pytest.raises(ValueError, match=r"stages \[0, 2\] have none"):
        StageStep(fxrelay.transform(base, "greedy", head_stages=[1], example_input=x), 0)
    with pytest.raises(ValueError, match="positive multiple of 4"):
        Trainer(fxrelay.transform(base, "greedy", example_input=x), _loader(), 3, Recipe(execution="sequential"))
