"""The mobilenet student: shapes, refusals, and exports to ONNX int8 and TFLite int8 in real runtimes."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from kdens.app.cli import cli
from kdens.errors import ModelError
from kdens.mobilenet import InvertedResidual, MobileNetV2
from kdens.models import build_model, count_params


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 100, 80)])
def test_builds_for_any_image_shape(shape):
    m = build_model("mobilenet", 7, shape)
    assert isinstance(m, MobileNetV2) and m.head.out_features == 7
    assert m.eval()(torch.zeros(3, *shape)).shape == (3, 7)
    blocks = [b for b in m.modules() if isinstance(b, InvertedResidual)]
    assert len(blocks) == 9 and sum(b.residual for b in blocks) >= 3  # repeats keep their residual adds
    relus = [a for a in m.modules() if isinstance(a, torch.nn.ReLU6)]
    assert len(relus) == len({id(a) for a in relus})  # one module per use (PT2E int8 export needs that)


def test_width_multiplier_and_refusals():
    full, half = build_model("mobilenet", 10, (1, 8, 8)), build_model("mobilenet", 10, (1, 8, 8), width=0.5)
    assert count_params(half) < 0.5 * count_params(full)
    with pytest.raises(ModelError, match="needs images"):
        build_model("mobilenet", 3, (20,))
    with pytest.raises(ModelError, match="width=0"):
        build_model("mobilenet", 3, (1, 8, 8), width=0)


def test_exports_to_onnx_and_tflite_int8_and_refuses_fpga(tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "m"
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mobilenet", "--model-arg",
                                 "width=0.5", "--epochs", "6", "--quiet", "--out", str(run)])
    assert r.exit_code == 0, r.output
    float_acc = json.loads((run / "metrics.json").read_text())["test_accuracy"]
    assert float_acc > 0.5
    for target in ("onnx", "tflite"):
        r = CliRunner().invoke(cli, ["deploy", "--model", str(run), "--target", target, "--quantize", "int8",
                                     "--batch-sizes", "1", "--threads", "1", "--tflite-runtime-venv", "none",
                                     "--max-accuracy-drop", "5", "--out", str(tmp_path / "dep")])
        assert r.exit_code == 0, r.output
        rep = json.loads((tmp_path / "dep" / f"{target}-int8" / "report.json").read_text())
        assert rep["float_accuracy"] == pytest.approx(float_acc) and rep["size_bytes"] < rep["float_size_bytes"]
    r = CliRunner().invoke(cli, ["deploy", "--model", str(run), "--target", "fpga", "--out", str(tmp_path / "dep")])
    assert r.exit_code == 2 and "does not take mobilenet" in r.output
    assert not [p for p in (tmp_path / "dep").iterdir() if p.name.startswith("fpga")]
