"""ONNX target on tiny trained models: float parity, int8 accuracy and size, dynamic refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

onnx = pytest.importorskip("onnx")  # the [onnx] extra; `make setup` installs it
pytest.importorskip("onnxruntime")

from deploy import onnx_export  # noqa: E402
from deploy.common import DeployData, DeployOptions, torch_logits  # noqa: E402
from deploy.edge_runner import OnnxModel  # noqa: E402
from kdens.errors import ConfigError  # noqa: E402

FAST = dict(latency_warmup=1, latency_min_runs=5, latency_min_seconds=0.0, threads=(1,))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Two busy cores: torch's second intra-op thread makes tiny training steps ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 100) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data() -> DeployData:
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    y = d.target.astype(np.int64)
    return DeployData(x_calib=x[:1400], x_test=x[1400:], y_test=y[1400:])


@pytest.fixture(scope="module")
def mlp(data) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return _train(m, data.x_calib, np.asarray(load_digits().target[:1400], dtype=np.int64))


@pytest.fixture(scope="module")
def cnn(data) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(64, 10))
    return _train(m, data.x_calib[:700], np.asarray(load_digits().target[:700], dtype=np.int64))


REQUIRED = {"target", "precision", "runtime", "runtimes", "files", "size_bytes", "float_size_bytes",
            "params", "float_accuracy", "accuracy", "agreement", "max_abs_diff", "latency_ms", "checks",
            "latency_bound_ms"}


def test_onnx_float_parity_dynamic_batch(tmp_path, data, mlp):
    mlp.train()  # deploy works on a copy: the caller's model keeps its mode
    rep = onnx_export.deploy(mlp, data, DeployOptions(batch_sizes=(1, 32), **FAST), tmp_path)
    assert mlp.training
    mlp.eval()
    assert REQUIRED <= rep.keys()
    assert rep["target"] == "onnx" and rep["precision"] == "float" and rep["passed"]
    assert rep["exporter"] == "dynamo", rep["export_note"]
    assert rep["max_abs_diff"] <= 1e-5 and rep["agreement"] == 1.0
    assert rep["accuracy"] == rep["float_accuracy"] > 0.8
    assert set(rep["latency_ms"]) == {"b1_t1", "b32_t1"}
    for stats in rep["latency_ms"].values():
        assert stats["runs"] >= 5 and 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert rep["params"] == 64 * 32 + 32 + 32 * 10 + 10
    path = tmp_path / "model.onnx"
    onnx.checker.check_model(str(path))
    assert rep["size_bytes"] == path.stat().st_size and rep["files"]["model.onnx"] == rep["size_bytes"]
    assert not list(tmp_path.glob("*.data")), "weights must be inside the .onnx file"
    # one file, any batch size: an odd batch of 7 matches PyTorch too
    x7 = data.x_test[:7]
    np.testing.assert_allclose(OnnxModel(path).predict(x7), torch_logits(mlp, x7), atol=1e-5)
    # the saved samples are what a device compares against
    xs, ts = np.load(tmp_path / "sample_x.npy"), np.load(tmp_path / "sample_torch_logits.npy")
    np.testing.assert_allclose(ts, torch_logits(mlp, xs), atol=1e-6)
    assert json.loads(json.dumps(rep)) == rep  # JSON-serializable as is, nothing lost


def test_onnx_int8_close_to_float_and_smaller(tmp_path, data, cnn):
    rep = onnx_export.deploy(cnn, data, DeployOptions(quantize="int8", calib_size=256, **FAST), tmp_path)
    assert rep["precision"] == "int8" and rep["n_calib"] == 256
    assert rep["size_bytes"] < rep["float_size_bytes"]
    drop_points = 100 * (rep["float_accuracy"] - rep["accuracy"])
    assert drop_points <= 3.0, rep
    assert rep["agreement"] >= 0.95
    assert rep["checks"]["int8_kernels"]["passed"], rep["checks"]["int8_kernels"]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # the deployed file, not the report, is int8: weights stored as int8 initializers
    inits = onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    assert any(i.data_type == onnx.TensorProto.INT8 for i in inits)


def test_onnx_dynamic_mlp_ok_conv_refused(tmp_path, data, mlp, cnn):
    with pytest.raises(ConfigError, match="9-33x"):
        onnx_export.deploy(cnn, data, DeployOptions(quantize="dynamic", **FAST), tmp_path / "cnn")
    assert not (tmp_path / "cnn" / "model.onnx").exists()
    rep = onnx_export.deploy(mlp, data, DeployOptions(quantize="dynamic", batch_sizes=(1,), **FAST), tmp_path / "m")
    assert rep["precision"] == "dynamic" and rep["size_bytes"] < rep["float_size_bytes"]
    assert 100 * (rep["float_accuracy"] - rep["accuracy"]) <= 3.0


@pytest.mark.parametrize("kw, flag", [
    ({"quantize": "fp16"}, "--quantize"),
    ({"io": "int8"}, "--io int8 needs --quantize int8"),
    ({"batch_sizes": (0, 32)}, "--batch-sizes"),
    ({"threads": "one"}, "--threads"),
    ({"calib_size": 0}, "--calib-size"),
    ({"max_latency_ms": 0.0}, "--max-latency-ms"),
    ({"max_accuracy_drop": -1.0}, "--max-accuracy-drop"),
])
def test_options_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        DeployOptions(**kw)


def test_options_parse_and_default():
    o = DeployOptions(batch_sizes="32, 1,1", threads=(2, 1))
    assert o.batch_sizes == (1, 32) and o.threads == (1, 2)
    assert DeployOptions().threads is None and DeployOptions().quantize == "none"  # machine-free default
    assert DeployOptions().thread_counts()[0] == 1 and o.thread_counts() == (1, 2)
