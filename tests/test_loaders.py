"""Users' own data: CSV files, image folders, layouts, labels of any values, normalization in the model."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from kdens import data as D
from kdens.app.cli import cli
from kdens.errors import DataError, ModelError
from kdens.models import build_model


def _csv(path, rows, header):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _tabular(n=300, seed=0):
    """Two informative features in natural ranges (~1e3 and ~1e-2) and a string label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    a = 1000.0 + 300.0 * y + rng.normal(0, 60, n)
    b = 0.01 * (2 - y) + rng.normal(0, 0.002, n)
    noise = rng.normal(0, 1, n)
    names = np.array(["low", "mid", "high"])[y]
    return [(f"{a[i]:.3f}", f"{b[i]:.6f}", f"{noise[i]:.3f}", names[i]) for i in range(n)]


def test_csv_features_labels_and_split(tmp_path):
    path = _csv(tmp_path / "t.csv", _tabular(), ["a", "b", "noise", "kind"])
    ds = D.load_dataset(str(path), val_fraction=0.1)
    assert ds.layout == "features" and ds.input_shape == (3,) and ds.class_names == ["high", "low", "mid"]
    assert len(ds.y_test) == 60 and len(ds.y_train) + len(ds.y_val) == 240  # 20% test, stratified
    assert ds.x_train[:, 0].max() > 100  # natural range kept; the models standardise
    assert ds.normalization["per"] == "feature" and len(ds.normalization["mean"]) == 3
    np.testing.assert_allclose(ds.normalization["mean"][0], ds.x_train[:, 0].mean(), rtol=1e-5)
    again = D.load_dataset(str(path), val_fraction=0.1)
    assert again.fingerprint == ds.fingerprint and (again.y_test == ds.y_test).all()
    other = D.load_dataset(str(path), val_fraction=0.1, label_column="kind", test_fraction=0.5)
    assert abs(len(other.y_test) - 150) <= 3 and other.fingerprint != ds.fingerprint  # per-class rounding


def test_csv_bad_input_names_the_value(tmp_path):
    rows = _tabular(30)
    with pytest.raises(DataError, match="column 'a' is not numeric.*'n/a'"):
        D.load_dataset(str(_csv(tmp_path / "x.csv", [("n/a", *r[1:]) for r in rows[:1]] + rows[1:],
                                ["a", "b", "noise", "kind"])))
    with pytest.raises(DataError, match="--label-column 'target' is not a column"):
        D.load_dataset(str(_csv(tmp_path / "y.csv", rows, ["a", "b", "noise", "kind"])), label_column="target")
    with pytest.raises(DataError, match="single class"):
        D.load_dataset(str(_csv(tmp_path / "z.csv", [(*r[:3], "same") for r in rows], ["a", "b", "c", "k"])))
    with pytest.raises(DataError, match="not a class.*fractions"):
        D.load_dataset(str(_csv(tmp_path / "f.csv", [(*r[:3], 0.5 * (i % 3)) for i, r in enumerate(rows)],
                                ["a", "b", "c", "k"])))
    train = _csv(tmp_path / "tr.csv", rows, ["a", "b", "noise", "kind"])
    test = _csv(tmp_path / "te.csv", [(*r[:3], "unseen") for r in rows[:3]], ["a", "b", "noise", "kind"])
    with pytest.raises(DataError, match="'unseen'.*never occur in training"):
        D.load_dataset(f"{train},{test}")


def test_numeric_labels_1_to_10_make_10_classes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((100, 6), dtype=np.float32), y_train=1 + np.arange(100) % 10,
             x_test=rng.random((20, 6), dtype=np.float32), y_test=1 + np.arange(20) % 10)
    ds = D.load_dataset(str(path))
    assert ds.num_classes == 10 and ds.class_names == [str(k) for k in range(1, 11)]
    assert ds.y_train.min() == 0 and ds.y_train.max() == 9


def test_layouts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)  # colour photos stored the common way
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=x, y_train=np.arange(40) % 2, x_test=x[:10], y_test=np.arange(10) % 2)
    ds = D.load_dataset(str(path), val_fraction=0.0)
    assert ds.layout == "nhwc" and ds.input_shape == (3, 32, 32)
    np.testing.assert_allclose(ds.x_train[1, 2, 5, 7], x[1, 5, 7, 2] / 255.0)
    odd = tmp_path / "odd.npz"
    np.savez(odd, x_train=np.zeros((8, 3, 5, 3), np.uint8), y_train=np.arange(8) % 2,
             x_test=np.zeros((2, 3, 5, 3), np.uint8), y_test=np.array([0, 1]))
    with pytest.raises(DataError, match=r"\(8, 3, 5, 3\).*--layout nchw"):
        D.load_dataset(str(odd))
    assert D.load_dataset(str(odd), layout="nhwc", val_fraction=0.0).input_shape == (3, 3, 5)
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, x_train=np.zeros((8, 1, 8, 8), np.uint8), y_train=np.arange(8) % 2,
             x_test=np.zeros((2, 1, 6, 6), np.uint8), y_test=np.array([0, 1]))
    with pytest.raises(DataError, match="must match"):
        D.load_dataset(str(shapes))


def _image(path, size, mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=value if mode == "L" else (value, 255 - value, 0)).save(path)


def test_image_folder_split_by_fraction_and_train_test(tmp_path):
    for c, v in (("cat", 30), ("dog", 220)):
        for i in range(10):
            _image(tmp_path / "one" / c / f"{i}.png", (12, 10), value=v)
    ds = D.load_dataset(str(tmp_path / "one"), val_fraction=0.0, test_fraction=0.2)
    assert ds.class_names == ["cat", "dog"] and ds.input_shape == (3, 10, 12) and len(ds.y_test) == 4
    assert ds.normalization is None  # uint8 images: scaled to [0, 1] as they are
    for split in ("train", "test"):
        for c in ("a", "b"):
            for i in range(3):
                _image(tmp_path / "two" / split / c / f"{i}.jpg", (8, 8), mode="L", value=10 if c == "a" else 200)
    ds = D.load_dataset(str(tmp_path / "two"), val_fraction=0.0)
    assert ds.input_shape == (1, 8, 8) and len(ds.y_train) == 6 and len(ds.y_test) == 6


def test_image_folder_bad_input(tmp_path):
    for c in ("a", "b"):
        for i in range(5):
            _image(tmp_path / "mixed" / c / f"{i}.png", (8, 8))
    _image(tmp_path / "mixed" / "b" / "big.png", (9, 8))
    with pytest.raises(DataError, match="big.png is 9x8.*--image-size"):
        D.load_dataset(str(tmp_path / "mixed"))
    assert D.load_dataset(str(tmp_path / "mixed"), image_size="6,6", val_fraction=0.0).input_shape == (3, 6, 6)
    (tmp_path / "mixed" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: cannot read this image"):
        D.load_dataset(str(tmp_path / "mixed"), image_size="6,6")


def test_models_are_probed_and_standardise_inside(tmp_path):
    norm = {"mean": [1000.0, 0.0], "std": [100.0, 1.0], "per": "feature"}
    m = build_model("mlp", 3, (2,), input_norm=norm, hidden=[4])
    assert m.head.out_features == 3 and set(m.state_dict()) >= {"mean", "inv_std", "core.head.weight"}
    with pytest.raises(ModelError, match=r"output for 2 inputs is \(2, 5\), expected \(2, 3\)"):
        build_model("tests.fixtures.bad_models:wrong_width", 3, (2,))
    with pytest.raises(ModelError, match="factory raised RuntimeError: no GPU here"):
        build_model("tests.fixtures.bad_models:raises", 3, (2,))


def test_tabular_end_to_end_through_onnx(tmp_path, monkeypatch):
    """A CSV in natural ranges: train, evaluate from elsewhere, export; the ONNX file takes raw features."""
    path = _csv(tmp_path / "t.csv", _tabular(400), ["a", "b", "noise", "kind"])
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "t.csv", "--model", "mlp", "--model-arg", "hidden=16",
                                 "--epochs", "30", "--quiet", "--out", "gen"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["config"]["data"] == str(path.resolve()) and manifest["data"]["layout"] == "features"
    acc = json.loads((tmp_path / "gen" / "metrics.json").read_text())["test_accuracy"]
    assert acc > 0.9  # two informative features: standardised inside, the MLP separates them
    os.chdir(tmp_path.parent)  # another working directory: the stored path still finds the data
    r = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "gen")])
    assert r.exit_code == 0 and json.loads(r.output)["test_accuracy"] == pytest.approx(acc)
    pytest.importorskip("onnxruntime")
    r = CliRunner().invoke(cli, ["deploy", "--model", str(tmp_path / "gen"), "--target", "onnx", "--threads", "1",
                                 "--batch-sizes", "1", "--out", str(tmp_path / "dep")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "dep" / "onnx-float" / "report.json").read_text())
    assert rep["accuracy"] == pytest.approx(acc) and rep["agreement"] == 1.0
    import onnxruntime as ort

    ds = D.load_dataset(str(path))
    sess = ort.InferenceSession(str(tmp_path / "dep" / "onnx-float" / "model.onnx"))
    logits = sess.run(None, {sess.get_inputs()[0].name: ds.x_test})[0]  # raw features, natural range
    assert (logits.argmax(1) == ds.y_test).mean() == pytest.approx(acc)
    # int8 starts after the normalization: one int8 scale over features ~1e3 and ~1e-2 would erase the small one
    r = CliRunner().invoke(cli, ["deploy", "--model", str(tmp_path / "gen"), "--target", "onnx", "--quantize", "int8",
                                 "--threads", "1", "--batch-sizes", "1", "--out", str(tmp_path / "dep")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "dep" / "onnx-int8" / "report.json").read_text())
    assert rep["accuracy"] >= acc - 0.03, rep["accuracy"]


def test_jitter_is_refused_for_features_and_out_inside_a_file(tmp_path):
    path = _csv(tmp_path / "t.csv", _tabular(60), ["a", "b", "noise", "kind"])
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(path), "--model", "mlp", "--jitter", "2",
                                 "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "--jitter 2 shifts images" in r.output and not (tmp_path / "g").exists()
    (tmp_path / "file").write_text("x")
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(path), "--model", "mlp",
                                 "--out", str(tmp_path / "file" / "g")])
    assert r.exit_code == 2 and "is a file, not a folder" in r.output
