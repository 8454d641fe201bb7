"""``kdens import-model`` (#12): ONNX files and PyTorch factories + weights as generalist run folders."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from imported_teachers import make_teacher_files

from kdens import metrics as M
from kdens.app.cli import cli
from kdens.models import load_model

FILES_ONNX = ["history.json", "manifest.json", "metrics.json", "model.json", "model.onnx"]


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _errors(run_dir) -> int:
    return json.loads((run_dir / "metrics.json").read_text())["test_errors"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    return make_teacher_files(tmp_path_factory.mktemp("teacher_files"), digits)


@pytest.fixture(scope="module")
def onnx_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "teacher"
    r = _run("import-model", "--data", "digits", "--onnx", files.onnx, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def torch_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "torch"
    r = _run("import-model", "--data", "digits", "--model", files.factory, "--model-arg", f"hidden={files.hidden}",
             "--weights", files.safetensors, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    return out


def test_onnx_import_is_a_generalist_folder_with_the_files_metrics(files, onnx_run, digits):
    import onnxruntime as ort

    assert sorted(p.name for p in onnx_run.iterdir()) == FILES_ONNX
    manifest = json.loads((onnx_run / "manifest.json").read_text())
    assert manifest["stage"] == "generalist" and manifest["data_fingerprint"] == digits.fingerprint
    assert manifest["inputs"] == {str(files.onnx.resolve()): _sha(files.onnx)}
    assert manifest["imported"]["sha256"] == _sha(files.onnx) and manifest["imported"]["layout"] == "nchw"
    assert manifest["outputs"]["model.onnx"] == _sha(files.onnx)  # the copy is hashed like any output
    # the metrics are the file's own answers, computed here by ONNX Runtime directly
    sess = ort.InferenceSession(str(files.onnx), providers=["CPUExecutionProvider"])
    scores = sess.run(None, {"x": digits.x_test})[0]
    metrics = json.loads((onnx_run / "metrics.json").read_text())
    assert metrics["test_errors"] == M.errors(scores, digits.y_test) and metrics["test_accuracy"] > 0.9
    assert metrics["test_nll"] == pytest.approx(M.nll(scores, digits.y_test), rel=1e-4)
    assert metrics["params"] == sum(p.numel() for p in files.model.parameters())
    r = _run("evaluate", onnx_run)
    assert r.exit_code == 0 and json.loads(r.output)["test_errors"] == metrics["test_errors"]


def test_an_onnx_teacher_teaches_alone_in_a_list_and_online_under_jitter(files, onnx_run, torch_run, tmp_path):
    student = tmp_path / "student"
    r = _run("distill", "--teacher", onnx_run, "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "15",
             "--out", student, "--quiet")
    assert r.exit_code == 0, r.output
    metrics = json.loads((student / "metrics.json").read_text())
    assert metrics["teacher_test_errors"] == _errors(onnx_run) and metrics["test_accuracy"] > 0.85
    # an ad-hoc ensemble of an ONNX and a PyTorch import, asked online about jittered images
    jit = tmp_path / "jitter"
    r = _run("distill", "--teacher", f"{onnx_run},{torch_run}", "--model", "mlp", "--model-arg", "hidden=32",
             "--epochs", "15", "--jitter", "1", "--out", jit, "--quiet")
    assert r.exit_code == 0, r.output
    m = json.loads((jit / "metrics.json").read_text())
    assert m["soft_targets"]["online"] is True and m["test_accuracy"] > 0.5


def test_onnx_with_a_fixed_batch_of_one_in_nhwc_answers_any_batch(files, digits, tmp_path):
    out = tmp_path / "nhwc"
    r = _run("import-model", "--data", "digits", "--onnx", files.onnx_nhwc_b1, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    spec = json.loads((out / "model.json").read_text())
    assert spec["onnx"]["layout"] == "nhwc" and spec["onnx"]["batch"] == 1
    model, _ = load_model(out)
    x = torch.as_tensor(digits.x_test[:5])
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), files.model(x).numpy(), rtol=1e-4, atol=1e-5)
        assert model(x[:0]).shape == (0, 10)


def test_an_onnx_softmax_output_is_read_as_probabilities(files, onnx_run, tmp_path):
    out = tmp_path / "probs"
    r = _run("import-model", "--data", "digits", "--onnx", files.onnx_probs, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "model.json").read_text())["onnx"]["outputs"] == "probabilities"
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, onnx_run))
    assert a["test_errors"] == b["test_errors"]
    assert a["test_nll"] == pytest.approx(b["test_nll"], rel=1e-3)  # log p, not p, reaches the metrics


def test_onnx_that_does_not_fit_the_data_is_refused_naming_both(files, tmp_path):
    r = _run("import-model", "--data", "digits", "--onnx", files.onnx_wrong_input, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "[N, 1, 10, 10]" in r.output and "(1, 8, 8)" in r.output
    r = _run("import-model", "--data", "digits", "--onnx", files.onnx_wrong_classes, "--out", tmp_path / "b")
    assert r.exit_code == 2 and "[N, 9]" in r.output and "10 classes" in r.output
    r = _run("import-model", "--data", "digits", "--onnx", tmp_path / "missing.onnx", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "no such file" in r.output
    r = _run("import-model", "--data", "digits", "--onnx", files.onnx, "--weights", files.safetensors,
             "--out", tmp_path / "d")
    assert r.exit_code == 2 and "drop --weights" in r.output
    assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written


def test_stages_that_need_the_network_refuse_an_onnx_teacher_in_one_line(onnx_run, tmp_path):
    cases = [
        (["train-specialists", "--generalist", onnx_run, "--clusters", "2"], "trainable copy"),
        (["deploy", "--model", onnx_run, "--target", "onnx"], "exports a PyTorch network"),
        (["distill", "--teacher", onnx_run, "--model", "mlp", "--method", "fitnets"], "no modules to hook"),
        (["distill", "--teacher", onnx_run], "--model is required"),
        (["distill", "--teacher", onnx_run, "--model", "mlp", "--transfer", "impressions=64,iters=5"],
         "runs without them"),
    ]
    for args, why in cases:
        r = _run(*args, "--out", tmp_path / "x")
        assert r.exit_code == 2, (args, r.output)
        assert why in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "x").exists()


def test_an_edited_model_onnx_is_refused_like_any_damaged_folder(files, tmp_path):
    out = tmp_path / "t"
    assert _run("import-model", "--data", "digits", "--onnx", files.onnx, "--out", out, "--quiet").exit_code == 0
    raw = bytearray((out / "model.onnx").read_bytes())
    raw[-1] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(raw))
    r = _run("evaluate", out)
    assert r.exit_code == 2 and "model.onnx differs from the sha256" in r.output
    r = _run("distill", "--teacher", out, "--model", "mlp", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "model.onnx" in r.output


def test_pytorch_imports_from_safetensors_state_dict_and_checkpoint_agree(files, torch_run, tmp_path):
    assert sorted(p.name for p in torch_run.iterdir()) == ["history.json", "manifest.json", "metrics.json",
                                                           "model.json", "model.safetensors"]
    manifest = json.loads((torch_run / "manifest.json").read_text())
    assert manifest["imported"] == {"format": "pytorch", "source": str(files.safetensors.resolve()),
                                    "sha256": _sha(files.safetensors), "weights_from": "safetensors"}
    for weights, where in ((files.state_dict, "state_dict"), (files.checkpoint, "state_dict['state_dict']")):
        out = tmp_path / weights.stem
        r = _run("import-model", "--data", "digits", "--model", files.factory, "--model-arg",
                 f"hidden={files.hidden}", "--weights", weights, "--out", out, "--quiet")
        assert r.exit_code == 0, r.output
        assert json.loads((out / "manifest.json").read_text())["imported"]["weights_from"] == where
        assert _errors(out) == _errors(torch_run)
        assert (out / "model.safetensors").read_bytes() == (torch_run / "model.safetensors").read_bytes()


def test_pickled_objects_and_weights_that_do_not_fit_are_refused(files, tmp_path):
    base = ["import-model", "--data", "digits", "--model", files.factory]
    r = _run(*base, "--model-arg", f"hidden={files.hidden}", "--weights", files.pickled, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "pickles Python objects" in r.output and "Net object" in r.output
    r = _run(*base, "--model-arg", "hidden=7", "--weights", files.safetensors, "--out", tmp_path / "b")
    assert r.exit_code == 2 and "shapes differ" in r.output and "(24, 64) vs (7, 64)" in r.output
    r = _run(*base, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "needs --weights" in r.output
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a torch file")
    r = _run(*base, "--weights", bad, "--out", tmp_path / "d")
    assert r.exit_code == 2 and "not a readable PyTorch file" in r.output
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_a_pytorch_import_trains_specialists_and_deploys(torch_run, tmp_path):
    spec = tmp_path / "specialists"
    r = _run("train-specialists", "--generalist", torch_run, "--groups", "3,5,8,9;1,7", "--epochs", "2",
             "--out", spec, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads((spec / "manifest.json").read_text())["stage"] == "specialists"
    dep = tmp_path / "deploy"
    r = _run("deploy", "--model", torch_run, "--target", "onnx", "--batch-sizes", "1", "--threads", "1",
             "--out", dep)
    assert r.exit_code == 0, r.output
    report = json.loads((dep / "onnx-float" / "report.json").read_text())
    assert report["verdict"] == "pass" and report["accuracy"] > 0.9
