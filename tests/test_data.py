"""Class-aware sampling (Relay BP) and the synthetic Shapes dataset."""

import math
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fxrelay.data import ClassAwareSampler, Shapes, reshuffled_passes

# 7 classes of 1..7 samples, interleaved: an imbalanced label list
LABELS = [c for size in range(1, 8) for c in range(7 - size, 7)]


def _gaps(sequence: list[int]) -> list[int]:
    """Distances between consecutive occurrences of each value."""
    last, gaps = {}, []
    for t, value in enumerate(sequence):
        if value in last:
            gaps.append(t - last[value])
        last[value] = t
    return gaps


@pytest.mark.parametrize("size", [1, 2, 3, 10, 37])
def test_reshuffled_passes_are_permutations_with_bounded_gaps(size):
    sequence = reshuffled_passes(size, 40 * size, torch.Generator().manual_seed(size)).tolist()
    passes = [sequence[p:p + size] for p in range(0, len(sequence), size)]
    assert all(sorted(p) == list(range(size)) for p in passes)
    gaps = _gaps(sequence)
    assert min(gaps) >= math.ceil(size / 2)
    assert max(gaps) <= size + size // 2
    if size >= 3:
        assert len({tuple(p) for p in passes}) > 1  # reason: it does reshuffle


def test_class_windows_are_balanced_across_reshuffles():
    labels = torch.tensor(LABELS)
    num_classes = 7
    sampler = ClassAwareSampler(labels, num_samples=60 * num_classes, seed=3)
    classes = labels[list(sampler)].tolist()
    for p in range(0, len(classes), num_classes):
        assert sorted(classes[p:p + num_classes]) == list(range(num_classes))
    for t in range(len(classes) - num_classes + 1):
        assert len(set(classes[t:t + 4])) == 4  # reason: ceil(7 / 2) = 4 draws apart at least
        counts = Counter(classes[t:t + num_classes])
        assert max(counts.values()) <= 2 and sum(counts.values()) == num_classes
    aligned = all(sorted(classes[t:t + num_classes]) == list(range(num_classes))
                  for t in range(len(classes) - num_classes + 1))
    assert not aligned  # reason: "exactly once in every window" would mean never reshuffling


def test_each_image_is_drawn_once_per_pass_over_its_class():
    labels = torch.tensor(LABELS)
    sequence = list(ClassAwareSampler(labels, num_samples=500, seed=1))
    for c in range(7):
        members = sorted((labels == c).nonzero()[:, 0].tolist())
        drawn = [i for i in sequence if labels[i] == c]
        passes = [drawn[p:p + len(members)] for p in range(0, len(drawn) - len(members) + 1, len(members))]
        assert len(passes) >= 10
        assert all(sorted(p) == members for p in passes)


def test_samples_per_class_draws_consecutive_samples_of_one_class():
    labels = torch.tensor(LABELS)
    sequence = list(ClassAwareSampler(labels, num_samples=140, samples_per_class=2, seed=0))
    classes = labels[sequence].tolist()
    pairs = [classes[t:t + 2] for t in range(0, 140, 2)]
    assert all(a == b for a, b in pairs)
    firsts = [a for a, _ in pairs]
    assert all(sorted(firsts[p:p + 7]) == list(range(7)) for p in range(0, 70, 7))
    assert len(sequence) == 140


def test_determinism_seed_epoch_and_generator():
    def run(**kwargs):
        return list(ClassAwareSampler(LABELS, num_samples=50, **kwargs))

    assert run(seed=5) == run(seed=5)
    assert run(seed=5) != run(seed=6)
    sampler = ClassAwareSampler(LABELS, seed=5)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    a = ClassAwareSampler(LABELS, generator=torch.Generator().manual_seed(9))
    b = ClassAwareSampler(LABELS, generator=torch.Generator().manual_seed(9))
    assert list(a) == list(b)
    assert list(a) != list(ClassAwareSampler(LABELS, generator=torch.Generator().manual_seed(9)))


def test_shards_are_disjoint_interleaved_and_cover_the_global_sequence():
    whole = list(ClassAwareSampler(LABELS, num_samples=102, seed=2))
    shards = [ClassAwareSampler(LABELS, num_samples=100, num_replicas=3, rank=r, seed=2) for r in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]
    lists = [list(s) for s in shards]
    assert [x for group in zip(*lists) for x in group] == whole
    for rank, values in enumerate(lists):
        assert values == whole[rank::3]
    with pytest.raises(ValueError, match="rank"):
        ClassAwareSampler(LABELS, num_replicas=2, rank=2)


def test_label_sources_and_errors():
    expected = list(ClassAwareSampler(LABELS, seed=0))
    assert list(ClassAwareSampler(torch.tensor(LABELS), seed=0)) == expected
    dataset = TensorDataset(torch.zeros(len(LABELS), 1), torch.tensor(LABELS))
    assert list(ClassAwareSampler.from_dataset(dataset, seed=0)) == expected
    dataset.targets = LABELS
    assert list(ClassAwareSampler(dataset, seed=0)) == expected
    assert ClassAwareSampler(LABELS).num_classes == 7
    with pytest.raises(ValueError, match="integers"):
        ClassAwareSampler([0.5, 1.0])
    with pytest.raises(ValueError, match="samples_per_class"):
        ClassAwareSampler(LABELS, samples_per_class=0)


def test_dataloader_gives_class_uniform_batches():
    dataset = Shapes(200, num_classes=10, seed=0)
    sampler = ClassAwareSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=5, sampler=sampler)
    labels = [batch_labels.tolist() for _, batch_labels in loader]
    assert len(labels) == 40
    assert all(len(set(batch)) == 5 for batch in labels)  # reason: ceil(10 / 2) = 5 distinct per window
    assert set(Counter(x for batch in labels for x in batch).values()) == {20}


def test_shapes_is_deterministic_per_index_and_seed():
    small, large = Shapes(30, seed=4), Shapes(1100, seed=4)
    assert torch.equal(small.images, large.images[:30])
    assert not torch.equal(small.images, Shapes(30, seed=5).images)
    image, label = large[1037]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and label == 7
    assert large.targets[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert set(Counter(large.targets).values()) == {110}


def test_shapes_normalisation_classes_and_transform():
    dataset = Shapes(1000, image_size=24, num_classes=18, seed=0, transform=lambda x: x[:1])
    pixels = dataset.images.float()
    assert abs(pixels.mean().item()) < 0.1 and 0.8 < pixels.std().item() < 1.2
    assert dataset[0][0].shape == (1, 24, 24)
    assert dataset.classes[0] == "solid disc" and dataset.classes[17] == "checker bar"
    with pytest.raises(ValueError, match="num_classes"):
        Shapes(10, num_classes=19)
