""".npy folders: memory-mapped inputs read per batch give the same data, fingerprint and model as in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdens import data as D
from kdens import mapped
from kdens.errors import DataError


def _images(n, rng):
    """uint8 NHWC 8x8x3 images whose class (0..2) is a bright column in one channel."""
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 60, (n, 8, 8, 3))
    for i, c in enumerate(y):
        x[i, :, 2 * c + 1, c] = 240
    return x.astype(np.uint8), (y * 10 + 5).astype(np.int64)  # labels 5, 15, 25 map to 0..2


def _features(n, rng):
    """float32 features in natural ranges (1e3, 1e-2, 1): the models standardise them."""
    y = rng.integers(0, 3, n)
    x = np.stack([1000 + 300 * y + rng.normal(0, 60, n), 0.01 * (2 - y) + rng.normal(0, 0.002, n),
                  rng.normal(0, 1, n)], 1)
    return x.astype(np.float32), y


def _write(tmp_path, make, n_train=240, n_test=60):
    rng = np.random.default_rng(0)
    xtr, ytr = make(n_train, rng)
    xte, yte = make(n_test, rng)
    folder = tmp_path / "npy"
    folder.mkdir()
    for k, a in {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}.items():
        np.save(folder / f"{k}.npy", a)
    npz = tmp_path / "same.npz"
    np.savez(npz, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return folder, npz


@pytest.mark.parametrize("make", [_images, _features])
def test_npy_folder_is_mapped_and_equals_the_npz(tmp_path, make):
    folder, npz = _write(tmp_path, make)
    m = D.load_dataset(str(folder), val_fraction=0.1)
    a = D.load_dataset(str(npz), val_fraction=0.1)
    assert isinstance(m.x_train, mapped.MappedRows) and isinstance(m.x_train.raw, np.memmap)
    assert isinstance(a.x_train, np.ndarray)
    assert m.fingerprint == a.fingerprint  # hashed in chunks: the same digest as the whole bytes
    assert m.layout == a.layout and m.input_shape == a.input_shape and m.class_names == a.class_names
    assert m.normalization == a.normalization
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(np.asarray(getattr(m, f"x_{split}")), getattr(a, f"x_{split}"))
        np.testing.assert_array_equal(getattr(m, f"y_{split}"), getattr(a, f"y_{split}"))
    idx = np.array([7, 2, 150, 2, 0])  # unsorted, repeated: rows come back in the order asked
    np.testing.assert_array_equal(m.x_train.take(idx), a.x_train[idx])
    np.testing.assert_array_equal(np.asarray(m.x_train[10:20][[3, 1]]), a.x_train[10:20][[3, 1]])


def test_statistics_are_the_same_numbers_in_memory_and_mapped(tmp_path):
    folder, npz = _write(tmp_path, _features)
    m = mapped.mapped_input(np.load(folder / "x_train.npy", mmap_mode="r"), "features", "x")
    a = D.load_dataset(str(npz), val_fraction=0.0).x_train
    for chunk_bytes in (100, 1000, 1 << 20):  # 8, 83 and all 240 rows a chunk
        got = mapped.moments(mapped.float_chunks(m, chunk_bytes), (0,))
        want = mapped.moments(mapped.float_chunks(a, chunk_bytes), (0,))
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        np.testing.assert_allclose(got[1], a.std(0, dtype=np.float64), rtol=1e-9)


def test_moments_in_chunks_match_numpy():
    x = np.random.default_rng(1).normal(5, 3, (1000, 3, 4, 4)).astype(np.float32)
    mean, std, lo, hi, n = mapped.moments([x[i:i + 97] for i in range(0, 1000, 97)], (0, 2, 3))
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-10)
    assert (lo, hi, n) == (min(0.0, float(x.min())), float(x.max()), 16000)


def test_batch_reads_runs_repeats_and_empty(tmp_path):
    folder, npz = _write(tmp_path, _images)
    rows = mapped.mapped_input(np.load(folder / "x_train.npy", mmap_mode="r"), "nhwc", "x_train")
    ref = D.load_dataset(str(npz), val_fraction=0.0).x_train
    idx = np.array([239, 3, 4, 5, 5, 0, 120, 121, 239])  # runs, repeats, both ends of the file
    np.testing.assert_array_equal(rows.take(idx), ref[idx])
    assert rows.take(np.array([], np.int64)).shape == (0, 3, 8, 8)
    np.testing.assert_array_equal(np.asarray(rows), ref)


def test_npy_folder_bad_input(tmp_path):
    folder, _ = _write(tmp_path, _features)
    (folder / "y_test.npy").unlink()
    with pytest.raises(DataError, match="missing y_test.npy"):
        D.load_dataset(str(folder))
    np.save(folder / "y_test.npy", np.zeros(59, np.int64))
    with pytest.raises(DataError, match="x_test.npy has 60 rows but y_test.npy 59"):
        D.load_dataset(str(folder))
    np.save(folder / "y_test.npy", np.zeros(60, np.int64))
    np.save(folder / "x_test.npy", np.array([["a"]] * 60))
    with pytest.raises(DataError, match="inputs must be numbers"):
        D.load_dataset(str(folder))
    bad = np.load(folder / "x_train.npy")
    bad[17, 1] = np.nan
    np.save(folder / "x_train.npy", bad)
    np.save(folder / "x_test.npy", bad[:60])
    with pytest.raises(DataError, match="NaN or inf"):
        D.load_dataset(str(folder))


def test_training_from_the_map_equals_training_in_memory(tmp_path):
    """The same seed trains the same generalist, and distils the same student through the
    soft-target cache, whether the inputs are memory-mapped or in memory."""
    import torch

    from distill.config import DistillConfig
    from distill.stage import run as distill
    from generalist.stage import run as train
    from kdens.config import GeneralistConfig, build
    from kdens.models import load_model

    folder, npz = _write(tmp_path, _images)
    runs = {}
    for name, spec in (("mem", npz), ("map", folder)):
        gen = train(build(GeneralistConfig, {"data": str(spec), "model": "mlp", "model_args": {"hidden": [32]},
                                             "epochs": 10, "batch_size": 32, "lr": 1e-2}),
                    tmp_path / name / "gen", progress=False)
        student = distill(build(DistillConfig, {"teacher": str(gen), "model": "mlp", "model_args": {"hidden": [16]},
                                                "transfer": "fraction=0.5", "temperature": 2.0, "alpha": 0.3,
                                                "epochs": 3, "batch_size": 32}),
                          tmp_path / name / "student", progress=False)
        runs[name] = (gen, student)
    for i in range(2):
        a, b = load_model(runs["mem"][i])[0].state_dict(), load_model(runs["map"][i])[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"run {i}: the weights differ"
        ma = json.loads((runs["mem"][i] / "metrics.json").read_text())
        mb = json.loads((runs["map"][i] / "metrics.json").read_text())
        assert ma["test_errors"] == mb["test_errors"] and ma["test_errors"] < 20  # 60 test images, 3 classes


def test_large_image_folder_is_decoded_once_into_a_mapped_cache(tmp_path, monkeypatch):
    from PIL import Image

    from kdens import loaders

    monkeypatch.setenv("KDENS_DATA", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    x, y = _images(40, rng)
    for i in range(40):
        (tmp_path / "photos" / f"k{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(tmp_path / "photos" / f"k{y[i]}" / f"{i:03d}.png")
    small = D.load_dataset(str(tmp_path / "photos"), val_fraction=0.0)
    assert isinstance(small.x_train, np.ndarray) and not (tmp_path / "cache").exists()
    monkeypatch.setattr(loaders, "IN_MEMORY_BYTES", 100)  # every split is "large" now
    big = D.load_dataset(str(tmp_path / "photos"), val_fraction=0.0)
    assert isinstance(big.x_train, mapped.MappedRows) and isinstance(big.x_test, mapped.MappedRows)
    assert big.fingerprint == small.fingerprint and big.input_shape == (3, 8, 8)
    np.testing.assert_array_equal(np.asarray(big.x_train), small.x_train)
    np.testing.assert_array_equal(np.asarray(big.x_test), small.x_test)
    cached = sorted((tmp_path / "cache" / "decoded").iterdir())
    assert len(cached) == 2 and all(p.suffix == ".npy" for p in cached)  # train and test, no temp files left
    stamps = [p.stat().st_mtime_ns for p in cached]
    D.load_dataset(str(tmp_path / "photos"), val_fraction=0.0)
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # found, not decoded again
    Image.fromarray(x[0][::-1]).save(next((tmp_path / "photos").glob("k*/000.png")))
    again = D.load_dataset(str(tmp_path / "photos"), val_fraction=0.0)
    assert again.fingerprint != small.fingerprint and len(list((tmp_path / "cache" / "decoded").iterdir())) == 3


def test_deploy_int8_calibrates_from_a_sample_of_the_map(tmp_path):
    pytest.importorskip("onnxruntime")
    from click.testing import CliRunner

    from kdens.app.cli import cli

    folder, _ = _write(tmp_path, _features)
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(folder), "--model", "mlp", "--model-arg", "hidden=16",
                                 "--epochs", "30", "--quiet", "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    acc = json.loads((tmp_path / "gen" / "metrics.json").read_text())["test_accuracy"]
    r = CliRunner().invoke(cli, ["deploy", "--model", str(tmp_path / "gen"), "--target", "onnx", "--quantize", "int8",
                                 "--calib-size", "64", "--threads", "1", "--batch-sizes", "1",
                                 "--out", str(tmp_path / "dep")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "dep" / "onnx-int8" / "report.json").read_text())
    assert rep["n_calib"] == 64 and rep["float_accuracy"] == pytest.approx(acc) and rep["accuracy"] >= acc - 0.05


def test_deploy_of_mapped_nhwc_uint8_images_takes_the_raw_arrays(tmp_path):
    """An .npy folder of uint8 NHWC images deploys to a file taking uint8 NHWC, calibrated from a sample."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from click.testing import CliRunner

    from kdens.app.cli import cli

    folder, _ = _write(tmp_path, _images)
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(folder), "--model", "mlp", "--model-arg", "hidden=16",
                                 "--epochs", "30", "--quiet", "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["deploy", "--model", str(tmp_path / "gen"), "--target", "onnx", "--quantize", "int8",
                                 "--calib-size", "64", "--threads", "1", "--batch-sizes", "1",
                                 "--out", str(tmp_path / "dep")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "dep" / "onnx-int8" / "report.json").read_text())
    assert rep["n_calib"] == 64 and rep["input"]["dtype"] == "uint8" and rep["input"]["layout"] == "nhwc"
    onnx_file = next((tmp_path / "dep" / "onnx-int8").glob("*.onnx"))
    inp = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [8, 8, 3]
    x_test, y_test = np.load(folder / "x_test.npy"), np.load(folder / "y_test.npy")
    logits = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {inp.name: x_test})[0]
    assert (logits.argmax(1) == (y_test - 5) // 10).mean() >= 0.9
