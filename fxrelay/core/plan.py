"""The ``Plan``: the one intermediate representation every pass after partition reads.

A Plan is a frozen value: the traced graph, its stages (contiguous runs of fx nodes
separated by cuts), the tracing configuration the graph was made with, and, once
:func:`fxrelay.transform` has chosen them, the heads and the span of stages each
head's loss trains. It holds no caches and runs nothing: splitting it into stage
modules is :func:`fxrelay.split_stages`, running them :func:`fxrelay.run_stages`.
Its costs are arithmetic over its values (:mod:`fxrelay.core.channels`).

Example:
    >>> import torchvision, fxrelay
    >>> plan = fxrelay.partition(torchvision.models.resnet18())
    >>> print(plan)
    Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, 3.63 GFLOPs/sample
    stage  name    red       shape   params  GFLOPs  share  nodes  saved MB  in -> out
        0  stem      2  64x112x112    9.54K   0.236   6.5%      3      6.70  x -> relu
        1  layer1    4    64x56x56  147.97K   0.925  25.5%     15      8.42  relu -> layer1_1_relu_1
        2  layer2    8   128x28x28  525.57K   0.822  22.7%     16      3.45  layer1_1_relu_1 -> layer2_1_relu_1
        3  layer3   16   256x14x14    2.10M   0.822  22.7%     16      1.73  layer2_1_relu_1 -> layer3_1_relu_1
        4  layer4   32        1000    8.91M   0.823  22.7%     19      0.87  layer3_1_relu_1 -> fc
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch.fx as fx

from .channels import StageScope, backward_flops, gradient_channels, memory_peaks, producing_stages
from .ir import Head, Stage, TracingConfig

__all__ = ["Plan", "table", "times", "si"]


@dataclass(frozen=True)
class Plan:
    """A partition of a traced model into stages, with the heads that train them.

    Attributes:
        graph_module: the traced GraphModule (shares parameters with the model); every
            node carries ``node.meta["fxrelay"]``, its :class:`~fxrelay.passes.analysis.NodeInfo`.
        stages: the stages, in order.
        heads: the heads, ordered by stage, the main head last; empty before
            :func:`fxrelay.transform`.
        mode: ``"relay"``, ``"greedy"``, ``"deep"`` or ``"standard"``.
        boundaries: how the stages were found: ``"pool"`` or ``"blocks"``.
        leaves: submodules traced as single calls because their code is not traceable.
        tracing: the tracing configuration the graph was made with (deploy and render
            re-trace with it).
        recompute: the transformed model keeps only stage boundaries for backward and
            recomputes each stage and head there (``transform(recompute=True)``).
        execution: the execution the model was transformed for (``transform(execution=...)``):
            the stages serve it, and :class:`~fxrelay.Recipe` runs it unless told otherwise.
        output: the keys from the model's output to the leaf that carries the heads
            (``()``: the output is that tensor; ``("logits",)`` for a dict output).
    """

    graph_module: fx.GraphModule
    stages: tuple[Stage, ...]
    heads: tuple[Head, ...] = ()
    mode: str = "standard"
    boundaries: str = "pool"
    leaves: tuple[str, ...] = ()
    tracing: TracingConfig = TracingConfig()
    recompute: bool = False
    output: tuple = ()
    execution: str = "one-line"

    @property
    def checkpoint(self) -> bool:
        """Deprecated alias of :attr:`recompute`."""
        warnings.warn("Plan.checkpoint is deprecated; use Plan.recompute", DeprecationWarning, stacklevel=2)
        return self.recompute

    @property
    def graph(self) -> fx.GraphModule:
        """Deprecated alias of :attr:`graph_module`."""
        warnings.warn("Plan.graph is deprecated; use Plan.graph_module", DeprecationWarning, stacklevel=2)
        return self.graph_module

    @property
    def model_name(self) -> str:
        """Class name of the traced model."""
        return type(self.graph_module).__name__

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.graph_module.graph.nodes if n.op == "placeholder")

    @property
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.graph_module.graph.nodes) if n.op == "output")

    @property
    def aux_heads(self) -> tuple[Head, ...]:
        """The heads fxrelay added (``model.heads[k]`` is the k-th of them)."""
        return tuple(h for h in self.heads if not h.is_main)

    def stage_of(self) -> dict[str, int]:
        """The stage of every fx node the stages compute (model inputs are ``-1``)."""
        stage_of = {name: -1 for name in self.input_names}
        stage_of.update((name, s.index) for s in self.stages for name in s.nodes)
        return stage_of

    def scopes(self) -> tuple[StageScope, ...]:
        """How gradients flow through each stage (see :func:`fxrelay.core.channels.gradient_channels`)."""
        return gradient_channels(producing_stages(self.stages), self.heads)

    def forward_flops(self) -> int:
        """Forward FLOPs per sample of the stages and heads."""
        return sum(s.flops for s in self.stages) + sum(h.flops for h in self.heads)

    def backward_flop_ratio(self) -> float:
        """Theoretical backward FLOPs of a training step relative to ``deep`` mode with the same heads.

        Overlap stages re-run their input-gradient pass once per gradient channel that
        continues below them (see :func:`fxrelay.core.channels.backward_flops`).
        """
        deep = tuple(replace(h, span=(0, h.stage)) for h in self.heads)
        return backward_flops(self.stages, self.heads) / backward_flops(self.stages, deep)

    def step_flops(self) -> int:
        """Theoretical forward + backward FLOPs per sample of a training step."""
        return self.forward_flops() + backward_flops(self.stages, self.heads)

    def memory_estimate(self, batch_size: int = 1) -> dict[str, int]:
        """Expected peak bytes saved for backward by a training step of ``batch_size`` samples, per
        execution (see :func:`fxrelay.core.channels.memory_peaks`)."""
        return {name: peak * batch_size for name, peak in memory_peaks(self.stages, self.heads).items()}

    def __str__(self) -> str:
        total_flops = sum(s.flops for s in self.stages) or 1
        total_params = sum(p.numel() for p in self.graph_module.parameters())
        lines = [
            f"Plan of {self.model_name}: {len(self.stages)} stages (boundaries={self.boundaries}, "
            f"mode={self.mode}), {si(total_params)} params, {total_flops / 1e9:.3g} GFLOPs/sample"
        ]
        rows = [("stage", "name", "red", "shape", "params", "GFLOPs", "share", "nodes", "saved MB", "in -> out")]
        for s in self.stages:
            rows.append((
                str(s.index), s.name, str(s.reduction), "x".join(map(str, s.shape)) or "-", si(s.params),
                f"{s.flops / 1e9:.3g}", f"{100 * s.flops / total_flops:.1f}%", str(len(s.nodes)),
                f"{s.saved_bytes / 2**20:.2f}", f"{_names(s.inputs)} -> {_names(s.outputs)}",
            ))
        lines += table(rows, left=(1,))
        if self.heads:
            lines.append("")
            rows = [("head", "stage", "trains", "weight", "kind", "params", "GFLOPs", "vs stage", "layers")]
            rows += [(str(h.index), str(h.stage), f"{h.span[0]}..{h.span[1]}", f"{h.weight:g}", h.kind,
                      si(h.params), f"{h.flops / 1e9:.3g}", _versus(h, self.stages[h.stage]), h.layers)
                     for h in self.heads]
            lines += table(rows, left=(4,))
            lines.append(f"backward FLOPs vs deep supervision: {self.backward_flop_ratio():.3f}x")
            peaks = ", ".join(f"{name} {peak / 2**20:.3g}" for name, peak in self.memory_estimate().items())
            lines.append(f"saved for backward at peak, MB per sample: {peaks}")
        if self.leaves:
            lines.append(f"traced as leaves (untraceable code): {', '.join(self.leaves)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Plan({self.model_name}, stages={len(self.stages)}, heads={len(self.heads)}, "
                f"mode={self.mode!r}, boundaries={self.boundaries!r})")


def _versus(head: Head, stage: Stage) -> str:
    """A head's params and FLOPs relative to the stage it reads: ``"2.2x/0.23x"``."""
    if head.is_main:
        return "-"
    return f"{times(head.params, stage.params)}/{times(head.flops, stage.flops)}"


def _names(names: tuple[str, ...]) -> str:
    return ",".join(names) if len(names) <= 2 else f"{names[0]},...(+{len(names) - 1})"


def table(rows: list[tuple[str, ...]], left: tuple[int, ...] = ()) -> list[str]:
    """Rows as aligned text columns: numbers right-aligned, ``left`` columns and the last left-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.ljust(w) if i in left or i == len(r) - 1 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def times(part: float, whole: float) -> str:
    """``part`` relative to ``whole``: ``times(3, 4) == '0.75x'``, ``times(150, 1) == '150x'``."""
    r = part / max(whole, 1)
    return f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def si(n: float) -> str:
    """``n`` with a K/M/G suffix: ``si(11_689_512) == '11.69M'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
