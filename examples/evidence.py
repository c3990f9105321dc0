"""The evidence study on real images: does relay help, at which depth, and does class-aware sampling?

    python examples/evidence.py --jobs 2          # the full study: under 30 minutes on 2 quiet cores
    python examples/evidence.py --quick           # smoke test: one seed, one epoch, the smallest depth

Two parts, all on scikit-learn's digits (:class:`fxrelay.data.Digits`, 32x32, 3 channels;
``pip install fxrelay[data]``), every run through :mod:`examples.compare` (same recipe,
budget and seeds for every mode; each run single-threaded, runs in ``--jobs`` processes):

1. **Depth study** (Relay BP's claim): standard, deep, relay (windows 1, 2, 3) and greedy
   on plain VGG-style CNNs without skips (:class:`fxrelay.models.PlainNet`) of
   increasing depth, and on timm's ``resnet10t`` (with skips).
2. **Class-aware sampling** (Relay BP's second contribution): on the long-tailed train
   split (``imbalance=10``: 139 images of digit 0 down to 14 of digit 9), standard and
   relay with shuffled epochs and with :class:`fxrelay.ClassAwareSampler`, without and with
   augmentation (random shifts of up to 4 px). The validation split is balanced, so its
   accuracy is the balanced accuracy; the tail is digits 7-9 (23, 18 and 14 train images).

``--heads shapes|digits`` runs the head study instead (issue 21): greedy and relay (windows 1
and 2) with the default heads against heads made of the model's own later layers
(``head_kind="downstream"``), and standard, on generated shapes (``resnet10t``, 5 epochs) or
digits (``plainnet30``, ``plainnet60``, ``resnet10t``, 10 epochs); it writes
``evidence/heads_DATA.md`` and ``.csv``, and ``compare/heads_DATA_MODEL.png`` / ``.csv``.
``--resume`` keeps the runs whose ``metrics.csv`` exists.

Writes every run's CSVs under ``OUT`` (``OUT/depth/MODEL/MODE/seedS/``,
``OUT/longtail/SAMPLER[-shift4]/MODE/seedS/``), and under ``DOCS``: ``evidence/results.md``
(the tables, the command, the time: wall, CPU and the load average while it ran),
``evidence/depth.csv``, ``evidence/depth.png``, ``evidence/class_aware.csv``,
``evidence/class_aware.png``, and ``compare/digits_MODEL.png`` / ``.csv`` (each model's
curves with error bands, and its summary).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reason: compare.py is a sibling script, not a package

import compare  # noqa: E402
from compare import Job, mean_std, percent, plt, read_metrics, run_dir  # noqa: E402

DEPTH_MODELS = ("plainnet10", "plainnet30", "plainnet60", "resnet10t")
LONGTAIL_MODEL = "plainnet20"
LONGTAIL_MODES = ("standard", "relay-w2")
SHIFTS = (0, 4)  # reason: 4 px at 32 px is one pixel of the 8x8 originals
TAIL = (7, 8, 9)
COMMAND = "python examples/evidence.py --jobs 2"
HEAD_MODES = ("standard", "greedy", "greedy:downstream", "relay-w1", "relay-w1:downstream", "relay-w2",
              "relay-w2:downstream")
HEAD_MODELS = {"shapes": ("resnet10t",), "digits": ("plainnet30", "plainnet60", "resnet10t")}
HEAD_EPOCHS = {"shapes": 5, "digits": 10}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per mode and model: 0 .. seeds - 1")
    p.add_argument("--epochs", type=int, default=10, help="epochs of the depth study's runs")
    p.add_argument("--longtail-epochs", type=int, default=20,
                   help="epochs of the class-aware runs (the long-tailed split has 569 images, 9 updates per epoch)")
    p.add_argument("--models", default=",".join(DEPTH_MODELS), help="models of the depth study, shallow to deep")
    p.add_argument("--longtail-model", default=LONGTAIL_MODEL, help="model of the class-aware study")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, each in its own single-threaded process")
    p.add_argument("--quick", action="store_true", help="smoke test: one seed, one epoch, the first (smallest) "
                                                        "model only, for both parts")
    p.add_argument("--heads", choices=tuple(HEAD_MODELS), default=None,
                   help="run the head study (auto vs downstream heads) on this data instead")
    p.add_argument("--head-modes", default=",".join(HEAD_MODES), help="head study: its run specs")
    p.add_argument("--resume", action="store_true", help="keep the runs whose metrics.csv exists")
    p.add_argument("--out", default="out/evidence", help="folder of the runs")
    p.add_argument("--docs", default=None, help="folder of the tables and figures (default: docs/img; with "
                                                "--quick: OUT/img)")
    return p


def settings(model: str, epochs: int, dataset: str = "digits", **data: Any) -> dict[str, Any]:
    """compare.py's settings for one study: ``dataset`` (digits, or generated shapes) at 32x32, its default recipe."""
    args = compare.parser().parse_args(["--data", dataset, "--model", model, "--epochs", str(epochs),
                                        "--no-progress", *(f"--{k.replace('_', '-')}={v}" for k, v in data.items())])
    return compare.settings_of(args)


class LoadMonitor:
    """The 1-minute load average, sampled every ``period`` seconds in a thread while the study runs."""

    def __init__(self, period: float = 10.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def finals(out: Path, mode: str, seeds: list[int]) -> list[float]:
    """The main head's final validation accuracy of each seed's run."""
    return [read_metrics(run_dir(out, mode, s) / "metrics.csv")[-1][-1] for s in seeds]


def class_accuracy(out: Path, mode: str, seeds: list[int]) -> list[dict[int, float]]:
    """Each seed's final validation accuracy per class, from ``classes.csv``."""
    runs = []
    for s in seeds:
        with open(run_dir(out, mode, s) / "classes.csv", newline="") as f:
            runs.append({int(r["class"]): float(r["val_accuracy"]) for r in csv.DictReader(f)})
    return runs


def paired(a: list[float], b: list[float]) -> str:
    """Mean ± std of the per-seed differences ``a - b`` (points), and in how many seeds ``a`` is ahead."""
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    spread = "" if math.isnan(std) else f" ± {100 * std:.1f}"
    return f"{100 * mean:+.1f}{spread} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def depth_study(out: Path, docs: Path, models: list[str], seeds: list[int]) -> list[str]:
    """Summaries, ``depth.csv``, ``depth.png`` and the per-model compare figures; returns the markdown."""
    rows, md = [], []
    for model in models:
        summary = compare.save(out / model, list(compare.MODES), seeds, f"{model} on digits 32px")
        shutil.copy(out / model / "compare.png", docs / "compare" / f"digits_{model}.png")
        shutil.copy(out / model / "summary.csv", docs / "compare" / f"digits_{model}.csv")
        rows += [dict(model=model, **{k: r[k] for k in ("mode", "seeds", "final_mean", "final_std", "best_mean",
                                                        "best_std", "train_seconds")}) for r in summary]
    columns = list(rows[0])
    with open(docs / "evidence" / "depth.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.4f}" for c in columns] for r in rows)
    by = {(r["model"], r["mode"]): r for r in rows}
    for key, title in (("final", "final"), ("best", "best (highest of the epochs)")):
        md += [f"Validation accuracy (%), {title}, mean ± std over {len(seeds)} seeds:", "",
               "| model | " + " | ".join(compare.MODES) + " |", "|---" * (len(compare.MODES) + 1) + "|"]
        md += ["| " + m + " | " + " | ".join(percent(by[m, mode][f"{key}_mean"], by[m, mode][f"{key}_std"])
                                             for mode in compare.MODES) + " |" for m in models]
        md.append("")
    md += ["Relay minus standard and minus deep supervision, final accuracy, per-seed paired differences in points "
           "(mean ± std; seeds where relay is ahead):", "",
           "| model | " + " | ".join(f"{w} − standard | {w} − deep" for w in compare.MODES if w.startswith("relay"))
           + " |", "|---" * 7 + "|"]
    for m in models:
        runs = {mode: finals(out / m, mode, seeds) for mode in compare.MODES}
        md.append(f"| {m} | " + " | ".join(f"{paired(runs[w], runs['standard'])} | {paired(runs[w], runs['deep'])}"
                                           for w in compare.MODES if w.startswith("relay")) + " |")
    md += ["", "Training seconds per run (mean, wall clock, two runs at a time): " + ", ".join(
        f"{m} {statistics.fmean(by[m, mode]['train_seconds'] for mode in compare.MODES):.0f}" for m in models), ""]
    plot_depth(by, models, seeds, docs / "evidence" / "depth.png")
    return md


def plot_depth(by: dict[tuple[str, str], dict[str, Any]], models: list[str], seeds: list[int], path: Path) -> None:
    plain = [m for m in models if m.startswith("plainnet")]
    other = [m for m in models if m not in plain]
    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(11 if other else 7, 4), dpi=150, squeeze=False,
                             width_ratios=[2, 1] if other else [1])
    axes = axes[0]
    depths = [int(m.removeprefix("plainnet")) for m in plain]
    for k, mode in enumerate(compare.MODES):
        shift = (k - len(compare.MODES) / 2) * 0.25
        axes[0].errorbar([d + shift for d in depths], [100 * by[m, mode]["final_mean"] for m in plain],
                         yerr=[_std(by[m, mode]["final_std"]) for m in plain], marker="o", capsize=3, label=mode)
        for j, m in enumerate(other):
            axes[1].errorbar([j + shift / 2], [100 * by[m, mode]["final_mean"]], yerr=[_std(by[m, mode]["final_std"])],
                             marker="o", capsize=3, color=f"C{k}", label=mode if j == 0 else None)
    axes[0].set(xlabel="depth (3x3 conv-BN-ReLU layers, no skips)", ylabel="final validation accuracy (%)",
                xticks=depths, title=f"plain CNNs on digits, mean ± std over {len(seeds)} seeds")
    if other:
        axes[1].set(xticks=range(len(other)), xticklabels=other, title="with skip connections (timm)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _std(std: float) -> float:
    return 0.0 if math.isnan(std) else 100 * std


def longtail_dir(sampler: str, shift: int) -> str:
    """The folder of a class-aware study's configuration: ``class-aware``, ``shuffle-shift4``."""
    return sampler + (f"-shift{shift}" if shift else "")


def class_aware_study(out: Path, docs: Path, seeds: list[int]) -> list[str]:
    """``class_aware.csv``, ``class_aware.png``; returns the markdown tables."""
    md = [f"Balanced validation accuracy (%) after training on the long-tailed split, mean ± std over {len(seeds)} "
          f"seeds; tail: digits {', '.join(map(str, TAIL))}; shift: random translation of the training images by up "
          "to that many pixels:", "",
          "| mode | sampler | shift | balanced accuracy | tail accuracy | head (digits 0-2) accuracy |",
          "|---|---|---|---|---|---|"]
    rows, curves = [], {}
    for shift in SHIFTS:
        for mode in LONGTAIL_MODES:
            for sampler in compare.SAMPLERS:
                runs = class_accuracy(out / longtail_dir(sampler, shift), mode, seeds)
                balanced = mean_std([statistics.fmean(r.values()) for r in runs])
                tail = mean_std([statistics.fmean(r[c] for c in TAIL) for r in runs])
                head = mean_std([statistics.fmean(r[c] for c in (0, 1, 2)) for r in runs])
                rows.append([mode, sampler, shift, len(seeds), *(f"{v:.4f}" for v in (*balanced, *tail, *head))])
                md.append(f"| {mode} | {sampler} | {shift} | {percent(*balanced)} | {percent(*tail)} | "
                          f"{percent(*head)} |")
                curves[shift, mode, sampler] = [statistics.fmean(r[c] for r in runs) for c in sorted(runs[0])]
    md += ["", "Class-aware minus shuffled, per-seed paired differences in points (mean ± std; seeds where "
           "class-aware is ahead):", "", "| mode | shift | balanced accuracy | tail accuracy |", "|---|---|---|---|"]
    for shift in SHIFTS:
        for mode in LONGTAIL_MODES:
            runs = {s: class_accuracy(out / longtail_dir(s, shift), mode, seeds) for s in compare.SAMPLERS}
            bal = {s: [statistics.fmean(r.values()) for r in runs[s]] for s in compare.SAMPLERS}
            tail = {s: [statistics.fmean(r[c] for c in TAIL) for r in runs[s]] for s in compare.SAMPLERS}
            md.append(f"| {mode} | {shift} | {paired(bal['class-aware'], bal['shuffle'])} | "
                      f"{paired(tail['class-aware'], tail['shuffle'])} |")
    md.append("")
    # reason: the balanced accuracy is the mean of the per-class accuracies, which classes.csv holds exactly
    # (the loop's validation accuracy is the same number on a balanced split)
    with open(docs / "evidence" / "class_aware.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", "sampler", "shift", "seeds", "balanced_mean", "balanced_std", "tail_mean", "tail_std",
                         "head_mean", "head_std"])
        writer.writerows(rows)
    with open(run_dir(out / "shuffle", LONGTAIL_MODES[0], seeds[0]) / "classes.csv", newline="") as f:
        train_images = [int(r["train_images"]) for r in csv.DictReader(f)]
    fig, axes = plt.subplots(1, len(SHIFTS), figsize=(6 * len(SHIFTS), 4), dpi=150, sharey=True, squeeze=False)
    for ax, shift in zip(axes[0], SHIFTS):
        for k, mode in enumerate(LONGTAIL_MODES):
            for sampler in compare.SAMPLERS:
                accs = curves[shift, mode, sampler]
                ax.plot(range(len(accs)), [100 * a for a in accs], marker="o", color=f"C{k}",
                        linestyle="-" if sampler == "shuffle" else "--", label=f"{mode}, {sampler}")
        ax.set(xticks=range(len(train_images)), xticklabels=[f"{c}\n({n})" for c, n in enumerate(train_images)],
               xlabel="digit (train images)", title=f"shift {shift} px" if shift else "no augmentation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation accuracy (%)")
    fig.suptitle(f"long-tailed digits: per-class accuracy, mean over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(docs / "evidence" / "class_aware.png")
    plt.close(fig)
    return md


def head_study(out: Path, docs: Path, data: str, models: list[str], modes: list[str], seeds: list[int]) -> list[str]:
    """Summaries, ``heads_DATA.csv`` and the per-model figures of the head study; returns the markdown."""
    rows, md = [], []
    for model in models:
        summary = compare.save(out / model, modes, seeds, f"{model} on {data}: auto vs downstream heads")
        for suffix in ("png", "csv"):
            shutil.copy(out / model / f"{'compare' if suffix == 'png' else 'summary'}.{suffix}",
                        docs / "compare" / f"heads_{data}_{model}.{suffix}")
        rows += [dict(model=model, **{k: r[k] for k in ("mode", "seeds", "final_mean", "final_std", "best_mean",
                                                        "best_std", "train_seconds")}) for r in summary]
    with open(docs / "evidence" / f"heads_{data}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(rows[0]))
        writer.writerows([r[c] if isinstance(r[c], (str, int)) else f"{r[c]:.4f}" for c in rows[0]] for r in rows)
    by = {(r["model"], r["mode"]): r for r in rows}
    md += [f"Validation accuracy (%), final, mean ± std over {len(seeds)} seeds ({data}; MODE:KIND: aux heads of "
           "that kind, else auto):", "",
           "| model | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    md += ["| " + m + " | " + " | ".join(percent(by[m, mode]["final_mean"], by[m, mode]["final_std"])
                                         for mode in modes) + " |" for m in models]
    md += ["", "Training seconds per run (mean): " + "; ".join(
        f"{m}: " + ", ".join(f"{mode} {by[m, mode]['train_seconds']:.0f}" for mode in modes) for m in models), ""]
    pairs = [(m, m.partition(":")[0]) for m in modes if ":" in m and m.partition(":")[0] in modes]
    if "standard" in modes and pairs:
        md += ["Each MODE:KIND minus the same mode with auto heads, and minus standard, final accuracy, per-seed "
               "paired differences in points (mean ± std; seeds where MODE:KIND is ahead); share of the auto heads' "
               "gap to standard that it closes (means):", "",
               "| model | run | − auto heads | − standard | gap closed |", "|---|---|---|---|---|"]
        for m in models:
            runs = {mode: finals(out / m, mode, seeds) for mode in modes}
            for d, a in pairs:
                gap = by[m, "standard"]["final_mean"] - by[m, a]["final_mean"]
                gain = by[m, d]["final_mean"] - by[m, a]["final_mean"]
                closed = "no gap" if gap <= 0 else f"{100 * gain / gap:.0f}%"
                md.append(f"| {m} | {d} | {paired(runs[d], runs[a])} | {paired(runs[d], runs['standard'])} | "
                          f"{closed} |")
        md.append("")
    return md


def run_head_study(args: argparse.Namespace, out: Path, docs: Path) -> list[str]:
    """The ``--heads`` part: its runs (those not kept by ``--resume``), then its tables."""
    data, seeds = args.heads, list(range(args.seeds))
    models = HEAD_MODELS[data][:1] if args.quick else list(HEAD_MODELS[data])
    modes = [m.strip() for m in args.head_modes.split(",") if m.strip()]
    epochs = 1 if args.quick else HEAD_EPOCHS[data]
    jobs = [Job(settings(m, epochs, dataset=data), mode, s, run_dir(out / m, mode, s))
            for s in seeds for m in models for mode in modes]  # reason: stopped early, whole seeds are done
    todo = [j for j in jobs if not (args.resume and (j.out / "metrics.csv").exists())]
    print(f"{len(todo)} of {len(jobs)} runs in {args.jobs} single-threaded processes", flush=True)
    tic = time.perf_counter()
    compare.run_jobs(todo, args.jobs, threads=1)
    wall = time.perf_counter() - tic
    md = [f"# Head study: auto vs downstream heads on {data}", "",
          f"Command: `python examples/evidence.py --heads {data} --jobs {args.jobs}`. {len(jobs)} runs "
          f"({len(todo)} run now, in {wall / 60:.1f} min wall), {len(seeds)} seeds, {epochs} epochs, "
          f"1-minute load average {os.getloadavg()[0]:.1f} at the end.", ""]
    return md + head_study(out, docs, data, models, modes, seeds)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.quick:
        args.seeds, args.epochs, args.longtail_epochs, models = 1, 1, 1, models[:1]
        args.longtail_model = models[0]
    if min(args.seeds, args.epochs, args.longtail_epochs, args.jobs) < 1 or not models:
        p.error("--seeds, --epochs, --longtail-epochs and --jobs must be >= 1, and --models not empty")
    out = Path(args.out)
    docs = Path(args.docs or (out / "img" if args.quick else "docs/img"))
    for folder in ("evidence", "compare"):
        (docs / folder).mkdir(parents=True, exist_ok=True)
    if args.heads:
        md = run_head_study(args, out / "heads" / args.heads, docs)
        (docs / "evidence" / f"heads_{args.heads}.md").write_text("\n".join(md))
        print("\n".join(md), flush=True)
        return 0
    seeds = list(range(args.seeds))
    jobs = [Job(settings(m, args.epochs), mode, s, run_dir(out / "depth" / m, mode, s))
            for m in reversed(models) for mode in compare.MODES for s in seeds]  # reason: the slowest runs first
    jobs += [Job(settings(args.longtail_model, args.longtail_epochs, imbalance=10, sampler=sampler, augment=shift),
                 mode, s, run_dir(out / "longtail" / longtail_dir(sampler, shift), mode, s))
             for shift in SHIFTS for sampler in compare.SAMPLERS for mode in LONGTAIL_MODES for s in seeds]
    print(f"{len(jobs)} runs in {args.jobs} single-threaded processes", flush=True)
    tic = time.perf_counter()
    with LoadMonitor() as load:
        compare.run_jobs(jobs, args.jobs, threads=1)
    wall = time.perf_counter() - tic
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    md = [f"# Evidence study results ({'quick smoke test' if args.quick else 'full study'})", "",
          f"Command: `{COMMAND}{' --quick' if args.quick else ''}`. {len(jobs)} runs, {args.seeds} seeds, "
          f"{args.epochs} epochs (depth study) and {args.longtail_epochs} epochs (class-aware study), "
          f"{args.jobs} single-threaded processes on {os.cpu_count()} CPUs.", "",
          f"Time: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (all processes); 1-minute load average "
          f"{statistics.fmean(load.samples):.1f} on average while it ran (max {max(load.samples):.1f}; the study's "
          f"own processes count {args.jobs}).", "", "## Depth study", ""]
    md += depth_study(out / "depth", docs, models, seeds)
    md += ["## Class-aware sampling", "", f"Model {args.longtail_model}, {args.longtail_epochs} epochs.", ""]
    md += class_aware_study(out / "longtail", docs, seeds)
    (docs / "evidence" / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {docs / 'evidence'} and {docs / 'compare'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
