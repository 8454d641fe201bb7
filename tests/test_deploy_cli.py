"""``kdens deploy`` / ``kdens bench`` end to end through the CLI with real ONNX Runtime."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from kdens.app.cli import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "gen"
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mlp", "--model-arg", "hidden=32",
                                 "--epochs", "6", "--batch-size", "64", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _deploy(*args):
    return CliRunner().invoke(cli, ["deploy", *args, "--threads", "1", "--tflite-runtime-venv", "none"])


def test_deploy_onnx_int8_passes_gates_then_bench(trained, tmp_path):
    out = tmp_path / "deploy"
    r = _deploy("--model", str(trained), "--target", "onnx", "--quantize", "int8", "--batch-sizes", "1",
                "--max-accuracy-drop", "5", "--max-latency-ms", "1000", "--out", str(out))
    assert r.exit_code == 0, r.output
    folder = out / "onnx-int8"
    assert {"model.onnx", "report.json", "report.md", "manifest.json"} <= {p.name for p in folder.iterdir()}
    rep = json.loads((folder / "report.json").read_text())
    for key in ("float_accuracy", "accuracy", "agreement", "max_abs_diff", "size_bytes", "latency_ms", "gates"):
        assert key in rep
    assert rep["gates"]["accuracy_drop_points"]["passed"] and rep["gates"]["latency_b1_p90_ms"]["passed"]
    # a 2k-parameter net: graph overhead dominates, so only "smaller" is asserted here
    assert rep["agreement"] > 0.95 and rep["size_bytes"] < rep["float_size_bytes"]
    assert json.loads((folder / "manifest.json").read_text())["stage"] == "deploy"

    r = CliRunner().invoke(cli, ["bench", str(out), "--threads", "1", "--batch-sizes", "1"])
    assert r.exit_code == 0, r.output
    bench = json.loads((out / "bench.json").read_text())
    names = {row["name"] for row in bench["rows"]}
    assert names == {"onnx-int8", "pytorch-float"}
    by = {row["name"]: row for row in bench["rows"]}
    rounds = by["onnx-int8"]["latency_b1_rounds_p50_ms"]  # the interleaved rounds behind the median
    assert len(rounds) == 30 and by["onnx-int8"]["latency_b1_p50_ms"] == pytest.approx(float(np.median(rounds)))
    assert by["pytorch-float"]["latency_b1_rounds_p50_ms"] is None
    assert bench["other_load_cpus"] >= 0  # Linux: measured while timing, and said in bench.md
    assert "CPUs busy on average" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_latency_gate_exits_1_and_keeps_artifact(trained, tmp_path):
    out = tmp_path / "deploy"
    r = _deploy("--model", str(trained), "--target", "onnx", "--batch-sizes", "1", "--max-latency-ms", "0.000001",
                "--out", str(out))
    assert r.exit_code == 1, r.output
    assert "over the 1e-06 ms budget by" in r.output
    rep = json.loads((out / "onnx-float" / "report.json").read_text())
    assert rep["gates"]["latency_b1_p90_ms"]["passed"] is False and rep["verdict"] == "fail"
    assert (out / "onnx-float" / "model.onnx").exists() and (out / "onnx-float" / "manifest.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--target", "onnx", "--precision", "ap_fixed<8,3>"], "--precision"),
    (["--target", "fpga", "--precision", "fixed16"], "--precision"),
    (["--target", "onnx", "--batch-sizes", "0"], "--batch-sizes"),
    (["--target", "onnx", "--quantize", "int8", "--io", "int8", "--batch-sizes", "x"], "--batch-sizes"),
])
def test_bad_deploy_input_exits_2(trained, tmp_path, args, message):
    r = _deploy("--model", str(trained), *args, "--out", str(tmp_path / "d"))
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_deploy_needs_a_finished_run(tmp_path):
    r = _deploy("--model", str(tmp_path / "nothing"), "--target", "onnx", "--out", str(tmp_path / "d"))
    assert r.exit_code == 2 and "does not exist" in r.output


def test_a_finished_export_is_redone_only_with_force_and_bench_skips_unfinished(trained, tmp_path):
    out = tmp_path / "deploy"
    args = ("--model", str(trained), "--target", "onnx", "--batch-sizes", "1", "--out", str(out))
    assert _deploy(*args).exit_code == 0
    again = _deploy(*args)
    assert again.exit_code == 2 and "already holds a finished deploy" in again.output and "--force" in again.output
    assert _deploy(*args, "--force").exit_code == 0
    # an export that did not finish (no manifest) is left out of the bench, and said so
    (out / "onnx-int8").mkdir()
    (out / "onnx-int8" / "report.json").write_text(json.dumps({"target": "onnx", "accuracy": 1.0}))
    r = CliRunner().invoke(cli, ["bench", str(out), "--threads", "1", "--batch-sizes", "1", "--no-measure"])
    assert r.exit_code == 0, r.output
    bench = json.loads((out / "bench.json").read_text())
    assert {row["name"] for row in bench["rows"]} == {"onnx-float"}
    assert "unfinished" in bench["skipped"]["onnx-int8"] and "Left out: onnx-int8" in r.output
    assert json.loads((out / "manifest.json").read_text())["stage"] == "bench"


def test_a_damaged_model_folder_is_refused_naming_the_file(trained, tmp_path):
    import shutil

    model = tmp_path / "gen"
    shutil.copytree(trained, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])  # truncated
    r = _deploy("--model", str(model), "--target", "onnx", "--out", str(tmp_path / "d"))
    assert r.exit_code == 2 and "model.safetensors differs from the sha256" in r.output
    assert not (tmp_path / "d").exists()
    r = CliRunner().invoke(cli, ["evaluate", str(model)])
    assert r.exit_code == 2 and "model.safetensors" in r.output


def test_a_tflite_runtime_venv_named_explicitly_must_exist(trained, tmp_path):
    r = CliRunner().invoke(cli, ["deploy", "--model", str(trained), "--target", "tflite", "--threads", "1",
                                 "--tflite-runtime-venv", str(tmp_path / "absent"), "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "make setup" in r.output and "tflite-runtime==2.14.0" in r.output
    assert not (tmp_path / "d").exists() and not (tmp_path / "absent").exists()
