"""End-to-end tests of the distillation stage on digits: real teachers, real training, tiny nets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distill.config import DistillConfig
from kdens import metrics as M
from kdens.artifacts import sha256_file
from kdens.app.cli import KdensGroup
from kdens.app.cli_distill import distill_cmd as distill
from kdens.config import GeneralistConfig, build
from kdens.errors import ConfigError
from kdens.models import load_model
from kdens.train import CHECKPOINT, predict_logits

STUDENT_FILES = ["history.json", "manifest.json", "metrics.json", "model.json", "model.safetensors"]
STUDENT = ["--model", "mlp", "--model-arg", "hidden=32", "--epochs", "4", "--batch-size", "64", "--quiet"]


def _cli():
    group = KdensGroup()  # the kdens group's error handling (KdensError -> exit 2), without relying on registration
    group.add_command(distill)
    return group


def _distill(*args):
    return CliRunner().invoke(_cli(), ["distill", *map(str, args)], catch_exceptions=False)


def _json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two digits generalists (seeds 0, 1) and a hard-label baseline with the students' shape."""
    from generalist import stage as generalist

    root = tmp_path_factory.mktemp("distill")
    out = {}
    for name, hidden, epochs, seed in (("gen0", [64], 10, 0), ("gen1", [64], 10, 1), ("base", [32], 4, 0)):
        cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": hidden}, "epochs": epochs,
                                       "batch_size": 64, "seed": seed})
        out[name] = generalist.run(cfg, root / name, progress=False)
    return out


def _state(run_dir: Path) -> dict:
    model, _ = load_model(run_dir)
    return model.state_dict()


def test_student_files_metrics_and_cache(runs, tmp_path):
    out = tmp_path / "exp" / "student"
    r = _distill("--teacher", runs["gen0"], *STUDENT, "--temperature", 4, "--baseline", runs["base"], "--out", out)
    assert r.exit_code == 0, r.output
    assert "soft targets: built" in r.output
    assert sorted(p.name for p in out.iterdir()) == STUDENT_FILES
    m = _json(out / "metrics.json")
    for key in ("test_accuracy", "test_errors", "test_nll", "val_accuracy", "val_nll", "params", "train_seconds",
                "teacher_agreement", "teacher_test_accuracy", "teacher_test_errors", "baseline_test_errors",
                "gap_recovered", "soft_targets"):
        assert key in m, key
    assert m["teacher_agreement"] >= 0.9 and m["test_accuracy"] >= 0.85
    assert m["teacher_test_errors"] == _json(runs["gen0"] / "metrics.json")["test_errors"]
    assert m["baseline_test_errors"] == _json(runs["base"] / "metrics.json")["test_errors"]
    b, t, s = m["baseline_test_errors"], m["teacher_test_errors"], m["test_errors"]
    gap, why = M.gap_recovered(b, t, s)
    assert b > t and m["gap_recovered"] == (None if gap is None else pytest.approx((b - s) / (b - t)))
    assert m.get("gap_recovered_note") == why
    assert m["soft_targets"]["reused"] is False and m["soft_targets"]["online"] is False
    assert len(_json(out / "history.json")) == m["epochs_run"] == 4

    man = _json(out / "manifest.json")
    teacher_manifest = runs["gen0"] / "manifest.json"
    assert man["stage"] == "student" and man["config"]["data"] == "digits"
    assert man["inputs"][str(teacher_manifest)] == sha256_file(teacher_manifest)
    assert man["teacher_manifest_hashes"] == [sha256_file(teacher_manifest)]
    assert man["data_differs_from_teacher"] is False
    # the cache sits beside the student, in its own folder with its own manifest
    cache = Path(man["soft_targets"]["path"]).parent
    assert cache.parent == tmp_path / "exp" / "soft_targets"
    assert sorted(p.name for p in cache.iterdir()) == ["logits.npy", "manifest.json"]
    cm = _json(cache / "manifest.json")
    assert cm["meta"]["teacher_manifest_hashes"] == man["teacher_manifest_hashes"]
    # the cached rows are the teacher's log-probabilities on the training split
    from kdens.data import load_dataset

    data = load_dataset("digits")
    teacher, _ = load_model(runs["gen0"])
    want = torch.log_softmax(predict_logits(teacher, data.x_train), 1).numpy()
    np.testing.assert_allclose(np.load(cache / "logits.npy"), want, atol=1e-5)
    # `kdens evaluate` reads the student back
    from kdens.app.stages import evaluate_run

    assert evaluate_run(out)["test_errors"] == m["test_errors"]


def test_second_student_reuses_cache_and_config_table(runs, tmp_path):
    first = tmp_path / "first"
    assert _distill("--teacher", runs["gen0"], *STUDENT, "--temperature", 4, "--out", first).exit_code == 0
    logits = Path(_json(first / "manifest.json")["soft_targets"]["path"])
    stamp = (logits.stat().st_ino, logits.stat().st_mtime_ns)
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[distill]\nteacher = "{runs["gen0"]}"\nmodel = "mlp"\nmodel-arg = {{ hidden = [16] }}\n'
                   'temperature = 8.0\nalpha = 0.5\nepochs = 9\nbatch-size = 64\n')
    second = tmp_path / "second"
    r = _distill("--config", cfg, "--epochs", 2, "--temperature", 2, "--quiet", "--out", second)
    assert r.exit_code == 0, r.output
    assert "soft targets: reused" in r.output
    man = _json(second / "manifest.json")
    assert man["config"]["temperature"] == 2.0 and man["config"]["alpha"] == 0.5  # flag > file > default
    assert man["config"]["train"]["epochs"] == 2 and man["config"]["model_args"] == {"hidden": [16]}
    info = man["soft_targets"]
    # the teacher was not run again: the cache says reused, and the array file is the same one, untouched
    assert info["reused"] is True and Path(info["path"]) == logits
    assert (logits.stat().st_ino, logits.stat().st_mtime_ns) == stamp
    assert info["build_seconds"] == _json(first / "manifest.json")["soft_targets"]["build_seconds"]


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(runs, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    args = ["--teacher", runs["gen0"], *STUDENT, "--cache-dir", tmp_path / "cache"]
    assert _distill(*args, "--out", ref).exit_code == 0

    import distill.stage as stage

    real = stage.make_method
    calls = {"n": 0}
    steps = -(-_json(ref / "metrics.json")["train_examples"] // 64)

    def crashing(*a, **k):
        method = real(*a, **k)
        loss = method.loss

        def wrapped(*b):
            calls["n"] += 1
            if calls["n"] == 2 * steps + 3:  # inside the third epoch
                raise _Interrupt
            return loss(*b)
        method.loss = wrapped
        return method

    out = tmp_path / "run"
    monkeypatch.setattr(stage, "make_method", crashing)
    with pytest.raises(_Interrupt):
        _distill(*args, "--out", out)
    monkeypatch.setattr(stage, "make_method", real)
    assert (out / CHECKPOINT).exists() and not (out / "manifest.json").exists()

    r = _distill(*args, "--out", out)
    assert r.exit_code == 2 and "--resume" in r.output
    r = _distill(*args, "--resume", "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == STUDENT_FILES
    assert _json(out / "manifest.json")["resumed_from_epoch"] == 2
    a, b = _state(ref), _state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_omit_with_fix_bias_reports_the_shift(runs, tmp_path):
    out = tmp_path / "no3"
    r = _distill("--teacher", runs["gen0"], *STUDENT, "--transfer", "omit=3", "--fix-bias", "--out", out)
    assert r.exit_code == 0, r.output
    m = _json(out / "metrics.json")
    from kdens.data import load_dataset

    data = load_dataset("digits")
    assert m["train_examples"] == int((data.y_train != 3).sum())
    fit = m["bias_fit"]
    assert m["bias_shift"] == fit["shift"] != 0.0 and fit["omitted_classes"] == [3]
    # the after-training check judged the nine classes it was taught, not the one it never saw
    assert m["training_check"]["classes_checked"] == [c for c in range(10) if c != 3]
    assert fit["accuracy_after"] >= fit["accuracy_before"]
    assert isinstance(m["test_errors_before_bias_fix"], int) and m["test_errors_after_bias_fix"] == m["test_errors"]
    # the saved student carries the shift: its validation accuracy is the fitted one
    student, _ = load_model(out)
    val_acc = float((predict_logits(student, data.x_val).argmax(1).numpy() == data.y_val).mean())
    assert val_acc == pytest.approx(fit["accuracy_after"])
    # the errors on the omitted class the paper counts (133 of its 1010 threes), after and before the fix
    threes = data.y_test == 3
    assert m["omitted_test_examples"] == int(threes.sum())
    wrong = int((predict_logits(student, data.x_test[threes]).argmax(1).numpy() != 3).sum())
    assert m["omitted_test_errors"] == wrong
    assert 0 <= m["omitted_test_errors_before_bias_fix"] <= m["omitted_test_examples"]


def test_unlabeled_transfer_forces_alpha_zero(runs, tmp_path, digits):
    from distill.stage import run

    path = tmp_path / "extra.npz"
    np.savez(path, x=digits.x_test[:, 0])  # (N, 8, 8) floats in [0, 1], no labels
    cfg = build(DistillConfig, {"teacher": str(runs["gen0"]), "model": "mlp", "model_args": {"hidden": [16]},
                                "transfer": f"unlabeled={path}", "alpha": 0.3, "epochs": 6, "batch_size": 64,
                                "val_fraction": 0.2})
    with pytest.warns(UserWarning, match="forced to 0"):
        out = run(cfg, tmp_path / "u", progress=False)
    man = _json(out / "manifest.json")
    assert man["config"]["alpha"] == 0.0 and man["alpha_requested"] == 0.3 and man["alpha_forced_zero"]
    assert man["transfer"] == {"spec": f"unlabeled={path}", "examples": len(digits.x_test), "labeled": False,
                               "sha256": sha256_file(path)}
    # another validation split is other data than the teacher's: allowed, and recorded
    assert man["config"]["val_fraction"] == 0.2 and man["data_differs_from_teacher"] is True


def test_adhoc_list_of_two_generalists(runs, tmp_path, digits):
    out = tmp_path / "pair"
    r = _distill("--teacher", f"{runs['gen0']},{runs['gen1']}", *STUDENT, "--epochs", 2, "--out", out)
    assert r.exit_code == 0, r.output
    man, m = _json(out / "manifest.json"), _json(out / "metrics.json")
    assert man["teacher"]["stage"] == "adhoc-ensemble" and len(man["teacher"]["members"]) == 2
    assert set(man["inputs"]) == {str(runs[g] / "manifest.json") for g in ("gen0", "gen1")}
    # the teacher is the arithmetic mean of the two members' probabilities
    def mean_probs(x, t=1.0):
        probs = [torch.softmax(predict_logits(load_model(runs[g])[0], x) / t, 1) for g in ("gen0", "gen1")]
        return (probs[0] + probs[1]) / 2

    assert m["teacher_test_errors"] == int((mean_probs(digits.x_test).argmax(1).numpy() != digits.y_test).sum())
    # the cache holds the soft targets at the run's T (4, the default) as scores s with
    # softmax(s / T) = mean_k softmax(z_k / T); T enters the key of an arithmetic mixture
    t = man["config"]["temperature"]
    assert t == 4.0 and man["soft_targets"]["soft_temperature"] == t
    cached = torch.from_numpy(np.load(man["soft_targets"]["path"]))  # (N, C) over the transfer set
    np.testing.assert_allclose(torch.softmax(cached / t, 1).numpy(), mean_probs(digits.x_train, t).numpy(), atol=1e-6)


def test_jitter_runs_the_teacher_online_without_a_cache(runs, tmp_path):
    out = tmp_path / "exp" / "jit"
    r = _distill("--teacher", runs["gen0"], *STUDENT, "--epochs", 3, "--jitter", 1, "--out", out)
    assert r.exit_code == 0, r.output
    assert _json(out / "metrics.json")["soft_targets"]["online"] is True
    assert not (tmp_path / "exp" / "soft_targets").exists()


@pytest.mark.parametrize("args,message", [
    (["--teacher", "{tmp}/nowhere"], "does not exist"),
    (["--teacher", "{tmp}"], "no manifest.json"),
    (["--teacher", "{gen0},"], "no empty ones"),
    (["--teacher", "{gen0}", "--transfer", "half"], "valid forms"),
    (["--teacher", "{gen0}", "--transfer", "omit=12"], "outside [0, 10)"),
    (["--teacher", "{gen0}", "--fix-bias"], "--fix-bias needs --transfer omit"),
    (["--teacher", "{gen0}", "--loss", "soft", "--alpha", "0.5"], "--alpha must be 0"),
    (["--teacher", "{gen0}", "--model", "resnet"], "valid: mlp, cnn, lenet5"),
    (["--teacher", "{gen0}", "--data", "{idx}"], "predicts 10 classes"),
    (["--teacher", "{gen0}", "--baseline", "{tmp}/nowhere"], "does not exist"),
    (["--teacher", "{gen0}", "--transfer", "unlabeled={tmp}/none.npz"], "does not exist"),
])
def test_bad_input_exits_2_and_writes_nothing(runs, tmp_path, idx_folder, args, message):
    fmt = {"tmp": tmp_path, "gen0": runs["gen0"], "idx": idx_folder}
    model = [] if "--model" in args else ["--model", "mlp"]
    out = tmp_path / "exp" / "s"
    r = _distill(*[a.format(**fmt) for a in args], *model, "--epochs", 1, "--quiet", "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "exp").exists()  # neither the student nor a cache folder


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--temperature"):
        DistillConfig(teacher="t", model="mlp", temperature=0.0)
    with pytest.raises(ConfigError, match="--alpha"):
        DistillConfig(teacher="t", model="mlp", alpha=1.5)
    with pytest.raises(ConfigError, match="--loss"):
        DistillConfig(teacher="t", model="mlp", loss="mse")
    with pytest.raises(ConfigError, match="unknown config key 'temprature'"):
        build(DistillConfig, {"teacher": "t", "model": "mlp", "temprature": 3})
