"""The ``Plan``: the one intermediate representation every pass after partition reads.

A Plan is a frozen value: the traced graph, its stages (contiguous runs of fx nodes
separated by cuts), and, once :func:`fxrelay.transform` has chosen them, the heads and
the window of stages each head's loss trains.

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.partition(torchvision.models.resnet18())
    >>> print(plan)
    Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, 3.63 GFLOPs/sample
    stage  red       shape   params  GFLOPs  share  nodes  in -> out
        0    2  64x112x112    9.54K   0.236   6.5%      3  x -> relu
        1    4    64x56x56  147.97K   0.925  25.5%     15  relu -> layer1_1_relu_1
        2    8   128x28x28  525.57K   0.822  22.7%     16  layer1_1_relu_1 -> layer2_1_relu_1
        3   16   256x14x14    2.10M   0.822  22.7%     16  layer2_1_relu_1 -> layer3_1_relu_1
        4   32        1000    8.91M   0.823  22.7%     19  layer3_1_relu_1 -> fc
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

__all__ = ["Stage", "Head", "Plan"]


@dataclass(frozen=True)
class Stage:
    """One stage: a contiguous run of graph nodes between two cuts.

    Attributes:
        index: position of the stage, 0 first.
        nodes: names of the fx nodes the stage computes, in graph order.
        inputs: names of the values the stage reads from earlier stages or the model
            inputs (the cut tensors entering it; several where skip edges cross).
        outputs: names of the values it produces for later stages or the model output;
            the last one is the stage's main output, the one heads read.
        shape: shape of the main output for one sample (batch dimension dropped).
        reduction: spatial downsampling factor of the stage's resolution vs the input.
        params: number of parameters the stage uses (shared ones counted once).
        flops: floating-point operations per sample.
    """

    index: int
    nodes: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shape: tuple[int, ...]
    reduction: int
    params: int
    flops: int


@dataclass(frozen=True)
class Head:
    """A loss: a classifier reading one stage, and the window of stages it trains.

    Attributes:
        index: position in ``plan.heads`` (the model's own classifier is last).
        stage: the stage whose main output the head reads (``a_j``).
        window: ``(lo, hi)``, the stages the head's loss trains; ``hi == stage``.
        weight: the loss weight (1 for the main head).
        kind: head type name: ``"main"`` for the model's classifier, else the factory
            name (``"auto"``, ``"linear"``, ``"layercnn"``, ``"dgl"``, a callable's name).
        flops: forward FLOPs per sample of the head itself (0 for the main head, whose
            classifier is part of the last stage).
    """

    index: int
    stage: int
    window: tuple[int, int]
    weight: float
    kind: str
    flops: int = 0


@dataclass(frozen=True)
class Plan:
    """A partition of a traced model into stages, with the heads that train them.

    Attributes:
        graph: the traced GraphModule (shares parameters with the model); every node
            carries ``node.meta["fxrelay"]``, its :class:`~fxrelay.analysis.NodeInfo`.
        stages: the stages, in order.
        heads: the heads, ordered by stage, the main head last; empty before
            :func:`fxrelay.transform`.
        mode: ``"relay"``, ``"greedy"``, ``"deep"`` or ``"standard"``.
        boundaries: how the stages were found: ``"pool"`` or ``"blocks"``.
        leaves: submodules traced as single calls because their code is not traceable.
    """

    graph: fx.GraphModule
    stages: tuple[Stage, ...]
    heads: tuple[Head, ...] = ()
    mode: str = "standard"
    boundaries: str = "pool"
    leaves: tuple[str, ...] = ()
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def model_name(self) -> str:
        return type(self.graph).__name__ if type(self.graph) is not fx.GraphModule else self.graph._get_name()

    def stage_modules(self) -> list[fx.GraphModule]:
        """One GraphModule per stage, each mapping the stage's inputs to its outputs.

        Plans made from this one by ``dataclasses.replace`` with the same graph and
        stages (adding heads) share these modules.
        """
        key = (id(self.graph), self.stages)
        if self._cache.get("stage_modules_key") != key:
            from .split import split_stages

            self._cache["stage_modules"] = split_stages(self)
            self._cache["stage_modules_key"] = key
        return self._cache["stage_modules"]

    def forward_flops(self) -> int:
        """Forward FLOPs per sample of the stages and heads."""
        return sum(s.flops for s in self.stages) + sum(h.flops for h in self.heads)

    def backward_flop_ratio(self) -> float:
        """Theoretical backward FLOPs of a training step relative to ``deep`` mode with the same heads.

        Scoped (overlap) stages re-run their backward once per gradient channel that
        continues below them (see :func:`fxrelay.scopes.backward_flops`).
        """
        from .scopes import backward_flops

        deep = replace(self, heads=tuple(replace(h, window=(0, h.stage)) for h in self.heads))
        return backward_flops(self) / backward_flops(deep)

    def step_flops(self) -> int:
        """Theoretical forward + backward FLOPs per sample of a training step."""
        from .scopes import backward_flops

        return self.forward_flops() + backward_flops(self)

    def run_stages(self, *inputs: Any) -> Any:
        """Run the stages one after the other and return the model's output.

        Equal to ``plan.graph(*inputs)``: the proof that the partition is complete.
        """
        env = dict(zip(self.input_names, inputs))
        for stage, module in zip(self.stages, self.stage_modules()):
            result = module(*(env[name] for name in stage.inputs))
            env.update(zip(stage.outputs, result if len(stage.outputs) > 1 else (result,)))
        return fx.node.map_arg(self.output_node.args[0], lambda n: env[n.name])

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.graph.graph.nodes if n.op == "placeholder")

    @property
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph.graph.nodes) if n.op == "output")

    def __str__(self) -> str:
        total_flops = sum(s.flops for s in self.stages) or 1
        total_params = _unique_param_count(self.graph)
        lines = [
            f"Plan of {self.model_name}: {len(self.stages)} stages (boundaries={self.boundaries}, "
            f"mode={self.mode}), {_si(total_params)} params, {total_flops / 1e9:.3g} GFLOPs/sample"
        ]
        rows = [("stage", "red", "shape", "params", "GFLOPs", "share", "nodes", "in -> out")]
        for s in self.stages:
            rows.append((
                str(s.index), str(s.reduction), "x".join(map(str, s.shape)) or "-", _si(s.params),
                f"{s.flops / 1e9:.3g}", f"{100 * s.flops / total_flops:.1f}%", str(len(s.nodes)),
                f"{_names(s.inputs)} -> {_names(s.outputs)}",
            ))
        lines += _table(rows)
        if self.heads:
            lines.append("")
            rows = [("head", "stage", "window", "weight", "kind", "GFLOPs")]
            rows += [(str(h.index), str(h.stage), f"{h.window[0]}..{h.window[1]}", f"{h.weight:g}", h.kind,
                      f"{h.flops / 1e9:.3g}") for h in self.heads]
            lines += _table(rows)
            lines.append(f"backward FLOPs vs deep supervision: {self.backward_flop_ratio():.3f}x")
        if self.leaves:
            lines.append(f"traced as leaves (untraceable code): {', '.join(self.leaves)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Plan({self.model_name}, stages={len(self.stages)}, heads={len(self.heads)}, "
                f"mode={self.mode!r}, boundaries={self.boundaries!r})")


def _names(names: tuple[str, ...]) -> str:
    return ",".join(names) if len(names) <= 2 else f"{names[0]},...(+{len(names) - 1})"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i < len(r) - 1 else c for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _unique_param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
