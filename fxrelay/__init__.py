"""fxrelay: relay backpropagation, local learning and deep supervision for any fx-traceable model.

The pipeline is a sequence of passes over one intermediate representation, the
:class:`Plan`: trace -> analyse -> partition -> transform (train) -> deploy / render.
The package is layered (see docs/architecture.md): ``core`` (the IR and the runtime the
emitted graphs call) <- ``passes`` <- ``deployment``, ``diagrams`` <- ``train`` <- ``io`` <- ``apps``.

Names are imported on first use, so ``import fxrelay`` (and ``fxrelay --help``) does
not pay for torch, timm and torchvision until a name needs them.

>>> import fxrelay, torchvision
>>> plan = fxrelay.partition(torchvision.models.resnet18())
>>> [s.reduction for s in plan.stages]
[2, 4, 8, 16, 32]
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "fxrelay.core.ir": ("Head", "Stage", "TracingConfig"),
    "fxrelay.core.plan": ("Plan",),
    "fxrelay.core.outputs": ("HeadOutputs", "head_losses", "head_outputs", "combine_heads"),
    "fxrelay.core.scopes": ("detach", "overlap"),
    "fxrelay.passes.tracing": ("TraceError", "Tracer", "default_example_input", "register_autowrap",
                               "register_leaf", "trace"),
    "fxrelay.passes.partition": ("partition",),
    "fxrelay.passes.split": ("run_stages", "split_stages"),
    "fxrelay.core.choices": ("MODES",),
    "fxrelay.passes.heads": ("make_head",),
    "fxrelay.passes.downstream": ("Downstream",),
    "fxrelay.passes.rewrite": ("head_parameters", "is_transformed", "original_state_dict", "plan_of",
                               "transform"),
    "fxrelay.deployment.deploy": ("deploy",),
    "fxrelay.deployment.fold": ("fold_bn", "fold_report"),
    "fxrelay.deployment.bn_stats": ("recalibrate_bn",),
    "fxrelay.diagrams.render": ("GraphvizNotFound", "render", "render_graph"),
    "fxrelay.data": ("ClassAwareSampler", "Digits", "Shapes"),
    "fxrelay.train.loop": ("Trainer", "fit"),
    "fxrelay.train.recipe": ("Recipe",),
    "fxrelay.train.memory": ("AllocatedBytes", "SavedBytes"),
    "fxrelay.train.localstep": ("LocalStep", "LocalStepResult"),
    "fxrelay.train.parallel": ("StageParallel",),
    "fxrelay.io.saving": ("ModelSpec", "ModelRecipe", "load", "save"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = {"data": "fxrelay.data", "models": "fxrelay.models", "parallel": "fxrelay.train.parallel"}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        # reason: the run-time guards subscribe to every transform (fxrelay.core.events) when imported
        importlib.import_module("fxrelay.train.guards")
        value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        raise AttributeError(f"module 'fxrelay' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF, *_SUBMODULES])
