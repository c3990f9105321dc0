"""fxrelay: relay backpropagation, local learning and deep supervision for any fx-traceable model.

The pipeline is a sequence of passes over one intermediate representation, the
:class:`Plan`: trace -> analyse -> partition -> transform (train) -> deploy / render.

>>> import fxrelay, torchvision
>>> plan = fxrelay.partition(torchvision.models.resnet18())
>>> [s.reduction for s in plan.stages]
[2, 4, 8, 16, 32]
"""

from .bn_stats import recalibrate_bn
from .data import ClassAwareSampler, Shapes
from .deploy import deploy
from .fold import fold_bn, fold_report
from .heads import make_head
from .localstep import LocalStep, LocalStepResult
from .outputs import HeadOutputs, head_losses, head_outputs
from .partition import partition
from .plan import Head, Plan, Stage
from .render import GraphvizNotFound, render, render_graph
from .rewrite import MODES, is_transformed, original_state_dict, plan_of, transform
from .trace import TraceError, Tracer, default_example_input, trace

__all__ = [
    "MODES",
    "ClassAwareSampler",
    "GraphvizNotFound",
    "Head",
    "HeadOutputs",
    "LocalStep",
    "LocalStepResult",
    "Plan",
    "Shapes",
    "Stage",
    "TraceError",
    "Tracer",
    "default_example_input",
    "deploy",
    "fold_bn",
    "fold_report",
    "head_losses",
    "head_outputs",
    "is_transformed",
    "make_head",
    "original_state_dict",
    "partition",
    "plan_of",
    "recalibrate_bn",
    "render",
    "render_graph",
    "trace",
    "transform",
]

__version__ = "0.1.0"
