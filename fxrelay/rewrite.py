"""Pass 4: rewrite a model for relay / greedy / deep / standard training.

:func:`transform` partitions the model, places the heads (:func:`assign_heads`, the
pure heart), and emits a ``torch.fx.GraphModule`` whose code is a short sequence of
stage calls, head calls and gradient-scope calls:

    >>> import fxrelay, torchvision
    >>> model = fxrelay.transform(torchvision.models.resnet18(num_classes=10))
    >>> print(model.code.strip())  # doctest: +ELLIPSIS
    def forward(self, x):
        stages_0 = getattr(self.stages, "0")(x);  x = None
        stages_1 = getattr(self.stages, "1")(stages_0);  stages_0 = None
        stages_2 = getattr(self.stages, "2")
        scoped_stage = fxrelay_scopes_scoped_stage(stages_2, (0, 2), ((0,),), stages_1);  stages_2 = stages_1 = None
        ...
        heads_0 = getattr(self.heads, "0")(getitem);  getitem = None
        heads_1 = getattr(self.heads, "1")(getitem_2);  getitem_2 = None
        combine_heads = fxrelay_outputs_combine_heads(stages_4, (heads_0, heads_1), (0.3, 0.3, 1.0));  ...
        return combine_heads

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
the keys ``stages.{i}.*`` and ``heads.{j}.*``; :func:`original_state_dict` maps the
weights back to the input model's keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import operator
from typing import Iterator, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .heads import AuxHead, HeadFactory, head_flops, head_kind, make_head
from .outputs import combine_heads
from .partition import partition
from .plan import Head, Plan
from .scopes import StageScope, detach_scope, gradient_channels, producing_stages, scoped_stage
from .trace import Tracer, default_example_input, trace

__all__ = ["MODES", "transform", "assign_heads", "model_aux_heads", "plan_of", "is_transformed",
           "original_state_dict"]

MODES = ("relay", "greedy", "deep", "standard")
_STATE = "fxrelay_state"


@dataclasses.dataclass
class _State:
    plan: Plan
    original_keys: dict[str, str]  # reason: input model's state-dict key -> transformed model's key
    unused_state: dict[str, torch.Tensor]


def assign_heads(num_stages: int, mode: str, *, window: int = 2, heads: Union[str, Sequence[int]] = "auto",
                 skip_first: int = 2, aux_weight: float = 0.3, kind: str = "auto") -> tuple[Head, ...]:
    """Place the heads and their windows: the pure heart of :func:`transform`.

    Example:
        >>> [h.window for h in assign_heads(5, "relay", window=2)]
        [(0, 2), (2, 3), (3, 4)]
        >>> [h.window for h in assign_heads(5, "greedy")]
        [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    """
    _check_mode(mode)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    stages = _aux_stages(num_stages, mode, heads, skip_first)
    lows = []
    for rank, a in enumerate(stages + [num_stages - 1]):
        lo = {"relay": max(0, a - window + 1), "greedy": a, "deep": 0, "standard": 0}[mode]
        lows.append(0 if mode == "relay" and rank == 0 else lo)
    return tuple(
        Head(index=j, stage=a, window=(lo, a), weight=1.0 if j == len(stages) else aux_weight,
             kind="main" if j == len(stages) else kind)
        for j, (a, lo) in enumerate(zip(stages + [num_stages - 1], lows))
    )


def _aux_stages(num_stages: int, mode: str, heads: Union[str, Sequence[int]], skip_first: int) -> list[int]:
    if mode == "standard":
        return []
    if isinstance(heads, str):
        if heads != "auto":
            raise ValueError(f"heads must be 'auto', 'model' or a list of stage indices, got {heads!r}")
        first = 0 if mode == "greedy" else skip_first
        return list(range(first, num_stages - 1))
    chosen = sorted(set(int(h) for h in heads))
    bad = [h for h in chosen if not 0 <= h < num_stages - 1]
    if bad:
        raise ValueError(f"head stages must be in 0..{num_stages - 2} (the last stage, {num_stages - 1}, "
                         f"has the model's own classifier), got {bad}")
    return chosen


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        close = difflib.get_close_matches(str(mode), MODES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}{hint}")


def transform(
    model: nn.Module,
    mode: str = "relay",
    *,
    window: int = 2,
    heads: Union[str, Sequence[int]] = "auto",
    head: Union[str, HeadFactory] = "auto",
    aux_weight: float = 0.3,
    skip_first: int = 2,
    boundaries: str = "auto",
    num_stages: int | None = None,
    example_input: torch.Tensor | Sequence[torch.Tensor] | None = None,
    num_classes: int | None = None,
) -> fx.GraphModule:
    """Rewrite ``model`` to train with Relay BP, greedy, deep or standard backprop.

    Args:
        model: any traceable ``nn.Module`` (timm, torchvision, your own).
        mode: ``"relay"``, ``"greedy"``, ``"deep"`` or ``"standard"``.
        window: relay window: how many stages below and including its head a loss trains.
        heads: ``"auto"`` (a head on every stage but the first ``skip_first`` and the
            last; greedy: every stage but the last), a list of stage indices, or
            ``"model"``: the model's own aux classifiers (GoogLeNet, Inception-v3) are
            the heads, and a stage ends where each reads its features.
        head: head kind (see :mod:`fxrelay.heads`) or ``factory(feature_shape, num_classes)``.
        aux_weight: loss weight of every aux head (the main head has weight 1).
        skip_first: stages without an aux head at the bottom (Relay BP: 2).
        boundaries, num_stages, example_input: passed to :func:`fxrelay.partition`.
        num_classes: classes of the aux heads (default: the model's classifier's).

    Returns:
        A GraphModule with submodules ``stages.{i}`` and ``heads.{j}``; in train mode
        it returns :class:`~fxrelay.outputs.HeadOutputs`, in eval mode the plain output.

    Raises:
        ValueError: unknown mode or head, window < 1, head stage out of range,
            ``num_classes`` not inferable, or ``model`` already transformed.
    """
    if is_transformed(model):
        raise ValueError("model is already transformed by fxrelay.transform; transform the original model "
                         "(fxrelay.plan_of(model) shows the current plan)")
    _check_mode(mode)
    example_input = default_example_input(model) if example_input is None else example_input
    own = model_aux_heads(model, example_input) if heads == "model" else {}
    with _mode(model, training=False):  # reason: the inference graph; aux-logit branches stay out
        plan = partition(model, boundaries, num_stages, example_input, cut_after=list(own.values()))
    if heads == "model":
        stage_of = {s.outputs[-1]: s.index for s in plan.stages}
        heads, head = [stage_of[name] for name in own.values()], "model"
    plan = dataclasses.replace(plan, mode=mode, heads=assign_heads(
        len(plan.stages), mode, window=window, heads=heads, skip_first=skip_first, aux_weight=aux_weight,
        kind=head_kind(head)))
    bodies = [model.get_submodule(name) for name in own] or _new_heads(model, plan, head, num_classes)
    flops = [head_flops(b, plan.stages[h.stage].shape) for b, h in zip(bodies, plan.heads)]
    plan = dataclasses.replace(plan, heads=tuple(
        dataclasses.replace(h, flops=flops[h.index]) if h.kind != "main" else h for h in plan.heads))
    return _build(model, plan, [AuxHead(b) for b in bodies])


def _new_heads(model: nn.Module, plan: Plan, head: Union[str, HeadFactory], num_classes: int | None) -> list[nn.Module]:
    """One new head per aux head of ``plan``, on the model's device and dtype."""
    aux = [h for h in plan.heads if h.kind != "main"]
    if not aux:
        return []
    classes = _num_classes(model, plan, num_classes)
    p = next(model.parameters(), None)
    placement = {"device": p.device, "dtype": p.dtype} if p is not None else {}
    return [make_head(head, plan.stages[h.stage].shape, classes).to(**placement) for h in aux]


def model_aux_heads(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, str]:
    """The model's own aux classifiers (GoogLeNet, Inception-v3): module name -> fx node it reads.

    They are the top-level submodules its train-mode graph calls and its eval-mode
    graph does not.

    Raises:
        ValueError: the model has none.
    """
    with _mode(model, training=True):
        train_graph = trace(model, example_input).graph
    with _mode(model, training=False):
        eval_graph = trace(model, example_input).graph
    used = {_top_module(n) for n in eval_graph.nodes}
    members: dict[str, set[str]] = {}
    for n in train_graph.nodes:
        if _top_module(n) not in used:
            members.setdefault(_top_module(n), set()).add(n.name)
    reads = {name: next(a.name for n in train_graph.nodes if n.name in nodes for a in n.all_input_nodes
                        if a.name not in nodes) for name, nodes in members.items()}
    if not reads:
        raise ValueError(f"heads='model': {type(model).__name__} has no aux classifiers of its own "
                         "(its train-mode graph calls no module its eval-mode graph does not)")
    return reads


def _top_module(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path]
    return paths[0].split(".")[0] if paths else None


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _num_classes(model: nn.Module, plan: Plan, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    last = plan.stages[-1].shape
    if len(last) == 1:
        return last[0]
    raise ValueError(f"cannot infer num_classes of {type(model).__name__} (its output has shape {last}); "
                     "pass num_classes=...")


def _build(model: nn.Module, plan: Plan, head_modules: list[nn.Module]) -> fx.GraphModule:
    root = nn.Module()
    root.stages = nn.ModuleList(plan.stage_modules())
    root.heads = nn.ModuleList(head_modules)
    graph = _staged_graph(plan, gradient_channels(producing_stages(plan), plan.heads))
    gm = fx.GraphModule(root, graph, f"{type(model).__name__}_{plan.mode}")
    gm.train(model.training)
    state = _State(plan, _original_keys(model, gm), {})
    state.unused_state = {k: v.detach().clone() for k, v in model.state_dict().items()
                          if k not in state.original_keys}
    setattr(gm, _STATE, state)
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = {_STATE: state}
    return gm


def _staged_graph(plan: Plan, scopes: tuple[StageScope, ...]) -> fx.Graph:
    """The training graph: stages, gradient scopes, heads and the combined output."""
    graph = fx.Graph(tracer_cls=Tracer)
    copies: dict[tuple[str, int | None], fx.Node] = {}  # reason: (value, channel) -> the node carrying it
    for name in plan.input_names:
        copies[(name, None)] = graph.placeholder(name)
    for stage, scope in zip(plan.stages, scopes):
        args = [_channel_args(graph, copies, name, chans) for name, chans in zip(stage.inputs, scope.input_channels)]
        if scope.scoped:
            module = graph.get_attr(f"stages.{stage.index}")
            flat = [a for group in args for a in group]
            call = graph.call_function(scoped_stage, (module, scope.channels, scope.input_channels, *flat))
            for o, name in enumerate(stage.outputs):
                for k, c in enumerate(scope.channels):
                    copies[(name, c)] = graph.call_function(
                        operator.getitem, (call, o * len(scope.channels) + k))
        else:
            call = graph.call_module(f"stages.{stage.index}", tuple(group[0] for group in args))
            outs = [call] if len(stage.outputs) == 1 else [graph.call_function(operator.getitem, (call, i))
                                                           for i in range(len(stage.outputs))]
            for name, node in zip(stage.outputs, outs):
                copies[(name, None)] = node
                for c in scope.channels:
                    copies[(name, c)] = node
    aux = [h for h in plan.heads if h.kind != "main"]
    head_nodes = tuple(graph.call_module(f"heads.{k}", (_copy(copies, plan.stages[h.stage].outputs[-1], h.window[0]),))
                       for k, h in enumerate(aux))
    main = next((h for h in plan.heads if h.kind == "main"), None)
    channel = main.window[0] if main else None
    result = fx.node.map_arg(plan.output_node.args[0], lambda n: _copy(copies, n.name, channel))
    if head_nodes:  # reason: standard mode (no aux heads) returns exactly what the original does
        result = graph.call_function(combine_heads, (result, head_nodes, tuple(h.weight for h in plan.heads)))
    graph.output(result)
    return graph


def _channel_args(graph: fx.Graph, copies: dict, name: str, channels: tuple[int, ...]) -> list[fx.Node]:
    if channels:
        return [_copy(copies, name, c) for c in channels]
    # reason: a scoped producer has only per-channel copies (equal values); any one is detached
    node = copies.get((name, None)) or next(v for (n, _), v in copies.items() if n == name)
    return [graph.call_function(detach_scope, (node,))]


def _copy(copies: dict, name: str, channel: int | None) -> fx.Node:
    return copies[(name, channel)] if (name, channel) in copies else copies[(name, None)]


def is_transformed(model: nn.Module) -> bool:
    """Whether ``model`` was made by :func:`transform`."""
    return isinstance(getattr(model, _STATE, None), _State)


def plan_of(model: nn.Module) -> Plan:
    """The Plan of a transformed model, with its heads and windows.

    Raises:
        TypeError: ``model`` was not made by :func:`transform`.
    """
    if not is_transformed(model):
        raise TypeError(f"{type(model).__name__} was not made by fxrelay.transform")
    return getattr(model, _STATE).plan


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transformed model's weights under the input model's state-dict keys.

    Loads with ``strict=True`` into a fresh instance of the input architecture.
    """
    state = getattr(model, _STATE, None)
    if not isinstance(state, _State):
        raise TypeError(f"{type(model).__name__} was not made by fxrelay.transform")
    current = model.state_dict()
    out = {k: current[v] for k, v in state.original_keys.items()}
    out.update(state.unused_state)
    return out


def _original_keys(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    by_id = {}
    for key, value in gm.state_dict(keep_vars=True).items():
        by_id.setdefault(id(value), key)
    return {k: by_id[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in by_id}
