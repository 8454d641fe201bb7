"""The many-class benchmark's generator (bench/many_class.py): what it promises, checked."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import many_class as mc  # noqa: E402


def test_classes_are_shapes_times_their_own_patterns():
    masks, pats = mc.shape_masks(), mc.class_patterns()
    assert masks.shape == (10, 16, 16) and pats.shape == (10, 10, 4, 4)
    assert not masks[:, 5:11, 5:11].any()  # the centre belongs to the fine pattern
    flat = masks.reshape(10, -1).astype(int)
    assert min(int((flat[i] != flat[j]).sum()) for i in range(10) for j in range(i + 1, 10)) >= 10  # coarse: easy
    for s in range(10):
        p = pats[s].reshape(10, -1)
        dist = [(p[i] != p[j]).sum() for i in range(10) for j in range(i + 1, 10)]
        assert min(dist) >= mc.MIN_HAMMING  # fine: subtle but distinct
    assert not all(np.array_equal(pats[0], pats[s]) for s in range(1, 10))  # each shape has its own
    assert np.array_equal(pats, mc.class_patterns())  # fixed by PATTERN_SEED


def test_examples_are_seeded_and_look_like_their_class():
    x, y = mc.make(2000, seed=3)
    x2, y2 = mc.make(2000, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(mc.make(2000, seed=4)[0], x)
    assert x.dtype == np.uint8 and x.shape == (2000, 16, 16) and y.dtype == np.int64
    assert set(np.unique(y)) <= set(range(100)) and len(np.unique(y)) > 95
    # without noise and shift an image is exactly its shape plus its pattern (up to intensity)
    clean, yc = mc.make(50, seed=5, noise=0.0)
    masks, pats = mc.shape_masks(), mc.class_patterns()
    hits = 0
    for img, c in zip(clean.astype(float), yc):
        ref = masks[c // 10].astype(float)
        ref[6:10, 6:10] = pats[c // 10, c % 10]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = np.roll(np.roll(np.pad(ref, 1), dy, 0), dx, 1)[1:-1, 1:-1]
                hits += bool(np.array_equal(img > 0, shifted > 0))
    assert hits == 50  # each one is one of the 9 shifts of its class's clean image


def test_npz_is_what_kdens_reads(tmp_path):
    from kdens.data import load_dataset

    path = mc.write(tmp_path / "mc.npz", 600, 200, seed=0, noise=0.15)
    data = load_dataset(str(path))
    assert data.num_classes == 100 and data.input_shape == (1, 16, 16) and len(data.y_test) == 200
    assert len(data.y_train) + len(data.y_val) == 600
    groups = str(np.load(path)["groups"])
    assert groups == mc.true_groups() and groups.split(";")[1] == ",".join(map(str, range(10, 20)))
    from specialists.cluster import parse_groups

    assert parse_groups(groups, 100) == [list(range(10 * s, 10 * s + 10)) for s in range(10)]
    unl = mc.write_unlabeled(tmp_path / "u.npz", 50, seed=7, noise=0.15)
    from kdens.data import load_unlabeled

    assert load_unlabeled(unl).shape == (50, 1, 16, 16)
    with pytest.raises(SystemExit):
        mc.main(["--train", "10"])  # --out is required
