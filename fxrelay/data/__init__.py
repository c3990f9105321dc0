"""Data for relay training: class-aware sampling and datasets that need no download
(generated :class:`Shapes`; scikit-learn's real :class:`Digits`, with the ``data`` extra).

Example:
    >>> import torch, fxrelay.data as data
    >>> ds = data.Shapes(200, num_classes=10)
    >>> sampler = data.ClassAwareSampler(ds.targets, seed=0)
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler)
    >>> images, labels = next(iter(loader))
    >>> images.shape, len(set(labels.tolist()))
    (torch.Size([5, 3, 32, 32]), 5)
"""

from .digits import Digits, imbalanced_counts
from .sampling import ClassAwareSampler, class_aware_sequence, reshuffled_passes
from .shapes import Shapes, render_shapes

__all__ = ["ClassAwareSampler", "Digits", "Shapes", "class_aware_sequence", "imbalanced_counts", "render_shapes",
           "reshuffled_passes"]
