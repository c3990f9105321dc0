"""Pass 4: rewrite a model for relay / greedy / deep / standard training.

:func:`transform` partitions the model, places the heads
(:func:`~fxrelay.passes.heads.assign_heads`, the pure heart), and emits a
``torch.fx.GraphModule`` whose code is a short sequence of stage calls, head calls and
gradient-scope calls (see docs/architecture.md for a whole one):

    >>> import fxrelay, torchvision
    >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10))
    >>> print(model.code.strip())  # doctest: +ELLIPSIS
    def forward(self, x):
        stem = self.stages.stem(x);  x = None
        layer1 = self.stages.layer1(stem);  stem = None
        layer2 = self.overlaps.layer2(layer1);  layer1 = None
        layer2_c0 = layer2.c0
        layer2_c2 = layer2.c2;  layer2 = None
        aux_layer2 = self.heads.layer2(layer2_c0);  layer2_c0 = None
        layer3 = self.overlaps.layer3(layer2_c2);  layer2_c2 = None
        layer3_c2 = layer3.c2
        layer3_c3 = layer3.c3;  layer3 = None
        aux_layer3 = self.heads.layer3(layer3_c2);  layer3_c2 = None
        layer4 = self.stages.layer4(layer3_c3);  layer3_c3 = None
        output = fxrelay_combine_heads(layer4, aux = (aux_layer2, aux_layer3), weights = (1.0, 1.0, 1.0));  ...
        return output

Modes (``S`` stages, head ``j`` reads stage ``a_j`` with loss weight ``w_j``, and its
loss trains the stages ``[lo_j, a_j]``):

* ``relay``: ``lo_j = a_j - window + 1``; the lowest head reaches stage 0;
* ``greedy``: ``lo_j = a_j`` (every stage trained by its own head only);
* ``deep``: ``lo_j = 0`` (every loss reaches the input);
* ``standard``: no aux heads; the model computes exactly what the original does.

For every parameter ``p`` of stage ``s``: ``grad(p) = sum_{j: lo_j <= s <= a_j}
w_j dL_j/dp``, in one ``loss.backward()`` over one forward pass.

The result shares parameters with the input model (training it trains the input
model's parameters); the input model is not otherwise modified. Its state dict has
the keys ``stages.<name>.*`` and ``heads.<name>.*``; :func:`original_state_dict` maps the
weights back to the input model's keys.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Iterable, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from ..core._compat import USER_PRESERVED_ATTRIBUTES_KEY
from ..core.choices import EXECUTIONS
from ..core.events import transformed
from ..core.ir import TracingConfig
from ..core.modules import AuxHead, ModuleSeq, training_mode
from ..core.outputs import OutputPath
from ..core.plan import Plan
from .analysis import saved_bytes_per_sample
from .emit import StagedModule, staged_module
from .downstream import build_head
from .heads import HeadFactory, assign_heads, check_mode, describe_head, head_flops, kind_name
from .introspect import model_aux_heads, num_classes_of, output_path
from .partition import partition
from .split import split_stages
from .tracing import ExampleInput, check_module, default_example_input, did_you_mean, tracing_config

__all__ = ["transform", "plan_of", "is_transformed", "original_state_dict", "head_parameters",
           "recompute_view", "check_execution_name"]

_STATE = "fxrelay_state"


@dataclasses.dataclass
class _State:
    plan: Plan
    original_keys: dict[str, str]  # reason: input model's state-dict key -> transformed model's key


def transform(
    model: nn.Module,
    mode: str = "relay",
    *,
    window: int = 2,
    head_stages: Union[str, Sequence[int]] = "auto",
    head_kind: Union[str, HeadFactory] = "auto",
    aux_weight: float | None = None,
    skip_first: int = 2,
    boundaries: str = "auto",
    num_stages: int | None = None,
    balance: str = "auto",
    example_input: ExampleInput | None = None,
    num_classes: int | None = None,
    output: Union[str, int, OutputPath, None] = None,
    recompute: bool = False,
    execution: str = "one-line",
    optimizer: torch.optim.Optimizer | None = None,
    tracing: TracingConfig | None = None,
    **removed: Any,
) -> fx.GraphModule:
    """Rewrite ``model`` to train with Relay BP, greedy, deep or standard backprop.

    Build the optimizer after this call (its parameters include the new heads), or
    pass the one you have as ``optimizer=``.

    Args:
        model: any traceable ``nn.Module`` (timm, torchvision, your own).
        mode: ``"relay"``, ``"greedy"``, ``"deep"`` or ``"standard"``.
        window: relay window: how many stages below and including its head a loss trains.
        head_stages: where the aux heads go: ``"auto"`` (every stage but the first
            ``skip_first`` and the last; greedy: every stage but the last), a list of
            stage indices, or ``"model"``: the model's own aux classifiers (GoogLeNet,
            Inception-v3) are the heads, and a stage ends where each reads its features.
        head_kind: what the aux heads are (see :mod:`fxrelay.passes.heads`), or
            ``factory(feature_shape, num_classes)``.
        aux_weight: loss weight of every aux head (the main head has weight 1); default: 1.0
            for relay and greedy (a greedy stage's only gradient is its head's), 0.3 for deep.
        skip_first: stages without an aux head at the bottom (Relay BP: 2).
        boundaries, num_stages, balance, example_input: passed to :func:`fxrelay.partition`.
        num_classes: classes of the aux heads (default: the model's classifier's).
        output: for a model returning a dict, tuple, namedtuple or dataclass, which leaf
            is the classifier output that carries the heads: a key, an index, or a
            tuple of them (default: the only 2-D tensor leaf).
        recompute: keep only the stage boundaries for backward and recompute each stage
            and head there (stage recompute: gradients unchanged, one more forward,
            far less memory; in greedy mode each stage's recompute and backward is local).
            ``checkpoint=`` is its deprecated name. The same as ``execution="recompute"``.
        execution: how the model will train (:data:`fxrelay.core.choices.EXECUTIONS`):
            ``"one-line"``, ``"recompute"``, ``"local"`` (:class:`fxrelay.LocalStep`) or
            ``"sequential"``. With ``num_stages`` and ``balance="auto"``, the memory
            executions get the boundaries that minimise their peak (``balance="recompute"``),
            the one-line step stages even in FLOPs and saved bytes. Recorded in the plan;
            :class:`fxrelay.Recipe` trains with it by default. The gradients are the same
            whichever execution runs the model.
        optimizer: an optimizer already built on ``model.parameters()``: the heads'
            parameters are added to it as a new parameter group.
        tracing: the tracing configuration (see :class:`fxrelay.TracingConfig`).

    Returns:
        A GraphModule with submodules ``stages`` and ``heads`` (indexable:
        ``model.stages[2]``, ``model.heads[0]``); in train mode its output carries
        every head (:class:`~fxrelay.HeadOutputs`), in eval mode it is the plain output.

    Raises:
        ValueError: an argument out of its range (the message gives it), an unknown
            mode or head kind, ``num_classes`` not inferable, an ambiguous structured
            output, or ``model`` already transformed.
    """
    check_module(model, "transform")
    if is_transformed(model):
        raise ValueError("model is already transformed by fxrelay.transform; transform the original model "
                         "(fxrelay.plan_of(model) shows the current plan)")
    recompute, execution = _execution(_renamed(removed, recompute), execution, mode)
    _check_arguments(mode, window, head_stages, head_kind, aux_weight, skip_first, num_classes)
    config = tracing_config(tracing)
    own = _own_heads(model, example_input, config) if head_stages == "model" else {}
    with training_mode(model, False):  # reason: the inference graph; aux-logit branches stay out
        # reason: the memory executions get the boundaries of the smallest peak
        balance = "recompute" if execution != "one-line" and balance == "auto" else balance
        plan = partition(model, boundaries, num_stages, example_input, balance=balance, tracing=config,
                         cut_after=list(own.values()))
    plan = dataclasses.replace(plan, output=output_path(plan, output))
    if own:
        stage_of = {s.outputs[-1]: s.index for s in plan.stages}
        head_stages, head_kind = [stage_of[name] for name in own.values()], "model"
    plan = dataclasses.replace(plan, mode=mode, recompute=recompute, execution=execution, heads=assign_heads(
        len(plan.stages), mode, window=window, head_stages=head_stages, skip_first=skip_first,
        aux_weight=aux_weight, kind=kind_name(head_kind)))
    bodies = [model.get_submodule(name) for name in own] or _new_heads(model, plan, head_kind, num_classes)
    plan = _with_head_figures(plan, bodies)
    _warn_degenerate(plan, mode, window, explicit=not isinstance(head_stages, str))
    staged = _build(model, plan, [AuxHead(b) for b in bodies])
    if optimizer is not None:
        optimizer.add_param_group({"params": head_parameters(staged)})
    return staged


def _own_heads(model: nn.Module, example_input: ExampleInput | None, config: TracingConfig) -> dict[str, str]:
    """``head_stages="model"``: the model's own aux classifiers, each by its module name, with the fx
    node whose output it reads (a stage ends there)."""
    example = default_example_input(model) if example_input is None else example_input
    return model_aux_heads(model, example, tracing=config)


def _with_head_figures(plan: Plan, bodies: list[nn.Module]) -> Plan:
    """``plan`` with each aux head's FLOPs, layers, parameters and saved bytes, measured on its body."""
    return dataclasses.replace(plan, heads=tuple(
        h if h.is_main else dataclasses.replace(h, flops=head_flops(body, plan.stages[h.stage].shape),
                                                layers=describe_head(body),
                                                params=sum(p.numel() for p in body.parameters()),
                                                saved_bytes=saved_bytes_per_sample(body, plan.stages[h.stage].shape))
        for h, body in zip(plan.heads, [*bodies, None])))


_REMOVED = {"heads": "head_stages", "head": "head_kind"}


def _renamed(removed: dict[str, Any], recompute: bool) -> bool:
    """``recompute`` from its deprecated name ``checkpoint=``; a one-line TypeError for removed names."""
    for old, new in _REMOVED.items():
        if old in removed:
            raise TypeError(f"transform({old}=...) was removed; use {new}=...")
    unknown = set(removed) - {"checkpoint"}
    if unknown:
        raise TypeError(f"transform() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    if "checkpoint" not in removed:
        return recompute
    warnings.warn("transform(checkpoint=...) is deprecated; use recompute=...", DeprecationWarning, stacklevel=3)
    if recompute:
        raise ValueError("pass either checkpoint= (deprecated) or recompute=, not both")
    return bool(removed["checkpoint"])


def check_execution_name(execution: str) -> None:
    """Raise a ``ValueError`` with a hint unless ``execution`` is one of :data:`EXECUTIONS`."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}"
                         f"{did_you_mean(execution, EXECUTIONS)}")


def _execution(recompute: bool, execution: str, mode: str) -> tuple[bool, str]:
    """``(recompute, execution)`` made consistent: ``recompute=True`` is the recompute execution."""
    check_execution_name(execution)
    if execution == "sequential" and mode != "greedy":
        raise ValueError(f"execution='sequential' trains stage by stage, each stage with its own head: "
                         f"use mode='greedy' (got {mode!r}), or execution='local'")
    if recompute and execution not in ("one-line", "recompute"):
        raise ValueError(f"recompute=True is execution='recompute'; execution={execution!r} runs the stages "
                         "itself: pass one of them")
    execution = "recompute" if recompute else execution
    return execution == "recompute", execution


def _is_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _check_arguments(mode: str, window: Any, head_stages: Any, kind: Any, aux_weight: Any, skip_first: Any,
                     num_classes: Any) -> None:
    """One-line ``ValueError`` for every argument outside its range."""
    check_mode(mode)
    if not _is_int(window) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if not _is_int(skip_first) or skip_first < 0:
        raise ValueError(f"skip_first must be an integer >= 0, got {skip_first!r}")
    if aux_weight is not None and not _is_weight(aux_weight):
        raise ValueError(f"aux_weight must be a finite number >= 0 or None, got {aux_weight!r}")
    if num_classes is not None and (not _is_int(num_classes) or num_classes < 1):
        raise ValueError(f"num_classes must be an integer >= 1 or None, got {num_classes!r}")
    if isinstance(head_stages, str):
        if head_stages not in ("auto", "model"):
            raise ValueError(f"head_stages must be 'auto', 'model' or a list of stage indices, got {head_stages!r}")
    elif not isinstance(head_stages, Iterable) or not all(_is_int(h) for h in head_stages):
        raise ValueError(f"head_stages must be 'auto', 'model' or a list of integer stage indices, "
                         f"got {head_stages!r}")
    if not callable(kind) and not isinstance(kind, str):
        raise ValueError(f"head_kind must be a head name or a callable, got {kind!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _warn_degenerate(plan: Plan, mode: str, window: int, explicit: bool) -> None:
    """Warn where the asked mode does not train as its name says."""
    n = len(plan.stages)
    if mode == "relay" and not plan.aux_heads:
        warnings.warn(f"relay on {plan.model_name}: its {n} stages leave no stage for an aux head "
                      "(none on the first skip_first stages or the last), so this trains like mode='standard'; "
                      "pass num_stages=, skip_first= or head_stages=", UserWarning, stacklevel=3)
    if mode == "relay" and window >= n and plan.aux_heads:
        warnings.warn(f"relay with window={window} on {n} stages: every loss reaches stage 0, which is "
                      "mode='deep'; pass a smaller window", UserWarning, stacklevel=3)
    untrained = [s.index for s in plan.stages if not any(h.span[0] <= s.index <= h.span[1] for h in plan.heads)]
    if untrained and mode != "standard":
        hint = "add heads there or widen the window" if explicit else "pass head_stages= or a wider window"
        warnings.warn(f"{mode} on {plan.model_name}: no loss trains stage(s) {untrained}; their parameters get no "
                      f"gradient ({hint})", UserWarning, stacklevel=3)


def _new_heads(model: nn.Module, plan: Plan, kind: Union[str, HeadFactory], num_classes: int | None
               ) -> list[nn.Module]:
    """One new head per aux head of ``plan``, on the model's device and dtype."""
    if not plan.aux_heads:
        return []
    classes = num_classes_of(model, plan, num_classes)
    p = next(model.parameters(), None)
    placement = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    return [build_head(kind, model, plan, h.stage, classes).to(**placement) for h in plan.aux_heads]


def _build(model: nn.Module, plan: Plan, head_modules: list[nn.Module]) -> StagedModule:
    root = nn.Module()
    root.stages = ModuleSeq({s.name: m for s, m in zip(plan.stages, split_stages(plan))})
    root.heads = ModuleSeq({plan.stages[h.stage].name: m for h, m in zip(plan.aux_heads, head_modules)})
    keys = _original_keys(model, root)
    unused = {k: v for k, v in model.state_dict().items() if k not in keys}
    unused_state = None
    if unused:  # reason: state the forward never reads still moves with .to(), saves and loads
        unused_state = nn.Module()
        for i, (key, value) in enumerate(unused.items()):
            unused_state.register_buffer(f"t{i}", value.detach())
            keys[key] = f"unused_state.t{i}"
    gm = staged_module(plan, root.stages, root.heads, f"{type(model).__name__}_{plan.mode}", unused_state)
    gm.train(model.training)
    state = _State(plan, keys)
    setattr(gm, _STATE, state)
    gm.meta[USER_PRESERVED_ATTRIBUTES_KEY] = {_STATE: state}
    transformed(gm)  # reason: the layers above subscribed (fxrelay.train.guards warns about optimizers)
    return gm


def recompute_view(model: nn.Module) -> nn.Module:
    """The same model (the same stage and head modules, so the same parameters and buffers) running
    with stage recompute, as ``transform(..., recompute=True)`` would have made it; ``model``
    itself when it already recomputes."""
    state = _state_of(model)
    if state.plan.recompute:
        return model
    plan = dataclasses.replace(state.plan, recompute=True)
    view = staged_module(plan, model.stages, model.heads, f"{type(model).__name__}_recompute",
                         getattr(model, "unused_state", None))
    view.train(model.training)
    view_state = _State(plan, state.original_keys)
    setattr(view, _STATE, view_state)
    view.meta[USER_PRESERVED_ATTRIBUTES_KEY] = {_STATE: view_state}
    return view


def is_transformed(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`transform`."""
    return isinstance(getattr(model, _STATE, None), _State)


def plan_of(model: nn.Module) -> Plan:
    """The Plan of a transformed model, with its heads and windows.

    Raises:
        TypeError: ``model`` was not made by :func:`transform`.
    """
    return _state_of(model).plan


def _state_of(model: nn.Module) -> _State:
    if not is_transformed(model):
        raise TypeError(f"{type(model).__name__} was not made by fxrelay.transform")
    return getattr(model, _STATE)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the aux heads :func:`transform` added (give them to your optimizer)."""
    _state_of(model)
    return list(model.heads.parameters())


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformed model's weights under the input model's state-dict keys.

    Loads with ``strict=True`` into a fresh instance of the input architecture.
    """
    state = _state_of(model)
    current = model.state_dict()
    return {k: current[v] for k, v in state.original_keys.items()}


def _original_keys(model: nn.Module, transformed: nn.Module) -> dict[str, str]:
    by_id = {}
    for key, value in transformed.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), key)
    return {k: by_id[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in by_id}


