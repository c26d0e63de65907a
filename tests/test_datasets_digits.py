"""The bundled 8 × 8 digits load as scikit-learn ships them, binarise at the
documented threshold, and split into the documented fixed train/test sets."""

import gzip
import hashlib
from importlib import resources

import pytest
import torch

from curvi.datasets import DIGITS_NUM_TEST, DIGITS_THRESHOLD, load_digits, split_digits

# The digits 0..9 in the file (as scikit-learn's load_digits().target counts them).
LABEL_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_file_is_scikit_learns_copy():
    """The compressed file is scikit-learn 1.9.1's, byte for byte (the digest
    digits_licence.md records)."""
    data = resources.files("curvi.datasets").joinpath("digits.csv.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == (
        "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
    )
    assert len(gzip.decompress(data).decode().splitlines()) == 1797


def test_raw_counts():
    data = load_digits(binarize=False, dtype=torch.float64)
    assert data.images.shape == (1797, 64) and data.images.dtype == torch.float64
    assert data.labels.shape == (1797,) and data.labels.dtype == torch.int64
    assert float(data.images.min()) == 0 and float(data.images.max()) == 16
    assert bool((data.images == data.images.round()).all())
    # checksums of the counts: their total, and Σ (row + 1)(column + 1) · count,
    # which a reordering of rows or columns would change
    assert int(data.images.sum()) == 561718
    weights = torch.arange(1, 1798, dtype=torch.float64).unsqueeze(-1) * torch.arange(1, 65)
    assert int((data.images * weights).sum()) == 16337198609
    assert torch.bincount(data.labels, minlength=10).tolist() == LABEL_COUNTS
    # the first image is a 0 (scikit-learn's digits.images[0])
    assert data.labels[0] == 0
    assert data.images[0, :8].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_binarised():
    raw = load_digits(binarize=False)
    data = load_digits()
    assert data.images.dtype == torch.get_default_dtype() and data.images.shape == (1797, 64)
    assert set(data.images.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(data.images, (raw.images > DIGITS_THRESHOLD).to(data.images.dtype))
    assert DIGITS_THRESHOLD == 7 and int(data.images.sum()) == 37151
    assert torch.equal(data.labels, raw.labels)


def test_split_is_fixed_and_disjoint():
    data = load_digits()
    train, test = split_digits(data)
    assert len(train.labels) == 1500 and len(test.labels) == DIGITS_NUM_TEST == 297
    assert train.images.shape == (1500, 64) and test.images.shape == (297, 64)
    # together they are the data set (row multisets agree), and the split is fixed
    assert torch.equal(
        torch.bincount(train.labels, minlength=10) + torch.bincount(test.labels, minlength=10),
        torch.tensor(LABEL_COUNTS),
    )
    assert torch.bincount(test.labels, minlength=10).tolist() == [30, 38, 28, 26, 27, 28, 32, 33, 35, 20]
    assert float(train.images.sum() + test.images.sum()) == float(data.images.sum())
    again_train, again_test = split_digits(load_digits())
    assert torch.equal(again_train.images, train.images) and torch.equal(again_test.labels, test.labels)
    other_train, _ = split_digits(data, seed=1)
    assert not torch.equal(other_train.labels, train.labels)


def test_split_rejects_bad_size():
    with pytest.raises(ValueError, match="num_test"):
        split_digits(load_digits(), num_test=1797)
