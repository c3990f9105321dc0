"""Data for relay training: class-aware sampling and a synthetic shapes dataset.

:class:`ClassAwareSampler` is the sampling of Relay Backpropagation's Places2 entry
(Shen et al., ECCV 2016): a list of classes and one list of images per class, each
walked through in order and reshuffled when exhausted, so that mini-batches are as
class-uniform as the data allows. :class:`Shapes` is a deterministic, generated
image-classification dataset (drawn shapes and textures on cluttered backgrounds) for
tests, demos and benchmarks without downloads.

Example:
    >>> import torch, fxrelay.data as data
    >>> ds = data.Shapes(200, num_classes=10)
    >>> sampler = data.ClassAwareSampler(ds.targets, seed=0)
    >>> loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=sampler)
    >>> images, labels = next(iter(loader))
    >>> images.shape, len(set(labels.tolist()))
    (torch.Size([5, 3, 32, 32]), 5)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ClassAwareSampler", "Shapes", "class_aware_sequence", "reshuffled_passes"]


def reshuffled_passes(size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``length`` entries of a list of ``size`` items walked in order and reshuffled at each pass.

    The first pass is a uniform random permutation. Each later pass is a *jittered
    sort* of the previous one: item at position ``u`` gets the key ``u + D * U(0, 1)``
    with ``D = size // 2 + 1``, and the new pass sorts by key. An item therefore moves
    fewer than ``D`` places between passes, which bounds the distance between two
    consecutive occurrences of an item, across the reshuffle seam too, to
    ``[ceil(size / 2), size + size // 2]``.

    (No reshuffle can keep *every* window of ``size`` entries a permutation: that
    forces ``seq[t] == seq[t + size]``, i.e. no reshuffle at all. A minimum gap of
    ``ceil(size / 2)`` is what this keeps instead.)

    Args:
        size: number of items in the list.
        length: number of entries wanted.
        generator: the random source.

    Returns:
        A ``LongTensor`` of item indices in ``[0, size)``.

    Example:
        >>> seq = reshuffled_passes(4, 8, torch.Generator().manual_seed(0))
        >>> sorted(seq[:4].tolist()), sorted(seq[4:].tolist())
        ([0, 1, 2, 3], [0, 1, 2, 3])
    """
    if size <= 0:
        raise ValueError(f"cannot cycle through an empty list (size={size})")
    passes = [torch.randperm(size, generator=generator)]
    jitter = size // 2 + 1
    for _ in range(math.ceil(length / size) - 1):
        keys = torch.arange(size) + jitter * torch.rand(size, generator=generator, dtype=torch.float64)
        passes.append(passes[-1][torch.argsort(keys)])
    return torch.cat(passes)[:length]


def class_aware_sequence(groups: Sequence[torch.Tensor], length: int, samples_per_class: int,
                         generator: torch.Generator) -> torch.Tensor:
    """The pure heart of :class:`ClassAwareSampler`: ``length`` sample indices.

    Draws a class from the reshuffled class list, then ``samples_per_class`` indices
    from that class's reshuffled list, and repeats.

    Args:
        groups: the sample indices of each class.
        length: number of indices wanted.
        samples_per_class: consecutive indices drawn per class draw.
        generator: the random source.

    Example:
        >>> groups = [torch.tensor([0, 1]), torch.tensor([2, 3])]
        >>> seq = class_aware_sequence(groups, 4, 2, torch.Generator().manual_seed(0))
        >>> sorted(seq.tolist())
        [0, 1, 2, 3]
    """
    num_draws = math.ceil(length / samples_per_class)
    classes = reshuffled_passes(len(groups), num_draws, generator)
    counts = torch.bincount(classes, minlength=len(groups)).tolist()
    draws_by_class = torch.argsort(classes, stable=True).split(counts)
    picks = torch.empty(num_draws, samples_per_class, dtype=torch.long)
    for members, draws in zip(groups, draws_by_class):
        order = reshuffled_passes(len(members), len(draws) * samples_per_class, generator)
        picks[draws] = members[order].view(-1, samples_per_class)
    return picks.flatten()[:length]


class ClassAwareSampler(Sampler[int]):
    """Class-aware sampling (Relay Backpropagation, Shen et al. 2016), for ``DataLoader(sampler=...)``.

    The sampler keeps a class list and one list of samples per class; it draws the next
    class from the class list, then the next ``samples_per_class`` samples from that
    class's list. Both kinds of list are walked in order and reshuffled when exhausted
    (see :func:`reshuffled_passes`). With ``samples_per_class=1`` and ``C`` classes:

    * every pass ``[p*C, (p+1)*C)`` of the sequence holds each class exactly once;
    * two draws of the same class are at least ``ceil(C/2)`` and at most
      ``C + C//2`` draws apart, across reshuffles too: any window of ``ceil(C/2)``
      draws has distinct classes, any window of ``C`` draws holds each class 0, 1 or 2
      times (exactly once for all classes is impossible if the list is ever reshuffled);
    * a class's samples are each drawn once per pass over that class's list.

    Like ``DistributedSampler``: the sequence of an epoch is fixed by ``seed`` and
    :meth:`set_epoch` (or by one draw from ``generator`` per ``__iter__``), and with
    ``num_replicas`` replicas, replica ``rank`` gets entries ``rank::num_replicas`` of
    one global sequence of ``len(self) * num_replicas`` entries (disjoint, interleaved
    shards that together are the whole sequence).

    Args:
        labels: one class label per sample: a list, a tensor, or a dataset with
            ``.targets`` (``ImageFolder``); also see :meth:`from_dataset`.
        num_samples: entries per epoch over all replicas (default ``len(labels)``).
        samples_per_class: consecutive samples drawn per class draw.
        generator: random source; when given, each ``__iter__`` draws its seed from it.
        num_replicas: number of distributed processes (default: the world size when
            ``torch.distributed`` is initialised, else 1).
        rank: this process's rank (default: the current rank, else 0).
        seed: base seed, combined with the epoch.

    Example:
        >>> labels = [0, 0, 0, 1, 2]
        >>> sampler = ClassAwareSampler(labels, num_samples=6)
        >>> [sorted(labels[i] for i in list(sampler)[p:p + 3]) for p in (0, 3)]
        [[0, 1, 2], [0, 1, 2]]
    """

    def __init__(self, labels: Any, num_samples: int | None = None, samples_per_class: int = 1,
                 generator: torch.Generator | None = None, *, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        labels = _labels_of(labels)
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        num_replicas, rank = _replica(num_replicas, rank)
        self.groups = _groups(labels)
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        self.samples_per_class = samples_per_class
        self.generator = generator
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0

    @classmethod
    def from_dataset(cls, dataset: Dataset, **kwargs: Any) -> "ClassAwareSampler":
        """A sampler over ``dataset``'s labels: its ``.targets``, else the label of every item."""
        labels = getattr(dataset, "targets", None)
        if labels is None:
            labels = [dataset[i][1] for i in range(len(dataset))]  # reason: no label list, read them all
        return cls(labels, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        """Use the sequence of ``epoch`` (call before each epoch, as with ``DistributedSampler``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.generator is not None:
            seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator))
        else:
            seed = self.seed + self.epoch
        total = len(self) * self.num_replicas
        sequence = class_aware_sequence(self.groups, total, self.samples_per_class,
                                        torch.Generator().manual_seed(seed))
        return iter(sequence[self.rank::self.num_replicas].tolist())


def _labels_of(labels: Any) -> torch.Tensor:
    labels = getattr(labels, "targets", labels)  # reason: ImageFolder, CIFAR10, Shapes
    labels = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels))
    if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point():
        raise ValueError(f"labels must be a non-empty 1-d sequence of integers, got shape {tuple(labels.shape)}")
    return labels.long()


def _groups(labels: torch.Tensor) -> list[torch.Tensor]:
    """The sample indices of each class present in ``labels``, classes in label order."""
    _, counts = torch.unique(labels, return_counts=True)
    return list(torch.argsort(labels, stable=True).split(counts.tolist()))


def _replica(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if distributed else 1
    if rank is None:
        rank = torch.distributed.get_rank() if distributed else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


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
