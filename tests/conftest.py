"""Shared fixtures: seeded RNGs and small datasets that stay fast on 2 cores."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)
    yield


@pytest.fixture(scope="session")
def digits():
    from kdens.data import load_dataset

    return load_dataset("digits")


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """Write ``arr`` (uint8) as an MNIST-format IDX file."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    """A tiny, learnable MNIST-format dataset: 3 classes of 8x8 bars, train 120 / test 30."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, 8, 8))
        for i, c in enumerate(y):
            x[i, :, 2 * c + 1] = 250  # a vertical bar whose column encodes the class
        return x.astype(np.uint8), y.astype(np.uint8)

    folder = tmp_path / "idx"
    folder.mkdir()
    xtr, ytr = make(120)
    xte, yte = make(30)
    write_idx(folder / "train-images-idx3-ubyte", xtr, gz=True)
    write_idx(folder / "train-labels-idx1-ubyte", ytr, gz=True)
    write_idx(folder / "t10k-images-idx3-ubyte", xte)
    write_idx(folder / "t10k-labels-idx1-ubyte", yte)
    return folder
