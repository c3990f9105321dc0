"""The train-mode output: one tensor that is the main head's logits and carries every head.

A transformed model in train mode returns :class:`HeadOutputs`. To autograd and to
any code that handles tensors (DDP, ``torch.utils.checkpoint``, ``torch.compile``,
autocast) it is one tensor with the main head's shape and dtype; underneath, every
operation is applied to each head's value in turn, so the unchanged loss code of a
training loop computes every head's loss::

    out = model(x)                                  # HeadOutputs
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)(out, y)   # HeadOutputs of losses
    loss.backward()                                 # gradient of sum_j w_j * L_j
    loss.item()                                     # the main head's loss

``loss.backward()``, ``torch.autograd.backward(loss)`` and ``torch.autograd.grad(loss,
...)`` all compute the gradient of the weighted total ``sum_j w_j L_j``: where no
gradient is given, the seed of head ``j`` is ``w_j``. :func:`head_outputs` gives the
per-head values as ordinary differentiable tensors (per-head gradients, GradNorm);
:func:`head_losses` their floats for logging. Reading values (``.item()``, ``.tolist()``,
printing, ``bool``) reads the main head. A plain tensor combined with a HeadOutputs
(``loss + reg``) joins every head's value, so its gradient is weighted by ``sum_j w_j``.

Example:
    >>> out = HeadOutputs.of([torch.zeros(2, 3), torch.ones(2, 3)], (0.3, 1.0))
    >>> torch.nn.functional.softmax(out, dim=1)[0, 0].item()
    0.3333333432674408
    >>> [t[0, 0].item() for t in head_outputs(out * 2)]
    [0.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import torch

from ._compat import disabled_torch_function, functorch_active, make_wrapper_subclass, tree_flatten, tree_map, \
    tree_unflatten

__all__ = ["HeadOutputs", "head_outputs", "head_losses", "combine_heads", "OutputPath", "output_leaves",
           "output_leaf", "replace_leaf"]

OutputPath = tuple  # reason: keys from the model's output to the leaf that carries the heads: ("logits",), (0,), ()

_READ_MAIN = frozenset({torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__repr__, torch.Tensor.__format__,
                        torch.Tensor.__reduce_ex__})


class HeadOutputs(torch.Tensor):
    """The main head's value, carrying the per-head values and loss weights.

    Build one with :meth:`of`; the values are per head, aligned with ``plan.heads``
    (main head last).
    """

    _values: tuple[torch.Tensor, ...]
    _weights: tuple[float, ...]

    @staticmethod
    def __new__(cls, values: Sequence[torch.Tensor], weights: Sequence[float]) -> "HeadOutputs":
        return make_wrapper_subclass(cls, values[-1])

    def __init__(self, values: Sequence[torch.Tensor], weights: Sequence[float]):
        self._values, self._weights = tuple(values), tuple(weights)
        for i, v in enumerate(self._values):  # reason: torch.compile reads the inner tensors by attribute name
            setattr(self, f"_head{i}", v)

    @staticmethod
    def of(values: Sequence[torch.Tensor], weights: Sequence[float]) -> "HeadOutputs":
        """Per-head values (main head last) as one differentiable HeadOutputs."""
        if len(values) != len(weights):
            raise ValueError(f"got {len(values)} head values for {len(weights)} weights")
        return _Pack.apply(tuple(weights), *values)

    def __tensor_flatten__(self) -> tuple[list[str], tuple[float, ...]]:
        return [f"_head{i}" for i in range(len(self._values))], self._weights

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], weights: tuple[float, ...], outer_size: Any,
                             outer_stride: Any) -> "HeadOutputs":
        return HeadOutputs([inner[f"_head{i}"] for i in range(len(inner))], weights)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return repr(self._values[-1])

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad):
            return _differentiate(func, args, kwargs)
        if func in _READ_MAIN:
            args, kwargs = _select((args, kwargs), -1)
            return func(*args, **kwargs)
        with disabled_torch_function():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        carrier = next(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, HeadOutputs))
        per_head = [func(*a, **k) for a, k in (_select((args, kwargs), j) for j in range(len(carrier._values)))]
        leaves, spec = tree_flatten(per_head[-1])
        if not any(isinstance(v, torch.Tensor) for v in leaves):
            return per_head[-1]  # reason: metadata, .item(), bool read the main head
        flat = [tree_flatten(value)[0] for value in per_head]
        return tree_unflatten([HeadOutputs([f[i] for f in flat], carrier._weights) if isinstance(v, torch.Tensor)
                               else v for i, v in enumerate(leaves)], spec)


def _select(tree: Any, j: int) -> Any:
    return tree_map(lambda v: v._values[j] if isinstance(v, HeadOutputs) else v, tree)


def _seed(value: torch.Tensor) -> torch.Tensor:
    """The gradient that makes a backward from ``value`` the weighted total ``sum_j w_j L_j``."""
    if not isinstance(value, HeadOutputs):
        return torch.ones_like(value)
    return HeadOutputs([torch.full_like(v, w) for v, w in zip(value._values, value._weights)], value._weights)


_SEEDED = {torch.Tensor.backward: ("self", "gradient"), torch.autograd.backward: ("tensors", "grad_tensors"),
           torch.autograd.grad: ("outputs", "grad_outputs")}


def _differentiate(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``backward``/``autograd.backward``/``autograd.grad`` with the weighted seed where none is given."""
    bound = inspect.signature(func).bind(*args, **kwargs).arguments
    outputs_name, seeds_name = _SEEDED[func]
    outputs = bound.pop(outputs_name)
    outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    given = bound.pop(seeds_name, None)
    given = [given] * len(outputs) if given is None or isinstance(given, torch.Tensor) else list(given)
    seeds = tuple(_seed(o) if g is None else g for o, g in zip(outputs, given))
    with disabled_torch_function():
        if func is torch.autograd.grad:
            return torch.autograd.grad(outputs, grad_outputs=seeds, **bound)
        return torch.autograd.backward(outputs, seeds, **bound)


class _Pack(torch.autograd.Function):
    """Per-head tensors -> one HeadOutputs; the gradient of a HeadOutputs -> per-head gradients."""

    @staticmethod
    def forward(weights: tuple[float, ...], *values: torch.Tensor) -> HeadOutputs:
        return HeadOutputs([v.detach() for v in values], weights)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: HeadOutputs) -> None:
        ctx.set_materialize_grads(False)
        ctx.shapes = [v.shape for v in inputs[1:]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple:
        if grad is None:
            return (None,) * (len(ctx.shapes) + 1)
        if isinstance(grad, HeadOutputs):
            return (None, *head_outputs(grad))
        # reason: a plain gradient (from code that does not know heads) belongs to the main head
        return (None, *(None for _ in ctx.shapes[:-1]), grad)


class _Unpack(torch.autograd.Function):
    """Head ``j``'s value of a HeadOutputs as a plain differentiable tensor."""

    @staticmethod
    def forward(packed: HeadOutputs, j: int) -> torch.Tensor:
        return packed._values[j].detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        packed, ctx.j = inputs
        ctx.like, ctx.weights = packed._values, packed._weights

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        values = [grad if j == ctx.j else torch.zeros_like(v) for j, v in enumerate(ctx.like)]
        return HeadOutputs.of(values, ctx.weights), None


def head_outputs(out: torch.Tensor) -> list[torch.Tensor]:
    """Per-head values of a transformed model's output (or of a loss), aligned with ``plan.heads``.

    They are ordinary tensors, differentiable back to the model: ``torch.autograd.grad(
    head_outputs(loss)[j], params, retain_graph=True)`` is head ``j``'s own (unweighted)
    gradient. A plain tensor (eval mode) gives a one-element list.
    """
    if isinstance(out, HeadOutputs):
        return [_Unpack.apply(out, j) for j in range(len(out._values))]
    return [out]


def head_losses(loss: torch.Tensor) -> list[float]:
    """Per-head loss values (floats, aligned with ``plan.heads``) for logging."""
    values = loss._values if isinstance(loss, HeadOutputs) else (loss,)
    return [float(v.detach()) for v in values]


def combine_heads(output: Any, aux: tuple = (), weights: tuple[float, ...] = (), path: OutputPath = (),
                  views: tuple | None = None) -> Any:
    """The model output with every head in it; unchanged when the aux heads did not run (eval mode).

    Args:
        output: the main head's output.
        aux: the aux heads' logits, aligned with ``plan.aux_heads``.
        weights: every head's loss weight (main head last).
        path: the keys to the output leaf the heads' logits take the place of.
        views: for a structured output, each aux head's view of it (its other leaves read in
            that head's gradient channel, see :mod:`fxrelay.core.wiring`); then every
            floating-point tensor leaf carries one value per head. ``None``: only the leaf at
            ``path`` does (the output is that leaf).
    """
    if any(a is None for a in aux):
        return output
    if functorch_active():
        raise RuntimeError("torch.func transforms (grad, vmap, jacrev) do not see the aux heads of a model made by "
                           "fxrelay.transform, so its gradients would be wrong: use torch.autograd.grad or "
                           "loss.backward() (torch.func.functional_call alone is fine)")
    if views is None:
        return replace_leaf(output, path, lambda main: HeadOutputs.of([*aux, main], weights))
    per_head = [dict(output_leaves(replace_leaf(v, path, lambda _, a=a: a))) for v, a in zip(views, aux)]
    result = replace_leaf(output, path, lambda main: HeadOutputs.of([*aux, main], weights))
    for key, leaf in output_leaves(output):
        if key != tuple(path) and isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            values = [*(heads[key] for heads in per_head), leaf]
            result = replace_leaf(result, key, lambda _, values=values: HeadOutputs.of(values, weights))
    return result


def output_leaves(output: Any, path: OutputPath = ()) -> list[tuple[OutputPath, Any]]:
    """``(path, leaf)`` for every leaf of a model output: dicts, lists, tuples, namedtuples and dataclasses.

    >>> [p for p, _ in output_leaves({"logits": 1, "aux": (2, 3)})]
    [('logits',), ('aux', 0), ('aux', 1)]
    """
    if isinstance(output, dict):
        items = list(output.items())
    elif _is_namedtuple(output):
        items = list(output._asdict().items())
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    else:
        return [(path, output)]
    return [leaf for key, value in items for leaf in output_leaves(value, (*path, key))]


def output_leaf(output: Any, path: OutputPath) -> Any:
    """The leaf of ``output`` at ``path``."""
    for key in path:
        plain = isinstance(output, (dict, list, tuple)) and not _is_namedtuple(output)
        output = output[key] if plain else getattr(output, key)
    return output


def replace_leaf(output: Any, path: OutputPath, new: Callable[[Any], Any]) -> Any:
    """A copy of ``output`` whose leaf at ``path`` is ``new(leaf)``."""
    if not path:
        return new(output)
    key, rest = path[0], path[1:]
    if isinstance(output, dict):
        return {**output, key: replace_leaf(output[key], rest, new)}
    if _is_namedtuple(output):
        return output._replace(**{key: replace_leaf(getattr(output, key), rest, new)})
    if isinstance(output, (tuple, list)):
        items = list(output)
        items[key] = replace_leaf(items[key], rest, new)
        return type(output)(items)
    return dataclasses.replace(output, **{key: replace_leaf(getattr(output, key), rest, new)})


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")
