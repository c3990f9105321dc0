"""fxrelay: relay backpropagation, local learning and deep supervision for any fx-traceable model.

The pipeline is a sequence of passes over one intermediate representation, the
:class:`Plan`: trace -> analyse -> partition -> transform (train) -> deploy / render.

Public names are imported on first use (PEP 562), so ``import fxrelay`` and the
``fxrelay`` command's ``--help`` do not wait for torch; ``from fxrelay import X`` and
``fxrelay.X`` work as usual, submodules included (``fxrelay.local``).

>>> import fxrelay, torchvision
>>> plan = fxrelay.partition(torchvision.models.resnet18())
>>> [s.reduction for s in plan.stages]
[2, 4, 8, 16, 32]
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# reason: name -> submodule defining it; imported on first access by __getattr__
_EXPORTS = {
    "recalibrate_bn": "bn_stats",
    "ClassAwareSampler": "data",
    "Shapes": "data",
    "deploy": "deploy",
    "fold_bn": "fold",
    "fold_report": "fold",
    "make_head": "heads",
    "HeadOutputs": "outputs",
    "head_losses": "outputs",
    "head_outputs": "outputs",
    "partition": "partition",
    "Head": "plan",
    "Plan": "plan",
    "Stage": "plan",
    "GraphvizNotFound": "render",
    "render": "render",
    "render_graph": "render",
    "MODES": "rewrite",
    "is_transformed": "rewrite",
    "original_state_dict": "rewrite",
    "plan_of": "rewrite",
    "transform": "rewrite",
    "Recipe": "saving",
    "load": "saving",
    "save": "saving",
    "TraceError": "trace",
    "Tracer": "trace",
    "default_example_input": "trace",
    "trace": "trace",
}

__all__ = sorted(_EXPORTS, key=str.lower)

if TYPE_CHECKING:
    from .bn_stats import recalibrate_bn
    from .data import ClassAwareSampler, Shapes
    from .deploy import deploy
    from .fold import fold_bn, fold_report
    from .heads import make_head
    from .outputs import HeadOutputs, head_losses, head_outputs
    from .partition import partition
    from .plan import Head, Plan, Stage
    from .render import GraphvizNotFound, render, render_graph
    from .rewrite import MODES, is_transformed, original_state_dict, plan_of, transform
    from .saving import Recipe, load, save
    from .trace import TraceError, Tracer, default_example_input, trace


def __getattr__(name: str) -> Any:
    """Import a public name, or a submodule (``fxrelay.local``), on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # reason: later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module: importing submodule ``fxrelay.deploy`` keeps ``fxrelay.deploy`` the function.

    reason: the import system sets a submodule as an attribute of its package once it
    is loaded; for ``deploy``, ``partition``, ``render`` and ``trace`` that would hide the
    function of the same name (the eager ``from .deploy import deploy`` used to overwrite it).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
