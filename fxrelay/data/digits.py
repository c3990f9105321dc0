"""scikit-learn's handwritten digits as a torch dataset: real images that need no download.

The digits (the UCI optdigits test set that ships inside scikit-learn: 1,797 8x8 images
of 10 classes, 174 to 183 per class, written by 13 people) are the one real image
dataset available without a network. scikit-learn is an optional dependency
(``pip install fxrelay[data]``), imported when a :class:`Digits` is built.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["Digits", "VAL_PER_CLASS", "imbalanced_counts"]

VAL_PER_CLASS = 35
"""Validation images per class: 350 in all (19.5% of the images), exactly balanced."""

_LEVELS = 16  # reason: scikit-learn's digits are counts of set pixels in 4x4 blocks, 0..16


def imbalanced_counts(largest: int, num_classes: int, imbalance: float) -> list[int]:
    """Long-tailed class sizes: ``round(largest * imbalance ** (-c / (num_classes - 1)))`` for class ``c``.

    Class 0 keeps ``largest`` images, the last class ``imbalance`` times fewer, and the
    sizes in between decay geometrically (rounded half up).

    Example:
        >>> imbalanced_counts(139, 10, 10)
        [139, 108, 83, 65, 50, 39, 30, 23, 18, 14]
    """
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (1: balanced), got {imbalance}")
    return [math.floor(largest * imbalance ** (-c / (num_classes - 1)) + 0.5) for c in range(num_classes)]


class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits, upsampled, with a fixed stratified split.

    **Split.** It is fixed, the same on every machine and for every seed: of each
    class's images, in scikit-learn's order, the :data:`VAL_PER_CLASS` = 35 at the
    evenly spaced positions ``floor((i + 0.5) * n / 35)``, ``i = 0..34`` (``n``: the
    class's images), are the validation split (350 images, exactly balanced, 19.5%), and
    the other 1,447 are the train split (139 to 148 per class).

    **Long tail.** With ``imbalance=r`` (train split only) class ``c`` keeps the first
    ``round(139 * r ** (-c / 9))`` of its train images: 139 for digit 0 down to ``139 / r``
    for digit 9 (:func:`imbalanced_counts`). ``imbalance=10`` keeps 139, 108, 83, 65, 50,
    39, 30, 23, 18, 14 images of digits 0..9 (569 in all). The validation split stays
    balanced, so its accuracy is the balanced accuracy (the mean per-class recall).

    **Images.** The 17 grey levels (0..16) are scaled to ``[0, 1]``, upsampled to
    ``image_size`` by bilinear interpolation (``align_corners=False``), repeated to
    ``channels`` channels (3 by default: what timm and torchvision models take), and
    normalised with :attr:`mean` and :attr:`std` (the pixels' mean and standard deviation
    over the whole dataset at 32x32 are 0.305 and 0.324), so they come out with about
    zero mean and unit standard deviation.

    Args:
        split: ``"train"`` or ``"val"``.
        image_size: height and width, at least 8.
        imbalance: ratio of the largest to the smallest train class (1: all train
            images); ``"val"`` takes only 1.
        channels: 1 (grey) or 3 (the grey image in each).
        transform: applied to each normalised image tensor.

    Attributes:
        targets: the label of every image (a list, like ``ImageFolder``'s; read by
            :class:`~fxrelay.data.ClassAwareSampler`).
        classes: ``"0"`` .. ``"9"``.
        indices: each image's index in scikit-learn's ``load_digits()``.
        images: the ``(N, 1, image_size, image_size)`` normalised grey images.

    Raises:
        ImportError: scikit-learn is not installed (one line naming ``pip install fxrelay[data]``).
        ValueError: an unknown split, an image size below 8, ``channels`` not 1 or 3,
            ``imbalance`` below 1, or an imbalanced validation split.

    Example:
        >>> from collections import Counter
        >>> train, val = Digits("train"), Digits("val", image_size=16, channels=1)
        >>> len(train), len(val), train[0][0].shape, val[0][0].shape
        (1447, 350, torch.Size([3, 32, 32]), torch.Size([1, 16, 16]))
        >>> sorted(Counter(Digits("train", imbalance=10).targets).values(), reverse=True)
        [139, 108, 83, 65, 50, 39, 30, 23, 18, 14]
    """

    mean = 0.3
    std = 0.32

    def __init__(self, split: str, image_size: int = 32, *, imbalance: float = 1, channels: int = 3,
                 transform: Callable[[torch.Tensor], Any] | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if imbalance < 1:
            raise ValueError(f"imbalance must be >= 1 (1: all train images), got {imbalance}")
        if split == "val" and imbalance != 1:
            raise ValueError(f"imbalance applies to the train split; the validation split stays balanced "
                             f"(got imbalance={imbalance} for 'val')")
        self.split, self.image_size, self.imbalance, self.channels = split, image_size, imbalance, channels
        self.transform = transform
        grey, labels = _load()
        self.classes = [str(c) for c in range(int(labels.max()) + 1)]
        self.indices = _split_indices(labels, split, imbalance)
        self.targets = labels[self.indices].tolist()
        pixels = grey[self.indices, None] / _LEVELS
        if image_size != pixels.shape[-1]:
            pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = pixels.sub_(self.mean).div_(self.std)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index].expand(self.channels, -1, -1)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _load() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits: ``(1797, 8, 8)`` float32 grey levels 0..16 and the labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("fxrelay.data.Digits needs scikit-learn: pip install fxrelay[data]") from None
    digits = load_digits()
    return torch.as_tensor(digits.images, dtype=torch.float32), torch.as_tensor(digits.target, dtype=torch.long)


def _split_indices(labels: torch.Tensor, split: str, imbalance: float) -> torch.Tensor:
    """The dataset indices of ``split`` (see :class:`Digits`), ascending."""
    members = [(labels == c).nonzero()[:, 0] for c in range(int(labels.max()) + 1)]
    parts = []
    for index in members:
        val = torch.tensor([math.floor((i + 0.5) * len(index) / VAL_PER_CLASS) for i in range(VAL_PER_CLASS)])
        keep = torch.zeros(len(index), dtype=torch.bool).index_fill_(0, val, True)
        parts.append(index[keep] if split == "val" else index[~keep])
    if imbalance != 1:
        counts = imbalanced_counts(min(len(p) for p in parts), len(parts), imbalance)
        parts = [p[:n] for p, n in zip(parts, counts)]
    return torch.cat(parts).sort().values
