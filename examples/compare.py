"""Standard, deep, relay and greedy training of one model on the same data, seed and budget.

    python examples/compare.py                                  # resnet10t, generated shapes
    python examples/compare.py --model tv:resnet18 --epochs 8 --out out/compare

Prints the validation accuracy of every mode after every epoch and writes the curves
to ``OUT/compare.png`` (matplotlib) and the figures to ``OUT/compare.csv``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import fxrelay  # noqa: E402
from fxrelay.apps.cli import load_model  # noqa: E402
from fxrelay.train.loop import fit  # noqa: E402

MODES = ("standard", "deep", "relay", "greedy")


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    train = fxrelay.Shapes(args.train_size, args.image_size, args.num_classes, seed=args.seed)
    val = fxrelay.Shapes(args.val_size, args.image_size, args.num_classes, seed=args.seed + 1)
    curves = {}
    for mode in MODES:
        torch.manual_seed(args.seed)
        model = fxrelay.transform(load_model(args.model, num_classes=args.num_classes), mode,
                                  example_input=torch.randn(1, 3, args.image_size, args.image_size))
        loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(args.seed))
        history = fit(model, loader, DataLoader(val, batch_size=256), args.epochs, progress=not args.no_progress)
        curves[mode] = history.val_accuracy
        print(f"{mode:<9} " + " ".join(f"{a:6.1%}" for a in history.val_accuracy)
              + f"   ({sum(history.seconds):.0f} s)", flush=True)
    return curves


def save(curves: dict[str, list[float]], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode"] + [f"epoch{e + 1}" for e in range(len(next(iter(curves.values()))))])
        writer.writerows([mode] + [f"{a:.4f}" for a in accs] for mode, accs in curves.items())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for mode, accs in curves.items():
        ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", label=mode)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    print(f"wrote {out / 'compare.png'} and {out / 'compare.csv'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/compare")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    print(f"validation accuracy per epoch, {args.model}, generated shapes, {args.train_size} images")
    save(run(args), Path(args.out), f"{args.model} on generated shapes ({args.num_classes} classes)")


if __name__ == "__main__":
    main()
