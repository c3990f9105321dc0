"""Every private torch symbol fxrelay uses, in one place.

The rest of the package uses only public torch, torchvision and timm API. When a torch
release moves one of these, this is the only file to change.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY, _deserialize_graph_module, _forward_from_src
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "ASSERT_IS_NONE", "BatchNormBase", "DropoutBase", "TORCH_ASSERT", "TorchDispatchMode",
    "USER_PRESERVED_ATTRIBUTES_KEY", "autowrap", "disabled_torch_function", "functorch_active", "make_wrapper_subclass",
    "rebuild_graph_module",
    "tree_flatten", "tree_map", "tree_unflatten",
]

BatchNormBase = nn.modules.batchnorm._BatchNorm
DropoutBase = nn.modules.dropout._DropoutNd
USER_PRESERVED_ATTRIBUTES_KEY = _USER_PRESERVED_ATTRIBUTES_KEY
disabled_torch_function = torch._C.DisableTorchFunctionSubclass
functorch_active = torch._C._are_functorch_transforms_active
ASSERT_IS_NONE = fx._symbolic_trace._assert_is_none  # reason: the guard fx adds for a ``concrete_args`` None
TORCH_ASSERT = torch._assert


def make_wrapper_subclass(cls: type, like: torch.Tensor) -> torch.Tensor:
    """A tensor of subclass ``cls`` with ``like``'s metadata and no storage of its own."""
    return torch.Tensor._make_wrapper_subclass(cls, like.shape, strides=like.stride(), dtype=like.dtype,
                                               device=like.device, layout=like.layout, requires_grad=False)


def rebuild_graph_module(body: dict, import_block: str, cls: type[fx.GraphModule]) -> fx.GraphModule:
    """Unpickle what ``GraphModule.__reduce__`` saved as an instance of the subclass ``cls``."""
    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    return _deserialize_graph_module(forward, body, cls)


def autowrap(tracer: fx.Tracer, functions: list) -> None:
    """Make ``tracer`` record calls of ``functions`` as single nodes (as its ``autowrap_functions`` argument does)."""
    tracer._autowrap_function_ids.update(id(f) for f in functions)
