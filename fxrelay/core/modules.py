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

__all__ = ["ModuleSeq", "AuxHead", "first_tensor", "training_mode"]


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
