"""The demo: fxrelay end to end on generated data, in a few minutes on a laptop CPU.

:func:`run_demo` prints the plan of its runs, then trains a small timm model on
:class:`fxrelay.data.Shapes` with plain backprop (``standard``) and with Relay BP
(``relay``) under the same seed and budget (one progress bar per run, labelled
``run i/n MODE``, kept on screen), renders the relay partition, deploys the
relay-trained model with BatchNorm folded, checks that the deployed model computes
what the trained one does (PASS/FAIL against :data:`TOLERANCE`), saves both with
:func:`fxrelay.save`, and returns a :class:`DemoResult` whose ``str`` is the summary.

Example:
    >>> print(run_demo(epochs=1, train_size=512))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import Shapes
from ..deployment.deploy import deploy
from ..deployment.fold import count_batchnorms
from ..diagrams.render import GraphvizNotFound, render
from ..passes.rewrite import plan_of
from ..train.executions import TrainingStep
from ..train.evaluation import evaluate
from ..train.history import History
from ..train.loop import fit
from ..train.memory import AllocatedBytes, SavedBytes
from ..io.saving import ModelSpec, save
from ..io.zoo import check_model_name

__all__ = ["DemoResult", "DeployCheck", "run_demo", "check_deployed", "TOLERANCE", "IMAGE_SIZE", "RUNS",
           "MEMORY_EXECUTIONS", "ExecutionMemory", "measure_executions"]

TOLERANCE = 1e-4
"""Deployed vs trained: max |difference| <= TOLERANCE * max(1, max |trained output|)."""
IMAGE_SIZE = 32
RUNS = ("standard", "relay")  # reason: the modes trained, in order; the last is deployed
MEMORY_EXECUTIONS = ("one-line", "recompute", "local")
_LOADING = {
    ".pt2": "deployed model: fxrelay.load(path), or without fxrelay torch.export.load(path).module()",
    ".pt": "trained model with its heads: fxrelay.load(path) (torch.load(path, weights_only=True) reads it)",
    ".svg": "partition diagram", ".png": "partition diagram", ".dot": "partition diagram (graphviz source)",
}


@dataclass(frozen=True)
class DeployCheck:
    """Deployed vs trained outputs: the largest difference and the tolerance it is held to.

    ``precision`` is ``"float32"``, or ``"float64"`` when the float32 difference exceeded
    the tolerance and the check was repeated in float64, where folding is exact up to
    rounding: the float32 gap is then the model's own rounding (``float32_diff``).
    """

    max_diff: float
    tolerance: float
    precision: str = "float32"
    float32_diff: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        relation = "<=" if self.passed else ">"
        text = (f"max |deployed - trained| = {self.max_diff:.2e} {relation} {self.tolerance:.2e} "
                f"({TOLERANCE:.0e} x max(1, max |output|))")
        if self.precision == "float64":
            text += f" in float64 (float32 rounding: {self.float32_diff:.2e})"
        return f"{verdict}: {text}"


@dataclass(frozen=True)
class ExecutionMemory:
    """One relay training step under one execution: its memory peaks and its gradients' distance to the one-line
    step's."""

    execution: str
    saved_mb: float
    allocated_mb: float
    grad_diff: float

    def __str__(self) -> str:
        return f"{self.execution:<11}{self.saved_mb:>9.2f}{self.allocated_mb:>14.2f}  {self.grad_diff:.1e}"


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    model: str
    rows: list[tuple[str, float, float, int]] = field(default_factory=list)  # mode, val acc, seconds, heads
    deployed_accuracy: float = 0.0
    check: DeployCheck = DeployCheck(0.0, 0.0)
    batchnorms: tuple[int, int] = (0, 0)
    files: list[Path] = field(default_factory=list)
    chance: float = 0.0
    memory: list[ExecutionMemory] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fxrelay demo: {self.model} on generated shapes (chance {self.chance:.1%})", "",
                 f"{'mode':<10}{'val acc':>9}{'train s':>9}{'heads':>7}"]
        lines += [f"{mode:<10}{acc:>9.1%}{secs:>9.1f}{heads:>7}" for mode, acc, secs, heads in self.rows]
        if self.memory:
            lines += ["", "one relay step, per execution (same gradients, different memory):",
                      f"{'execution':<11}{'saved MB':>9}{'allocated MB':>14}  max |grad - one-line grad|"]
            lines += [str(row) for row in self.memory]
            lines.append("  saved: fxrelay.SavedBytes peak (recompute's saves inside torch.utils.checkpoint are not "
                         "seen); allocated: fxrelay.AllocatedBytes peak")
        lines += ["", f"deployed (relay, BN folded {self.batchnorms[0]} -> {self.batchnorms[1]}): "
                      f"val acc {self.deployed_accuracy:.1%}",
                  f"deployed computes what the trained model does: {self.check}", "", "files written:"]
        width = max((len(str(f)) for f in self.files), default=0)
        lines += [f"  {str(f):<{width}}  {_LOADING.get(f.suffix, '')}".rstrip() for f in self.files]
        return "\n".join(lines)


def run_demo(out_dir: str | Path = "out/demo", *, model_name: str = "resnet10t", epochs: int = 4,
             train_size: int = 4096, val_size: int = 1024, image_size: int = IMAGE_SIZE, num_classes: int = 10,
             batch_size: int = 64, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train standard and relay, render, deploy, verify and save; see the module docstring.

    Args:
        progress: print the plan of runs and show progress bars.

    Raises:
        fxrelay.io.zoo.UnknownModelError: unknown ``model_name``, before anything runs
            (nothing is written unless training finishes).
    """
    check_model_name(model_name)
    out = Path(out_dir)
    train_set = Shapes(train_size, image_size, num_classes, seed=seed)
    val_set = Shapes(val_size, image_size, num_classes, seed=seed + 1)
    val_loader = DataLoader(val_set, batch_size=256)
    recipes = [ModelSpec(model_name, mode, model_kwargs={"num_classes": num_classes},
                      input_shape=(3, image_size, image_size)) for mode in RUNS]
    if progress:
        print(_plan_text(model_name, epochs, train_size, image_size, num_classes, out), flush=True)
    result = DemoResult(model_name, chance=1 / num_classes)
    for i, recipe in enumerate(recipes, 1):
        torch.manual_seed(seed)
        model = recipe.build()
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        tic = time.perf_counter()
        with tqdm(total=epochs * len(loader), desc=f"run {i}/{len(recipes)} {recipe.mode:<8}", unit="batch",
                  leave=True, disable=not progress) as bar:
            history = fit(model, _Ticking(loader, bar), val_loader, epochs, progress=False,
                          on_epoch_end=functools.partial(_show_epoch, bar, epochs))
        result.rows.append((recipe.mode, history.val_accuracy[-1], time.perf_counter() - tic,
                            len(plan_of(model).heads)))
    result.memory = measure_executions(model, next(iter(val_loader)), num_classes)
    trained = model.eval()
    out.mkdir(parents=True, exist_ok=True)
    result.files += _render(trained, out, model_name)
    deployed = deploy(trained)
    result.batchnorms = (count_batchnorms(plan_of(trained).graph_module), count_batchnorms(deployed))
    result.deployed_accuracy = evaluate(deployed, val_loader)
    result.check = check_deployed(trained, deployed, val_loader)
    result.files.append(save(deployed, out / "deployed_relay.pt2", example_input=next(iter(val_loader))[0][:2]))
    result.files.append(save(trained, out / "trained_relay.pt", recipe=recipes[-1]))
    return result


def measure_executions(model: torch.nn.Module, batch: tuple, num_classes: int,
                       executions: tuple[str, ...] = MEMORY_EXECUTIONS) -> list[ExecutionMemory]:
    """Per execution, the peak MB saved for backward (:class:`fxrelay.SavedBytes`) and allocated
    (:class:`fxrelay.AllocatedBytes`) by one training step of ``model`` on ``batch``, and how far its gradients
    are from the one-line step's (BN statistics restored before each)."""
    x, y = batch[0][:64], batch[1][:64]
    criterion = torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    rows, reference = [], None
    for name in executions:
        model.load_state_dict(buffers, strict=False)
        model.train().zero_grad(set_to_none=True)
        step = TrainingStep(model, criterion, name)
        with SavedBytes(exclude=params) as saved, AllocatedBytes() as allocated:
            step(x, y)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        reference = reference or grads
        diff = max((g - r).abs().max().item() for g, r in zip(grads, reference))
        rows.append(ExecutionMemory(name, saved.peak / 2**20, allocated.peak / 2**20, diff))
    model.load_state_dict(buffers, strict=False)
    model.zero_grad(set_to_none=True)
    return rows


def check_deployed(trained: torch.nn.Module, deployed: torch.nn.Module, loader: DataLoader) -> DeployCheck:
    """Compare outputs on every batch of ``loader``; past the tolerance, again in float64 on the first batch.

    In float64 (copies of both models) the deployed model's folded weights keep their
    float32 rounding (~1e-7 relative), far below the tolerance: what is left is a real
    difference.

    Example:
        >>> import torchvision, fxrelay
        >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10)).eval()
        >>> check_deployed(model, fxrelay.deploy(model), [(torch.randn(2, 3, 64, 64), None)]).passed
        True
    """
    with torch.no_grad():
        diff, scale = 0.0, 1.0
        for x, _ in loader:
            expected = trained(x)
            diff = max(diff, (deployed(x) - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
        check = DeployCheck(diff, TOLERANCE * scale)
        if check.passed:
            return check
        x = next(iter(loader))[0].double()
        expected = copy.deepcopy(trained).double()(x)
        diff64 = (copy.deepcopy(deployed).double()(x) - expected).abs().max().item()
        return DeployCheck(diff64, TOLERANCE * max(1.0, expected.abs().max().item()), "float64", diff)


class _Ticking:
    """``loader``, advancing ``bar`` by one per batch: one bar across all epochs of a run."""

    def __init__(self, loader: DataLoader, bar: tqdm):
        self.loader, self.bar = loader, bar

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.bar.update()

    def __len__(self) -> int:
        return len(self.loader)


def _show_epoch(bar: tqdm, epochs: int, epoch: int, history: History) -> None:
    bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}, val acc {history.val_accuracy[-1]:.1%}")


def _plan_text(model_name: str, epochs: int, train_size: int, image_size: int, num_classes: int, out: Path) -> str:
    lines = [f"fxrelay demo: {model_name} on {train_size} generated {image_size}x{image_size} images of "
             f"{num_classes} classes, {epochs} epochs per run, same seed for every run:"]
    lines += [f"  run {i}/{len(RUNS)}: {mode}" + (" (plain backprop)" if mode == "standard" else " (Relay BP)")
              for i, mode in enumerate(RUNS, 1)]
    lines.append(f"then: render the relay partition, deploy it with BN folded, check deployed == trained "
                 f"(tolerance {TOLERANCE:.0e} x max |output|), save to {out}/")
    return "\n".join(lines)


def _render(model: torch.nn.Module, out: Path, title: str) -> list[Path]:
    try:
        return [render(model, out / "relay_stages.svg", title=title), render(model, out / "relay_stages.png",
                                                                             title=title)]
    except GraphvizNotFound:  # reason: the demo still trains and deploys without the dot program
        return [render(model, out / "relay_stages.dot", title=title)]
