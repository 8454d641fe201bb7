"""``kdens distill --teacher scores.npy|.npz`` (#12): precomputed teacher scores, in the training set's row order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from imported_teachers import make_teacher_files

from kdens.app.cli import cli
from kdens.data import load_dataset

STUDENT = ["--model", "mlp", "--model-arg", "hidden=32", "--epochs", "12", "--quiet"]


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, digits):
    """The imported teacher's folder, and its logits on the training rows before the validation split."""
    files = make_teacher_files(tmp_path_factory.mktemp("teacher_files"), digits)
    run = files.folder / "run"
    r = _run("import-model", "--data", "digits", "--model", files.factory, "--model-arg", f"hidden={files.hidden}",
             "--weights", files.safetensors, "--out", run, "--quiet")
    assert r.exit_code == 0, r.output
    x = load_dataset("digits", val_fraction=0).x_train  # the documented row order
    with torch.no_grad():
        logits = files.model(torch.as_tensor(x)).float()
    return files.folder, run, logits


def test_logits_log_probs_and_probabilities_teach_the_same_student(teacher, tmp_path):
    folder, _, logits = teacher
    np.save(tmp_path / "logits.npy", logits.numpy())
    np.savez(tmp_path / "logp.npz", scores=torch.log_softmax(logits, 1).numpy(),
             data_fingerprint=load_dataset("digits").fingerprint)
    np.save(tmp_path / "probs.npy", torch.softmax(logits, 1).numpy())
    errors = []
    for name in ("logits.npy", "logp.npz", "probs.npy"):
        out = tmp_path / name.replace(".", "_")
        r = _run("distill", "--teacher", tmp_path / name, "--data", "digits", *STUDENT, "--out", out)
        assert r.exit_code == 0, r.output
        assert "precomputed" in r.output
        m = _metrics(out)
        assert m["test_accuracy"] > 0.85 and m["teacher_transfer_accuracy"] > 0.95
        errors.append(m["test_errors"])
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["teacher"]["scores"] == ("probabilities" if name == "probs.npy"
                                                 else "logits or log-probabilities")
        assert list(manifest["inputs"]) == [str(tmp_path / name)]
    assert max(errors) - min(errors) <= 1  # the same soft targets (up to float rounding)


@pytest.mark.parametrize("transfer", ["train", "val", "fraction=0.5"])
def test_scores_pick_the_transfer_sets_rows_like_the_run_folder_does(teacher, transfer, tmp_path):
    """The teacher's log-probabilities as scores train exactly the student its run folder trains."""
    _, run, logits = teacher
    np.save(tmp_path / "s.npy", torch.log_softmax(logits, 1).numpy())
    extra = ["--alpha", "0"] if transfer == "val" else []
    a, b = tmp_path / "from_scores", tmp_path / "from_run"
    assert _run("distill", "--teacher", tmp_path / "s.npy", "--data", "digits", "--transfer", transfer, *extra,
                *STUDENT, "--out", a).exit_code == 0
    assert _run("distill", "--teacher", run, "--transfer", transfer, *extra, *STUDENT, "--out", b).exit_code == 0
    assert _metrics(a)["test_errors"] == _metrics(b)["test_errors"]
    assert _metrics(a)["train_examples"] == _metrics(b)["train_examples"]


def test_scores_that_do_not_fit_the_data_are_refused_naming_the_value(teacher, tmp_path):
    _, _, logits = teacher
    s = logits.numpy()
    bad = dict(short=s[:-1], classes=s[:, :9])
    nan = s.copy()
    nan[7, 2] = np.nan
    bad["nan"] = nan
    for name, arr in bad.items():
        np.save(tmp_path / f"{name}.npy", arr)
    np.savez(tmp_path / "fp.npz", scores=s, data_fingerprint="0123456789abcdef")
    np.savez(tmp_path / "nokey.npz", logits=s)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    cases = {
        "short.npy": ["1437 rows", "1438 examples", "val_fraction=0"],
        "classes.npy": ["9 columns", "10 classes"],
        "nan.npy": ["1 non-finite", "row 7"],
        "fp.npz": ["0123456789ab", load_dataset("digits").fingerprint[:12]],
        "nokey.npz": ["no array 'scores'", "logits"],
        "objects.npy": ["not a plain numeric array"],
    }
    for name, words in cases.items():
        r = _run("distill", "--teacher", tmp_path / name, "--data", "digits", *STUDENT, "--out", tmp_path / "x")
        assert r.exit_code == 2, (name, r.output)
        assert all(w in r.output for w in words), (name, r.output)
    assert not (tmp_path / "x").exists()


def test_what_scores_cannot_do_is_refused_in_one_line(teacher, tmp_path):
    _, run, logits = teacher
    path = tmp_path / "s.npy"
    np.save(path, logits.numpy())
    cases = [
        (["--data", "digits", "--jitter", "1", "--model", "mlp"], "drop --jitter"),
        (["--data", "digits", "--augment", "flip", "--model", "mlp"], "drop --augment"),
        (["--model", "mlp"], "give --data"),
        (["--data", "digits", "--model", "mlp", "--method", "fitnets"], "precomputed scores"),
        (["--data", "digits", "--model", "mlp", "--transfer", f"unlabeled={path}"], "training rows only"),
        (["--data", "digits"], "--model is required"),
        (["--data", "digits", "--model", "tree"], "import the teacher model"),
    ]
    for args, words in cases:
        r = _run("distill", "--teacher", path, *args, "--out", tmp_path / "x")
        assert r.exit_code == 2 and words in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    r = _run("distill", "--teacher", f"{path},{run}", "--model", "mlp", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "teach alone" in r.output
    assert not (tmp_path / "x").exists()
