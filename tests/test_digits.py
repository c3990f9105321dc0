"""scikit-learn's digits as a dataset: split, long tail, images, the missing-extra error."""

import sys
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from fxrelay.data import ClassAwareSampler, Digits, imbalanced_counts
from fxrelay.data.digits import VAL_PER_CLASS

RAW = load_digits()
CLASS_SIZES = np.bincount(RAW.target).tolist()  # 174 to 183


def _bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """Reference bilinear upsampling with half-pixel centres (``align_corners=False``), one pixel at a time."""
    n = image.shape[0]
    out = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            y, x = [max((o + 0.5) * n / size - 0.5, 0.0) for o in (i, j)]
            y0, x0 = min(int(y), n - 1), min(int(x), n - 1)
            y1, x1 = min(y0 + 1, n - 1), min(x0 + 1, n - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = ((1 - dy) * (1 - dx) * image[y0, x0] + (1 - dy) * dx * image[y0, x1]
                         + dy * (1 - dx) * image[y1, x0] + dy * dx * image[y1, x1])
    return out


def test_shapes_channels_and_normalisation():
    train, val = Digits("train"), Digits("val", image_size=16, channels=1)
    assert (len(train), len(val)) == (1447, 350) == (len(train.targets), len(val.targets))
    image, label = train[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == train.targets[5]
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert val[0][0].shape == (1, 16, 16)
    assert train.classes == [str(c) for c in range(10)]
    pixels = torch.cat([train.images, Digits("val").images])
    assert abs(float(pixels.mean())) < 0.02 and abs(float(pixels.std()) - 1) < 0.02


@pytest.mark.parametrize("size", [8, 16, 32])
def test_images_are_the_bilinear_upsampled_digits(size):
    ds = Digits("val", image_size=size, channels=1)
    for k in (0, 101, 349):
        raw = RAW.images[ds.indices[k]] / 16
        expected = (_bilinear(raw, size) - Digits.mean) / Digits.std
        np.testing.assert_allclose(ds[k][0][0].numpy(), expected, rtol=0, atol=1e-5)
        assert ds.targets[k] == RAW.target[ds.indices[k]]


def test_split_is_fixed_disjoint_and_stratified():
    torch.manual_seed(1)
    first = Digits("train").indices, Digits("val").indices
    torch.manual_seed(2)
    again = Digits("train").indices, Digits("val").indices
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    train, val = first
    assert sorted(train.tolist() + val.tolist()) == list(range(len(RAW.target)))
    val_counts = np.bincount(RAW.target[val.numpy()]).tolist()
    train_counts = np.bincount(RAW.target[train.numpy()]).tolist()
    assert val_counts == [VAL_PER_CLASS] * 10
    assert train_counts == [n - VAL_PER_CLASS for n in CLASS_SIZES]
    for c, n in enumerate(CLASS_SIZES):  # reason: spread through the class, not its first images
        members = np.flatnonzero(RAW.target == c)
        positions = np.searchsorted(members, val.numpy()[RAW.target[val.numpy()] == c])
        assert positions.tolist() == [int((i + 0.5) * n / VAL_PER_CLASS) for i in range(VAL_PER_CLASS)]


def test_long_tail_counts_decay_geometrically_and_validation_stays_balanced():
    assert imbalanced_counts(139, 10, 10) == [139, 108, 83, 65, 50, 39, 30, 23, 18, 14]
    assert imbalanced_counts(100, 3, 4) == [100, 50, 25] and imbalanced_counts(7, 4, 1) == [7] * 4
    tail, full = Digits("train", imbalance=10), Digits("train")
    counts = Counter(tail.targets)
    assert [counts[c] for c in range(10)] == [139, 108, 83, 65, 50, 39, 30, 23, 18, 14] and len(tail) == 569
    for c in range(10):  # reason: each class keeps its first train images
        members = full.indices[torch.tensor(full.targets) == c]
        assert torch.equal(tail.indices[torch.tensor(tail.targets) == c], members[:counts[c]])
    assert torch.equal(Digits("train", imbalance=1).indices, full.indices)
    sampler = ClassAwareSampler(tail.targets, seed=0)
    drawn = Counter(tail.targets[i] for i in list(sampler)[:500])
    assert set(drawn.values()) == {50}


def test_missing_scikit_learn_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError) as info:
        Digits("train")
    assert str(info.value) == "fxrelay.data.Digits needs scikit-learn: pip install fxrelay[data]"


@pytest.mark.parametrize("kwargs, message", [
    (dict(split="test"), "split must be 'train' or 'val', got 'test'"),
    (dict(split="train", image_size=4), "image_size must be >= 8 (the digits are 8x8), got 4"),
    (dict(split="train", channels=2), "channels must be 1 or 3, got 2"),
    (dict(split="train", imbalance=0.5), "imbalance must be >= 1 (1: all train images), got 0.5"),
    (dict(split="val", imbalance=10), "imbalance applies to the train split; the validation split stays balanced "
                                      "(got imbalance=10 for 'val')"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        Digits(**kwargs)
    assert str(info.value) == message
