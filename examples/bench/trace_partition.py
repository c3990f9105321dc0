"""Benchmark: fxrelay trace + partition vs torchvision's ``create_feature_extractor``.

Both take timm ``resnet50`` (random weights) and return a model split at its
resolution levels; the anchor, torchvision's feature extractor at timm's
``feature_info`` nodes, is measured in the same run. Prints the median seconds of
each over ``--repeats`` runs and the ratio (fxrelay / torchvision; <= 1 is no slower).

Example:
    $ python examples/bench/trace_partition.py --repeats 5
    fxrelay trace+partition: 0.094 s  torchvision create_feature_extractor: 0.210 s  ratio 0.45
"""

from __future__ import annotations

import argparse

import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

import fxrelay
from timing import median_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="timm model (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each; the median is shown (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=224, help="image side in px (default: %(default)s)")
    args = parser.parse_args(argv)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, args.input_size, args.input_size)
    return_nodes = {f["module"]: f"stage{i}" for i, f in enumerate(model.feature_info)}
    ours = median_seconds(lambda: fxrelay.partition(model, example_input=x), args.repeats)
    anchor = median_seconds(lambda: create_feature_extractor(model, return_nodes=return_nodes), args.repeats)
    print(f"{args.model} @ {args.input_size}px, median of {args.repeats}: "
          f"fxrelay trace+partition: {ours:.3f} s  torchvision create_feature_extractor: {anchor:.3f} s  "
          f"ratio {ours / anchor:.2f}")


if __name__ == "__main__":
    main()
