"""Pass 1: symbolic tracing that honours timm's and torchvision's fx conventions.

:func:`trace` turns any ``nn.Module`` into a :class:`torch.fx.GraphModule` that shares
its parameters. The tracer:

* keeps timm's registered leaf modules (``timm.layers._fx``), its norm+act layers
  (``BatchNormAct2d`` and friends: BN, activation and drop are one unit for folding)
  and torchvision's ``ops`` modules as leaves, and wraps timm's and torchvision's
  untraceable helper functions, so the 98% of timm families that fx can handle trace;
* binds every ``forward`` argument that has a default to that default
  (``concrete_args``), so a ``forward(x, mask=None)`` records the ``mask is None``
  branch instead of turning ``mask`` into an input;
* falls back to an *auto-leaf*: when tracing fails inside a submodule (Python control
  flow on tensor values), that innermost submodule becomes a leaf and tracing is
  retried; the leaves found this way are listed in ``gm.meta["fxrelay_leaves"]``;
* raises :class:`TraceError` with the code location, the reason and the fix when
  the model's own ``forward`` cannot be traced;
* leaves no proxies behind in module caches (efficientformer/levit keep
  attention-bias caches that tracing would otherwise corrupt).

Example:
    >>> import torchvision, fxrelay
    >>> gm = fxrelay.trace(torchvision.models.resnet18())
    >>> [n.target for n in gm.graph.nodes][:4]
    ['x', 'conv1', 'bn1', 'relu']
"""

from __future__ import annotations

import inspect
import linecache
import math
import operator
import os
import traceback
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

__all__ = ["Tracer", "TraceError", "trace", "default_example_input"]

_FX_DIR = os.path.dirname(fx.__file__)
_TORCH_DIR = os.path.dirname(torch.__file__)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_MODE_DEPENDENT = frozenset({
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
})


class TraceError(RuntimeError):
    """The model's own ``forward`` cannot be traced by torch.fx.

    Attributes:
        model_name: class name of the traced model.
        location: ``"file:line"`` of the offending code.
        reason: one-line cause.
    """

    def __init__(self, model_name: str, location: str, code: str, reason: str):
        self.model_name, self.location, self.reason = model_name, location, reason
        super().__init__(
            f"cannot trace {model_name}: {location}: `{code}`: {reason}. "
            "Fix: make that control flow independent of tensor values (torch.where, "
            "shape arithmetic on .shape is fine), or wrap the helper with torch.fx.wrap / "
            "pass it in autowrap_functions=..., or move the code into a submodule "
            "(fxrelay then treats it as a leaf)."
        )


def _timm_leaf_types() -> list[type]:
    try:
        import timm.models  # noqa: F401  (reason: registers every model's notrace modules)
        from timm.layers import get_notrace_modules, norm_act
    except ImportError:  # reason: timm is optional for plain torchvision/user models
        return []
    from timm.layers import DropBlock2d, DropPath

    norm_acts = [
        obj for obj in vars(norm_act).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == norm_act.__name__
    ]
    # reason: DropPath/DropBlock branch on self.training; as leaves they follow the mode at run time
    return list(get_notrace_modules()) + norm_acts + [DropPath, DropBlock2d]


def _timm_autowrap_functions() -> list[Callable]:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return []
    return [f for f in get_notrace_functions() if callable(f)]


def _fxrelay_runtime_functions() -> list[Callable]:
    # reason: pickling a transformed model re-traces its code with the graph's tracer class
    from .outputs import combine_heads
    from .scopes import detach_scope, scoped_stage

    return [combine_heads, detach_scope, scoped_stage]


def _torchvision_leaf_types() -> list[type]:
    import torchvision.ops

    return [
        obj for obj in vars(torchvision.ops).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    ]


class Tracer(fx.Tracer):
    """An fx tracer with timm's and torchvision's leaf modules and wrapped functions.

    Constructible without arguments, so pickled GraphModules re-trace their code
    with the same wrapped functions.

    Args:
        leaf_modules: extra module types to keep as leaves.
        autowrap_functions: extra functions to record as single calls.
        leaf_names: qualified names of submodules to keep as leaves.
    """

    def __init__(
        self,
        leaf_modules: Iterable[type] = (),
        autowrap_functions: Iterable[Callable] = (),
        leaf_names: Iterable[str] = (),
    ):
        import torchvision.ops

        wrapped = _timm_autowrap_functions() + _fxrelay_runtime_functions() + list(autowrap_functions)
        super().__init__(
            autowrap_modules=(math, torchvision.ops),
            autowrap_functions=tuple(wrapped),
            param_shapes_constant=True,
        )
        self.leaf_types = tuple(_timm_leaf_types() + _torchvision_leaf_types() + list(leaf_modules))
        self.leaf_names = frozenset(leaf_names)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            module_qualified_name in self.leaf_names
            or isinstance(m, self.leaf_types)
            or super().is_leaf_module(m, module_qualified_name)
        )

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **more: Any):
        if kind == "call_function" and target in _MODE_DEPENDENT:
            # reason: F.dropout(x, p, training=self.training) would bake the trace-time mode in;
            # a get_attr of `training` reads the mode of the GraphModule that runs it
            bound = inspect.signature(target).bind(*args, **kwargs)
            bound.apply_defaults()
            kwargs = {**bound.arguments, "training": self.create_proxy("get_attr", "training", (), {})}
            args = (kwargs.pop("input"),)
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # reason: the first frame to see the exception is the innermost failing module
            if not hasattr(e, "_fxrelay_module"):
                e._fxrelay_module = next((n for n, mod in self.root.named_modules() if mod is m), "")
            raise


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A random batch of one for ``model``: timm's ``pretrained_cfg['input_size']``
    when the model has one, else ``(1, 3, 224, 224)``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    param = next(model.parameters(), None)
    device = param.device if param is not None else "cpu"
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device)


def trace(
    model: nn.Module,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> fx.GraphModule:
    """Trace ``model`` in its current train/eval mode into a GraphModule sharing its parameters.

    Args:
        model: any ``nn.Module``; timm and torchvision models need no options.
        example_input: only its arity matters here (one tensor or a tuple of tensors);
            ``forward`` arguments beyond it that have defaults are bound to them.
        leaf_modules: extra module types not to trace through.
        autowrap_functions: extra functions to record as single calls
            (for helpers with Python control flow on tensor values).

    Returns:
        The GraphModule; ``gm.meta["fxrelay_leaves"]`` lists submodules that were
        made leaves because their code could not be traced.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        TraceError: the model's own ``forward`` cannot be traced.

    Tracing tips:
        * ``if x.sum() > 0`` or ``int(x.size(1) * r)`` inside a submodule only makes
          that submodule a leaf (coarser partition there); in the top-level
          ``forward`` it is an error, and the message says where.
        * Pass a helper with tensor-dependent control flow in ``autowrap_functions``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxrelay.trace expects an nn.Module, got {type(model).__name__}")
    n_inputs = len(example_input) if isinstance(example_input, (tuple, list)) else 1
    concrete_args = _defaulted_args(model, n_inputs)
    leaf_names: list[str] = []
    while True:
        tracer = Tracer(leaf_modules, autowrap_functions, leaf_names)
        try:
            with _restored_module_state(model):
                graph = tracer.trace(model, concrete_args=concrete_args)
                _bind_concrete_args(graph, n_inputs)
                # reason: inside the block, so the graph keeps the tensor constants fx stored on the model
                gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        except Exception as e:  # noqa: BLE001  (reason: any failure becomes a leaf or a TraceError)
            failing = getattr(e, "_fxrelay_module", "")
            if not failing or failing in leaf_names:
                raise _trace_error(model, e) from None
            leaf_names.append(failing)
            continue
        break
    gm.meta["fxrelay_leaves"] = tuple(leaf_names)
    return gm


def _bind_concrete_args(graph: fx.Graph, n_inputs: int) -> None:
    """Replace the placeholders fx keeps for ``concrete_args`` by their values.

    fx guards each bound argument with an assertion; dropping both leaves a graph whose
    only inputs are the model's real inputs.
    """
    for placeholder in [n for n in graph.nodes if n.op == "placeholder"][n_inputs:]:
        value = placeholder.args[0] if placeholder.args else None
        for user in list(placeholder.users):
            if _is_guard(user):
                _erase_guard(graph, user)
            else:
                user.args = fx.node.map_arg(user.args, lambda n: value if n is placeholder else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is placeholder else n)
        graph.erase_node(placeholder)


def _is_guard(node: fx.Node) -> bool:
    if node.target is fx._symbolic_trace._assert_is_none:
        return True
    return node.target is operator.eq and all(u.target is torch._assert for u in node.users)


def _erase_guard(graph: fx.Graph, node: fx.Node) -> None:
    for user in list(node.users):
        graph.erase_node(user)
    graph.erase_node(node)


def _defaulted_args(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    return concrete


class _restored_module_state:
    """Undo attribute writes that tracing makes to modules (caches that stored proxies)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = []
        for m in self.model.modules():
            attrs = {k: v for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
            containers = {k: (list(v) if isinstance(v, list) else dict(v))
                          for k, v in attrs.items() if isinstance(v, (dict, list))}
            self.saved.append((m, attrs, containers))
        return self

    def __exit__(self, *exc):
        for m, attrs, containers in self.saved:
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():
                if vars(m).get(k) is not v:
                    object.__setattr__(m, k, v)
                if k in containers:
                    v.clear()
                    v.extend(containers[k]) if isinstance(v, list) else v.update(containers[k])
        return False


def _trace_error(model: nn.Module, e: BaseException) -> TraceError:
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if not f.filename.startswith((_FX_DIR, os.path.dirname(__file__)))]
    frame = user[-1] if user else frames[-1]
    code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TraceError(type(model).__name__, f"{frame.filename}:{frame.lineno}", code, reason)
