"""The demo: fxrelay end to end on generated data, in a few minutes on a laptop CPU.

:func:`run_demo` trains a small timm model on :class:`fxrelay.data.Shapes` with plain
backprop (``standard``) and with Relay BP (``relay``) under the same seed and budget,
renders the relay partition, deploys the relay-trained model with BatchNorm folded,
checks that the deployed model computes what the trained one does, and returns a
:class:`DemoResult` whose ``str`` is the summary table.

Example:
    >>> print(run_demo(epochs=1, train_size=512))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from ..deployment.deploy import deploy
from ..deployment.fold import count_batchnorms
from ..diagrams.render import GraphvizNotFound, render
from ..passes.rewrite import plan_of, transform
from ..data import Shapes
from ..train.loop import evaluate, fit

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What the demo measured and wrote."""

    model: str
    rows: list[tuple[str, float, float, int]] = field(default_factory=list)  # mode, val acc, seconds, heads
    deployed_accuracy: float = 0.0
    deployed_max_diff: float = 0.0
    batchnorms: tuple[int, int] = (0, 0)
    files: list[Path] = field(default_factory=list)
    chance: float = 0.0

    def __str__(self) -> str:
        lines = [f"fxrelay demo: {self.model} on generated shapes (chance {self.chance:.1%})", "",
                 f"{'mode':<10}{'val acc':>9}{'train s':>9}{'heads':>7}"]
        lines += [f"{mode:<10}{acc:>9.1%}{secs:>9.1f}{heads:>7}" for mode, acc, secs, heads in self.rows]
        lines += ["", f"deployed (relay, BN folded {self.batchnorms[0]} -> {self.batchnorms[1]}): "
                      f"val acc {self.deployed_accuracy:.1%}, max |deployed - trained| = {self.deployed_max_diff:.2e}",
                  "", "files written:"]
        lines += [f"  {f}" for f in self.files]
        return "\n".join(lines)


def run_demo(out_dir: str | Path = "out/demo", *, model_name: str = "resnet10t", epochs: int = 4,
             train_size: int = 4096, val_size: int = 1024, image_size: int = 32, num_classes: int = 10,
             batch_size: int = 64, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train standard and relay, render, deploy and verify; see the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set = Shapes(train_size, image_size, num_classes, seed=seed)
    val_set = Shapes(val_size, image_size, num_classes, seed=seed + 1)
    val_loader = DataLoader(val_set, batch_size=256)
    result = DemoResult(model_name, chance=1 / num_classes)
    trained = None
    for mode in ("standard", "relay"):
        torch.manual_seed(seed)
        model = transform(timm.create_model(model_name, num_classes=num_classes), mode,
                          example_input=torch.randn(1, 3, image_size, image_size))
        loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        tic = time.perf_counter()
        history = fit(model, loader, val_loader, epochs, progress=progress)
        result.rows.append((mode, history.val_accuracy[-1], time.perf_counter() - tic, len(plan_of(model).heads)))
        trained = model
    result.files += _render(trained, out)
    deployed = deploy(trained)
    result.batchnorms = (count_batchnorms(plan_of(trained).graph_module), count_batchnorms(deployed))
    result.deployed_accuracy = evaluate(deployed, val_loader)
    result.deployed_max_diff = _max_diff(trained.eval(), deployed, val_loader)
    path = out / "deployed_relay.pt"
    torch.save(deployed, path)
    result.files.append(path)
    return result


def _render(model: torch.nn.Module, out: Path) -> list[Path]:
    try:
        return [render(model, out / "relay_stages.svg"), render(model, out / "relay_stages.png")]
    except GraphvizNotFound:  # reason: the demo still trains and deploys without the dot program
        return [render(model, out / "relay_stages.dot")]


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, loader: DataLoader) -> float:
    with torch.no_grad():
        return max((a(x) - b(x)).abs().max().item() for x, _ in loader)
