"""Tree students (#15): targets, the fit, the ONNX export, deploy, the pipeline, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from distill import trees
from distill.trees_stage import REFERENCE_FILE, TREE_FILES
from kdens import metrics as M
from kdens.app.cli import cli
from kdens.app.plan import build_plan
from kdens.errors import ConfigError


def _ok(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r


def _refused(args, *words):
    """Exit 2, one line naming the problem."""
    r = CliRunner().invoke(cli, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("trees") / "t"
    _ok(["train-generalist", "--data", "digits", "--model", "mlp", "--model-arg", "hidden=64", "--epochs", "20",
         "--quiet", "--out", str(out)])
    return out


def test_targets_mix_hard_labels_and_soft_targets_at_t():
    s = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    q = trees.target_distribution(s, 2.0, 0.25, np.array([1, 2]))
    soft = np.sqrt([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    soft /= soft.sum(1, keepdims=True)  # softmax(log p / 2) = p^(1/2) renormalized
    assert np.allclose(q, 0.25 * np.eye(3)[[1, 2]] + 0.75 * soft)
    assert np.allclose(q.sum(1), 1.0)
    assert np.allclose(trees.target_distribution(s, 2.0, 0.25, None), soft)  # no labels: no hard term


def test_gbt_rows_carry_the_soft_labels_as_weights():
    q = np.array([[0.9995, 0.0004, 0.0001], [0.3, 0.7, 0.0], [0.5, 0.5, 0.0]])
    rows, cls, w = trees.weighted_rows(q)
    # every class with q >= 1e-3 is a row weighted q; class 2 (never that likely) keeps its best example
    assert sorted(zip(rows.tolist(), cls.tolist())) == [(0, 0), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert np.allclose(w, q[rows, cls])
    # the weighted log-loss is the KD cross-entropy: a classifier on these rows predicts q where it can
    x = np.array([[0.0], [1.0], [2.0]] * 50, np.float32)
    qq = np.tile(np.array([[0.8, 0.2, 0.0], [0.1, 0.6, 0.3], [0.0, 0.1, 0.9]]), (50, 1))
    est = trees.fit_student("gbt", trees.resolve_args("gbt", {"max_iter": 200, "min_samples_leaf": 1}), x, qq, 0)
    assert np.abs(trees.predict_proba(est, x[:3], 3) - qq[:3]).max() < 0.02


def test_a_leaf_predicts_the_mean_target_distribution():
    x = np.array([[0.0], [0.0], [1.0], [1.0]], np.float32)
    q = np.array([[0.6, 0.4], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7]])
    est = trees.fit_student("tree", trees.resolve_args("tree", {"max_depth": 1}), x, q, 0)
    p = trees.predict_proba(est, x, 2)
    assert np.allclose(p, [[0.7, 0.3], [0.7, 0.3], [0.2, 0.8], [0.2, 0.8]], atol=1e-6)
    assert trees.size(est, 2) == {"nodes": 3, "leaves": 2, "params": 2 * 1 + 2 * 2}


@pytest.mark.parametrize("model, args, message", [
    ("tree", {"max_depth": 0}, "max_depth=0 must be >= 1"),
    ("tree", {"depth": 3}, "no setting depth"),
    ("tree", {"min_samples_leaf": 2.5}, "must be an integer"),
    ("gbt", {"learning_rate": 0}, "learning_rate=0.0 must be > 0"),
])
def test_bad_settings_name_the_value(model, args, message):
    with pytest.raises(ConfigError, match=message):
        trees.resolve_args(model, args)


def test_a_tree_student_and_its_onnx_export_agree_on_real_inputs(teacher, tmp_path):
    out = tmp_path / "tree"
    _ok(["distill", "--teacher", str(teacher), "--model", "tree", "--model-arg", "max_depth=8",
         "--model-arg", "min_samples_leaf=2", "--quiet", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(TREE_FILES)
    from kdens.data import load_dataset

    data = load_dataset("digits")
    ort_p = trees.onnx_proba(out / "model.onnx", data.x_test)  # (N, C) from the file, in ONNX Runtime
    sk_p = np.load(out / REFERENCE_FILE)  # scikit-learn's predict at fit time
    assert ort_p.shape == (len(data.y_test), 10)
    assert np.abs(ort_p - sk_p).max() <= 1e-5 and (ort_p.argmax(1) == sk_p.argmax(1)).all()
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.6 and m["onnx_parity_max_abs_diff"] <= 1e-5
    assert m["test_errors"] == int((sk_p.argmax(1) != data.y_test).sum())
    assert m["leaves"] <= 2 ** 8 and m["model_args"]["max_depth"] == 8
    twin = m["hard_label_twin"]
    assert m["baseline_test_errors"] == twin["test_errors"] and twin["train_examples"] == m["train_examples"]
    b, t, s = twin["test_errors"], m["teacher_test_errors"], m["test_errors"]
    gap, why = M.gap_recovered(b, t, s)  # the noise rule of every student
    assert m["gap_recovered"] == (None if gap is None else pytest.approx((b - s) / (b - t)))
    assert m.get("gap_recovered_note") == why
    assert (out / "rules.txt").read_text().startswith("|--- x")
    assert json.loads((out / "history.json").read_text()) == []
    ev = json.loads(_ok(["evaluate", str(out)]).output)  # through the ONNX file: the same answers
    assert ev["model"] == "tree" and ev["test_errors"] == m["test_errors"]
    assert ev["val_accuracy"] == pytest.approx(m["val_accuracy"])

    # deploy: parity, accuracy and latency at batch 1 in ONNX Runtime, the neural students' gates
    d = tmp_path / "deploy"
    _ok(["deploy", "--model", str(out), "--target", "onnx", "--batch-sizes", "1", "--threads", "1",
         "--max-accuracy-drop", "0", "--out", str(d)])
    rep = json.loads((d / "onnx-float" / "report.json").read_text())
    assert rep["checks"]["parity"]["passed"] is True and rep["verdict"] == "pass"
    assert rep["accuracy"] == pytest.approx(m["test_accuracy"]) and "b1_t1" in rep["latency_ms"]
    assert rep["params"] == m["params"]
    for target, words in (("tflite", ("--target tflite", "use --target onnx")),
                          ("fpga", ("--target fpga", "use --target onnx"))):
        _refused(["deploy", "--model", str(out), "--target", target, "--out", str(tmp_path / target)], *words)
        assert not (tmp_path / target).exists()
    _refused(["deploy", "--model", str(out), "--target", "onnx", "--quantize", "int8", "--out",
              str(tmp_path / "q")], "--quantize int8", "--quantize none")
    assert not (tmp_path / "q").exists()


def test_a_gbt_student_learns_from_munge_pseudo_data(teacher, tmp_path):
    out = tmp_path / "gbt"
    _ok(["distill", "--teacher", str(teacher), "--model", "gbt", "--model-arg", "max_iter=30",
         "--transfer", "munge=2000", "--temperature", "2", "--quiet", "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["transfer"]["labeled"] is False and manifest["alpha_forced_zero"] is True
    m = json.loads((out / "metrics.json").read_text())
    assert m["alpha"] == 0.0 and m["train_examples"] == 2000
    assert m["test_accuracy"] > 0.7 and m["onnx_parity_max_abs_diff"] <= 1e-5
    assert m["hard_label_twin"]["train_examples"] != 2000  # the twin learns the real labelled split
    from kdens.data import load_dataset

    data = load_dataset("digits")
    ort_p = trees.onnx_proba(out / "model.onnx", data.x_test)
    assert np.allclose(ort_p.sum(1), 1.0, atol=1e-5)  # a softmax behind the regressors' logits
    assert np.abs(ort_p - np.load(out / REFERENCE_FILE)).max() <= 1e-5


@pytest.mark.parametrize("extra, words", [
    (["--model", "tree", "--jitter", "1"], ("--jitter 1", "--model tree")),
    (["--model", "tree", "--augment", "flip"], ("--augment flip", "--model tree")),
    (["--model", "tree", "--transfer", "munge=0"], ("N > 0",)),
    (["--model", "gbt", "--transfer", "munge=-5"], ("N > 0",)),
    (["--model", "tree", "--model-arg", "max_depth=0"], ("max_depth=0",)),
    (["--model", "tree", "--method", "dkd"], ("--method dkd", "kd or soft")),
    (["--model", "tree", "--baseline", "somewhere"], ("--baseline", "twin")),
    (["--model", "gbt", "--generations", "2"], ("--generations 2",)),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(teacher, tmp_path, extra, words):
    _refused(["distill", "--teacher", str(teacher), *extra, "--out", str(tmp_path / "bad")], *words)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "soft_targets").exists()


def test_a_pipeline_tree_student_fits_its_twin_itself(tmp_path):
    doc = {"name": "t", "data": {"data": "digits"},
           "generalist": {"model": "mlp", "model_args": {"hidden": [16]}, "epochs": 2},
           "distill": [{"name": "tree", "model": "tree", "model_args": {"max_depth": 4}},
                       {"name": "net", "model": "mlp", "epochs": 2}],
           "deploy": {"student": "tree", "targets": ["onnx"]}}
    plan = build_plan(doc, out=tmp_path)
    assert [s.name for s in plan.stages] == ["generalist", "tree", "baseline:net", "net", "deploy:onnx-float",
                                             "bench"]
    assert plan.stage("tree").config.baseline is None and plan.stage("tree").needs == ["generalist"]
    assert plan.stage("tree").config.model_args == {"max_depth": 4, "min_samples_leaf": 1,
                                                    "max_leaf_nodes": None, "min_samples_split": 2}
