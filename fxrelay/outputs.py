"""The train-mode output: a tensor that is the main head's logits and carries every head.

A transformed model in train mode returns :class:`HeadOutputs`. It *is* the main
head's logits (``.item()``, printing, ``.argmax()`` for accuracy, ``.shape`` read the
main head), and every torch function applied to it is applied to each head's logits
in turn, so the unchanged loss code of a training loop computes every head's loss::

    out = model(x)                                  # HeadOutputs
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(out, y)   # HeadOutputs of losses
    loss.backward()                                 # backward of sum_j w_j * L_j
    loss.item()                                     # the main head's loss

Caveats: ``torch.autograd.grad(loss, ...)`` and ``torch.autograd.backward(loss)``
see only the main head (use ``loss.backward()``); a plain tensor combined with a
HeadOutputs (``loss + reg``) is added to every head's value and so weighted by
``sum_j w_j``.

Example:
    >>> out = HeadOutputs.of([torch.zeros(2, 3), torch.ones(2, 3)], (0.3, 1.0))
    >>> torch.nn.functional.softmax(out, dim=1)[0, 0].item()
    0.3333333432674408
    >>> [t[0, 0].item() for t in head_outputs(out * 2)]
    [0.0, 2.0]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["HeadOutputs", "head_outputs", "head_losses", "combine_heads"]


class HeadOutputs(torch.Tensor):
    """The main head's value, carrying the per-head values and loss weights."""

    _values: tuple[torch.Tensor, ...]
    _weights: tuple[float, ...]

    @staticmethod
    def of(values: Sequence[torch.Tensor], weights: Sequence[float]) -> "HeadOutputs":
        """Wrap per-head values (main head last) with their loss weights."""
        out = values[-1].as_subclass(HeadOutputs)
        out._values, out._weights = tuple(values), tuple(weights)
        return out

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.backward:
            return _backward(args[0], *args[1:], **kwargs)
        carriers = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, HeadOutputs)]
        n = len(carriers[0]._values)
        with torch._C.DisableTorchFunctionSubclass():
            main = func(*_select(args, n - 1), **_select(kwargs, n - 1))
            leaves, spec = tree_flatten(main)
            if not any(isinstance(v, torch.Tensor) for v in leaves):
                return main  # reason: metadata, .item(), printing, .tolist() read the main head
            per_head = [tree_flatten(func(*_select(args, j), **_select(kwargs, j)))[0] for j in range(n - 1)]
        per_head.append(leaves)
        weights = carriers[0]._weights
        wrapped = [HeadOutputs.of([h[i] for h in per_head], weights) if isinstance(v, torch.Tensor) else v
                   for i, v in enumerate(leaves)]
        return tree_unflatten(wrapped, spec)

    def __reduce_ex__(self, protocol):  # reason: saving a logged loss keeps the main value
        return torch.Tensor.__reduce_ex__(self._values[-1], protocol)


def _select(tree: Any, j: int) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([v._values[j] if isinstance(v, HeadOutputs) else v for v in leaves], spec)


def _backward(out: HeadOutputs, gradient: torch.Tensor | None = None, retain_graph: bool | None = None,
              create_graph: bool = False, inputs: Any = None) -> None:
    total = sum(w * v for w, v in zip(out._weights, out._values) if v.requires_grad)
    torch.autograd.backward(total, gradient, retain_graph, create_graph, inputs=inputs)


def combine_heads(main: Any, aux: tuple, weights: tuple[float, ...]) -> Any:
    """The model output: ``main`` alone when the aux heads did not run (eval mode)."""
    if not isinstance(main, torch.Tensor) or any(a is None for a in aux):
        return main
    return HeadOutputs.of([*aux, main], weights)



def head_outputs(out: torch.Tensor) -> list[torch.Tensor]:
    """Per-head values of a transformed model's output, aligned with ``plan.heads``.

    A plain tensor (eval mode) gives a one-element list.
    """
    if isinstance(out, HeadOutputs):
        return [v for v in out._values]
    return [out]


def head_losses(loss: torch.Tensor) -> list[float]:
    """Per-head loss values (floats, aligned with ``plan.heads``) for logging."""
    return [float(v.detach()) for v in head_outputs(loss)]
