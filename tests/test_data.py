
import numpy as np
import pytest

from kdens import data as D
from kdens import datasets
from kdens.errors import DataError
from tests.conftest import write_idx


def test_digits_shapes_split_and_fingerprint(digits):
    assert digits.x_train.dtype == np.float32 and digits.x_train.shape[1:] == (1, 8, 8)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert digits.num_classes == 10 and digits.input_shape == (1, 8, 8)
    n = len(digits.y_train) + len(digits.y_val) + len(digits.y_test)
    assert n == 1797
    # the validation split is stratified: every class present, roughly 10% of the rest
    assert set(np.unique(digits.y_val)) == set(range(10))
    assert abs(len(digits.y_val) / (len(digits.y_train) + len(digits.y_val)) - 0.1) < 0.01
    again = D.load_dataset("digits")
    assert again.fingerprint == digits.fingerprint
    assert np.array_equal(again.y_val, digits.y_val)
    other = D.load_dataset("digits", split_seed=1)
    assert other.fingerprint != digits.fingerprint
    assert not np.array_equal(other.y_val, digits.y_val) or not np.array_equal(other.x_val, digits.x_val)


def test_idx_folder_plain_and_gz(idx_folder):
    ds = D.load_dataset(str(idx_folder), val_fraction=0.2)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 3
    assert len(ds.y_train) + len(ds.y_val) == 120 and len(ds.y_test) == 30
    assert ds.x_train.max() <= 1.0 and ds.x_train.dtype == np.float32


def test_parse_idx_rejects_bad_magic_and_truncation():
    good = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert D.parse_idx(good).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="magic"):
        D.parse_idx(b"\x01\x00" + good[2:])
    with pytest.raises(DataError, match="truncated"):
        D.parse_idx(good[:-1])
    with pytest.raises(DataError, match="trailing"):
        D.parse_idx(good + b"\x00")
    with pytest.raises(DataError, match="element type"):
        D.parse_idx(bytes([0, 0, 0x0D, 1]) + good[4:])
    with pytest.raises(DataError, match="too short"):
        D.parse_idx(b"\x00")


def test_idx_folder_errors(idx_folder):
    # truncated images file
    p = idx_folder / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        D.load_dataset(str(idx_folder))


def test_idx_label_count_mismatch_and_range(idx_folder):
    write_idx(idx_folder / "t10k-labels-idx1-ubyte", np.zeros(29, np.uint8))
    with pytest.raises(DataError, match="30 images but 29 labels"):
        D.load_dataset(str(idx_folder))
    # test labels beyond the classes seen in training
    write_idx(idx_folder / "t10k-labels-idx1-ubyte", np.full(30, 7, np.uint8))
    with pytest.raises(DataError, match="test label.*7.*never occur in training"):
        D.load_dataset(str(idx_folder))


def test_idx_corrupt_gzip_and_missing_file(idx_folder):
    (idx_folder / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="decompress"):
        D.load_dataset(str(idx_folder))
    (idx_folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        D.load_dataset(str(idx_folder))


def test_idx_wrong_rank(idx_folder):
    write_idx(idx_folder / "t10k-images-idx3-ubyte", np.zeros(30, np.uint8))
    with pytest.raises(DataError, match="rank"):
        D.load_dataset(str(idx_folder))


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((50, 4, 4), dtype=np.float32), y_train=rng.integers(0, 2, 50),
             x_test=rng.random((10, 4, 4), dtype=np.float32), y_test=rng.integers(0, 2, 10))
    ds = D.load_dataset(str(path))
    assert ds.input_shape == (1, 4, 4) and ds.num_classes == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((5, 4)), y_train=np.zeros(5, int))
    with pytest.raises(DataError, match="lacks x_test, y_test"):
        D.load_dataset(str(bad))
    wide = tmp_path / "wide.npz"  # floats beyond [0, 1]: kept, and standardised inside the models
    np.savez(wide, x_train=np.full((6, 4, 4), 3.0) + np.arange(6)[:, None, None], y_train=np.arange(6) % 2,
             x_test=np.zeros((2, 4, 4)), y_test=np.array([0, 1]))
    ds = D.load_dataset(str(wide), val_fraction=0.0)
    assert ds.x_train.max() == 8.0 and ds.normalization["mean"] == [5.5] and ds.normalization["per"] == "channel"
    single = tmp_path / "single.npz"
    np.savez(single, x_train=np.zeros((5, 4, 4)), y_train=np.zeros(5, int), x_test=np.zeros((2, 4, 4)),
             y_test=np.zeros(2, int))
    with pytest.raises(DataError, match="single class"):
        D.load_dataset(str(single))
    mismatch = tmp_path / "mm.npz"
    np.savez(mismatch, x_train=np.zeros((5, 4, 4)), y_train=np.zeros(4, int),
             x_test=np.zeros((2, 4, 4)), y_test=np.zeros(2, int))
    with pytest.raises(DataError, match="5 rows but y_train 4"):
        D.load_dataset(str(mismatch))


def test_unknown_spec_and_missing_fashion_mnist(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such dataset"):
        D.load_dataset(str(tmp_path / "nothing"))
    # nothing cached, no Debian copy, and the only mirror refuses the connection (never the internet)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setenv("KDENS_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("KDENS_MIRROR", "http://127.0.0.1:9")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist")
    assert not (tmp_path / "cache").exists()


def test_stratified_subset_is_seeded_and_stratified():
    y = np.repeat(np.arange(4), [100, 50, 30, 20])
    a = D.stratified_subset(y, 0.1, seed=3)
    assert np.array_equal(a, D.stratified_subset(y, 0.1, seed=3))
    assert not np.array_equal(a, D.stratified_subset(y, 0.1, seed=4))
    assert np.bincount(y[a]).tolist() == [10, 5, 3, 2]


@pytest.mark.skipif(not datasets.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files(tmp_path, monkeypatch):
    # read from Debian's folder (hash-checked), with an empty cache and no reachable mirror
    monkeypatch.setenv("KDENS_DATA", str(tmp_path))
    monkeypatch.setenv("KDENS_MIRROR", "http://127.0.0.1:9")
    ds = D.load_dataset("fashion-mnist")
    assert len(ds.y_train) + len(ds.y_val) == 60000 and len(ds.y_test) == 10000
    assert ds.class_names[9] == "Ankle boot" and ds.input_shape == (1, 28, 28)
