"""Standard, deep, relay and greedy training of one model on the same data, seeds and budget.

    python examples/compare.py --data digits --seeds 5 --jobs 2           # resnet10t, scikit-learn's digits
    python examples/compare.py --data digits --model plainnet30 --seeds 5 --jobs 2
    python examples/compare.py --data digits --imbalance 10 --sampler class-aware --modes standard,relay-w2
    python examples/compare.py --epochs 5                                  # generated shapes
    python examples/compare.py --data digits --quick                       # one seed, one epoch
    python examples/compare.py --epochs 5 --seeds 5 --modes standard,greedy,greedy:downstream

Modes: ``standard``, ``deep``, ``greedy`` and ``relay-wN`` (Relay BP, each loss training
``N`` stages; ``relay`` is ``relay-w2``); ``MODE:KIND`` picks the aux heads' kind
(``greedy:downstream``: heads made of the model's own later layers; default ``auto``), and
``MODE:downstream-dD-xW`` a downstream head of depth ``D`` and width ``W``
(``greedy:downstream-d2-x0.25``). Every run (mode, seed) trains with
:func:`fxrelay.train.loop.fit` (SGD with Nesterov momentum, one per-update cosine
schedule with warm-up, label smoothing); the seed fixes the model's initialisation and
the order of the batches, the data and budget are the same for all. A run writes
``OUT/MODE/seedS/metrics.csv`` (the loop's per-head CSV) and ``classes.csv`` (the main
head's final validation accuracy per class). Runs go to ``--jobs`` processes with
``--threads`` torch threads each; single-threaded runs give the same numbers whatever
``--jobs`` is.

The script then reads those CSVs back and writes ``OUT/compare.csv`` (the main head's
validation accuracy per epoch, mean over seeds), ``OUT/summary.csv`` (mean and standard
deviation over seeds of the final and the best validation accuracy) and
``OUT/compare.png`` (mean ± one standard deviation per mode, and every head of the relay
model). ``--data digits`` is :class:`fxrelay.data.Digits` (needs ``pip install
fxrelay[data]``); its validation split is balanced, so its accuracy is the balanced accuracy.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms.v2 import RandomCrop  # noqa: E402

import fxrelay  # noqa: E402
from fxrelay.core.choices import HEAD_KINDS  # noqa: E402  (the head kinds a run spec may name)
import fxrelay.models  # noqa: E402,F401  (registers plainnet* and cliquenet* with timm)
from fxrelay.io.zoo import load_model  # noqa: E402
from fxrelay.train.loop import fit  # noqa: E402
from fxrelay.train.recipe import Recipe  # noqa: E402

MODES = ("standard", "deep", "relay-w1", "relay-w2", "relay-w3", "greedy")
DEFAULT_WINDOW = 2
SAMPLERS = ("shuffle", "class-aware")


def parse_mode(spec: str) -> tuple[str, int]:
    """``"relay-w3"`` -> ``("relay", 3)``; ``"relay"`` -> ``("relay", 2)``; ``"deep"`` -> ``("deep", 2)``.

    Raises:
        ValueError: not a mode, or a window on a mode other than relay, or below 1.
    """
    mode, _, window = spec.partition("-w")
    if mode not in fxrelay.MODES or (window and (mode != "relay" or not window.isdigit() or int(window) < 1)):
        raise ValueError(f"unknown mode {spec!r}: choose from {', '.join(fxrelay.MODES)} or relay-wN (N >= 1)")
    return mode, int(window or DEFAULT_WINDOW)


def parse_run(spec: str) -> tuple[str, int, Any]:
    """``"greedy:downstream"`` -> ``("greedy", 2, "downstream")``: the mode, window and ``head_kind`` of a run spec.

    ``downstream-dD-xW`` is ``fxrelay.Downstream(depth=D, width=W)``; without ``:`` the heads are ``"auto"``.

    Raises:
        ValueError: an unknown mode (see :func:`parse_mode`) or head kind.
    """
    mode, _, kind = spec.partition(":")
    name, *options = (kind or "auto").split("-")
    if name not in HEAD_KINDS or (options and name != "downstream"):
        raise ValueError(f"unknown head kind {kind!r} in {spec!r}: choose from "
                         f"{', '.join(HEAD_KINDS)} or downstream-dD-xW")
    if not options:
        return (*parse_mode(mode), name)
    values = {o[:1]: o[1:] for o in options}
    try:
        head = fxrelay.Downstream(depth=int(values["d"]) if "d" in values else None,
                                  width=float(values.get("x", 0.5)))
    except ValueError as e:
        raise ValueError(f"bad downstream head {kind!r} in {spec!r}: {e}") from None
    return (*parse_mode(mode), head)


class Job(NamedTuple):
    """One training run: the script's settings (the parsed arguments), a mode, a seed, its folder."""

    settings: dict[str, Any]
    mode: str
    seed: int
    out: Path


def datasets(s: dict[str, Any], seed: int) -> tuple[Dataset, Dataset]:
    """The train and validation sets of settings ``s`` (generated shapes depend on the seed, digits do not)."""
    if s["data"] == "digits":
        # reason: edge padding continues the digits' blank border, so shifted images keep their background
        shift = RandomCrop(s["image_size"], padding=s["augment"], padding_mode="edge") if s["augment"] else None
        return (fxrelay.Digits("train", s["image_size"], imbalance=s["imbalance"], transform=shift),
                fxrelay.Digits("val", s["image_size"]))
    return (fxrelay.Shapes(s["train_size"], s["image_size"], s["num_classes"], seed=seed),
            fxrelay.Shapes(s["val_size"], s["image_size"], s["num_classes"], seed=seed + 1))


def train(job: Job) -> float:
    """Train ``job``, writing its ``metrics.csv`` and ``classes.csv``; returns the process CPU seconds it took."""
    s, tic = job.settings, time.process_time()
    train_set, val_set = datasets(s, job.seed)
    num_classes = len(set(train_set.targets))
    mode, window, head_kind = parse_run(job.mode)
    torch.manual_seed(job.seed)
    model = fxrelay.transform(load_model(s["model"], num_classes=num_classes), mode, window=window,
                              head_kind=head_kind, aux_weight=s.get("aux_weight"),
                              example_input=torch.randn(1, 3, s["image_size"], s["image_size"]))
    if s["sampler"] == "class-aware":
        loader = DataLoader(train_set, batch_size=s["batch_size"],
                            sampler=fxrelay.ClassAwareSampler(train_set.targets, seed=job.seed))
    else:
        loader = DataLoader(train_set, batch_size=s["batch_size"], shuffle=True,
                            generator=torch.Generator().manual_seed(job.seed))
    val_loader = DataLoader(val_set, batch_size=256)
    fit(model, loader, val_loader, s["epochs"], recipe=Recipe(lr=s["lr"], warmup_epochs=s["warmup_epochs"]),
        progress=s["progress"], metrics=job.out / "metrics.csv")
    write_classes(model, train_set.targets, val_loader, num_classes, job.out / "classes.csv")
    return time.process_time() - tic


def write_classes(model: torch.nn.Module, train_targets: list[int], val_loader: DataLoader, num_classes: int,
                  path: Path) -> None:
    """``classes.csv``: per class, its train and validation images and the main head's validation accuracy."""
    hits, seen = torch.zeros(num_classes), torch.zeros(num_classes)
    model.eval()
    with torch.no_grad():
        for x, y in val_loader:
            y = torch.as_tensor(y)
            seen += torch.bincount(y, minlength=num_classes)
            hits += torch.bincount(y[model(x).argmax(1) == y], minlength=num_classes)
    train_counts = torch.bincount(torch.as_tensor(train_targets), minlength=num_classes)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "train_images", "val_images", "val_accuracy"])
        writer.writerows([c, int(train_counts[c]), int(seen[c]), f"{hits[c] / seen[c]:.6g}"]
                         for c in range(num_classes))


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: list[Job], workers: int, threads: int) -> float:
    """Train ``jobs`` (in this process with one worker, else in ``workers`` processes); returns their CPU seconds."""
    if workers == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return sum(_report(job, train(job)) for job in jobs)
        finally:
            torch.set_num_threads(before)
    # reason: spawn, not fork: a forked child of a process that has run torch's thread pool can deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(threads,)) as pool:
        return sum(_report(job, cpu) for job, cpu in zip(jobs, pool.map(train, jobs)))


def _report(job: Job, cpu: float) -> float:
    final = read_metrics(job.out / "metrics.csv")[-1][-1]
    print(f"  {job.out}: final validation accuracy {final:.1%}, {cpu:.0f} CPU s", flush=True)
    return cpu


def read_metrics(path: Path) -> dict[int, list[float]]:
    """Head index -> validation accuracy per epoch, from a ``metrics.csv``; the main head under -1 too."""
    curves: dict[int, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            curves.setdefault(int(row["head"]), []).append(float(row["val_accuracy"]))
            if row["main"] == "1":
                curves.setdefault(-1, []).append(float(row["val_accuracy"]))
    return curves


def train_seconds(path: Path) -> float:
    """The training seconds (without validation) of a run, from its ``metrics.csv``."""
    with open(path, newline="") as f:
        return sum(float(row["seconds"]) for row in csv.DictReader(f) if row["main"] == "1")


def head_stages(path: Path) -> dict[int, int]:
    with open(path, newline="") as f:
        return {int(row["head"]): int(row["head_stage"]) for row in csv.DictReader(f)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def run_dir(out: Path, mode: str, seed: int) -> Path:
    return out / mode / f"seed{seed}"


def summarise(out: Path, modes: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Per mode: the mean and standard deviation over seeds of the final and the best validation accuracy.

    Also the main head's mean curve (``curve``), its standard deviation (``curve_std``) and
    the mean training seconds of a run.
    """
    rows = []
    for mode in modes:
        curves = [read_metrics(run_dir(out, mode, s) / "metrics.csv")[-1] for s in seeds]
        final, best = mean_std([c[-1] for c in curves]), mean_std([max(c) for c in curves])
        per_epoch = [mean_std(list(accs)) for accs in zip(*curves)]
        rows.append(dict(mode=mode, seeds=len(seeds), final_mean=final[0], final_std=final[1], best_mean=best[0],
                         best_std=best[1], curve=[m for m, _ in per_epoch], curve_std=[d for _, d in per_epoch],
                         train_seconds=statistics.fmean(train_seconds(run_dir(out, mode, s) / "metrics.csv")
                                                        for s in seeds)))
    return rows


def percent(mean: float, std: float) -> str:
    """``"97.3 ± 0.4"`` (percent), or ``"97.3"`` without a standard deviation."""
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def save(out: Path, modes: list[str], seeds: list[int], title: str) -> list[dict[str, Any]]:
    """Write ``compare.csv``, ``summary.csv`` and ``compare.png`` from the runs' CSVs; returns :func:`summarise`."""
    rows = summarise(out, modes, seeds)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode"] + [f"epoch{e + 1}" for e in range(len(rows[0]["curve"]))])
        writer.writerows([r["mode"]] + [f"{a:.4f}" for a in r["curve"]] for r in rows)
    columns = ["mode", "seeds", "final_mean", "final_std", "best_mean", "best_std", "train_seconds"]
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.4f}" for c in columns] for r in rows)
    detail = "relay-w2" if "relay-w2" in modes else next((m for m in modes if m.startswith("relay")), modes[-1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=150)
    for r in rows:
        epochs = range(1, len(r["curve"]) + 1)
        mean = [100 * a for a in r["curve"]]
        label = f"{r['mode']}: final {percent(r['final_mean'], r['final_std'])}"
        line, = left.plot(epochs, mean, marker="o", markersize=3, label=label)
        if len(seeds) > 1:
            spread = [100 * d for d in r["curve_std"]]
            left.fill_between(epochs, [m - d for m, d in zip(mean, spread)], [m + d for m, d in zip(mean, spread)],
                              color=line.get_color(), alpha=0.15)
    band = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    left.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{title}\n{band}")
    stages = head_stages(run_dir(out, detail, seeds[0]) / "metrics.csv")
    heads = [read_metrics(run_dir(out, detail, s) / "metrics.csv") for s in seeds]
    for head in sorted(h for h in heads[0] if h >= 0):
        accs = [statistics.fmean(a) for a in zip(*(c[head] for c in heads))]
        name = "main head" if head == max(stages) else f"head {head} (stage {stages[head]})"
        right.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", markersize=3, label=name)
    right.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{detail}: every head (mean)")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png")
    plt.close(fig)
    return rows


def describe_data(s: dict[str, Any]) -> str:
    if s["data"] == "digits":
        tail = f", long-tailed {s['imbalance']:g}:1" if s["imbalance"] != 1 else ""
        shift = f", shifted by up to {s['augment']} px" if s["augment"] else ""
        return f"digits {s['image_size']}px{tail}{shift}, {s['sampler']} sampling"
    return f"generated shapes ({s['num_classes']} classes, {s['train_size']} images)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="resnet10t", help="timm model name (plainnet10 ... after fxrelay.models), "
                                                        "or tv:NAME for torchvision")
    p.add_argument("--data", choices=("shapes", "digits"), default="shapes",
                   help="generated shapes, or scikit-learn's digits (pip install fxrelay[data])")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes: standard, deep, greedy, "
                                                             "relay-wN (relay = relay-w2), each optionally "
                                                             ":HEAD_KIND (greedy:downstream)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per run")
    p.add_argument("--aux-weight", type=float, default=None,
                   help="loss weight of every aux head (default: the mode's, fxrelay.core.choices.AUX_WEIGHTS)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per mode: --seed, --seed + 1, ...")
    p.add_argument("--seed", type=int, default=0, help="first seed (models, shuffling; generated data)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, Nesterov momentum)")
    p.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up, in epochs")
    p.add_argument("--image-size", type=int, default=32, help="image side in px")
    p.add_argument("--imbalance", type=float, default=1, help="digits: largest / smallest train class (long tail)")
    p.add_argument("--augment", type=int, default=0, help="digits: shift the training images randomly by up to "
                                                          "this many px (0: no augmentation)")
    p.add_argument("--sampler", choices=SAMPLERS, default="shuffle",
                   help="training order: shuffled epochs, or Relay BP's ClassAwareSampler")
    p.add_argument("--num-classes", type=int, default=10, help="classes of the generated data")
    p.add_argument("--train-size", type=int, default=4096, help="generated training images")
    p.add_argument("--val-size", type=int, default=1024, help="generated validation images")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, each in its own process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--quick", action="store_true", help="smoke test: one seed, one epoch")
    p.add_argument("--out", default="out/compare", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a run reads, as plain data (they travel to the worker processes)."""
    keys = ("model", "data", "epochs", "batch_size", "lr", "warmup_epochs", "image_size", "imbalance", "augment",
            "sampler", "num_classes", "train_size", "val_size", "aux_weight")
    return {**{k: getattr(args, k) for k in keys}, "progress": not args.no_progress and args.jobs == 1}


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The mode list; exits with a one-line usage error on bad arguments."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        p.error("--modes: none given")
    for mode in modes:
        try:
            parse_run(mode)
        except ValueError as e:
            p.error(f"--modes: {e}")
    if min(args.seeds, args.epochs, args.jobs, args.threads) < 1:
        p.error("--seeds, --epochs, --jobs and --threads must be >= 1")
    if (args.imbalance != 1 or args.augment) and args.data != "digits":
        p.error("--imbalance and --augment apply to --data digits")
    return modes


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 1
    modes = check(p, args)
    out = Path(args.out)
    seeds = list(range(args.seed, args.seed + args.seeds))
    settings = settings_of(args)
    print(f"{args.model} on {describe_data(settings)}: {len(modes)} modes x {len(seeds)} seeds, {args.epochs} epochs, "
          f"{args.jobs} processes x {args.threads} threads", flush=True)
    tic = time.perf_counter()
    cpu = run_jobs([Job(settings, m, s, run_dir(out, m, s)) for m in modes for s in seeds], args.jobs, args.threads)
    rows = save(out, modes, seeds, f"{args.model} on {describe_data(settings)}")
    print(f"\nmain head's validation accuracy (%), mean over {len(seeds)} seeds, per epoch; "
          "final and best: mean ± std")
    for r in rows:
        print(f"{r['mode']:<18} " + " ".join(f"{100 * a:5.1f}" for a in r["curve"])
              + f"   final {percent(r['final_mean'], r['final_std'])}   best {percent(r['best_mean'], r['best_std'])}"
              + f"   ({r['train_seconds']:.0f} s per run)")
    print(f"\n{time.perf_counter() - tic:.0f} s, {cpu:.0f} CPU s in the runs; wrote {out / 'compare.png'}, "
          f"{out / 'compare.csv'}, {out / 'summary.csv'} and {out}/MODE/seedS/{{metrics,classes}}.csv", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
