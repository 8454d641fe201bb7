"""``kdens run`` with an imported teacher, and paths resolved against the pipeline file's folder (#12)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from imported_teachers import MODULE, make_teacher_files

from kdens.app.cli import cli
from kdens.app.plan import build_plan, load_plan
from kdens.errors import ConfigError

STUDENT = """
[[distill]]
name = "student"
model = "mlp"
model_args = {{ hidden = 32 }}
epochs = 12
batch_size = 64
baseline = {baseline}
[report]
html = false
"""


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory, digits):
    """A project folder: the pipeline's data as an .npz, the teacher's files and its factory in nets/."""
    root = tmp_path_factory.mktemp("project")
    files = make_teacher_files(root / "nets", digits)
    (root / "data").mkdir()
    x_train = np.concatenate([digits.x_train, digits.x_val])
    y_train = np.concatenate([digits.y_train, digits.y_val])
    np.savez(root / "data" / "digits.npz", x_train=x_train, y_train=y_train, x_test=digits.x_test,
             y_test=digits.y_test)
    shutil.copy(files.onnx, root / "teacher.onnx")
    return root, files


def test_an_onnx_import_pipeline_runs_from_another_folder(project, tmp_path, monkeypatch):
    root, _ = project
    toml = root / "onnx.toml"
    toml.write_text('name = "imp"\n[data]\ndata = "data/digits.npz"\n[generalist]\nimport_onnx = "teacher.onnx"\n'
                    + STUDENT.format(baseline="true"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither data/ nor teacher.onnx is here: they resolve against the file
    r = _run("run", toml, "--quiet")
    assert r.exit_code == 0, r.output
    exp = elsewhere / "runs" / "imp"  # the experiment folder is an output: where kdens run is started
    manifest = json.loads((exp / "generalist" / "manifest.json").read_text())
    assert manifest["stage"] == "generalist" and manifest["imported"]["format"] == "onnx"
    assert manifest["config"]["onnx"] == str(root / "teacher.onnx")
    assert manifest["config"]["data"] == str(root / "data" / "digits.npz")
    student = json.loads((exp / "students" / "student" / "metrics.json").read_text())
    assert student["teacher_test_errors"] == manifest["metrics"]["test_errors"]
    assert (exp / "report.md").exists() and "imp" in (exp / "report.md").read_text()
    r = _run("run", toml, "--quiet")
    assert r.exit_code == 0 and r.output.count("reuse") == 3, r.output
    # a changed source file is imported again, and what reads it is redone
    import onnx

    shutil.copy(root / "teacher.onnx", tmp_path / "keep.onnx")
    model = onnx.load(str(root / "teacher.onnx"))
    model.doc_string = "edited"
    onnx.save(model, str(root / "teacher.onnx"))
    lines = _run("run", toml, "--quiet", "--dry-run").output
    assert "generalist: would run (config or inputs changed)" in lines, lines
    assert "student: would run" in lines and "baseline:student: reused" in lines, lines
    shutil.copy(tmp_path / "keep.onnx", root / "teacher.onnx")


def test_a_pytorch_import_pipeline_with_pythonpath_and_weights_beside_the_file(project, tmp_path, monkeypatch):
    root, files = project
    toml = root / "torch.toml"
    toml.write_text(f'name = "imp-torch"\npythonpath = ["nets"]\n[data]\ndata = "data/digits.npz"\n'
                    f'[generalist]\nimport_model = "{MODULE}:net"\nweights = "nets/teacher.safetensors"\n'
                    f'model_args = {{ hidden = {files.hidden} }}\n' + STUDENT.format(baseline="false"))
    monkeypatch.chdir(tmp_path)
    plan = load_plan(toml)
    gen = plan.stage("generalist").config
    assert gen.weights == str(root / "nets" / "teacher.safetensors") and gen.model == f"{MODULE}:net"
    r = _run("run", toml, "--quiet")
    assert r.exit_code == 0, r.output
    exp = tmp_path / "runs" / "imp-torch"
    assert json.loads((exp / "generalist" / "manifest.json").read_text())["imported"]["format"] == "pytorch"
    assert (exp / "generalist" / "model.safetensors").exists()


def test_data_paths_resolve_against_the_file_not_the_working_directory(project, tmp_path, monkeypatch):
    root, _ = project
    toml = root / "train.toml"
    toml.write_text('[data]\ndata = "data/digits.npz"\n[generalist]\nmodel = "mlp"\n'
                    '[[distill]]\nname = "student"\nteacher = "generalist"\nmodel = "mlp"\ntransfer = "unlabeled=data/digits.npz"\n'
                    'alpha = 0\n[[distill]]\nname = "from-scores"\nteacher = "nets/scores.npy"\nmodel = "mlp"\n')
    monkeypatch.chdir(tmp_path)
    plan = load_plan(toml)
    assert plan.stage("generalist").config.data == str(root / "data" / "digits.npz")
    assert plan.stage("student").config.transfer == f"unlabeled={root / 'data' / 'digits.npz'}"
    assert plan.stage("from-scores").config.teacher == str(root / "nets" / "scores.npy")
    assert plan.stage("student").config.teacher.endswith("generalist")  # a stage name stays a stage
    (tmp_path / "data").mkdir()  # a same-named file in the working directory is not what the file means
    toml.write_text('[data]\ndata = "data/other.npz"\n[generalist]\nmodel = "mlp"\n')
    np.savez(tmp_path / "data" / "other.npz", x=np.zeros(1))
    assert load_plan(toml).stage("generalist").config.data == str(root / "data" / "other.npz")


@pytest.mark.parametrize("table, message", [
    ({"import_onnx": "t.onnx", "epochs": 3}, "nothing is trained and epochs cannot be set"),
    ({"weights": "w.pt", "model": "mlp"}, "weights = ... goes with import_model"),
    ({"import_model": "m:f", "model": "mlp", "weights": "w.pt"}, "both model"),
    ({"import_onnx": "missing.onnx"}, "no such file"),
    ({"import_model": "m:f"}, "needs --weights"),
])
def test_bad_import_tables_are_refused_naming_the_key(table, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        build_plan({"data": {"data": "digits"}, "generalist": table, "distill": {"model": "mlp"}})


def test_a_student_of_an_onnx_teacher_needs_a_model_at_plan_time(project):
    root, _ = project
    doc = {"data": {"data": "digits"}, "generalist": {"import_onnx": str(root / "teacher.onnx")},
           "distill": {"teacher": "generalist"}}
    with pytest.raises(ConfigError, match="model is required: the \\[generalist\\] is an imported ONNX file"):
        build_plan(doc)
