"""Class-aware sampling (Relay Backpropagation, Shen et al. 2016).

:class:`ClassAwareSampler` is the sampling of Relay Backpropagation's Places2 entry: a
list of classes and one list of images per class, each walked through in order and
reshuffled when exhausted, so that mini-batches are as class-uniform as the data allows.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ClassAwareSampler", "class_aware_sequence", "reshuffled_passes"]


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
