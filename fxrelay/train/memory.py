"""Measure the memory of a training step two ways, on any device, without a profiler.

* :class:`SavedBytes`: bytes of the tensors autograd saves for backward, each storage
  counted once, live from when it is saved until autograd releases it; the peak is what
  :meth:`fxrelay.Plan.memory_estimate` predicts. It sees what saved-tensor hooks see:
  ``torch.utils.checkpoint`` keeps its region's inputs out of their reach.
* :class:`AllocatedBytes`: bytes of every tensor storage created inside the block, live
  until it is freed: activations, gradients, workspaces (the CPU counterpart of
  ``torch.cuda.max_memory_allocated``, minus what existed before).

Example:
    >>> import torch
    >>> w = torch.ones(1000, requires_grad=True)
    >>> with SavedBytes() as saved, AllocatedBytes() as allocated:
    ...     (w.exp() * 2).sum().backward()
    >>> saved.peak, allocated.peak > 8000
    (4000, True)
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch

from ..core._compat import TorchDispatchMode, tree_flatten

__all__ = ["SavedBytes", "AllocatedBytes"]


class _LiveBytes:
    """Bytes of distinct storages that are alive, and their peak."""

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def add(self, storage: torch.UntypedStorage) -> None:
        key = _key(storage)
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)


def _key(storage: torch.UntypedStorage) -> int:
    return storage.data_ptr() or id(storage)  # reason: empty storages share the null pointer


class _SavedHandle:
    """What autograd keeps for a saved tensor while :class:`SavedBytes` is on."""

    def __init__(self, tensor: torch.Tensor, on_free: Any):
        self.tensor = tensor
        weakref.finalize(self, on_free)


class SavedBytes:
    """Peak bytes of the tensors autograd saves for backward inside the block (see the module doc).

    Args:
        exclude: tensors whose storage does not count (a model's parameters: layers save
            their weights, which exist anyway).

    Attributes:
        peak: the highest number of saved bytes alive at once.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._live = _LiveBytes()
        self._refs: dict[int, int] = {}
        self._excluded = {_key(t.untyped_storage()) for t in exclude}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda handle: handle.tensor)

    @property
    def peak(self) -> int:
        return self._live.peak

    def _pack(self, tensor: torch.Tensor) -> _SavedHandle:
        storages = [(_key(t.untyped_storage()), t.untyped_storage().nbytes()) for t in _plain_tensors(tensor)]
        storages = [(key, nbytes) for key, nbytes in storages if key not in self._excluded]
        for key, nbytes in storages:
            if self._refs.get(key, 0) == 0:
                self._live.live += nbytes
                self._live.peak = max(self._live.peak, self._live.live)
            self._refs[key] = self._refs.get(key, 0) + 1
        return _SavedHandle(tensor, lambda: self._unref(storages))

    def _unref(self, storages: list[tuple[int, int]]) -> None:
        for key, nbytes in storages:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                self._live.live -= nbytes

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


class AllocatedBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and still alive.

    Attributes:
        peak: the highest number of such bytes alive at once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live = _LiveBytes()

    @property
    def peak(self) -> int:
        return self._live.peak

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # reason: views and in-place results share an input's storage, which is not new
        inputs = {_key(t.untyped_storage()) for v in tree_flatten((args, kwargs))[0] for t in _plain_tensors(v)}
        for value in tree_flatten(out)[0]:
            for tensor in _plain_tensors(value):
                if _key(tensor.untyped_storage()) not in inputs:
                    self._live.add(tensor.untyped_storage())
        return out


def _plain_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors with storage inside ``value``: itself, or the inner tensors of a wrapper subclass."""
    if not isinstance(value, torch.Tensor) or value.device.type == "meta":
        return []
    if type(value) is torch.Tensor or not hasattr(value, "__tensor_flatten__"):
        return [value]
    names, _ = value.__tensor_flatten__()
    return [t for name in names for t in _plain_tensors(getattr(value, name))]
