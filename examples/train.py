"""Train any timm or torchvision model with Relay BP (or greedy, deep, standard), then deploy it.

    python examples/train.py --model resnet10t --mode relay --epochs 5            # generated shapes
    python examples/train.py --model tv:resnet18 --data /path/to/imagefolder --image-size 128 --amp --ema
    python examples/train.py --model resnet10t --mode greedy --execution sequential --epochs 10 --cache-prefix
    python examples/train.py --model resnet50 --mode relay --execution local      # least memory, same gradients
    python examples/train.py --resume out/train/checkpoint.pt                   # continue a run
    torchrun --nproc-per-node 2 examples/train.py --mode greedy --pipeline 2 --microbatches 4

``--pipeline K`` trains stage-parallel (:class:`fxrelay.StageParallel`): launched with
``torchrun --nproc-per-node K*D`` (``--replicas D``), every rank builds the same model and
trains a contiguous group of its stages and their heads, activations flowing forward
between ranks; greedy sends nothing back, relay only the gradients of windows that span a
rank boundary. The same optimizer and schedule per rank; rank 0 evaluates and deploys.

``--data`` is an ImageFolder root with ``train/`` and ``val/`` subfolders (or one folder,
split 90/10). Without it the generated :class:`fxrelay.data.Shapes` dataset is used.

The loop is :class:`fxrelay.train.loop.Trainer`: one timm optimizer (SGD with Nesterov
momentum or AdamW, no weight decay on norms and biases) and one per-update cosine
schedule with warm-up for the whole run, label smoothing, optional bfloat16 autocast
(``--amp``) and EMA of the weights (``--ema``). ``--execution`` chooses how each training
step runs, with the same gradients: ``one-line`` (``loss.backward()``), ``recompute`` (stages
recomputed in backward), ``local`` (:class:`fxrelay.LocalStep`: each loss backpropagated as soon as
its window is complete, the least memory); ``sequential`` is the sequential
greedy schedule (one stage at a time, each for the same number of epochs; only stages
``0..k`` and head ``k`` run), ``--cache-prefix`` computes the frozen stages once per stage.

After every epoch the script prints each head's train loss and accuracy and validation
accuracy, and writes ``OUT/checkpoint.pt`` (the whole run; it loads with
``torch.load(..., weights_only=True)``; ``--resume`` continues it bitwise as if never
stopped) and ``OUT/metrics.csv`` (one row per epoch and head). At the end the model (the
EMA weights with ``--ema``) is deployed: heads and scopes stripped, BatchNorm folded; the
script checks that the deployed model's validation accuracy equals the trained one's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, random_split

import fxrelay
from fxrelay.core.choices import EXECUTIONS
from fxrelay.apps.cli import UsageError
from fxrelay.io.zoo import load_model
from fxrelay.train.checkpoints import load_checkpoint
from fxrelay.train.evaluation import evaluate
from fxrelay.train.history import History
from fxrelay.train.loop import Trainer
from fxrelay.train.optimizers import lr_schedule, make_optimizer, no_weight_decay_names
from fxrelay.train.recipe import Recipe
from fxrelay.train.parallel import StageParallel

DEFAULT_EPOCHS = 5
# reason: what a resumed run may change; everything else is the checkpointed run's
RESUME_MAY_SET = {"resume", "epochs", "out", "workers", "no_progress", "device"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet10t", help="timm model name, or tv:NAME for torchvision")
    p.add_argument("--mode", choices=fxrelay.MODES, default="relay", help="training mode of the transform")
    p.add_argument("--window", type=int, default=2, help="relay window: stages each loss trains")
    p.add_argument("--head", default="auto", help="aux head kind: auto, linear, layercnn, dgl")
    p.add_argument("--data", default=None, help="ImageFolder root (none: generated shapes)")
    p.add_argument("--epochs", type=int, default=argparse.SUPPRESS,
                   help=f"epochs of the run (default: {DEFAULT_EPOCHS}; with --resume: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--opt", default="sgd", help="timm optimizer: sgd (Nesterov momentum), adamw, ...")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (not on norms and biases)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up, in epochs (may be fractional)")
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CPU and CUDA)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3); "
                   "validate and deploy it")
    p.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (with --ema)")
    p.add_argument("--image-size", type=int, default=32, help="image side in px")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the generated data")
    p.add_argument("--train-size", type=int, default=4096, help="generated training images")
    p.add_argument("--val-size", type=int, default=1024, help="generated validation images")
    p.add_argument("--class-aware", action="store_true", help="class-aware sampling (Relay BP)")
    p.add_argument("--execution", choices=EXECUTIONS, default="one-line",
                   help="how each step runs (same gradients): one-line, recompute, local (LocalStep, least "
                        "memory); sequential: the greedy schedule, one stage at a time (--mode greedy)")
    p.add_argument("--local-step", action="store_true", help=argparse.SUPPRESS)  # reason: renamed; says so
    p.add_argument("--cache-prefix", action="store_true",
                   help="with --execution sequential: compute the frozen stages' outputs once per stage (memory: the "
                        "training set times one stage input)")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the data and the shuffling")
    p.add_argument("--out", default="out/train", help="folder for checkpoint.pt, metrics.csv and the deployed model "
                   "(with --resume: the checkpoint's folder)")
    p.add_argument("--resume", default=None, help="checkpoint.pt of a run to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--pipeline", type=int, default=0,
                   help="stage-parallel over K ranks per pipeline, under torchrun --nproc-per-node K*D (0: off)")
    p.add_argument("--replicas", type=int, default=1, help="with --pipeline: D data-parallel replicas")
    p.add_argument("--microbatches", type=int, default=4, help="with --pipeline: micro-batches per batch")
    return p


def given_options(p: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options written on the command line."""
    actions = p._option_string_actions
    return {actions[a.split("=")[0]].dest for a in argv if a.split("=")[0] in actions}


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


def recipe(args: argparse.Namespace) -> Recipe:
    return Recipe(opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum,
                  warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, label_smoothing=args.label_smoothing,
                  amp=args.amp, ema_decay=args.ema_decay if args.ema else 0.0,
                  execution=args.execution, cache_prefix=args.cache_prefix)


def report(epoch: int, history: History, epochs: int) -> None:
    heads = "  ".join(f"h{j}@s{stage}: " + (f"loss {loss:.3f} acc {acc:.1%} " if not math.isnan(loss) else "")
                      + f"val {val:.1%}" for j, (stage, loss, acc, val) in enumerate(zip(
                          history.head_stages, history.head_loss[epoch], history.head_accuracy[epoch],
                          history.val_head_accuracy[epoch])))
    stage = "" if history.stage[epoch] is None else f" [stage {history.stage[epoch]}]"
    ema = f" (EMA {history.ema_val_accuracy[epoch]:.1%})" if history.ema_val_head_accuracy else ""
    print(f"epoch {epoch + 1}/{epochs}{stage}: {heads}  | val acc {history.val_accuracy[epoch]:.1%}{ema}  "
          f"lr {history.lr[epoch]:.4g}  ({history.seconds[epoch]:.1f} s)", flush=True)


def error(message: str) -> int:
    print(f"train.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    given = given_options(p, argv)
    state = None
    if args.resume:
        try:
            state = load_checkpoint(args.resume)
        except (OSError, ValueError, RuntimeError) as e:
            return error(f"cannot resume from {args.resume}: {str(e).splitlines()[0]}")
        stored = state["extra"].get("args", {})
        changed = sorted(k for k in given - RESUME_MAY_SET if getattr(args, k) != stored.get(k))
        if changed:
            options = ", ".join("--" + k.replace("_", "-") for k in changed)
            return error(f"--resume continues the checkpointed run with its settings; it cannot change {options} "
                         "(start a new run with another --out)")
        args = argparse.Namespace(**{**stored, "resume": args.resume, **{k: getattr(args, k) for k in given}})
        if "epochs" not in given:
            args.epochs = state["epochs"]
        if "out" not in given:
            args.out = str(Path(args.resume).parent)
        source = "--epochs given" if "epochs" in given else "the checkpoint's --epochs"
        print(f"resuming {args.resume} after epoch {state['epoch']} of {state['epochs']}; training to epoch "
              f"{args.epochs} ({source})")
    else:
        args.epochs = getattr(args, "epochs", DEFAULT_EPOCHS)
    if args.local_step:
        return error("--local-step is renamed --execution sequential (fxrelay.LocalStep is --execution local)")
    if args.execution == "sequential" and args.mode != "greedy":
        return error("--execution sequential trains stage by stage with one head per stage: add --mode greedy")
    if args.cache_prefix and args.execution != "sequential":
        return error("--cache-prefix caches the frozen stages of --execution sequential: add --execution sequential")
    if args.pipeline and (args.execution != "one-line" or args.resume or args.ema or args.class_aware):
        return error("--pipeline trains one schedule across processes: drop --execution, --resume, --ema and "
                     "--class-aware")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out)
    train, val, num_classes = datasets(args)
    train_loader, val_loader = loaders(args, train, val)
    try:
        torch.manual_seed(args.seed)
        original = load_model(args.model, num_classes=num_classes)
        model = fxrelay.transform(original, args.mode, window=args.window, head_kind=args.head,
                                  execution=args.execution,
                                  example_input=torch.randn(1, 3, args.image_size, args.image_size))
        if args.pipeline:
            return train_pipelined(args, model, train, val_loader, device)
        trainer = Trainer(model, train_loader, args.epochs, recipe(args), device=device,
                          no_weight_decay=no_weight_decay_names(original, model))
        if state is not None:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                trainer.load_state_dict(state)
            for note in notes:
                print(f"note: {note.message}")
    except (UsageError, ValueError) as e:
        return error(str(e))
    print(fxrelay.plan_of(model))
    print(f"training: {trainer.describe()}, {args.opt} lr {args.lr}, {len(train_loader)} updates/epoch"
          + (", bfloat16 autocast" if args.amp else "") + (f", EMA {args.ema_decay}" if args.ema else "")
          + (", prefix cache" if args.cache_prefix else ""), flush=True)
    stored_args = {k: v for k, v in vars(args).items() if k != "resume"}
    trainer.fit(val_loader, progress=not args.no_progress, checkpoint=out / "checkpoint.pt",
                extra={"args": stored_args}, on_epoch_end=lambda e, h: report(e, h, args.epochs))
    final = trainer.final_model
    deployed = fxrelay.deploy(final)
    trained_acc, deployed_acc = evaluate(final, val_loader, device), evaluate(deployed, val_loader, device)
    files = save_deployed(final, deployed, out)
    verdict = "equal" if trained_acc == deployed_acc else "DIFFERENT"
    print(f"deployed ({'EMA' if args.ema else 'trained'} weights): val acc {deployed_acc:.2%} vs trained "
          f"{trained_acc:.2%} ({verdict}); wrote {', '.join(map(str, files))}, {out / 'checkpoint.pt'}, "
          f"{out / 'metrics.csv'}")
    return 0


def save_deployed(trained: torch.nn.Module, deployed: torch.nn.Module, out: Path) -> list[Path]:
    """The deployed model (torch.export, loads with fxrelay.load) and the trained weights under the
    original model's keys (loads with torch.load(weights_only=True) and load_state_dict(strict=True))."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(fxrelay.original_state_dict(trained), out / "original_state_dict.pt")
    return [fxrelay.save(deployed, out / "deployed.pt2"), out / "original_state_dict.pt"]


def train_pipelined(args: argparse.Namespace, model: torch.nn.Module, train: Dataset, val_loader: DataLoader,
                    device: str) -> int:
    """``--pipeline``: the same recipe, stage-parallel across the torchrun processes."""
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        model.to(device).train()
        settings = recipe(args)
        parallel = StageParallel(model, lambda params: make_optimizer(settings, params),
                                 microbatches=args.microbatches, pipeline=args.pipeline, replicas=args.replicas,
                                 criterion=torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing))
        sampler = DistributedSampler(train, num_replicas=args.replicas, rank=parallel.replica, seed=args.seed)
        loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.workers)
        scheduler = lr_schedule(parallel.optimizer, settings, args.epochs * len(loader), len(loader))
        reporting = parallel.rank_in_pipeline == parallel.pipeline - 1 and parallel.replica == 0
        for epoch in range(args.epochs):
            sampler.set_epoch(epoch)
            busy = []
            for i, (x, y) in enumerate(loader):
                stats = parallel.step(x.to(device), y.to(device))
                scheduler.step_update(epoch * len(loader) + i + 1)
                busy.append(stats.busy)
            if reporting:
                losses = "  ".join(f"h{j}: {v:.3f}" for j, v in stats.losses.items())
                print(f"epoch {epoch + 1}/{args.epochs}: last batch {losses}; busy {sum(busy) / len(busy):.0%}",
                      flush=True)
        model = parallel.gather_model()
        if dist.get_rank() == 0:
            accuracy = evaluate(model, val_loader, device)
            deployed = fxrelay.deploy(model)
            files = save_deployed(model, deployed, Path(args.out))
            print(f"val acc {accuracy:.2%} (deployed {evaluate(deployed, val_loader, device):.2%}); wrote "
                  f"{', '.join(map(str, files))}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
