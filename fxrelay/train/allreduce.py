"""Data parallelism for the stage-by-stage engine: each parameter pass's gradients all-reduced at once."""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["AllReduceSink"]


class AllReduceSink:
    """Data parallelism for a :class:`StageRunner`: each parameter pass's gradients are
    all-reduced asynchronously right away (one bucket per pass and dtype); :meth:`finish`
    waits, averages over the group and accumulates into ``.grad``.

    Every process of the group must run the same model on its own shard of the batch:
    the passes, and so the collectives, come in the same order everywhere.

    Args:
        group: the process group of the replicas (``None``: the default group).
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self._pending: list[tuple[list[torch.Tensor], torch.Tensor, Any]] = []

    def __call__(self, params: list[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
        by_dtype: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p, g in zip(params, grads):
            if g is not None:
                by_dtype.setdefault(g.dtype, []).append((p, g))
        for pairs in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for _, g in pairs])
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._pending.append(([p for p, _ in pairs], flat, work))

    def finish(self) -> float:
        """Wait for every all-reduce, accumulate the averages into ``.grad``; returns seconds waited."""
        size = dist.get_world_size(self.group)
        waited = 0.0
        for params, flat, work in self._pending:
            start = time.perf_counter()
            work.wait()
            waited += time.perf_counter() - start
            flat /= size
            offset = 0
            for p in params:
                g = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)
        self._pending.clear()
        return waited
