"""The ``fxrelay`` command line: one small function per subcommand.

``fxrelay inspect MODEL`` prints the stage plan of a timm model (``resnet50``) or a
torchvision one (``tv:resnet18``), created with random weights.

A subcommand is a :class:`Command` in :data:`COMMANDS`: its ``configure`` adds the
arguments to its subparser and its ``run`` returns the exit code. Errors the user can
fix (an unknown model name, an impossible ``--num-stages``) are one line on stderr and
exit code 2, without a traceback.

Example:
    >>> from fxrelay.apps.cli import main
    >>> main(["inspect", "tv:resnet18", "--input-size", "64"])  # doctest: +ELLIPSIS
    Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, ...
    0
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["Command", "COMMANDS", "UsageError", "load_model", "example_input", "main"]

TORCHVISION_PREFIX = "tv:"
DEFAULT_INPUT_SIZE = 224


class UsageError(Exception):
    """An error the user can fix from the command line; printed as one line, exit code 2."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, argument setup and action."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def known_models() -> list[str]:
    """Every name :func:`load_model` accepts: timm names and ``tv:`` torchvision names."""
    import timm
    import torchvision.models as tvm

    return timm.list_models() + [TORCHVISION_PREFIX + n for n in tvm.list_models(module=tvm)]


def load_model(name: str, input_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm model, or a torchvision one for ``tv:NAME``, with random weights, in eval mode.

    A timm model with a fixed input size is built for ``input_size`` when it takes an
    ``img_size`` argument. ``kwargs`` (``num_classes=10``) go to the model's constructor.

    Raises:
        UsageError: unknown name (the message lists close matches).

    Example:
        >>> type(load_model("tv:resnet18")).__name__
        'ResNet'
    """
    import timm
    import torchvision.models as tvm

    if name.startswith(TORCHVISION_PREFIX) and name[len(TORCHVISION_PREFIX):] in tvm.list_models(module=tvm):
        return tvm.get_model(name[len(TORCHVISION_PREFIX):], weights=None, **kwargs).eval()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, known_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (timm names, or tv:NAME for torchvision)"
        raise UsageError(f"unknown model {name!r}{hint}")
    default = timm.get_pretrained_cfg_value(name, "input_size") or (3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
    if input_size is not None and input_size != default[-1]:
        try:
            return timm.create_model(name, pretrained=False, img_size=input_size, **kwargs).eval()
        except TypeError:  # reason: models without img_size take any size or only their own
            pass
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def example_input(model: nn.Module, input_size: int | None = None) -> torch.Tensor:
    """A seeded random batch of one: ``input_size`` px square, else the model's default size."""
    from ..passes.tracing import default_example_input

    if input_size is None:
        return default_example_input(model)
    channels = default_example_input(model).shape[1]
    return torch.randn(1, channels, input_size, input_size, generator=torch.Generator().manual_seed(0))


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    from ..passes.partition import BOUNDARIES

    parser.add_argument("model", help="timm model name, or tv:NAME for torchvision (e.g. tv:resnet18)")
    parser.add_argument("--boundaries", choices=BOUNDARIES, default="auto", help="how stages are found")
    parser.add_argument("--num-stages", type=int, default=None, help="merge or split to N stages")
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE, help="input side in px (224)")


def run_inspect(args: argparse.Namespace) -> int:
    """Print the plan table of ``args.model``."""
    from ..passes.partition import partition
    from ..passes.tracing import TraceError

    model = load_model(args.model, args.input_size)
    try:
        plan = partition(model, args.boundaries, args.num_stages, example_input(model, args.input_size))
    except ValueError as e:
        raise UsageError(str(e)) from None
    except TraceError as e:
        print(f"fxrelay inspect: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # reason: the model itself rejects the input size
        raise UsageError(_cannot_run(args, e)) from None
    print(plan)
    return 0


def _cannot_run(args: argparse.Namespace, e: Exception) -> str:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{args.model} does not run at --input-size {args.input_size}: {reason}"


def _configure_render(parser: argparse.ArgumentParser) -> None:
    from ..diagrams.render import LEVELS
    from ..passes.heads import MODES

    _configure_inspect(parser)
    parser.add_argument("--mode", choices=MODES, default="relay", help="training mode whose heads are drawn")
    parser.add_argument("--window", type=int, default=2, help="relay window (stages a loss trains)")
    parser.add_argument("--level", choices=LEVELS, default="stage", help="one box per stage, or fx nodes")
    parser.add_argument("--depth", default="2", help="node level: collapse modules below this depth ('none': all)")
    parser.add_argument("-o", "--output", default=None, help="output file, .svg .png .pdf .dot (MODEL.svg)")


def run_render(args: argparse.Namespace) -> int:
    """Draw the partition and heads of ``args.model`` in ``args.mode``."""
    from ..diagrams.render import GraphvizNotFound, render
    from ..passes.rewrite import transform

    model = load_model(args.model, args.input_size)
    x = example_input(model, args.input_size)
    try:
        transformed = transform(model, args.mode, window=args.window, boundaries=args.boundaries,
                                num_stages=args.num_stages, example_input=x, num_classes=1000)
        depth = None if args.depth.lower() == "none" else int(args.depth)
        path = render(transformed, args.output or f"{args.model.replace(':', '_')}.svg", level=args.level,
                      depth=depth)
    except (ValueError, GraphvizNotFound) as e:
        raise UsageError(str(e)) from None
    except RuntimeError as e:  # reason: the model itself rejects the input size
        raise UsageError(_cannot_run(args, e)) from None
    print(path)
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="where the demo writes its files (out/demo)")
    parser.add_argument("--model", default="resnet10t", help="timm model to train (resnet10t)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per mode")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    """Train standard and relay on generated data, render, deploy, verify, print the table."""
    from .demo import run_demo as demo

    kwargs = {"epochs": args.epochs} if args.epochs else {}
    print(demo(args.out, model_name=args.model, progress=not args.no_progress, **kwargs))
    return 0


COMMANDS: list[Command] = [
    Command("inspect", "print the stage plan of a timm or torchvision model", _configure_inspect, run_inspect),
    Command("render", "draw a model's stages, heads and gradient windows with graphviz", _configure_render,
            run_render),
    Command("demo", "train standard and relay on generated data, render, deploy and verify", _configure_demo,
            run_demo),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The ``fxrelay`` parser with one subparser per command."""
    parser = argparse.ArgumentParser(prog="fxrelay", description="Relay backpropagation for any fx-traceable model.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for usage errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"fxrelay {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
