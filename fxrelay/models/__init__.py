"""Models that fxrelay's papers use and timm lacks, registered with timm on import.

Example:
    >>> import timm, fxrelay.models
    >>> timm.list_models("cliquenet_s*")
    ['cliquenet_s0', 'cliquenet_s1', 'cliquenet_s2', 'cliquenet_s3']
    >>> timm.list_models("plainnet*")
    ['plainnet5', 'plainnet10', 'plainnet20', 'plainnet30', 'plainnet40', 'plainnet60']
"""

from .cliquenet import CliqueBlock, CliqueLayer, CliqueNet, ScalePool, Transition
from .plainnet import PlainNet, plain_cnn

__all__ = ["CliqueBlock", "CliqueLayer", "CliqueNet", "PlainNet", "ScalePool", "Transition", "plain_cnn"]
