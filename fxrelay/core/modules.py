"""The modules a transformed model is made of, and the one train/eval save-restore.

* :class:`ModuleSeq`: an ordered container with readable attribute names (the emitted
  code calls ``self.stages.layer2(...)``) and list semantics (``model.stages[2]``,
  ``len(model.stages)``, iteration);
* :class:`AuxHead`: an aux head that runs only in training mode, on its stage output's
  first tensor (:func:`first_tensor`);
* :func:`training_mode`: set a module tree's train/eval flags for a block, restored
  exactly (per module) on exit, also on errors.

Example:
    >>> seq = ModuleSeq({"stem": nn.Conv2d(3, 8, 3), "head": nn.Linear(8, 2)})
    >>> len(seq), type(seq[1]).__name__, [type(m).__name__ for m in seq], seq.names
    (2, 'Linear', ['Conv2d', 'Linear'], ('stem', 'head'))
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ._compat import tree_flatten

__all__ = ["ModuleSeq", "AuxHead", "Conv1x1", "HeadReLU", "first_tensor", "training_mode"]


class ModuleSeq(nn.Module):
    """Modules in order, each under a readable name; indexable by position like ``nn.ModuleList``."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    @property
    def names(self) -> tuple[str, ...]:
        """The attribute names, in order."""
        return tuple(self._modules)

    def __getitem__(self, index: int | str | slice) -> nn.Module | list[nn.Module]:
        if isinstance(index, str):
            return self._modules[index]
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())


def first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` itself if it is a tensor, else its first tensor leaf (``None`` if it has none).

    A stage may end in a module returning a tuple; its aux head reads the first tensor,
    the one whose shape the head was built for.

    >>> first_tensor((torch.zeros(2), torch.ones(3))).shape, first_tensor({"a": 1}) is None
    (torch.Size([2]), True)
    """
    if isinstance(value, torch.Tensor):
        return value
    return next((v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)), None)


class AuxHead(nn.Module):
    """An aux head that runs only in training mode (returns ``None`` in eval), on the first
    tensor of its stage's output (:func:`first_tensor`), in every execution."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, features: Any) -> torch.Tensor | None:
        return self.body(first_tensor(features)) if self.training else None


class Conv1x1(nn.Conv2d):
    """A 1x1 convolution without bias for aux heads, computed as a matrix product over the channels:
    the convolution's values (to rounding) and parameters, and a backward that allocates only the
    input's gradient and a weight gradient per sample (summed), no larger than the input where it is
    used: maps of at least ``out_channels`` positions; smaller maps run the convolution. On CPU oneDNN's
    convolution backward holds two more maps of the input's size, the largest term of a greedy local
    step's resident peak (docs/performance.md).

    >>> conv = Conv1x1(8, 4); x = torch.randn(2, 8, 5, 5)
    >>> torch.allclose(conv(x), torch.nn.functional.conv2d(x, conv.weight), atol=1e-6)
    True
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h * w < self.out_channels:  # reason: bmm's weight gradient, one (out, in) matrix a sample, would pass a map
            return super().forward(x)
        # reason: bmm reads the (channels, positions) matrices in place; matmul's broadcasting folds a copy
        out = torch.bmm(self.weight.view(1, self.out_channels, c).expand(n, -1, -1), x.reshape(n, c, h * w))
        return out.view(n, self.out_channels, h, w)


class _ReLUIntoGrad(torch.autograd.Function):
    """``relu_`` whose backward zeroes the incoming gradient where the output is 0, in place."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.relu_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        # reason: only a dense gradient of its own (not a view or an expanded value that another node may
        # share, not part of a graph being built for a second derivative) may be overwritten
        own = grad._base is None and grad.is_contiguous() and not torch.is_grad_enabled()
        return grad.masked_fill_(out <= 0, 0) if own else grad.masked_fill(out <= 0, 0)


class HeadReLU(nn.ReLU):
    """``nn.ReLU(inplace=True)`` for aux heads: the same values and gradients, with the input
    gradient written into the incoming one. The head's backward at its stage's resolution (the
    pool's gradient, then the ReLU's) is the peak of a greedy local step; this holds one map
    fewer there (docs/performance.md). Only for fxrelay's head bodies, where the layer after it
    (a pool, conv or linear) makes a fresh gradient that nothing else reads; a view or expanded
    gradient is never overwritten.

    >>> x = torch.randn(2, 3, requires_grad=True)
    >>> HeadReLU()(x.clone()).sum().backward(); x.grad.equal((x > 0).float())
    True
    """

    def __init__(self) -> None:
        super().__init__(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x.relu_()
        return _ReLUIntoGrad.apply(x)


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module`` and its submodules in train (``True``) or eval mode for the block.

    Every module's own flag is restored on exit, so mixed trees (frozen BNs in eval
    inside a training model) come back as they were.

    >>> m = nn.Sequential(nn.Dropout(), nn.BatchNorm1d(2).eval())
    >>> with training_mode(m, False):
    ...     m[0].training
    False
    >>> m[0].training, m[1].training
    (True, False)
    """
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield module
    finally:
        for m, mode in modes.items():
            m.training = mode
