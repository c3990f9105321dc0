"""Standard, deep, relay and greedy training of one model on the same data, seed and budget.

    python examples/compare.py                                  # resnet10t, generated shapes
    python examples/compare.py --model tv:resnet18 --epochs 8 --out out/compare

Each mode trains with :func:`fxrelay.train.loop.fit` (SGD with Nesterov momentum, one
per-update cosine schedule with warm-up, label smoothing) and writes its per-head
metrics to ``OUT/MODE/metrics.csv``. The script then reads those CSVs, prints the
validation accuracy of every mode after every epoch, and writes ``OUT/compare.csv`` and
``OUT/compare.png``: the main head's validation accuracy per mode, and how each head of
the relay model learns.
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
from fxrelay.apps.zoo import load_model  # noqa: E402
from fxrelay.train.loop import Recipe, fit  # noqa: E402

MODES = ("standard", "deep", "relay", "greedy")


def train(args: argparse.Namespace, mode: str, out: Path) -> float:
    """Train ``mode``, writing ``out/mode/metrics.csv``; returns the training seconds."""
    train_set = fxrelay.Shapes(args.train_size, args.image_size, args.num_classes, seed=args.seed)
    val_set = fxrelay.Shapes(args.val_size, args.image_size, args.num_classes, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    model = fxrelay.transform(load_model(args.model, num_classes=args.num_classes), mode,
                              example_input=torch.randn(1, 3, args.image_size, args.image_size))
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    history = fit(model, loader, DataLoader(val_set, batch_size=256), args.epochs,
                  recipe=Recipe(lr=args.lr, warmup_epochs=args.warmup_epochs), progress=not args.no_progress,
                  metrics=out / mode / "metrics.csv")
    return sum(history.seconds)


def read_metrics(path: Path) -> dict[int, list[float]]:
    """Head index -> validation accuracy per epoch, from a ``metrics.csv``; the main head under -1 too."""
    curves: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(int(row["head"]), []).append(float(row["val_accuracy"]))
            if row["main"] == "1":
                curves.setdefault(-1, []).append(float(row["val_accuracy"]))
    return curves


def head_stages(path: Path) -> dict[int, int]:
    with open(path, newline="") as f:
        return {int(row["head"]): int(row["head_stage"]) for row in csv.DictReader(f)}


def save(out: Path, modes: list[str], title: str) -> None:
    curves = {mode: read_metrics(out / mode / "metrics.csv") for mode in modes}
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode"] + [f"epoch{e + 1}" for e in range(len(curves[modes[0]][-1]))])
        writer.writerows([mode] + [f"{a:.4f}" for a in c[-1]] for mode, c in curves.items())
    detail = "relay" if "relay" in modes else modes[-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=150)
    for mode, c in curves.items():
        left.plot(range(1, len(c[-1]) + 1), [100 * a for a in c[-1]], marker="o", label=mode)
    left.set(xlabel="epoch", ylabel="validation accuracy (%)", title=title)
    stages = head_stages(out / detail / "metrics.csv")
    for head, accs in sorted((h, a) for h, a in curves[detail].items() if h >= 0):
        name = "main head" if head == max(stages) else f"head {head} (stage {stages[head]})"
        right.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", label=name)
    right.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{detail}: every head")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    metrics = ", ".join(str(out / m / "metrics.csv") for m in modes)
    print(f"wrote {out / 'compare.png'}, {out / 'compare.csv'} and {metrics}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet10t", help="timm model name, or tv:NAME for torchvision")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to train")
    p.add_argument("--epochs", type=int, default=6, help="epochs per mode")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, Nesterov momentum)")
    p.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up, in epochs")
    p.add_argument("--image-size", type=int, default=32, help="image side in px")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the generated data")
    p.add_argument("--train-size", type=int, default=4096, help="generated training images")
    p.add_argument("--val-size", type=int, default=1024, help="generated validation images")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, the data and the shuffling")
    p.add_argument("--out", default="out/compare", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in fxrelay.MODES]
    if unknown or not modes:
        p.error(f"--modes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(fxrelay.MODES)}")
    out = Path(args.out)
    print(f"validation accuracy per epoch, {args.model}, generated shapes, {args.train_size} images, "
          f"{len(modes)} runs: {', '.join(modes)}", flush=True)
    for mode in modes:
        seconds = train(args, mode, out)
        accs = read_metrics(out / mode / "metrics.csv")[-1]
        print(f"{mode:<9} " + " ".join(f"{a:6.1%}" for a in accs) + f"   ({seconds:.0f} s)", flush=True)
    save(out, modes, f"{args.model} on generated shapes ({args.num_classes} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
