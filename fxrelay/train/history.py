"""A run's per-epoch figures (:class:`History`) and their per-head CSV (``metrics.csv``)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["History", "METRICS_COLUMNS", "write_metrics"]


@dataclass
class History:
    """Per-epoch figures; per-head lists follow ``plan.heads`` (main head last).

    Plain data: ``History(**dataclasses.asdict(history))`` rebuilds it, and so does
    ``History(**checkpoint["history"])``. Heads that did not run in an epoch (the
    sequential schedule trains one) have NaN train figures.

    Attributes:
        head_stages: the stage each head reads.
        head_loss, head_accuracy: train loss and accuracy of each head, per epoch.
        val_head_accuracy: validation accuracy of each head (aux heads evaluated with
            the model in eval mode), per epoch.
        ema_val_head_accuracy: the same for the EMA weights (empty without EMA).
        stage: the stage trained in each epoch (None: all stages).
        lr: the learning rate of each epoch's last update.
        seconds: training time of each epoch (without validation).
    """

    head_stages: list[int] = field(default_factory=list)
    head_loss: list[list[float]] = field(default_factory=list)
    head_accuracy: list[list[float]] = field(default_factory=list)
    val_head_accuracy: list[list[float]] = field(default_factory=list)
    ema_val_head_accuracy: list[list[float]] = field(default_factory=list)
    stage: list[int | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def val_accuracy(self) -> list[float]:
        """The main head's validation accuracy, per epoch."""
        return [accs[-1] for accs in self.val_head_accuracy]

    @property
    def ema_val_accuracy(self) -> list[float]:
        """The EMA weights' main-head validation accuracy, per epoch (empty without EMA)."""
        return [accs[-1] for accs in self.ema_val_head_accuracy]



METRICS_COLUMNS = ("epoch", "trained_stage", "head", "head_stage", "main", "train_loss", "train_accuracy",
                   "val_accuracy", "ema_val_accuracy", "lr", "seconds")


def write_metrics(history: History, path: str | Path) -> None:
    """The per-head CSV: one row per epoch and head (:data:`METRICS_COLUMNS`); empty cells: not measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(METRICS_COLUMNS)
        writer.writerows(_metric_rows(history))


def _metric_rows(h: History) -> Iterator[list[str]]:
    last = len(h.head_stages) - 1
    for e in range(len(h.seconds)):
        ema = h.ema_val_head_accuracy[e] if h.ema_val_head_accuracy else [math.nan] * (last + 1)
        for j, stage in enumerate(h.head_stages):
            yield [str(e + 1), "" if h.stage[e] is None else str(h.stage[e]), str(j), str(stage), str(int(j == last)),
                   *(_cell(v) for v in (h.head_loss[e][j], h.head_accuracy[e][j], h.val_head_accuracy[e][j], ema[j],
                                         h.lr[e])), f"{h.seconds[e]:.2f}"]


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"
