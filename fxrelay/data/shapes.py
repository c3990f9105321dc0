"""A deterministic, generated image-classification dataset: drawn shapes and textures on
cluttered backgrounds, for tests, demos and benchmarks without downloads."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

__all__ = ["Shapes", "render_shapes", "SHAPES", "FILLS"]

SHAPES = ("disc", "ring", "square", "triangle", "cross", "bar")
FILLS = ("solid", "stripes", "checker")
_CLUTTER = 3
_FIELDS = {"center": 2, "radius": 1, "angle": 1, "colour": 3, "second": 3, "background": 3, "gradient": 2,
           "period": 1, "orientation": 1, "phase": 2, "clutter": 6 * _CLUTTER}
_CHUNK = 1024


class Shapes(Dataset):
    """Generated images of drawn shapes with textures, on noisy cluttered backgrounds.

    Class ``c`` is the shape ``SHAPES[c % 6]`` (disc, ring, square, triangle, cross,
    bar) filled with ``FILLS[c // 6]`` (solid, stripes, checkerboard), so up to 18
    classes. Every image draws its own position, size, rotation, colours, stripe or
    check period, orientation and phase, background colour and gradient, three
    clutter blobs and its pixel noise. Images are generated in vectorised chunks of
    1024, each from a generator seeded by ``(seed, i // 1024)``, so image ``i``
    depends on ``seed`` and ``i`` alone, whatever ``n`` is; they are kept normalised,
    as float16. Labels cycle through the classes (``i % num_classes``): balanced.

    Args:
        n: number of images.
        image_size: height and width.
        num_classes: number of classes, 2 to 18.
        seed: dataset seed.
        noise: standard deviation of the pixel noise (images are in ``[0, 1]`` before
            normalisation).
        transform: applied to each normalised image tensor.

    Attributes:
        targets: the label of every image (a list, like ``ImageFolder``'s).
        classes: class names, ``"solid disc"`` ... ``"checker bar"``.
        mean, std: the normalisation applied (images come out ~ zero mean, unit std).

    Example:
        >>> ds = Shapes(100, image_size=32, num_classes=10, seed=0)
        >>> image, label = ds[13]
        >>> image.shape, label, ds.targets[:3], ds.classes[7]
        (torch.Size([3, 32, 32]), 3, [0, 1, 2], 'stripes ring')
    """

    mean = 0.5
    std = 0.3

    def __init__(self, n: int, image_size: int = 32, num_classes: int = 10, seed: int = 0, *,
                 noise: float = 0.08, transform: Callable[[torch.Tensor], Any] | None = None):
        if not 2 <= num_classes <= len(SHAPES) * len(FILLS):
            raise ValueError(f"num_classes must be between 2 and {len(SHAPES) * len(FILLS)}, got {num_classes}")
        self.image_size, self.num_classes, self.seed, self.noise = image_size, num_classes, seed, noise
        self.transform = transform
        self.targets = [i % num_classes for i in range(n)]
        self.classes = [f"{FILLS[c // len(SHAPES)]} {SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]
        chunks = [self._render(lo // _CHUNK, min(n - lo, _CHUNK)) for lo in range(0, n, _CHUNK)]
        self.images = torch.cat(chunks) if chunks else torch.empty(0, 3, image_size, image_size, dtype=torch.float16)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index].float()
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def _render(self, chunk: int, count: int) -> torch.Tensor:
        """The first ``count`` images of ``chunk`` (parameters are drawn for the whole chunk)."""
        params, noise = _draw(self.seed, chunk, self.image_size)
        labels = torch.arange(chunk * _CHUNK, chunk * _CHUNK + count) % self.num_classes
        images = render_shapes(params[:count], labels, self.image_size).add_(noise[:count], alpha=self.noise)
        return images.sub_(self.mean).div_(self.std).half()


def _draw(seed: int, chunk: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform parameters and the pixel noise of the images of ``chunk`` of dataset ``seed``."""
    generator = torch.Generator().manual_seed(hash((seed, chunk)) & (2**62 - 1))
    params = torch.rand(_CHUNK, sum(_FIELDS.values()), generator=generator)
    return params, torch.randn(_CHUNK, 3, size, size, generator=generator)


def render_shapes(params: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """The pure heart of :class:`Shapes`: images in ``[0, 1]`` from uniform parameters.

    Each pixel gets a layer: background, a clutter blob, or the shape's first or second
    colour (stripes and checks); one gather then paints the layers with each image's
    palette, and a linear gradient is added.

    Args:
        params: ``(N, 37)`` uniform numbers in ``[0, 1)``, one row per image.
        labels: ``(N,)`` classes: shape ``SHAPES[label % 6]``, fill ``FILLS[label // 6]``.
        size: image height and width.

    Returns:
        ``(N, 3, size, size)`` float images.

    Example:
        >>> render_shapes(torch.rand(2, 37), torch.tensor([0, 9]), 16).shape
        torch.Size([2, 3, 16, 16])
    """
    f = dict(zip(_FIELDS, params.split(list(_FIELDS.values()), dim=1)))
    grid = torch.linspace(-1, 1, size)
    xs, ys = grid.view(1, 1, size), grid.view(1, size, 1)
    layers = torch.zeros(len(params), size, size, dtype=torch.uint8)
    for k, blob in enumerate(f["clutter"].view(-1, _CLUTTER, 6).unbind(1)):
        radius = 0.08 + 0.1 * blob[:, :1, None]
        inside = (xs - 2 * blob[:, 1:2, None] + 1) ** 2 + (ys - 2 * blob[:, 2:3, None] + 1) ** 2 < radius ** 2
        layers.masked_fill_(inside, 1 + k)
    shape, fill = labels % len(SHAPES), labels // len(SHAPES)
    for s in range(len(SHAPES)):
        index = (shape == s).nonzero()[:, 0]
        if len(index):
            layers[index] = _paint_shape(layers[index], s, fill[index], {k: v[index] for k, v in f.items()}, xs, ys)
    background = (f["colour"] + 0.3 + 0.4 * f["background"]) % 1  # reason: contrast >= 0.3 with the shape
    second = (f["colour"] + 0.35 + 0.3 * f["second"]) % 1
    palette = torch.cat([background[:, None], f["clutter"].view(-1, _CLUTTER, 6)[..., 3:],
                         f["colour"][:, None], second[:, None]], dim=1).transpose(1, 2)
    images = torch.gather(palette, 2, layers.view(len(params), 1, -1).long().expand(-1, 3, -1)).view(-1, 3, size, size)
    angle = 2 * math.pi * f["gradient"][:, :1, None]
    slope = 0.25 * f["gradient"][:, 1:, None]
    return images.add_((slope * (torch.cos(angle) * xs + torch.sin(angle) * ys))[:, None])


def _paint_shape(layers: torch.Tensor, shape: int, fill: torch.Tensor, f: dict[str, torch.Tensor],
                 xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Lay shape ``shape`` (one per image, same type) over ``layers``, in one or two colours."""
    radius = 0.4 + 0.35 * f["radius"][:, :, None]
    angle = 2 * math.pi * f["angle"][:, :, None]
    center = 0.9 * f["center"][..., None] - 0.45  # reason: keep the centre in the middle 45%
    dx, dy = (xs - center[:, :1]) / radius, (ys - center[:, 1:]) / radius
    u, v = torch.cos(angle) * dx + torch.sin(angle) * dy, torch.cos(angle) * dy - torch.sin(angle) * dx
    inside = _INSIDE[SHAPES[shape]](u, v)
    first = 1 + _CLUTTER
    second = inside & (fill[:, None, None] > 0) & ~_pattern(fill, f, xs, ys)
    return layers.masked_fill_(inside, first).masked_fill_(second, first + 1)


def _box(u: torch.Tensor, v: torch.Tensor, width: float = 0.3) -> torch.Tensor:
    return (u.abs() < 1) & (v.abs() < width)


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s3 = math.sqrt(3) / 2
    return (v > -0.5) & (s3 * u + v / 2 < 0.5) & (v / 2 - s3 * u < 0.5)


_INSIDE = {
    "disc": lambda u, v: u * u + v * v < 1,
    "ring": lambda u, v: ((u * u + v * v) - 0.65).abs() < 0.35,
    "square": lambda u, v: (u.abs() < 0.8) & (v.abs() < 0.8),
    "triangle": _triangle,
    "cross": lambda u, v: _box(u, v) | _box(v, u),
    "bar": _box,
}


def _pattern(fill: torch.Tensor, f: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Where the first colour of the fill shows: stripes (fill 1) or checks (fill 2)."""
    size = xs.shape[-1]
    frequency = math.pi * size / (3 + 4 * f["period"][:, :, None])  # reason: a period of 3 to 7 pixels
    angle = math.pi * f["orientation"][:, :, None]
    phase = 2 * math.pi * f["phase"][:, :, None]
    along = torch.sin(frequency * (torch.cos(angle) * xs + torch.sin(angle) * ys) + phase[:, :1])
    across = torch.sin(frequency * (torch.cos(angle) * ys - torch.sin(angle) * xs) + phase[:, 1:])
    return torch.where(fill[:, None, None] == 1, along > 0, along * across > 0)
