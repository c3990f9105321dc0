"""The values of the intermediate representation: stages, heads and the tracing configuration.

They are frozen dataclasses without behaviour of their own; :class:`fxrelay.Plan`
(:mod:`fxrelay.core.plan`) puts them together with the traced graph.

Example:
    >>> Head(index=0, stage=2, span=(0, 2), weight=0.3, kind="auto").is_main
    False
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

__all__ = ["Stage", "Head", "TracingConfig", "MAIN"]

MAIN = "main"


@dataclass(frozen=True)
class Stage:
    """One stage: a contiguous run of graph nodes between two cuts.

    Attributes:
        index: position of the stage, 0 first.
        name: a readable identifier, unique in the plan (the module the stage spans,
            such as ``layer2``, else ``stage2``); the transformed model's
            ``model.stages.<name>`` and the emitted code use it.
        nodes: names of the fx nodes the stage computes, in graph order.
        inputs: names of the values the stage reads from earlier stages or the model
            inputs (the cut values entering it; several where skip edges cross).
        outputs: names of the values it produces for later stages or the model output;
            the last one is the stage's main output, the one heads read.
        shape: shape of the main output for one sample (batch dimension dropped).
        reduction: spatial downsampling factor of the stage's resolution vs the input.
        params: number of parameters the stage uses (shared ones counted once).
        flops: floating-point operations per sample.
        saved_bytes: bytes per sample that a training step saves for backward in this
            stage (its activations), from the meta-tensor analysis.
        boundary_bytes: bytes per sample of the stage's tensor outputs (its cut values).
        detached_saved_bytes: bytes per sample the stage saves when its inputs do not require
            grad (greedy's detached inputs, a frozen prefix): layers before its first parameter save nothing.
        input_saved_bytes: bytes per sample of its inputs that the stage saves then (counted in
            ``saved_bytes`` of the stage that made them).
        unsaved_output_bytes: bytes per sample of the main output when no layer of the stage saves
            it (it ends with a pool or a conv): a head reading it saves it then.
    """

    index: int
    name: str
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shape: tuple[int, ...]
    reduction: int
    params: int
    flops: int
    saved_bytes: int = 0
    boundary_bytes: int = 0
    detached_saved_bytes: int = 0
    input_saved_bytes: int = 0
    unsaved_output_bytes: int = 0


@dataclass(frozen=True)
class Head:
    """A loss: a classifier reading one stage, and the span of stages it trains.

    Attributes:
        index: position in ``plan.heads`` (the model's own classifier is last).
        stage: the stage whose main output the head reads (``a_j``).
        span: ``(lo, hi)``, the stages the head's loss trains; ``hi == stage``
            (``transform(window=w)`` is the relay span's length: ``lo = max(0, stage - w + 1)``).
        weight: the loss weight (1 for the main head).
        kind: ``"main"`` for the model's own classifier, else the head factory's name
            (``"auto"``, ``"linear"``, ``"layercnn"``, ``"dgl"``, ``"model"``, a callable's name).
        flops: forward FLOPs per sample of the head itself (0 for the main head, whose
            classifier is part of the last stage).
        layers: what the head computes, e.g. ``"conv1x1-BN-ReLU-pool2x2-linear"``.
        params: parameters of the head itself (0 for the main head).
        saved_bytes: bytes per sample the head saves for backward in a training step.
    """

    index: int
    stage: int
    span: tuple[int, int]
    weight: float
    kind: str
    flops: int = 0
    layers: str = ""
    params: int = 0
    saved_bytes: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this is the model's own classifier (the last head)."""
        return self.kind == MAIN

    def __setstate__(self, state: dict[str, Any]) -> None:
        # reason: a model pickled before the rename stores the span under its old name, "window"
        if "window" in state:
            state = {("span" if k == "window" else k): v for k, v in state.items()}
        self.__dict__.update(state)


@dataclass(frozen=True)
class TracingConfig:
    """How a model is traced: the one configuration every entry point accepts.

    Attributes:
        leaf_modules: module types not to trace through (their calls stay single nodes),
            besides timm's and torchvision's and those registered with
            :func:`fxrelay.register_leaf`.
        autowrap_functions: functions recorded as single calls (helpers with Python
            control flow on tensor values), besides timm's and those registered with
            :func:`fxrelay.register_autowrap`.
        leaf_names: qualified names of submodules not to trace through.
        concrete_args: ``forward`` arguments bound to constants while tracing (on top of
            every argument with a default, which is bound to its default).

    Example:
        >>> TracingConfig(leaf_modules=[nn.LSTM]).leaf_modules
        (<class 'torch.nn.modules.rnn.LSTM'>,)
    """

    leaf_modules: tuple[type[nn.Module], ...] = ()
    autowrap_functions: tuple[Callable, ...] = ()
    leaf_names: tuple[str, ...] = ()
    concrete_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("leaf_modules", "autowrap_functions", "leaf_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [m for m in self.leaf_modules if not (isinstance(m, type) and issubclass(m, nn.Module))]
        if bad:
            raise TypeError(f"leaf_modules must be nn.Module subclasses, got {bad!r}")
        bad = [f for f in self.autowrap_functions if not callable(f)]
        if bad:
            raise TypeError(f"autowrap_functions must be callables, got {bad!r}")
