"""Models that fxrelay's papers use and timm lacks, registered with timm on import.

Example:
    >>> import timm, fxrelay.models
    >>> timm.list_models("cliquenet_s*")
    ['cliquenet_s0', 'cliquenet_s1', 'cliquenet_s2', 'cliquenet_s3']
"""

from .cliquenet import CliqueBlock, CliqueLayer, CliqueNet, ScalePool, Transition

__all__ = ["CliqueBlock", "CliqueLayer", "CliqueNet", "ScalePool", "Transition"]
