"""Benchmark: node-level drawing of timm resnet50 at the default depth.

Times (median of 3) ``fxrelay.render(model, "x.svg", level="node")`` end to end
(trace + partition + layout) and from a ready Plan, counts the SVG's nodes, and prints
both against the anchor measured in the same run: ``fxrelay.partition(model)`` alone.
Goal: under 5 s and under 400 SVG nodes.

Run:
    python examples/bench/render.py [--model resnet50] [--depth 2]

Example:
    >>> import subprocess, sys
    >>> out = subprocess.run([sys.executable, "examples/bench/render.py"], capture_output=True, text=True)
    >>> "svg nodes" in out.stdout  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import timm
import torch

import fxrelay
from timing import median_seconds
from fxrelay.diagrams.render import DEFAULT_DEPTH, render

_GOAL_SECONDS, _GOAL_NODES = 5.0, 400


def svg_node_count(path: Path) -> int:
    return len(re.findall(r'class="node"', path.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="timm model to draw (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                        help="collapse modules nested deeper than this (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = timm.create_model(args.model, pretrained=False).eval()
    out = Path(tempfile.mkdtemp()) / f"{args.model}_nodes.svg"

    anchor = median_seconds(lambda: fxrelay.partition(model), 3, warmup=False)
    plan = fxrelay.partition(model)
    from_plan = median_seconds(lambda: render(plan, out, level="node", depth=args.depth), 3, warmup=False)
    end_to_end = median_seconds(lambda: render(model, out, level="node", depth=args.depth), 3, warmup=False)
    nodes = svg_node_count(out)

    print(f"{args.model}, level=node, depth={args.depth}, input {tuple(fxrelay.default_example_input(model).shape)}")
    print(f"anchor  fxrelay.partition(model)       {anchor:6.2f} s   1.00x")
    print(f"        render(plan)  (layout + svg)   {from_plan:6.2f} s   {from_plan / anchor:.2f}x anchor")
    print(f"        render(model) (end to end)     {end_to_end:6.2f} s   {end_to_end / anchor:.2f}x anchor")
    print(f"svg nodes {nodes} (goal < {_GOAL_NODES}); end to end {end_to_end:.2f} s (goal < {_GOAL_SECONDS:g} s): "
          f"{'met' if nodes < _GOAL_NODES and end_to_end < _GOAL_SECONDS else 'MISSED'}")


if __name__ == "__main__":
    main()
