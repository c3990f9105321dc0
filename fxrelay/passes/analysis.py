"""Pass 2: shapes, cost and structure of a traced graph.

:func:`analyse` propagates meta tensors (no compute, the model is untouched) through a
GraphModule twice, at the example input's size and at twice that size; a model with ops
that need values (``.item()`` in a leaf) runs on seeded random data instead, on copies of
its buffers. A dimension that doubles with the input is spatial; that is how resolution
levels are found from shapes alone, whatever the layout (NCHW, NHWC, tokens with class
tokens) and whether or not the model has pooling ops. The result, per node:

* ``shape``/``dtype`` of the output, ``flops`` per sample, ``params`` owned;
* ``reduction``: measured spatial downsampling factor of the output vs the input
  (``None`` for non-spatial tensors such as logits or pooled vectors);
* ``level``: the resolution level the node computes at (measured, else inherited);
* ``bytes`` of its output and, with ``memory=True``, ``saved_bytes``: what a training step
  saves for backward in it (counted during the first propagation: :mod:`fxrelay.passes.saved`).

Example:
    >>> import torchvision, fxrelay
    >>> from fxrelay.passes.analysis import analyse
    >>> gm = fxrelay.trace(torchvision.models.resnet18())
    >>> a = analyse(gm, fxrelay.default_example_input(gm))
    >>> a.info["layer2_0_conv1"].reduction, a.info["fc"].level
    (8, 32)
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import flop_registry

from ..core._compat import BatchNormBase, DropoutBase, TorchDispatchMode, tree_flatten, tree_map
from ..core.modules import first_tensor
from .saved import SavedCounter, meta_like, meta_training_state, saved_bytes_per_sample, training_but_batch_norm
from .tracing import ExampleInput, as_inputs

__all__ = ["NodeInfo", "Analysis", "analyse", "owned_parameters", "data_dependent_nodes", "saved_bytes_per_sample"]

_SHAPE_PRESERVING = (
    BatchNormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    nn.Identity, DropoutBase, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.Mish, nn.Softplus,
)
_FLOP_FREE_FUNCTIONS = frozenset({
    operator.getitem, getattr, operator.add, operator.sub, operator.mul, operator.truediv,
    operator.floordiv, operator.neg, operator.iadd, operator.imul, torch.flatten, torch.cat,
    torch.stack, torch.reshape, torch.permute, torch.transpose, torch.add, torch.mul, torch.sigmoid,
    torch.relu, torch.chunk, torch.split, torch.narrow, torch.squeeze, torch.unsqueeze,
})
_SUMS = frozenset({operator.add, operator.sub, torch.add, torch.sub})
_FLOP_METHODS = ("matmul", "mm", "bmm", "linear", "conv", "einsum", "attention", "baddbmm", "addmm")


@dataclass(frozen=True)
class NodeInfo:
    """What analysis knows about one fx node.

    Attributes:
        shape: output shape (the first tensor of a tuple output) at the analysis batch size.
        dtype: its dtype.
        flops: floating-point operations per sample (matmul/conv-class ops, as
            ``torch.utils.flop_counter`` counts them).
        params: parameters owned by the node (a called leaf module or a fetched parameter).
        reduction: measured spatial downsampling of the output vs the model input,
            ``None`` when the output has no spatial dimensions.
        level: resolution level the node works at: ``reduction``, else the highest
            level among its inputs (1 at the input).
        bytes: bytes of the node's tensor outputs at the analysis batch size.
        saved_bytes: bytes the node saves for backward in a training step at the analysis
            batch size (activations only, each storage counted once; 0 unless
            ``analyse(..., memory=True)``).
        reused: storages the node saves too that an earlier node counted: ``(that node, storage
            number, bytes)`` (a stage's input its first layer saves, counted where it was made).
        saver: the node that first saves the storage of this node's output ("" if none does).
    """

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    bytes: int
    saved_bytes: int
    flops: int
    params: int
    reduction: int | None
    level: int
    reused: tuple[tuple[str, int, int], ...] = ()
    saver: str = ""


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyse`.

    Attributes:
        info: :class:`NodeInfo` per node name (also stored in ``node.meta["fxrelay"]``).
        batch: batch size the shapes were propagated at.
        exact_levels: True when levels came from the two-size comparison, False when
            the model only runs at one size and the layout was inferred from one shape.
    """

    info: dict[str, NodeInfo]
    batch: int
    exact_levels: bool


def analyse(gm: fx.GraphModule, example_input: ExampleInput, *, memory: bool = False) -> Analysis:
    """Shapes, FLOPs, params, resolution levels and (with ``memory``) saved bytes of ``gm``.

    Args:
        gm: a traced GraphModule (see :func:`fxrelay.trace`).
        example_input: an input of the size the model is used at; only shapes and
            dtypes are read, nothing runs on real data unless the model cannot run on
            meta tensors.
        memory: also measure what a training step saves for backward, per node.

    Returns:
        An :class:`Analysis`; every node also gets ``node.meta["fxrelay"]``.
    """
    inputs = as_inputs(example_input)
    batch = max(2, inputs[0].shape[0]) if inputs[0].dim() else 1  # reason: train-mode BN needs 2
    first = _propagate(gm, inputs, batch, 1, count_saved=memory)
    second = None
    if _image_input(inputs) is not None:
        try:
            second = _propagate(gm, inputs, batch, 2, count_flops=False)
        except Exception:  # noqa: BLE001  (reason: fixed-size models such as ViT)
            second = None
    size = _image_input(inputs)
    counter = first.counter if first.counter is not None else _saved_bytes(gm, inputs, batch) if memory else None
    info = _node_info(gm, first, second, size, batch, counter)
    for node in gm.graph.nodes:
        node.meta["fxrelay"] = info[node.name]
    return Analysis(info, batch, second is not None)


def data_dependent_nodes(graph: fx.Graph) -> set[str]:
    """Nodes whose values depend on the input's values, not only on its shape."""
    data: set[str] = set()
    for n in graph.nodes:
        reads_shape = (n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "dtype", "device")) \
            or (n.op == "call_method" and n.target in ("size", "dim"))
        if n.op == "placeholder" or (not reads_shape and any(s.name in data for s in n.all_input_nodes)):
            data.add(n.name)
    return data


def _image_input(inputs: tuple[torch.Tensor, ...]) -> tuple[int, int] | None:
    images = [t for t in inputs if isinstance(t, torch.Tensor) and t.dim() == 4]
    return tuple(images[0].shape[-2:]) if len(images) == 1 else None


def _resized(inputs: tuple, batch: int, scale: int, device: torch.device | str) -> tuple:
    out = []
    for t in inputs:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        shape = list(t.shape)
        if shape:
            shape[0] = batch
        if t.dim() == 4:
            shape[-2:] = [shape[-2] * scale, shape[-1] * scale]
        if device == "meta":
            out.append(torch.empty(shape, dtype=t.dtype, device="meta"))
        else:  # reason: values matter only to leaves with data-dependent code; keep them seeded
            out.append(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(t.device, t.dtype))
    return tuple(out)


class _FlopCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class _MetaPropagator(fx.Interpreter):
    """Runs a graph on meta tensors (or real ones), recording every value's shape and its FLOPs and,
    with a ``counter``, the bytes each node saves for backward. On meta tensors shape-preserving
    modules are not run (``shortcut``): their output is a new tensor like their input, and the
    counter replays what they save (see :meth:`SavedCounter.replay`)."""

    def __init__(self, gm: fx.GraphModule, count_flops: bool, meta: bool = True,
                 counter: SavedCounter | None = None, shortcut: bool = True):
        super().__init__(gm)
        self.count_flops, self.meta, self.counter, self.shortcut = count_flops, meta, counter, shortcut
        self.values: dict[str, Any] = {}
        self.flops: dict[str, int] = {}
        self.steps = 1

    def run_node(self, n: fx.Node) -> Any:
        if self.counter is not None:
            self.counter.key = n.name
        if self.count_flops and _may_cost_flops(n, self.submodules):
            with _FlopCounter() as counter:
                value = super().run_node(n)
            self.flops[n.name], self.steps = counter.total * self.steps, 1
        else:
            value = super().run_node(n)
        # reason: real runs must not keep every activation
        self.values[n.name] = value if self.meta else tree_map(_shape_only, value)
        return value

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if self.meta and self.shortcut and _is_shape_preserving(module) and args and isinstance(args[0], torch.Tensor):
            return self.counter.replay(module, args) if self.counter is not None else meta_like(args[0], False)
        if self.meta and self.shortcut and isinstance(module, nn.RNNBase) and args and args[0].dim() == 3:
            return self._one_step(target, args, kwargs)
        return super().call_module(target, args, kwargs)

    def _one_step(self, target: str, args: tuple, kwargs: dict) -> Any:
        """A recurrent layer run on its first time step, its output, FLOPs and saved bytes scaled to the
        sequence (the input saved once), since on meta every step decomposes in Python (sequencer2d: 16 s)."""
        x, module = args[0], self.fetch_attr(target)
        dim = 1 if module.batch_first else 0
        self.steps = x.shape[dim]
        own = 0 if self.counter is None or x.untyped_storage() in self.counter.seen else x.untyped_storage().nbytes()
        before = self.counter.bytes.get(self.counter.key, 0) if self.counter is not None else 0
        out, hidden = super().call_module(target, (x.narrow(dim, 0, 1), *args[1:]), kwargs)
        if self.counter is not None:
            step = self.counter.bytes.get(self.counter.key, 0) - before - own
            self.counter.bytes[self.counter.key] = before + own + step * self.steps
        full = out.new_empty((*out.shape[:dim], self.steps, *out.shape[dim + 1:]))
        return (full.requires_grad_().clone() if out.requires_grad else full), hidden

    def call_function(self, target, args, kwargs):
        if self.meta and self.shortcut and target in _SUMS and not kwargs and len(args) == 2 and _same_layout(*args):
            # reason: a residual sum saves nothing and keeps the layout; its meta kernel is Python
            return meta_like(args[0], args[0].requires_grad or args[1].requires_grad)
        return super().call_function(target, *self._on_meta(args, kwargs))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._on_meta(args, kwargs))

    def _on_meta(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Devices the trace baked in (``device=x.device`` evaluated while tracing) become meta."""
        if not self.meta:
            return args, kwargs
        return tree_map(_meta_device, args), tree_map(_meta_device, kwargs)

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        # reason: tensor constants fx stored on the module are not in the state dict; parameters are meta already
        return _shape_only(value) if self.meta and not (isinstance(value, torch.Tensor) and value.is_meta) else value


def _same_layout(a: Any, b: Any) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_meta and b.is_meta \
        and a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()


def _meta_device(value: Any) -> Any:
    return torch.device("meta") if isinstance(value, torch.device) else value


def _shape_only(value: Any) -> Any:
    return meta_like(value, False) if isinstance(value, torch.Tensor) else value


def _is_shape_preserving(module: nn.Module) -> bool:
    if isinstance(module, _SHAPE_PRESERVING):
        return True
    # reason: timm's norm+act leaves (BatchNormAct2d, GroupNormAct, FrozenBatchNormAct2d ...)
    return type(module).__module__.endswith("layers.norm_act") or type(module).__name__ == "FrozenBatchNorm2d"


def _may_cost_flops(n: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return not _is_shape_preserving(modules[n.target])
    if n.op == "call_method":
        return any(k in n.target for k in _FLOP_METHODS)
    if n.op == "call_function":
        if n.target in _FLOP_FREE_FUNCTIONS:
            return False
        name = getattr(n.target, "__name__", "")
        module = getattr(n.target, "__module__", "") or ""
        return any(k in name for k in _FLOP_METHODS) or not module.startswith(("torch", "_operator"))
    return False


def _propagate(gm: fx.GraphModule, inputs: tuple, batch: int, scale: int,
               count_flops: bool = True, count_saved: bool = False) -> _MetaPropagator:
    """Run ``gm`` on meta tensors (counting saved bytes if asked and if it can), with meta as the
    default device when forward makes tensors (rotary tables, masks), else on real ones if some op
    needs values."""
    meta_inputs = _resized(inputs, batch, scale, "meta")
    # reason: the device mode slows every op; only if needed
    for device, saved in ((None, True),) * count_saved + ((None, False), ("meta", False)):
        try:
            return _run_meta(gm, meta_inputs, device, count_flops, saved)
        except Exception:  # noqa: BLE001  (reason: cpu tensors made in forward, .item(), data-dependent leaves)
            pass
    state = {k: v.clone() for k, v in gm.named_buffers()}  # reason: train-mode BN must not update the model's
    prop = _MetaPropagator(gm, count_flops, meta=False)
    with torch.no_grad():
        _run_with_state(gm, state, prop.run, _resized(inputs, batch, scale, inputs[0].device))
    return prop


def _run_meta(gm: fx.GraphModule, inputs: tuple, device: str | None, count_flops: bool, count_saved: bool,
              shortcut: bool = True) -> _MetaPropagator:
    params, state = meta_training_state(gm)  # reason: buffers too, non-persistent ones included
    counter = SavedCounter(state.values()) if count_saved else None  # reason: weights and running statistics
    prop = _MetaPropagator(gm, count_flops, True, counter, shortcut)
    default_device = torch.device(device) if device else contextlib.nullcontext()
    # reason: a step saves what modules save in training (the shortcut modules' replay runs them so too)
    hooks, mode = (counter.hooks(), training_but_batch_norm(gm)) if counter is not None \
        else (contextlib.nullcontext(), contextlib.nullcontext())
    with torch.set_grad_enabled(count_saved), hooks, mode, default_device:
        _run_with_state(gm, state, prop.run, inputs)
    return prop


def _saved_bytes(gm: fx.GraphModule, inputs: tuple, batch: int) -> SavedCounter | None:
    """Saved bytes from a pass of their own where counting while propagating failed (None: not on meta)."""
    try:
        return _run_meta(gm, _resized(inputs, batch, 1, "meta"), None, False, True, shortcut=False).counter
    except Exception:  # noqa: BLE001  (reason: models that need values or real devices get no estimate)
        return None


class _Runner(nn.Module):
    """Calls ``run`` on a graph module it holds, so that ``functional_call`` can swap the module's state."""

    def __init__(self, gm: fx.GraphModule, run: Callable):
        super().__init__()
        self.gm, self.run = gm, run

    def forward(self, *inputs: Any) -> Any:
        return self.run(*inputs)


def _run_with_state(gm: fx.GraphModule, state: dict[str, torch.Tensor], run: Callable, inputs: tuple) -> Any:
    """``run(*inputs)`` with ``gm``'s parameters and buffers replaced by ``state``."""
    return functional_call(_Runner(gm, run), {f"gm.{k}": v for k, v in state.items()}, inputs)


def owned_parameters(node: fx.Node, modules: Mapping[str, nn.Module]) -> list[nn.Parameter]:
    """Parameters a node uses directly: those of a called module, or a fetched parameter; ``modules``:
    ``dict(gm.named_modules())``, made once per pass (a walk per node was a tenth of a partition)."""
    if node.op == "call_module":
        return list(modules[node.target].parameters())
    if node.op == "get_attr":
        prefix, _, name = node.target.rpartition(".")
        attr = getattr(modules[prefix], name) if prefix in modules else functools.reduce(
            getattr, node.target.split("."), modules[""])
        return [attr] if isinstance(attr, nn.Parameter) else []
    return []


def _node_info(gm, first, second, size, batch, counter) -> dict[str, NodeInfo]:
    saved, reused = (counter.bytes, counter.reused) if counter is not None else ({}, {})
    owners = counter.owners if counter is not None else {}
    info: dict[str, NodeInfo] = {}
    modules = first.submodules
    for n in gm.graph.nodes:
        value = first.values.get(n.name)
        t1 = first_tensor(value)
        t2 = first_tensor(second.values.get(n.name)) if second is not None else None
        reduction = None
        if size is not None and t1 is not None:
            reduction = _reduction_two_sizes(t1, t2, size, batch) if second is not None \
                else _reduction_one_size(t1, size, batch)
        inherited = max((info[i.name].level for i in n.all_input_nodes), default=1)
        info[n.name] = NodeInfo(
            shape=tuple(t1.shape) if t1 is not None else None,
            dtype=t1.dtype if t1 is not None else None,
            flops=first.flops.get(n.name, 0) // batch,
            params=sum(p.numel() for p in owned_parameters(n, modules)),
            reduction=reduction,
            level=reduction if reduction is not None else inherited,
            bytes=sum(t.numel() * t.element_size() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)),
            saved_bytes=saved.get(n.name, 0),
            reused=tuple(sorted(reused.get(n.name, ()))),
            saver=owners.get(t1.untyped_storage(), ("",))[0] if t1 is not None and t1.is_meta else "",
        )
    return info


def _snap(size: int, extent: float) -> int:
    """Reduction factor of a spatial dim that is ``extent`` long (or grows by ``extent``)
    for a ``size``-long input (or one that grows by ``size``)."""
    if extent <= 0:
        return size
    exact = size / extent
    if float(exact).is_integer():
        return int(exact)
    power = 2 ** round(math.log2(exact))
    return power if abs(exact / power - 1) < 0.25 else max(1, round(exact))


def _reduction_two_sizes(t1, t2, size, batch) -> int | None:
    if t2 is None or t1.dim() != t2.dim() or not 2 <= t1.dim() <= 4 or t1.shape[0] != batch or t2.shape[0] != batch:
        return None  # reason: > 4 dims are window or patch-merge reshapes, not a resolution
    changed = [d for d in range(1, t1.dim()) if t1.shape[d] != t2.shape[d]]
    if len(changed) == 2 and all(1.5 <= t2.shape[d] / t1.shape[d] <= 2.5 for d in changed):
        # reason: the growth cancels padding offsets (valid convs: 299 -> 8, 598 -> 17 is 32)
        return _snap(size[0], t2.shape[changed[0]] - t1.shape[changed[0]])
    if len(changed) == 1:  # reason: flattened tokens, possibly with class/register tokens
        d = changed[0]
        area = (t2.shape[d] - t1.shape[d]) / 3
        extra = t1.shape[d] - area
        if area > 0 and 0 <= extra <= 16:
            return _snap(size[0], math.sqrt(area * size[0] / size[1]))
    return None


def _reduction_one_size(t, size, batch) -> int | None:
    """Layout guess for models that only run at one input size."""
    if t.dim() not in (3, 4) or t.shape[0] != batch:
        return None  # reason: > 4 dims are window or patch-merge reshapes, not a resolution
    h_in, w_in = size
    if t.dim() == 4:
        a, b, c = t.shape[1:]
        side = b if b == c > 1 else a if a == b > 1 else None  # reason: NCHW, else NHWC (swin, maxvit)
        # reason: a valid conv leaves an odd extent (PiT: 224 -> 27 is 8)
        return (_power_stride(h_in, side) or _snap(h_in, side)) if side else None
    for d in (1, 2):  # reason: (B, N, C) tokens or (B, C, N)
        for extra in range(0, 9):
            side = math.isqrt(max(t.shape[d] - extra, 0))
            if side > 1 and side * side == t.shape[d] - extra:
                stride = _power_stride(h_in, side) or (h_in // side if h_in % side == 0 else None)
                if stride:
                    return stride
    return None


def _power_stride(size: int, extent: int) -> int | None:
    """The power of two a strided layer maps ``size`` to ``extent`` with, rounding up or
    down (224 -> 4 is 64, not 56), if any."""
    return next((2 ** k for k in range(12) if extent in (size // 2 ** k, -(-size // 2 ** k))), None)
