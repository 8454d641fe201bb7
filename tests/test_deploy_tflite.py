"""TFLite target with real runtimes: ai_edge_litert here, tflite-runtime 2.14 in its own venv.

Slow-ish (litert-torch imports in ~10 s; each conversion a few seconds), so few tests share
module-scoped deploys. The tflite-runtime venv is the one ``make setup`` makes (kdens never
installs it while it runs); where the platform has no wheel for it, the tests that need it skip
and say so.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from deploy import tflite_export
from deploy.bundle import make_bundle
from deploy.common import DeployData, DeployOptions, torch_logits
from deploy.edge_runner import TFLiteModel
from deploy.report import write_report
from kdens.artifacts import write_manifest
from deploy import tflite_check
from deploy.tflite_check import check_in_tflite_runtime, find_tflite_runtime
from kdens.errors import ConfigError

TFLITE_RT, _NO_TFLITE_RT = find_tflite_runtime(None)
# tflite-runtime 2.14 has wheels for CPython <= 3.11 on Linux x86_64/aarch64: there `make setup`
# makes the venv and a missing one fails these tests; elsewhere they cannot run.
_HAS_WHEEL = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") and sys.version_info < (3, 12)
needs_tflite_runtime = pytest.mark.skipif(TFLITE_RT is None and not _HAS_WHEEL, reason=_NO_TFLITE_RT)
FAST = dict(latency_warmup=1, latency_min_runs=5, latency_min_seconds=0.0, threads=(1,))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ReusedPoolCNN(nn.Module):
    """One MaxPool2d and one ReLU module called twice: the PT2E pitfall in docs/toolchain.md."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.pool, self.relu, self.fc = nn.MaxPool2d(2), nn.ReLU(), nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.c1(x)))  # (B, 8, 4, 4)
        x = self.pool(self.relu(self.c2(x)))  # (B, 16, 2, 2)
        return self.fc(torch.flatten(x, 1))  # (B, 10)


def _train(model, x, y, steps=100):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data():
    d = load_digits()
    x, y = (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)
    return DeployData(x_calib=x[:1400], x_test=x[1400:], y_test=y[1400:]), y[:1400]


@pytest.fixture(scope="module")
def cnn(data):
    (d, y_calib) = data
    torch.manual_seed(0)
    return _train(ReusedPoolCNN(), d.x_calib[:700], y_calib[:700])


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, data, cnn):
    """One int8 (--io int8) deploy shared by the checks below; also the bundle's content."""
    out = tmp_path_factory.mktemp("deploy") / "tflite-int8"
    rep = tflite_export.deploy(cnn, data[0], DeployOptions(quantize="int8", io="int8", **FAST), out)
    write_report(out, rep)
    write_manifest(out, stage="deploy", config={"target": "tflite"})  # finished, as the deploy stage leaves it
    return out, rep


@needs_tflite_runtime
def test_float_parity_and_one_signature_per_batch_size(tmp_path, data):
    d = data[0]
    torch.manual_seed(0)
    mlp = _train(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                 d.x_calib, data[1])
    rep = tflite_export.deploy(mlp, d, DeployOptions(batch_sizes=(1, 32), **FAST), tmp_path)
    assert rep["target"] == "tflite" and rep["precision"] == "float" and rep["passed"], rep["failures"]
    assert rep["max_abs_diff"] <= 1e-5 and rep["agreement"] == 1.0
    assert set(rep["latency_ms"]) == {"b1_t1", "b32_t1"}
    m = TFLiteModel(tmp_path / "model.tflite", "ai_edge_litert")
    assert m.signatures == {1: "b1", 32: "b32"}  # one file, fixed shapes, a signature per size
    assert m.input_dtype == "float32"
    # an odd count exercises padding of the last chunk; every row must still match PyTorch
    x = d.x_test[:45]
    np.testing.assert_allclose(m.predict(x), torch_logits(mlp, x), atol=1e-5)
    tr = rep["runtimes"]["tflite_runtime"]
    assert tr["loads"] is True and tr["agreement"] == 1.0 and tr["max_abs_diff"] <= 1e-4, tr


@needs_tflite_runtime
def test_int8_io_int8_agrees_in_both_runtimes(data, int8_dir):
    out, rep = int8_dir
    assert rep["precision"] == "int8" and rep["io"] == "int8" and rep["passed"], rep["failures"]
    assert rep["io_quantization"]["input"]["dtype"] == "int8"
    assert rep["size_bytes"] < rep["float_size_bytes"]
    assert rep["agreement"] >= 0.97 and 100 * (rep["float_accuracy"] - rep["accuracy"]) <= 3.0, rep
    m = TFLiteModel(out / "model.tflite", "ai_edge_litert")
    assert m.input_dtype == "int8" and set(m.signatures.values()) == {"b1", "b32"}
    tr = rep["runtimes"]["tflite_runtime"]
    assert tr["loads"] is True and tr["runtime"].startswith("tflite_runtime 2.14")
    assert tr["agreement_host_runtime"] >= 0.99 and tr["agreement"] >= 0.97, tr
    assert rep["checks"]["tflite_runtime"]["passed"] is True


@needs_tflite_runtime
def test_float_io_wraps_the_same_int8_graph(tmp_path, data, int8_dir):
    """--io float = the int8 file plus QUANTIZE/DEQUANTIZE ops at the boundary; both runtimes read it."""
    d = data[0]
    out, rep = int8_dir
    path = tmp_path / "float_io.tflite"
    path.write_bytes(tflite_export.add_float_io((out / "model.tflite").read_bytes()))
    f_io = TFLiteModel(path, "ai_edge_litert")
    i_io = TFLiteModel(out / "model.tflite", "ai_edge_litert")
    assert f_io.input_dtype == "float32" and f_io.signatures == i_io.signatures
    a, b = f_io.predict(d.x_test), i_io.predict(d.x_test)
    step = rep["io_quantization"]["output"]["scale"]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert np.abs(a - b).max() <= step * 1.01  # at most one output quantization step apart
    tr = check_in_tflite_runtime(path, d.x_test, b, python=TFLITE_RT)
    assert tr["loads"] is True and tr["agreement"] >= 0.99, tr


@pytest.mark.slow
def test_deploy_int8_float_io_end_to_end(tmp_path, data, cnn):
    rep = tflite_export.deploy(cnn, data[0], DeployOptions(quantize="int8", io="float", **FAST), tmp_path)
    assert rep["io"] == "float" and rep["io_quantization"]["input"]["dtype"] == "float32"
    assert rep["passed"] and rep["agreement"] >= 0.97, rep["failures"]


def test_dynamic_refused(tmp_path, data, cnn):
    with pytest.raises(ConfigError, match="tflite-runtime 2.14"):
        tflite_export.deploy(cnn, data[0], DeployOptions(quantize="dynamic", **FAST), tmp_path)


@needs_tflite_runtime
def test_bundle_runner_in_clean_tflite_runtime_venv(tmp_path, int8_dir):
    out, rep = int8_dir
    tar_path = make_bundle(out.parent, tmp_path / "bundle.tar.gz")
    with tarfile.open(tar_path) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "x", filter="data")
    assert {"kdens-bundle/edge_runner.py", "kdens-bundle/bundle.json",
            "kdens-bundle/tflite-int8/model.tflite", "kdens-bundle/tflite-int8/sample_x.npy"} <= names
    py = TFLITE_RT
    probe = subprocess.run([str(py), "-I", "-c", "import numpy, importlib.util as u; print(numpy.__version__, "
                            "u.find_spec('torch') is None, u.find_spec('ai_edge_litert') is None)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert probe[0].startswith("1.") and probe[1:] == ["True", "True"]  # numpy<2, no torch, no LiteRT
    bundle = tmp_path / "x" / "kdens-bundle"
    r = subprocess.run([str(py), "-I", "edge_runner.py", "--bundle", ".", "--min-seconds", "0.05",
                        "--min-runs", "5", "--out", "results.json"], cwd=bundle, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((bundle / "results.json").read_text())
    assert res["environment"]["runtimes"].keys() == {"tflite_runtime"}
    (item,) = res["results"]
    assert item["name"] == "tflite-int8" and item["loads"] and item["error"] is None
    assert item["runtime"].startswith("tflite_runtime 2.14")
    assert item["agreement"] >= 0.95 and item["agreement_host_runtime"] >= 0.98
    assert set(item["latency_ms"]) == {"b1_t1", "b32_t1"} and item["latency_ms"]["b1_t1"]["p50"] > 0


def test_runtime_venv_is_looked_up_never_installed(tmp_path, monkeypatch):
    """Absent at the default place: 'not checked' with the install command; named explicitly: exit-2 error."""
    monkeypatch.delenv("KDENS_TFLITE_RUNTIME_VENV", raising=False)
    monkeypatch.setattr(tflite_check, "DEFAULT_VENV", tmp_path / "absent")
    python, why = find_tflite_runtime(None)
    assert python is None and "make setup" in why and "tflite-runtime==2.14.0" in why
    assert not (tmp_path / "absent").exists()  # nothing was created or installed
    assert find_tflite_runtime("none") == (None, "disabled (--tflite-runtime-venv none)")
    with pytest.raises(ConfigError, match="make setup.*--tflite-runtime-venv none"):
        find_tflite_runtime(str(tmp_path / "named"))
    monkeypatch.setenv("KDENS_TFLITE_RUNTIME_VENV", str(tmp_path / "from-env"))
    with pytest.raises(ConfigError, match="from-env"):
        find_tflite_runtime(None)
    assert not (tmp_path / "named").exists() and not (tmp_path / "from-env").exists()
