"""Train any timm or torchvision model with Relay BP (or greedy, deep, standard), then deploy it.

    python examples/train.py --model resnet10t --mode relay --epochs 5            # generated shapes
    python examples/train.py --model tv:resnet18 --data /path/to/imagefolder --image-size 128
    python examples/train.py --model resnet10t --mode greedy --local-step --epochs 10
    python examples/train.py --resume out/train/checkpoint.pt                   # continue a run

``--data`` is an ImageFolder root with ``train/`` and ``val/`` subfolders (or one folder,
split 90/10). Without it the generated :class:`fxrelay.data.Shapes` dataset is used.
Every epoch prints each head's train loss and accuracy and the validation accuracy;
a checkpoint is written after every epoch. At the end the model is deployed (heads and
scopes stripped, BatchNorm folded) and the script checks that the deployed model's
validation accuracy equals the trained model's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, random_split

import fxrelay
from fxrelay.apps.cli import load_model
from fxrelay.train.loop import History, evaluate, fit


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """Train and validation sets and the number of classes."""
    if args.data is None:
        train = fxrelay.Shapes(args.train_size, args.image_size, args.num_classes, seed=args.seed)
        return train, fxrelay.Shapes(args.val_size, args.image_size, args.num_classes, seed=args.seed + 1), \
            args.num_classes
    from torchvision import datasets as tvd, transforms as T

    tf = T.Compose([T.Resize(args.image_size), T.CenterCrop(args.image_size), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    root = Path(args.data)
    if (root / "train").is_dir():
        train, val = tvd.ImageFolder(root / "train", tf), tvd.ImageFolder(root / "val", tf)
    else:
        full = tvd.ImageFolder(root, tf)
        n_val = max(1, len(full) // 10)
        train, val = random_split(full, [len(full) - n_val, n_val], torch.Generator().manual_seed(args.seed))
        train.targets = [full.targets[i] for i in train.indices]
    return train, val, len(getattr(train, "classes", None) or set(train.targets))


def loaders(args: argparse.Namespace, train: Dataset, val: Dataset) -> tuple[DataLoader, DataLoader]:
    sampler = fxrelay.ClassAwareSampler(train.targets, seed=args.seed) if args.class_aware else None
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, generator=torch.Generator().manual_seed(args.seed))
    return train_loader, DataLoader(val, batch_size=256, num_workers=args.workers)


def build(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = load_model(args.model, num_classes=num_classes)
    return fxrelay.transform(model, args.mode, window=args.window, head_kind=args.head,
                             example_input=torch.randn(1, 3, args.image_size, args.image_size))


def report(epoch: int, history: History, heads) -> None:
    per_head = "  ".join(f"h{h.index}@s{h.stage}: loss {loss:.3f} acc {acc:.1%}" for h, loss, acc in
                         zip(heads, history.head_loss[epoch], history.head_accuracy[epoch]))
    print(f"epoch {epoch + 1}: {per_head}  | val acc {history.val_accuracy[epoch]:.1%} "
          f"({history.seconds[epoch]:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--mode", choices=fxrelay.MODES, default="relay")
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--head", default="auto")
    parser.add_argument("--data", default=None, help="ImageFolder root (default: generated shapes)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10, help="generated data only")
    parser.add_argument("--train-size", type=int, default=4096, help="generated data only")
    parser.add_argument("--val-size", type=int, default=1024, help="generated data only")
    parser.add_argument("--class-aware", action="store_true", help="class-aware sampling (Relay BP)")
    parser.add_argument("--local-step", action="store_true",
                        help="sequential greedy schedule: one stage at a time, lower ones frozen")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/train")
    parser.add_argument("--resume", default=None, help="checkpoint to continue from")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    checkpoint = torch.load(args.resume, weights_only=False) if args.resume else None
    if checkpoint:
        args = argparse.Namespace(**{**vars(checkpoint["args"]), "resume": args.resume, "epochs": args.epochs})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, num_classes = datasets(args)
    train_loader, val_loader = loaders(args, train, val)
    model = build(args, num_classes)
    history, start = History(), 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        history, start = checkpoint["history"], checkpoint["epoch"] + 1
        print(f"resumed from {args.resume} after epoch {start}")
    heads = fxrelay.plan_of(model).heads
    print(fxrelay.plan_of(model))

    def save(epoch: int, hist: History) -> None:
        report(epoch, hist, heads)
        torch.save({"args": args, "model": model.state_dict(), "history": hist, "epoch": epoch},
                   out / "checkpoint.pt")

    fit(model, train_loader, val_loader, args.epochs, lr=args.lr, local_step=args.local_step,
        progress=not args.no_progress, start_epoch=start, history=history, on_epoch_end=save)
    deployed = fxrelay.deploy(model)
    trained_acc, deployed_acc = evaluate(model, val_loader), evaluate(deployed, val_loader)
    torch.save(deployed, out / "deployed.pt")
    torch.save(fxrelay.original_state_dict(model), out / "original_state_dict.pt")
    verdict = "equal" if trained_acc == deployed_acc else "DIFFERENT"
    print(f"deployed: val acc {deployed_acc:.2%} vs trained {trained_acc:.2%} ({verdict}); "
          f"wrote {out / 'deployed.pt'}, {out / 'original_state_dict.pt'}, {out / 'checkpoint.pt'}")


if __name__ == "__main__":
    main()
