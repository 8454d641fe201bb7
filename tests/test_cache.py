"""Tests for distill/cache.py: reuse, content, interrupted and corrupt builds, keys."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from distill.cache import build_or_load, cache_key
from kdens.errors import ConfigError, DataError, ModelError


class CountingTeacher(nn.Module):
    """A tiny real teacher that counts its forward calls and can fail on call ``fail_at``."""

    def __init__(self, in_features: int = 12, num_classes: int = 5, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes)
        )
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("teacher crashed mid-way")
        return self.net(x)


def _x(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 3, 4), dtype=np.float32)


def _direct(teacher: CountingTeacher, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return teacher.net(torch.from_numpy(x)).numpy()


KEY = cache_key(["a" * 64], "f" * 64, "train", {"T": 1})


def test_build_then_reuse(tmp_path):
    x = _x()
    teacher = CountingTeacher().eval()
    arr, info = build_or_load(
        tmp_path, KEY, x, teacher, batch_size=16, progress=False, meta={"who": "test"}
    )
    assert info["reused"] is False and teacher.calls == 4  # ceil(50 / 16)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float32 and arr.shape == (50, 5)
    np.testing.assert_allclose(arr, _direct(teacher, x), rtol=1e-6, atol=1e-6)
    assert not arr.flags.writeable

    arr2, info2 = build_or_load(tmp_path, KEY, x, teacher, batch_size=16, progress=False)
    assert info2["reused"] is True and teacher.calls == 4  # not called again
    np.testing.assert_array_equal(arr2, arr)
    assert info2["path"] == str(tmp_path / KEY / "logits.npy")

    m = json.loads((tmp_path / KEY / "manifest.json").read_text())
    assert m["key"] == KEY and m["shape"] == [50, 5] and m["dtype"] == "float32" and m["complete"]
    assert m["meta"] == {"who": "test"} and len(m["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / KEY).iterdir()) == ["logits.npy", "manifest.json"]


def test_interrupted_build_leaves_no_finished_cache(tmp_path):
    x = _x()
    broken = CountingTeacher(fail_at=3).eval()
    with pytest.raises(RuntimeError, match="mid-way"):
        build_or_load(tmp_path, KEY, x, broken, batch_size=16, progress=False)
    d = tmp_path / KEY
    assert not (d / "manifest.json").exists() and not (d / "logits.npy").exists()
    assert list(d.iterdir()) == []  # the temp file was removed too

    teacher = CountingTeacher().eval()
    arr, info = build_or_load(tmp_path, KEY, x, teacher, batch_size=16, progress=False)
    assert info["reused"] is False and teacher.calls == 4
    np.testing.assert_allclose(arr, _direct(teacher, x), rtol=1e-6, atol=1e-6)


def test_array_without_manifest_is_rebuilt(tmp_path):
    # a crash between moving logits.npy into place and writing the manifest
    x = _x()
    d = tmp_path / KEY
    d.mkdir()
    np.save(d / "logits.npy", np.zeros((50, 5), dtype=np.float32))
    teacher = CountingTeacher().eval()
    with pytest.warns(RuntimeWarning, match="interrupted"):
        arr, info = build_or_load(tmp_path, KEY, x, teacher, batch_size=64, progress=False)
    assert info["reused"] is False and teacher.calls == 1
    np.testing.assert_allclose(arr, _direct(teacher, x), rtol=1e-6, atol=1e-6)


def test_corrupt_cache_is_rebuilt_with_warning(tmp_path):
    x = _x()
    teacher = CountingTeacher().eval()
    build_or_load(tmp_path, KEY, x, teacher, batch_size=64, progress=False)
    path = tmp_path / KEY / "logits.npy"
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0xFF  # flip bits in the data, not the header
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum"):
        arr, info = build_or_load(tmp_path, KEY, x, teacher, batch_size=64, progress=False)
    assert info["reused"] is False and teacher.calls == 2
    np.testing.assert_allclose(arr, _direct(teacher, x), rtol=1e-6, atol=1e-6)


def test_garbled_manifest_and_shape_mismatch_are_rebuilt(tmp_path):
    x = _x()
    teacher = CountingTeacher().eval()
    build_or_load(tmp_path, KEY, x, teacher, batch_size=64, progress=False)
    (tmp_path / KEY / "manifest.json").write_text('{"key": ')
    with pytest.warns(RuntimeWarning, match="cannot read"):
        build_or_load(tmp_path, KEY, x, teacher, batch_size=64, progress=False)
    assert teacher.calls == 2
    x2 = _x(n=30, seed=1)  # same key, different number of rows: never reuse
    with pytest.warns(RuntimeWarning, match="50 rows"):
        arr, info = build_or_load(tmp_path, KEY, x2, teacher, batch_size=64, progress=False)
    assert info["reused"] is False and arr.shape == (30, 5)
    np.testing.assert_allclose(arr, _direct(teacher, x2), rtol=1e-6, atol=1e-6)


def test_plain_miss_and_hit_do_not_warn(tmp_path):
    teacher = CountingTeacher().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, miss = build_or_load(tmp_path, KEY, _x(), teacher, progress=False)
        calls = teacher.calls
        _, hit = build_or_load(tmp_path, KEY, _x(), teacher, progress=False)
    assert miss["reused"] is False and calls >= 1
    assert hit["reused"] is True and teacher.calls == calls  # the hit never ran the teacher


def test_bad_teacher_and_inputs(tmp_path):
    x = _x(8)
    with pytest.raises(ModelError, match="shape"):
        build_or_load(tmp_path, KEY, x, lambda xb: xb.flatten(), progress=False)
    with pytest.raises(ModelError, match="NaN"):
        build_or_load(
            tmp_path, KEY, x, lambda xb: torch.full((len(xb), 3), float("nan")), progress=False
        )
    assert not (tmp_path / KEY / "manifest.json").exists()
    # -inf is a valid log-probability of zero
    lp = torch.log(torch.tensor([1.0, 0.0, 0.0]))
    arr, _ = build_or_load(tmp_path, KEY, x, lambda xb: lp.expand(len(xb), 3), progress=False)
    assert np.isneginf(arr[:, 1]).all()
    with pytest.raises(DataError):
        build_or_load(tmp_path, KEY, x[:0], lambda xb: xb, progress=False)
    with pytest.raises(ConfigError):
        build_or_load(tmp_path, "../escape", x, lambda xb: xb, progress=False)
    with pytest.warns(RuntimeWarning, match="training mode"):
        build_or_load(tmp_path, "other", x, CountingTeacher(), progress=False)


def test_key_changes_with_each_input():
    base = dict(teacher_manifest_hashes=["a" * 64, "b" * 64], data_fingerprint="d" * 64,
                transfer="train", extra={"combine": "geometric", "T": 2.0})
    k = cache_key(**base)
    assert len(k) == 64 and int(k, 16) >= 0
    assert cache_key(**base) == k
    variants = [
        {**base, "teacher_manifest_hashes": ["a" * 64, "c" * 64]},
        {**base, "teacher_manifest_hashes": ["b" * 64, "a" * 64]},
        {**base, "teacher_manifest_hashes": ["a" * 64]},
        {**base, "data_fingerprint": "e" * 64},
        {**base, "transfer": "omit=3"},
        {**base, "extra": {"combine": "arithmetic", "T": 2.0}},
        {**base, "extra": {"combine": "geometric", "T": 3.0}},
        {**base, "extra": {}},
    ]
    keys = {cache_key(**v) for v in variants}
    assert len(keys) == len(variants) and k not in keys
    # key order inside extra does not matter
    assert cache_key(**{**base, "extra": {"T": 2.0, "combine": "geometric"}}) == k
    with pytest.raises(ConfigError):
        cache_key(["a"], "d", "train", {"x": object()})
    with pytest.raises(ConfigError):
        cache_key(["a"], "d", "train", {"x": float("nan")})
