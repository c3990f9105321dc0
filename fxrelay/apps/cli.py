"""The ``fxrelay`` command line: one small function per subcommand.

``fxrelay inspect MODEL`` prints the stage plan of a timm model (``resnet50``) or a
torchvision one (``tv:resnet18``), created with random weights; ``--mode relay`` adds
the heads and the window of stages each head's loss trains.

A subcommand is a :class:`Command` in :data:`COMMANDS`: its ``configure`` adds the
arguments to its subparser and its ``run`` returns the exit code. Every error is one
line on stderr, without a traceback: exit code 2 for what the user can fix from the
command line (a bad option, an unknown model name, an impossible ``--num-stages``, a
model that does not run at ``--input-size``), 1 for anything else
(``fxrelay --traceback COMMAND ...`` shows where it came from).

This module imports only the standard library at import time: torch, timm and the
fxrelay passes are imported by the command that needs them, so ``fxrelay --help``
answers at once.

Example:
    >>> from fxrelay.apps.cli import main
    >>> main(["inspect", "tv:resnet18", "--input-size", "64"])  # doctest: +ELLIPSIS
    Plan of ResNet: 5 stages (boundaries=pool, mode=standard), 11.69M params, ...
    0
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NoReturn, Sequence

from .. import __version__
from ..core.choices import BALANCES, BOUNDARIES, FORMATS, HEAD_KINDS, LEVELS, MODES
from ..io.zoo import check_model_name, example_input, load_model

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Command", "COMMANDS", "UsageError", "build_parser", "main"]

_VERSIONS_OF = ("torch", "torchvision", "timm")


class UsageError(Exception):
    """An error the user can fix from the command line; printed as one line, exit code 2."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, argument setup and action."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``fxrelay inspect: error: ... (see ... --help)``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Version(argparse.Action):
    """``--version``: fxrelay's version and those of torch, torchvision and timm (read without importing them)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        def installed(name: str) -> str:
            with contextlib.suppress(PackageNotFoundError):
                return f"{name} {version(name)}"
            return f"{name} not installed"

        print(f"fxrelay {__version__} ({', '.join(map(installed, _VERSIONS_OF))}; python {sys.version.split()[0]})")
        parser.exit(0)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _depth(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1 or 'none', got {text!r}") from None


@contextlib.contextmanager
def _model_errors(model: str, runs_at: str) -> Iterator[None]:
    """Turn what tracing and running ``model`` raise into one-line errors.

    ``ValueError`` (options the passes reject) and a model that fails on its input
    (``RuntimeError``, ``AssertionError``: ``runs_at`` says which input) become usage
    errors; a :class:`~fxrelay.TraceError` (untraceable code) stays an error, exit 1.
    """
    from ..passes.tracing import TraceError

    try:
        yield
    except TraceError:
        raise
    except ValueError as e:
        raise UsageError(_first_line(e)) from None
    except (RuntimeError, AssertionError) as e:  # reason: the model itself rejects the input
        raise UsageError(f"{model} does not run {runs_at}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _load(name: str, input_size: int | None, **kwargs: Any) -> nn.Module:
    try:
        return load_model(name, input_size, **kwargs)
    except ValueError as e:  # reason: unknown name, or constructor arguments the model rejects
        raise UsageError(_first_line(e)) from None


def _configure_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm model name, or tv:NAME for torchvision (e.g. resnet50, tv:resnet18)")
    parser.add_argument("--boundaries", choices=BOUNDARIES, default="auto",
                        help="how stages are found: at resolution changes (pool), between blocks (blocks), "
                             "or whichever fits the model (default: auto)")
    parser.add_argument("--num-stages", type=_positive_int, default=None,
                        help="merge or split to N stages (default: one per resolution level)")
    parser.add_argument("--input-size", type=_positive_int, default=None,
                        help="input side in px (default: the model's own input size)")
    parser.add_argument("--balance", choices=BALANCES, default="auto",
                        help="with --num-stages: merge and split stages by FLOPs, bytes saved for backward, both "
                             "(auto) or the recompute peak (default: auto)")
    parser.add_argument("--leaf-module", action="append", default=[], metavar="PKG.MODULE.CLASS",
                        help="a module class not to trace through (repeatable; tracing configuration)")
    parser.add_argument("--autowrap", action="append", default=[], metavar="PKG.MODULE.FUNCTION",
                        help="a function to record as one call (repeatable; tracing configuration)")


def _configure_mode(parser: argparse.ArgumentParser, default: str | None) -> None:
    shown = f"default: {default}" if default else "default: no heads, the partition only"
    parser.add_argument("--mode", choices=MODES, default=default,
                        help=f"training mode whose heads and windows are shown ({shown})")
    parser.add_argument("--window", type=_positive_int, default=2,
                        help="relay window: how many stages, up to its own, a head's loss trains (default: 2)")
    parser.add_argument("--head-kind", choices=HEAD_KINDS, default="auto",
                        help="what the aux heads are; downstream: copies of the model's later layers (default: auto)")


def _configure_inspect(parser: argparse.ArgumentParser) -> None:
    _configure_model(parser)
    _configure_mode(parser, None)
    parser.add_argument("--memory", type=_positive_int, nargs="?", const=32, default=None, metavar="BATCH",
                        help="also print the expected peak of bytes saved for backward per execution, for a "
                             "batch of BATCH (default when given without a value: 32)")


def _tracing(args: argparse.Namespace) -> Any:
    """The tracing configuration of ``--leaf-module`` and ``--autowrap``."""
    from ..core.ir import TracingConfig

    return TracingConfig(leaf_modules=[_imported(p) for p in args.leaf_module],
                         autowrap_functions=[_imported(p) for p in args.autowrap])


def _imported(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UsageError(f"cannot import {path!r} ({_first_line(e)}): give PACKAGE.MODULE.NAME") from None


def _transformed(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The model of ``args`` and its Plan: partitioned, or transformed for ``args.mode``."""
    from ..passes.partition import partition
    from ..passes.rewrite import plan_of, transform

    model = _load(args.model, args.input_size)
    x = example_input(model, args.input_size)
    size = f"at --input-size {args.input_size}" if args.input_size else f"at its default input size {x.shape[-1]}"
    with _model_errors(args.model, size):
        if args.mode is None:
            return model, partition(model, args.boundaries, args.num_stages, x, balance=args.balance,
                                    tracing=_tracing(args))
        model = transform(model, args.mode, window=args.window, head_kind=args.head_kind, boundaries=args.boundaries,
                          num_stages=args.num_stages, balance=args.balance, example_input=x, tracing=_tracing(args))
        return model, plan_of(model)


def run_inspect(args: argparse.Namespace) -> int:
    """Print the plan table of ``args.model`` (with heads and windows for ``--mode``; memory for ``--memory``)."""
    plan = _transformed(args)[1]
    print(plan)
    if args.memory:
        executions = ("one-line", "recompute") if args.mode is None else tuple(plan.memory_estimate())
        print(f"\nexpected peak of bytes saved for backward, batch {args.memory} "
              f"({'plain backprop' if args.mode is None else args.mode}):")
        for name in executions:
            print(f"  {name:<13}{plan.memory_estimate(args.memory)[name] / 2**30:8.2f} GB")
    return 0


def _configure_render(parser: argparse.ArgumentParser) -> None:
    _configure_model(parser)
    _configure_mode(parser, "relay")
    parser.add_argument("--level", choices=LEVELS, default="stage",
                        help="one box per stage, or the fx nodes of each stage (default: stage)")
    parser.add_argument("--depth", type=_depth, default=2,
                        help="node level: collapse modules nested deeper than this; 'none' draws every node "
                             "(default: 2)")
    parser.add_argument("-o", "--output", default=None,
                        help="output file: .svg .png .pdf .dot; its folder is created (default: MODEL.svg)")


def run_render(args: argparse.Namespace) -> int:
    """Draw the partition and heads of ``args.model`` in ``args.mode``."""
    path = Path(args.output or f"{args.model.replace(':', '_')}.svg")
    if path.suffix.lower() not in tuple(FORMATS):  # reason: say so before seconds of tracing
        raise UsageError(f"cannot tell the format of {str(path)!r}: use one of {', '.join(tuple(FORMATS))}")
    from ..diagrams.render import GraphvizNotFound, render

    model, _ = _transformed(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        print(render(model, path, level=args.level, depth=args.depth, title=args.model))
    except GraphvizNotFound as e:
        raise UsageError(str(e)) from None
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="where the demo writes its files (default: out/demo)")
    parser.add_argument("--model", default="resnet10t",
                        help="timm model to train, or tv:NAME for torchvision (default: resnet10t)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="epochs per mode (default: 4)")
    parser.add_argument("--no-progress", action="store_true", help="no plan of runs, no progress bars")


def run_demo(args: argparse.Namespace) -> int:
    """Train standard and relay on generated data, render, deploy, verify, print the table.

    Exit code 1 when the deployed model does not compute what the trained one does.
    """
    from .demo import IMAGE_SIZE, run_demo as demo

    try:  # reason: a wrong name fails now, not after minutes of work
        check_model_name(args.model)
    except ValueError as e:
        raise UsageError(_first_line(e)) from None
    kwargs = {"epochs": args.epochs} if args.epochs else {}
    with _model_errors(args.model, f"on the demo's {IMAGE_SIZE}x{IMAGE_SIZE} images"):
        result = demo(args.out, model_name=args.model, progress=not args.no_progress, **kwargs)
    print(result)
    return 0 if result.check.passed else 1


COMMANDS: list[Command] = [
    Command("inspect", "print the stage plan of a timm or torchvision model (--mode adds heads and windows)",
            _configure_inspect, run_inspect),
    Command("render", "draw a model's stages, heads and gradient windows with graphviz", _configure_render,
            run_render),
    Command("demo", "train standard and relay on generated data, render, deploy and verify", _configure_demo,
            run_demo),
]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The ``fxrelay`` parser with one subparser per command."""
    parser = _Parser(prog="fxrelay", description="Relay backpropagation for any fx-traceable model.")
    parser.add_argument("--version", action=_Version, help="print the versions of fxrelay, torch, torchvision, timm")
    parser.add_argument("--traceback", action="store_true", help="on an unexpected error, show the full traceback")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for usage errors, 1 for other errors)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"fxrelay {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fxrelay {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (reason: the command line promises one-line errors)
        if args.traceback:
            raise
        print(f"fxrelay {args.command}: error: {type(e).__name__}: {_first_line(e)} "
              f"(fxrelay --traceback {args.command} ... shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
