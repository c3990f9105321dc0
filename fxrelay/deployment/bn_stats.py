"""Exact BatchNorm population statistics (BN paper, Algorithm 2).

After training with relay/greedy/deep supervision, or after changing what feeds a BN,
the exponential running averages are stale. :func:`recalibrate_bn` replaces them by
the population statistics over a loader's batches:

    E[x] = E_B[mu_B],    Var[x] = m / (m - 1) * E_B[sigma_B^2]

with ``sigma_B^2`` the biased batch variance and ``m`` the per-channel element count of
a batch (``N*H*W``). It uses PyTorch's own cumulative average: with ``momentum=None``
a training-mode BN averages the batch means and unbiased batch variances
``m_B / (m_B - 1) * sigma_B^2`` it has seen, which is Algorithm 2 (with equal batch
sizes; with a smaller last batch each batch's own ``m_B`` is used). Each BN sees the
activations of the training network (the BNs before it use batch statistics), as in
the paper; every other module runs in eval mode, so dropout does not perturb them.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.BatchNorm1d(2))
    >>> data = [torch.tensor([[0., 1.], [2., 5.]]), torch.tensor([[4., 3.], [6., 7.]])]
    >>> recalibrate_bn(model, data, progress=False)[0].running_mean
    tensor([3., 4.])
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core._compat import BatchNormBase
from ..core.modules import training_mode

__all__ = ["recalibrate_bn"]


def recalibrate_bn(
    model: nn.Module, loader: Iterable[Any], num_batches: int | None = None, *, progress: bool = True
) -> nn.Module:
    """Set every BatchNorm's running mean and variance to the population statistics over ``loader``.

    Args:
        model: any module; its BNs (``_BatchNorm`` subclasses with running statistics,
            timm's ``BatchNormAct2d`` included) are updated in place.
        loader: batches: tensors, or tuples/lists whose first item is the input.
        num_batches: use only the first ``num_batches`` batches.
        progress: show a tqdm bar (only when stderr is a terminal).

    Returns:
        ``model``, with every module's train/eval flag and every BN's momentum restored.

    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    >>> batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    >>> recalibrate_bn(model, batches, progress=False)[1].num_batches_tracked
    tensor(3)
    """
    norms = [m for m in model.modules() if isinstance(m, BatchNormBase) and m.track_running_stats]
    if not norms:
        return model
    device = next(model.parameters(), torch.empty(0)).device
    batches = tqdm(islice(loader, num_batches), total=_length(loader, num_batches), desc="recalibrate BN",
                   disable=not progress or not sys.stderr.isatty())
    with _cumulative_average(model, norms), torch.no_grad():
        seen = 0
        for seen, batch in enumerate(batches, 1):
            model(_input_of(batch).to(device))
        if not seen:
            raise ValueError("recalibrate_bn: the loader yielded no batches")
    return model


@contextmanager
def _cumulative_average(model: nn.Module, norms: list[BatchNormBase]) -> Iterator[None]:
    """BNs in training mode with reset statistics and ``momentum=None``, the rest in eval.

    Modes and momenta are restored on exit, the previous statistics only on an error.
    """
    momenta = [bn.momentum for bn in norms]
    saved = [{k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in norms]
    with training_mode(model, False):
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None
            bn.training = True  # reason: not bn.train(), which would also switch BatchNormAct2d's drop on
        try:
            yield
        except BaseException:
            for bn, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(bn, name).copy_(value)
            raise
        finally:
            for bn, momentum in zip(norms, momenta):
                bn.momentum = momentum


def _input_of(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _length(loader: Iterable[Any], num_batches: int | None) -> int | None:
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, num_batches)
