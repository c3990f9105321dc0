"""Pass 1: symbolic tracing that honours timm's and torchvision's fx conventions.

:func:`trace` turns any ``nn.Module`` into a :class:`torch.fx.GraphModule` that shares
its parameters. The tracer:

* keeps timm's registered leaf modules (``timm.layers.get_notrace_modules``), its
  norm+act layers (``BatchNormAct2d`` and friends: BN, activation and drop are one unit
  for folding) and torchvision's ``ops`` modules as leaves, and wraps timm's untraceable
  helper functions, so the 98% of timm families that fx can handle trace;
* takes one :class:`~fxrelay.TracingConfig` (extra leaf modules, autowrap functions,
  leaf names, concrete arguments) that every fxrelay entry point accepts, plus what
  :func:`register_leaf` and :func:`register_autowrap` registered;
* binds every ``forward`` argument that has a default to that default, so a
  ``forward(x, mask=None)`` records the ``mask is None`` branch instead of turning
  ``mask`` into an input;
* falls back to an *auto-leaf*: when tracing fails inside a submodule (Python control
  flow on tensor values), that innermost submodule becomes a leaf and tracing is
  retried; the leaves found this way are listed in ``gm.meta["fxrelay_leaves"]``;
* makes every read that follows an in-place op read that op's result (``v = u.mul_(2)``,
  then ``f(u)`` becomes ``f(v)``): the graph's data flow then shows the order the
  in-place op imposes, so cutting it between stages keeps the model's semantics;
* raises :class:`TraceError` with the code location, the reason and the fix when the
  model's own ``forward`` cannot be traced;
* leaves no proxies behind in module caches (efficientformer/levit keep
  attention-bias caches that tracing would otherwise corrupt).

Example:
    >>> import torchvision, fxrelay
    >>> gm = fxrelay.trace(torchvision.models.resnet18())
    >>> [n.target for n in gm.graph.nodes][:4]
    ['x', 'conv1', 'bn1', 'relu']
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import linecache
import math
import operator
import os
import traceback
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import timm.models  # noqa: F401  (reason: importing the models registers their notrace modules and functions)
import torch
import torch.fx as fx
import torchvision.ops
from timm.layers import DropBlock2d, DropPath, get_notrace_functions, get_notrace_modules, norm_act
from torch import nn
from torch.nn import functional as F

from ..core._compat import ASSERT_IS_NONE, TORCH_ASSERT, autowrap
from ..core.ir import TracingConfig
from .example_input import default_example_input

__all__ = ["Tracer", "GeneratedCodeTracer", "TraceError", "TracingConfig", "trace", "default_example_input", "register_leaf",
           "register_autowrap", "tracing_config", "module_path", "did_you_mean", "as_inputs", "DROPOUT_FUNCTIONS",
           "ExampleInput", "check_module", "mutates_input"]

ExampleInput = torch.Tensor | Sequence[torch.Tensor]
_FX_DIR = os.path.dirname(fx.__file__)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_RUNTIME_TRAINING_DROPOUTS = frozenset({  # reason: their `training` argument is read at run time
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
})
DROPOUT_FUNCTIONS = _RUNTIME_TRAINING_DROPOUTS | {
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
}
_registered_leaves: list[type[nn.Module]] = []
_registered_functions: list[Callable] = []
_T = TypeVar("_T")


def register_leaf(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: fxrelay never traces through modules of this type (like timm's
    ``register_notrace_module``). Use it for modules with Python control flow on tensor values.

    >>> @register_leaf
    ... class Gate(nn.Module):
    ...     def forward(self, x):
    ...         return x if x.sum() > 0 else -x
    >>> Gate in Tracer().leaf_types
    True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_leaf decorates nn.Module subclasses, got {cls!r}")
    _registered_leaves.append(cls)
    return cls


def register_autowrap(fn: _T) -> _T:
    """Function decorator: fxrelay records calls of ``fn`` as single graph nodes (like timm's
    ``register_notrace_function``). Use it for helpers with Python control flow on tensor values.

    As with torch.fx's ``autowrap_functions``, ``fn`` must be a module-level function of
    the module whose code calls it (fx patches module globals, not closures). A private
    name (``_helper``), which fx's autowrap skips, is registered with :func:`torch.fx.wrap`
    instead: its calls are then single nodes in every torch.fx trace, not only fxrelay's.

    Raises:
        TypeError: ``fn`` is not callable, or is a private function that is not module-level.
    """
    if not callable(fn):
        raise TypeError(f"register_autowrap decorates functions, got {fn!r}")
    name = getattr(fn, "__name__", "")
    if name.startswith("_"):
        if getattr(fn, "__qualname__", None) != name or not hasattr(fn, "__globals__"):
            raise TypeError(f"register_autowrap({name}): torch.fx wraps a private function only when it is "
                            "defined at module level; move it to the top level of its module")
        # reason: fx's autowrap skips private names; fx.wrap patches any name but must be called from the
        # module's top level, which exec in the module's globals is
        exec("wrap(name)", fn.__globals__, {"wrap": fx.wrap, "name": name})  # noqa: S102
    _registered_functions.append(fn)
    return fn


def tracing_config(tracing: TracingConfig | None = None, *, leaf_modules: Iterable[type] = (),
                   autowrap_functions: Iterable[Callable] = ()) -> TracingConfig:
    """``tracing`` (default: the empty configuration) with extra leaf modules and autowrap functions."""
    base = tracing if tracing is not None else TracingConfig()
    if not isinstance(base, TracingConfig):
        raise TypeError(f"tracing must be a fxrelay.TracingConfig, got {type(base).__name__}")
    return dataclasses.replace(base, leaf_modules=(*base.leaf_modules, *leaf_modules),
                               autowrap_functions=(*base.autowrap_functions, *autowrap_functions))


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
            "shape arithmetic on .shape is fine), or decorate the helper with @fxrelay.register_autowrap "
            "(or pass tracing=fxrelay.TracingConfig(autowrap_functions=[...])), or move the code into a "
            "submodule (fxrelay then treats it as a leaf; @fxrelay.register_leaf makes that explicit)."
        )


def _leaf_types() -> tuple[type, ...]:
    norm_acts = [obj for obj in vars(norm_act).values()
                 if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == norm_act.__name__]
    torchvision_ops = [obj for obj in vars(torchvision.ops).values()
                       if isinstance(obj, type) and issubclass(obj, nn.Module)]
    # reason: DropPath/DropBlock branch on self.training; as leaves they follow the mode at run time
    return (*get_notrace_modules(), *norm_acts, DropPath, DropBlock2d, *torchvision_ops, *_registered_leaves)


class Tracer(fx.Tracer):
    """An fx tracer with timm's and torchvision's leaf modules and wrapped functions.

    Constructible without arguments, so pickled GraphModules re-trace their code with
    the same wrapped functions (those registered with :func:`register_autowrap` too).

    Args:
        config: extra leaves and wrapped functions.
        leaf_names: qualified names of submodules to keep as leaves (auto-leaves).
    """

    def __init__(self, config: TracingConfig = TracingConfig(), leaf_names: Iterable[str] = ()):
        wrapped = [f for f in get_notrace_functions() if callable(f)] + _registered_functions
        super().__init__(autowrap_modules=(math, torchvision.ops),
                         autowrap_functions=(*wrapped, *config.autowrap_functions), param_shapes_constant=True)
        self.leaf_types = (*_leaf_types(), *config.leaf_modules)
        self.leaf_names = frozenset((*config.leaf_names, *leaf_names))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, module_qualified_name))

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **more: Any):
        if kind == "call_function" and target in _RUNTIME_TRAINING_DROPOUTS:
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


class GeneratedCodeTracer(Tracer):
    """The tracer class of the graphs fxrelay generates (stages, the staged model).

    Unpickling a GraphModule re-traces its generated code; every function that code
    calls was one node when the graph was made, so it stays one node: no tracing
    configuration (autowrap functions of a single call) needs to be known then.
    """

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        forward = getattr(root, "forward", root)
        code_globals = getattr(forward, "__func__", forward).__globals__
        autowrap(self, [f for f in code_globals.values() if inspect.isfunction(f)])
        return super().trace(root, concrete_args)


def as_inputs(example_input: ExampleInput) -> tuple[torch.Tensor, ...]:
    """Normalise one tensor or a sequence of tensors to a tuple."""
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def trace(
    model: nn.Module,
    example_input: ExampleInput | None = None,
    *,
    tracing: TracingConfig | None = None,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable] = (),
) -> fx.GraphModule:
    """Trace ``model`` in its current train/eval mode into a GraphModule sharing its parameters.

    Args:
        model: any ``nn.Module``; timm and torchvision models need no options.
        example_input: only its arity matters here (one tensor or a tuple of tensors);
            ``forward`` arguments beyond it that have defaults are bound to them.
        tracing: the tracing configuration (leaf modules, autowrap functions, leaf
            names, concrete arguments).
        leaf_modules, autowrap_functions: shorthands added to ``tracing``.

    Returns:
        The GraphModule; ``gm.meta["fxrelay_leaves"]`` lists submodules that were
        made leaves because their code could not be traced.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``forward`` needs more arguments than ``example_input`` gives.
        TraceError: the model's own ``forward`` cannot be traced.

    Tracing tips:
        * ``if x.sum() > 0`` or ``int(x.size(1) * r)`` inside a submodule only makes
          that submodule a leaf (coarser partition there); in the top-level
          ``forward`` it is an error, and the message says where.
        * Decorate a helper with tensor-dependent control flow with
          :func:`register_autowrap`, or pass it in ``autowrap_functions``.
    """
    check_module(model, "trace")
    config = tracing_config(tracing, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    n_inputs = len(as_inputs(example_input)) if example_input is not None else 1
    concrete_args = _concrete_args(model, n_inputs, config)
    leaf_names: list[str] = []
    while True:
        tracer = Tracer(config, leaf_names)
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
    _read_after_inplace(gm)
    gm.meta["fxrelay_leaves"] = tuple(leaf_names)
    return gm


def mutates_input(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` writes into its first argument (``relu_``, ``inplace=True``, ...);
    ``modules``: the graph module's ``dict(gm.named_modules())``."""
    if node.op == "call_module":
        return getattr(modules[node.target], "inplace", False) is True
    if node.kwargs.get("inplace") is True:
        return True
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def _read_after_inplace(gm: fx.GraphModule) -> None:
    """Make every read of a tensor after an in-place op on it read the op's result (the same tensor)."""
    latest: dict[fx.Node, fx.Node] = {}  # reason: a mutated value -> the node whose result it now is
    changed, modules = False, dict(gm.named_modules())
    for node in gm.graph.nodes:
        if latest:
            args = fx.node.map_arg(node.args, lambda n: latest.get(n, n))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: latest.get(n, n))
            changed |= args != node.args or kwargs != node.kwargs
            node.args, node.kwargs = args, kwargs
        if node.op != "output" and node.args and isinstance(node.args[0], fx.Node) and mutates_input(node, modules):
            target = node.args[0]
            for value in [v for v, now in latest.items() if now is target] + [target]:
                latest[value] = node
    if changed:
        gm.recompile()


def check_module(model: Any, entry_point: str) -> None:
    """The one check every entry point makes of its model argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxrelay.{entry_point} expects an nn.Module, got {type(model).__name__}")


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
    if node.target is ASSERT_IS_NONE:
        return True
    return node.target is operator.eq and all(u.target is TORCH_ASSERT for u in node.users)


def _erase_guard(graph: fx.Graph, node: fx.Node) -> None:
    for user in list(node.users):
        graph.erase_node(user)
    graph.erase_node(node)


def _concrete_args(model: nn.Module, n_inputs: int, config: TracingConfig) -> dict[str, Any]:
    """Every ``forward`` argument beyond the inputs, bound to the configuration's value or its default."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in config.concrete_args:
            concrete[p.name] = config.concrete_args[p.name]
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
        else:
            names = ", ".join(q.name for q in params[:n_inputs + 1])
            raise ValueError(f"{type(model).__name__}.forward needs the argument {p.name!r} besides the "
                             f"{n_inputs} input(s) given: pass example_input=({names}) as a tuple, or bind it "
                             f"with tracing=fxrelay.TracingConfig(concrete_args={{{p.name!r}: ...}})")
    unknown = set(config.concrete_args) - {p.name for p in params}
    if unknown:
        raise ValueError(f"concrete_args names no argument of {type(model).__name__}.forward: "
                         f"{sorted(unknown)}{did_you_mean(sorted(unknown)[0], [p.name for p in params])}")
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


def module_path(node: fx.Node) -> tuple[str, ...]:
    """The qualified name of the innermost module a traced node belongs to, split at dots.

    >>> import torchvision, fxrelay
    >>> gm = fxrelay.trace(torchvision.models.resnet18())
    >>> module_path(next(n for n in gm.graph.nodes if n.name == "layer1_0_conv1"))
    ('layer1', '0', 'conv1')
    """
    stack = node.meta.get("nn_module_stack")
    if stack:
        qualname = list(stack.values())[-1][0]
    else:
        qualname = node.target if node.op == "call_module" else ""
    return tuple(qualname.split(".")) if qualname else ()


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, case-insensitively, or ``""``.

    >>> did_you_mean("RELAY", ["relay", "greedy"])
    " (did you mean 'relay'?)"
    """
    choices = list(choices)
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
