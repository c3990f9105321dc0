"""Benchmark: fxrelay trace + partition vs torchvision's ``create_feature_extractor``.

Both take a model (random weights) and return it split at its resolution levels; the
anchor, torchvision's feature extractor at the model's feature nodes (timm's
``feature_info``; torchvision ResNets: ``relu``, ``layer1`` .. ``layer4``), is measured in
the same run, alternating with fxrelay. Prints the median seconds of each over
``--repeats`` runs and the ratio (fxrelay / torchvision; <= 1 is no slower).

Example:
    $ python examples/bench/trace_partition.py --repeats 5
    resnet50 @ 224px, median of 5 (wall clock): fxrelay trace+partition: 0.050 s  torchvision create_feature_extractor: 0.066 s  ratio 0.76
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import fxrelay

# reason: CPU time counts only this process's work, so a neighbour's load changes it less than wall time
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,tv_resnet50",
                        help="comma-separated timm models, tv_ for torchvision's (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each; the median is shown (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=224, help="image side in px (default: %(default)s)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed seconds; cpu: this process's CPU seconds, which other processes on a "
                             "shared machine disturb less (default: %(default)s)")
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    x = torch.randn(1, 3, args.input_size, args.input_size)
    for name in args.models.split(","):
        if name.startswith("tv_"):
            model = getattr(torchvision.models, name[3:])().eval()
            return_nodes = {m: f"stage{i}" for i, m in enumerate(("relu", "layer1", "layer2", "layer3", "layer4"))}
        else:
            model = timm.create_model(name, pretrained=False).eval()
            return_nodes = {f["module"]: f"stage{i}" for i, f in enumerate(model.feature_info)}
        ours, anchor = _alternating(lambda: fxrelay.partition(model, example_input=x),
                                    lambda: create_feature_extractor(model, return_nodes=return_nodes), args.repeats,
                                    clock)
        print(f"{name} @ {args.input_size}px, median of {args.repeats} ({args.clock} clock): "
              f"fxrelay trace+partition: {ours:.3f} s  torchvision create_feature_extractor: {anchor:.3f} s  "
              f"ratio {ours / anchor:.2f}", flush=True)


def _alternating(first, second, repeats: int, clock: Callable[[], float]) -> tuple[float, float]:
    """Median seconds (on ``clock``) of ``first`` and of ``second``, run alternately after one warm-up call each."""
    times: tuple[list[float], list[float]] = ([], [])
    for k in range(repeats + 1):
        for fn, out in zip((first, second), times):
            start = clock()
            fn()
            if k:
                out.append(clock() - start)
    return statistics.median(times[0]), statistics.median(times[1])


if __name__ == "__main__":
    main()
