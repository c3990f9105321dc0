"""fxrelay: relay backpropagation, local learning and deep supervision for any fx-traceable model.

The pipeline is a sequence of passes over one intermediate representation, the
:class:`Plan`: trace -> analyse -> partition -> transform (train) -> deploy / render.

>>> import fxrelay, torchvision
>>> plan = fxrelay.partition(torchvision.models.resnet18())
>>> [s.reduction for s in plan.stages]
[2, 4, 8, 16, 32]
"""

from .partition import partition
from .plan import Head, Plan, Stage
from .trace import TraceError, Tracer, default_example_input, trace

__all__ = [
    "Head",
    "Plan",
    "Stage",
    "TraceError",
    "Tracer",
    "default_example_input",
    "partition",
    "trace",
]

__version__ = "0.1.0"
