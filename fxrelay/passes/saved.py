"""Bytes a training step saves for backward, counted on meta tensors while shapes propagate.

:class:`SavedCounter` counts, per fx node, the distinct storages autograd saves for
backward (parameters and buffers excluded: they exist anyway). The analysis's first shape propagation
runs with autograd on and this counter's hooks, so the saved bytes come with the shapes
in one pass. Shape-preserving modules (norms, activations, dropout) are not run there:
:meth:`SavedCounter.replay` runs the first module of each kind and input signature once
(in train mode, batch norms on their eval kernel: same bytes, fast on meta), records
which of its inputs and outputs it saved and what else, and replays that for the others
with the same storages, so a storage saved by two layers (an in-place ReLU's output that
the next conv saves too) still counts once.

Example:
    >>> from torch import nn
    >>> saved_bytes_per_sample(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (4,))  # relu(.)
    32
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..core._compat import BatchNormBase
from ..core.modules import training_mode

__all__ = ["SavedCounter", "meta_like", "training_but_batch_norm", "meta_training_state", "saved_bytes_per_sample"]

# reason: a record is a pure function of a module's kind and configuration (its type and repr) and its input
# signature, so it is shared across analyses (the same model partitioned again, the zoo's repeated blocks)
_RECORDS: OrderedDict[tuple, tuple] = OrderedDict()
_MAX_RECORDS = 1024


class SavedCounter:
    """Bytes of the distinct storages saved for backward while its hooks are on, by :attr:`key`.

    Args:
        exclude: tensors whose storages do not count (parameters and buffers: they exist anyway).
    """

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.excluded = {t.untyped_storage() for t in exclude}
        self.seen = set(self.excluded)  # reason: weights are not activations
        self.bytes: dict[str, int] = {}
        self.key = ""
        self.owners: dict[torch.UntypedStorage, tuple[str, int]] = {}
        self.reused: dict[str, set[tuple[str, int, int]]] = {}
        self._kinds: dict[int, tuple[type, str]] = {}

    def add(self, storage: torch.UntypedStorage) -> None:
        """Count ``storage`` for the current key, once in all; a storage an earlier key counted goes to
        :attr:`reused`: ``(that key, its storage number, bytes)`` per key saving it again."""
        if storage not in self.seen:
            self.seen.add(storage)
            self.owners[storage] = (self.key, len(self.owners))
            self.add_bytes(storage.nbytes())
        elif storage in self.owners and self.owners[storage][0] != self.key:
            self.reused.setdefault(self.key, set()).add((*self.owners[storage], storage.nbytes()))

    def add_bytes(self, nbytes: int) -> None:
        self.bytes[self.key] = self.bytes.get(self.key, 0) + nbytes

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.add(tensor.untyped_storage())
        return tensor

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def replay(self, module: nn.Module, args: tuple) -> torch.Tensor:
        """The output of shape-preserving ``module`` on ``args`` (a meta tensor of ``args[0]``'s shape),
        counting what the module saves, measured once per module kind and input signature."""
        if id(module) not in self._kinds:  # reason: the repr shows the configuration, children included
            self._kinds[id(module)] = (type(module), repr(module))
        signature = (self._kinds[id(module)], tuple(
            (a.shape, a.dtype, a.stride(), a.requires_grad) if isinstance(a, torch.Tensor) else repr(a) for a in args))
        if signature not in _RECORDS:
            _RECORDS[signature] = self._record(module, args)
            if len(_RECORDS) > _MAX_RECORDS:
                _RECORDS.popitem(last=False)
        in_place, requires_grad, saved_args, saves_output, other = _RECORDS[signature]
        out = args[0] if in_place else meta_like(args[0], requires_grad)
        for i in saved_args:
            self.add(args[i].untyped_storage())
        if saves_output:
            self.add(out.untyped_storage())
        self.add_bytes(other)
        return out

    def _record(self, module: nn.Module, args: tuple) -> tuple:
        fresh = tuple(meta_like(a) if isinstance(a, torch.Tensor) else a for a in args)
        packed: list[torch.Tensor] = []
        with training_but_batch_norm(module), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = module(*fresh)
        inputs = {a.untyped_storage(): i for i, a in enumerate(fresh) if isinstance(a, torch.Tensor)}
        storages = {t.untyped_storage() for t in packed} - self.excluded
        saved_args = tuple(sorted(inputs[s] for s in storages if s in inputs))
        output = out.untyped_storage()
        other = sum(s.nbytes() for s in storages if s not in inputs and s is not output)
        in_place = inputs.get(output) == 0
        return in_place, out.requires_grad, saved_args, output in storages and not in_place, other


def meta_like(tensor: torch.Tensor, requires_grad: bool | None = None) -> torch.Tensor:
    """A new meta tensor like ``tensor``; one that requires grad is no leaf, so that in-place ops on it
    are allowed as on the activation it stands for."""
    grad = tensor.requires_grad if requires_grad is None else requires_grad
    empty = _meta_empty_like(tensor)
    return empty.requires_grad_().clone() if grad else empty


def _meta_empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(tensor, device="meta")``, made directly where the layout is dense (on a meta
    tensor ``empty_like`` runs a Python reference: 270 us against 4 us)."""
    if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    return torch.empty_like(tensor, device="meta")


@contextlib.contextmanager
def training_but_batch_norm(module: nn.Module) -> Iterator[None]:
    """``module`` in train mode for the block, but its batch norms that keep running statistics.

    Train- and eval-mode batch norm save the same bytes for backward (the input and two
    per-channel vectors); on meta tensors the eval kernel is fast and the train one is a
    Python decomposition.
    """
    with training_mode(module, True):
        for m in module.modules():
            if isinstance(m, BatchNormBase) and m.track_running_stats:
                m.training = False
        yield


def meta_training_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Meta copies of ``module``'s parameters (requiring grad where floating) and of all its state."""
    params = {k: torch.empty_like(v, device="meta").requires_grad_(v.is_floating_point())
              for k, v in module.named_parameters()}
    return params, {**params, **{k: torch.empty_like(v, device="meta") for k, v in module.named_buffers()}}


def saved_bytes_per_sample(module: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """Bytes per sample that ``module`` saves for backward in train mode, besides its input (which
    the layer producing it usually saves already); meta tensors, 0 if it cannot run on them."""
    params, state = meta_training_state(module)
    x = torch.empty(2, *sample_shape, device="meta")
    counter = SavedCounter([*state.values(), x])
    try:
        with training_but_batch_norm(module), torch.enable_grad(), counter.hooks():
            functional_call(module, state, (x,))
    except Exception:  # noqa: BLE001  (reason: a head that needs values or a real device gets no estimate)
        return 0
    return sum(counter.bytes.values()) // 2
