"""Exported artifacts take the user's raw input: uint8 NHWC images stay uint8 NHWC, raw-range
features stay raw (and TFLite int8 keeps their standardization float)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdens import data as D
from kdens.app.cli import cli
from kdens.raw_input import RawInput, describe, split_front, to_raw


def _rgb_npz(path, n_train=600, n_test=200, size=8, seed=0):
    """Three classes of uint8 NHWC colour images: a bright centre square in the class's channel."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 120, (n, size, size, 3))
        for c in range(3):
            x[y == c, 2:size - 2, 2:size - 2, c] += 120
        return x.astype(np.uint8), y

    (xa, ya), (xb, yb) = make(n_train), make(n_test)
    np.savez(path, x_train=xa, y_train=ya, x_test=xb, y_test=yb)
    return path


def test_raw_form_round_trips_and_front_rebuilds_the_model_input(tmp_path):
    ds = D.load_dataset(str(_rgb_npz(tmp_path / "rgb.npz", 60, 20)), val_fraction=0.0)
    assert ds.raw_input == {"shape": [8, 8, 3], "layout": "nhwc", "dtype": "uint8", "range": [0.0, 255.0],
                            "range_from": "dtype", "channel_order": None}
    raw = np.load(tmp_path / "rgb.npz")["x_test"]
    back = to_raw(ds.x_test, ds.raw_input)
    assert back.dtype == np.uint8 and back.shape == raw.shape and (back == raw).all()  # exact
    model = torch.nn.Flatten()
    wrapped = RawInput(model, ds.raw_input)
    assert torch.equal(wrapped(torch.from_numpy(raw)), model(torch.from_numpy(ds.x_test)))  # bit-identical
    front, core = split_front(wrapped)
    assert core is model and torch.equal(front(torch.from_numpy(raw)), torch.from_numpy(ds.x_test))
    # float features: the raw form is the model input; only a standardizing model has a front
    feats = describe(np.array([[1.0, 2e4], [3.0, -5.0]], np.float32), "features")
    assert feats["dtype"] == "float32" and feats["range"] == [-5.0, 2e4] and feats["channel_order"] is None
    assert split_front(RawInput(model, feats)) == (None, model)
    grey = describe(np.zeros((4, 6, 6), np.uint8), "nchw")
    assert grey["shape"] == [1, 6, 6] and grey["channel_order"] == "grey"


def _deploy(run, out, *args):
    return CliRunner().invoke(cli, ["deploy", "--model", str(run), "--threads", "1", "--batch-sizes", "1,4",
                                    "--out", str(out), *args])


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rgb")
    npz = _rgb_npz(tmp / "rgb.npz")
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(npz), "--model", "cnn", "--model-arg", "size=small",
                                 "--epochs", "8", "--optimizer", "adamw", "--lr", "0.003", "--quiet",
                                 "--out", str(tmp / "gen")])
    assert r.exit_code == 0, r.output
    return tmp / "gen", np.load(npz)


WANT = {"layout": "nhwc", "dtype": "uint8", "range": [0.0, 255.0], "range_from": "dtype"}


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_onnx_takes_uint8_nhwc(rgb_run, tmp_path, quantize):
    ort = pytest.importorskip("onnxruntime")
    run, raw = rgb_run
    r = _deploy(run, tmp_path, "--target", "onnx", "--quantize", quantize)
    assert r.exit_code == 0, r.output
    folder = tmp_path / f"onnx-{'float' if quantize == 'none' else 'int8'}"
    rep = json.loads((folder / "report.json").read_text())
    assert rep["input"]["shape"] == ["batch", 8, 8, 3] and WANT.items() <= rep["input"].items()
    assert "Input: uint8 nhwc ['batch', 8, 8, 3], values 0..255 (dtype)" in (folder / "report.md").read_text()
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    logits = sess.run(None, {sess.get_inputs()[0].name: raw["x_test"]})[0]  # the user's arrays, untouched
    assert (logits.argmax(1) == raw["y_test"]).mean() == pytest.approx(rep["accuracy"])
    assert rep["accuracy"] >= 0.95 and rep["verdict"] == "pass"
    sample = np.load(folder / "sample_x.npy")
    assert sample.dtype == np.uint8 and (sample == raw["x_test"][:len(sample)]).all()


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_tflite_takes_uint8_nhwc_in_both_runtimes(rgb_run, tmp_path, quantize):
    pytest.importorskip("litert_torch")
    from ai_edge_litert.interpreter import Interpreter

    from deploy.tflite_check import find_tflite_runtime

    run, raw = rgb_run
    r = _deploy(run, tmp_path, "--target", "tflite", "--quantize", quantize)
    assert r.exit_code == 0, r.output
    folder = tmp_path / f"tflite-{'float' if quantize == 'none' else 'int8'}"
    rep = json.loads((folder / "report.json").read_text())
    assert rep["input"]["shape"] == ["batch", 8, 8, 3] and WANT.items() <= rep["input"].items()
    runner = Interpreter(model_path=str(folder / "model.tflite")).get_signature_runner("b1")
    (name, detail), = runner.get_input_details().items()
    assert detail["dtype"] == np.uint8 and list(detail["shape"]) == [1, 8, 8, 3]
    logits = np.concatenate([next(iter(runner(**{name: raw["x_test"][i:i + 1]}).values()))
                             for i in range(len(raw["y_test"]))])
    assert (logits.argmax(1) == raw["y_test"]).mean() == pytest.approx(rep["accuracy"])
    assert rep["accuracy"] >= 0.95 and rep["verdict"] == "pass"
    if find_tflite_runtime(None)[0] is not None:  # the 2.14 cross-check ran on the same uint8 arrays
        tr = rep["runtimes"]["tflite_runtime"]
        assert tr["loads"] and tr["agreement_host_runtime"] >= 0.99, tr


def test_tflite_int8_on_raw_range_features_passes_the_accuracy_gate(tmp_path):
    """Features near 1e3 and 1e-2 in one CSV: int8 starts after the float standardization."""
    pytest.importorskip("litert_torch")
    from tests.test_loaders import _csv, _tabular

    path = _csv(tmp_path / "t.csv", _tabular(400), ["a", "b", "noise", "kind"])
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(path), "--model", "mlp", "--model-arg",
                                 "hidden=16", "--epochs", "30", "--quiet", "--out", str(tmp_path / "gen")])
    assert r.exit_code == 0, r.output
    acc = json.loads((tmp_path / "gen" / "metrics.json").read_text())["test_accuracy"]
    assert acc > 0.9
    r = _deploy(tmp_path / "gen", tmp_path / "dep", "--target", "tflite", "--quantize", "int8",
                "--max-accuracy-drop", "3")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "dep" / "tflite-int8" / "report.json").read_text())
    assert rep["gates"]["accuracy_drop_points"]["passed"] and rep["accuracy"] >= acc - 0.03, rep["accuracy"]
    assert rep["input"]["dtype"] == "float32" and rep["input"]["layout"] == "features"
    assert rep["input"]["shape"] == ["batch", 3] and rep["input"]["range"][1] > 1000  # raw range, stated


def test_fpga_report_says_how_to_make_its_float_input_from_the_raw_arrays():
    from deploy.stage import fpga_input

    raw = {"shape": [8, 8, 3], "layout": "nhwc", "dtype": "uint8", "range": [0.0, 255.0], "range_from": "dtype",
           "channel_order": "RGB"}
    entry = fpga_input(raw, [3, 8, 8])
    assert entry["shape"] == ["batch", 3, 8, 8] and entry["layout"] == "nchw" and entry["dtype"] == "float32"
    assert entry["range"] == [0.0, 1.0] and entry["channel_order"] == "RGB"
    assert "divide the uint8 pixels by 255, then transpose NHWC -> NCHW" in entry["note"]
    feats = fpga_input(describe(np.array([[1.0, 2e4], [3.0, -5.0]], np.float32), "features"), [2])
    assert feats["layout"] == "features" and feats["range"] == [-5.0, 2e4] and "divide" not in feats["note"]
