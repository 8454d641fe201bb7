"""End-to-end tests of ``kdens distill --method``: every method on digits, hints, adapters,
refusals, teacher-free runs and born-again generations (tiny nets, 1-8 epochs: students that
end at chance fail their run, so those that must finish train long enough to learn)."""

from __future__ import annotations

import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from distill.methods import METHODS
from kdens.app.cli import cli
from kdens.config import GeneralistConfig, build
from kdens.models import build_model, load_model
from kdens.train import predict_logits

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _distill(*args):
    return CliRunner().invoke(cli, ["distill", *map(str, args)], catch_exceptions=False)


def _json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def teachers(tmp_path_factory):
    """The built-in mlp with its defaults (800-800) as `kdens train-generalist` makes it, and two small ones."""
    from generalist import stage as generalist

    root = tmp_path_factory.mktemp("teachers")
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mlp", "--epochs", "3",
                                 "--quiet", "--out", str(root / "mlp")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = {"mlp": root / "mlp"}
    for name, hidden, seed in (("small", [64], 0), ("small1", [64], 1)):
        cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": hidden}, "epochs": 8,
                                       "batch_size": 64, "seed": seed})
        out[name] = generalist.run(cfg, root / name, progress=False)
    return out


def _plain_keys(hidden) -> set:
    return set(build_model("mlp", 10, (1, 8, 8), hidden=hidden).state_dict())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_digits_with_the_builtin_mlp(teachers, tmp_path, method):
    out = tmp_path / method
    warns = pytest.warns(UserWarning, match="designed teacher") if method == "tfkd-virtual" else nullcontext()
    with warns:  # tfkd-virtual accepts a teacher, for data settings and comparison metrics only
        r = _distill("--method", method, "--teacher", teachers["mlp"], "--model", "mlp", "--epochs", 6, "--quiet",
                     "--out", out)
    assert r.exit_code == 0, r.output
    man, m = _json(out / "manifest.json"), _json(out / "metrics.json")
    assert man["stage"] == "student" and man["config"]["method"] == m["method"] == m["loss"] == method
    assert m["method_args"] == man["config"]["method_args"] and m["teacher_test_errors"] is not None
    assert set(load_file(out / "model.safetensors")) == _plain_keys([800, 800])
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "manifest.json", "metrics.json", "model.json",
                                                     "model.safetensors"]
    features = METHODS[method].features
    # without --jitter a feature method's teacher features are computed once (digits' fit the auto budget)
    assert ("phases" in m) == features and (m.get("teacher_features") == "memory") == features
    assert man["soft_targets"]["online"] is False or method == "tfkd-virtual"


def test_fitnets_adapters_train_but_are_not_saved(teachers, tmp_path):
    out = tmp_path / "fit"
    r = _distill("--method", "fitnets", "--teacher", teachers["small"], "--model", "mlp", "--model-arg", "hidden=32",
                 "--method-arg", "hint_epochs=2", "--epochs", 2, "--batch-size", 64, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    man, m = _json(out / "manifest.json"), _json(out / "metrics.json")
    # one regressor Linear(32 -> 64) was trained beside the student ...
    assert man["features"].pop("teacher_features")["path"] == "memory"
    assert man["features"] == {"hints": ["head/in:head/in"], "teacher_shapes": [[64]], "student_shapes": [[32]],
                               "adapter_params": 32 * 64 + 64}
    assert [(p["phase"], p["epochs_run"], p["validated"]) for p in m["phases"]] == [("hints", 2, False),
                                                                                   ("kd", 2, True)]
    assert m["epochs_run"] == 4 and m["phases"][0]["final_train_loss"] > 0
    # ... and the saved student is the plain architecture: strict load, same predictions as evaluated
    state = load_file(out / "model.safetensors")
    assert set(state) == _plain_keys([32])
    plain = build_model("mlp", 10, (1, 8, 8), hidden=[32])
    plain.load_state_dict(state, strict=True)
    from kdens.data import load_dataset

    data = load_dataset("digits")
    errors = int((predict_logits(plain, data.x_test).argmax(1).numpy() != data.y_test).sum())
    assert errors == m["test_errors"] and m["test_accuracy"] > 0.5
    assert not (out / "phase-1-hints").exists()


def test_hint_points_resolve_by_module_name_and_default():
    from distill.methods.hints import Tap, parse_hints

    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    mlp = build_model("mlp", 10, (1, 8, 8), hidden=[16, 12]).eval()
    default = parse_hints([])
    assert [str(h) for h in default] == ["head/in:head/in"]
    tap = Tap(mlp, [default[0].student, parse_hints(["body.1:body.1"])[0].student], "student")
    mlp(x)
    last, first = tap.take()
    torch.testing.assert_close(last, mlp.body(mlp.flatten(x)))  # the input of head: the last hidden layer
    torch.testing.assert_close(first, torch.relu(mlp.body[0](mlp.flatten(x))))  # body.1's output
    with pytest.raises(Exception, match="never ran"):
        tap.take()  # cleared after reading: a stale value is never served
    cnn = build_model("cnn", 10, (1, 8, 8)).eval()
    tap = Tap(cnn, [default[0].teacher], "teacher")
    cnn(x)
    torch.testing.assert_close(tap.take()[0], cnn.body(cnn.flatten(cnn.features(x))))
    sys.path.insert(0, str(EXAMPLES))  # a package.module:factory model whose last layer is head
    try:
        user = build_model("mymodels:depthwise_net", 10, (1, 8, 8)).eval()
    finally:
        sys.path.remove(str(EXAMPLES))
    tap = Tap(user, [default[0].student], "student")
    user(x)
    torch.testing.assert_close(tap.take()[0], user.flatten(user.body(x)))
    from kdens.errors import ConfigError

    with pytest.raises(ConfigError, match="the teacher has no module named 'bodyy'; its modules: flatten, body, "
                                          "body.0, body.1"):
        Tap(mlp, [parse_hints(["bodyy:body"])[0].teacher], "teacher")
    for bad in ("body", "a:b:c", ":body", "body:x y", "/in:body"):
        with pytest.raises(ConfigError, match="--hint"):
            parse_hints([bad])


@pytest.mark.parametrize("method", ["fitnets", "fsp", "rkd"])
def test_feature_losses_take_half_precision_activations(method, digits):
    """Under CUDA autocast the student's hidden layers are bf16; the loss upcasts them like the logits."""
    from distill import online
    from distill.methods import make_method

    torch.manual_seed(0)
    teacher = build_model("mlp", 10, (1, 8, 8), hidden=[16]).eval()
    student = build_model("mlp", 10, (1, 8, 8), hidden=[16])
    m = make_method(method)
    setup = online.prepare(m, teacher, student, [], digits.x_train, (1, 8, 8), seed=0)
    phase = m.phases(2)[0]
    xb = torch.as_tensor(digits.x_train[:8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = setup.trainee(xb)
    assert setup.student_tap._seen[0].dtype == torch.bfloat16
    loss = online._loss_fn(m, phase, setup)(logits.float(), xb, torch.as_tensor(digits.y_train[:8]), None)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.body[0].weight.grad is not None and torch.isfinite(student.body[0].weight.grad).all()
    setup.close()


def test_named_hints_on_the_command_line(teachers, tmp_path):
    out = tmp_path / "rkd"
    r = _distill("--method", "rkd", "--teacher", teachers["small"], "--model", "mlp", "--model-arg", "hidden=32,16",
                 "--hint", "body.1:body.1", "--hint", "head/in:body.3", "--epochs", 1, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    f = _json(out / "manifest.json")["features"]
    assert f["hints"] == ["body.1:body.1", "head/in:body.3"] and f["student_shapes"] == [[32], [16]]
    assert f["teacher_shapes"] == [[64], [64]] and f["adapter_params"] == 0


@pytest.mark.parametrize("args,message", [
    (["--method", "fitnets", "--teacher", "{small},{small1}"], r"must be a generalist or student run folder \(one network\); .* is an ad-hoc ensemble of 2 runs"),
    (["--method", "tfkd-self", "--teacher", "{small},{small1}"], "must be a generalist or student run folder"),
    (["--method", "fsp", "--teacher", "{small}", "--model-arg", "hidden=32"], "equal widths"),
    (["--method", "fitnets", "--teacher", "{small}", "--hint", "nope:body"], "no module named 'nope'"),
    (["--method", "dkd", "--teacher", "{small}", "--alpha", "0.5"], "--alpha .* does not apply to --method dkd"),
    (["--method", "dkd", "--teacher", "{small}", "--loss", "kd"], "--loss kd and --method dkd disagree"),
    (["--method", "kd", "--teacher", "{small}", "--hint", "body:body"], "--hint names hidden layers"),
    (["--method", "dkd", "--teacher", "{small}", "--method-arg", "betta=2"], "unknown --method-arg betta"),
    (["--method", "dkd", "--teacher", "{small}", "--method-arg", "beta"], "--method-arg 'beta' must look like key=value"),
    (["--method", "made-up", "--teacher", "{small}"], "valid methods: kd, soft, logits"),
    (["--method", "kd"], "needs --teacher"),
    (["--method", "tfkd-virtual", "--model", ""], "--model is required"),
    (["--method", "dkd", "--teacher", "{small}", "--transfer", "unlabeled={npz}"], "dkd needs labels"),
    (["--method", "tfkd-virtual", "--generations", "2"], "nothing to chain"),
])
def test_bad_input_exits_2_and_writes_nothing(teachers, tmp_path, digits, args, message):
    np.savez(tmp_path / "u.npz", x=digits.x_test[:, 0])
    fmt = {"small": teachers["small"], "small1": teachers["small1"], "npz": tmp_path / "u.npz"}
    model = [] if "--model" in args else ["--model", "mlp", "--model-arg", "hidden=16"]
    args = [a.format(**fmt) for a in args]
    if "--model" in args:
        args = [a for a in args if a not in ("--model", "")]
    out = tmp_path / "exp" / "s"
    r = _distill(*args, *model, "--epochs", 1, "--quiet", "--out", out)
    assert r.exit_code == 2, r.output
    assert any(l.startswith("Error: ") for l in r.output.splitlines()) and "Traceback" not in r.output
    assert re.search(message, r.output), r.output
    assert not (tmp_path / "exp").exists()


def test_tfkd_virtual_needs_no_teacher_and_tfkd_self_copies_the_architecture(teachers, tmp_path):
    free = tmp_path / "free"
    r = _distill("--method", "tfkd-virtual", "--model", "mlp", "--model-arg", "hidden=16", "--epochs", 8,
                 "--method-arg", "a=0.95", "--quiet", "--out", free)
    assert r.exit_code == 0, r.output
    man, m = _json(free / "manifest.json"), _json(free / "metrics.json")
    assert man["teacher"] is None and man["inputs"] == {} and m["soft_targets"] is None
    assert "teacher_test_errors" not in m and m["method_args"] == {"temperature": 20.0, "alpha": 0.1, "a": 0.95}
    assert man["config"]["data"] == "digits" and m["test_accuracy"] > 0.3
    self_ = tmp_path / "self"
    r = _distill("--method", "tfkd-self", "--teacher", teachers["small"], "--epochs", 8, "--quiet", "--out", self_)
    assert r.exit_code == 0, r.output
    spec = _json(self_ / "model.json")
    assert (spec["name"], spec["kwargs"]) == ("mlp", {"hidden": [64]})  # the teacher's own architecture
    assert _json(self_ / "manifest.json")["config"]["model"] == "mlp"


def test_method_args_merge_from_the_config_file_and_flags(teachers, tmp_path):
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'[distill]\nteacher = "{teachers["small"]}"\nmodel = "mlp"\nmodel_args = {{ hidden = [16] }}\n'
                   'method = "dkd"\nmethod_args = { beta = 2, warmup = 5 }\nepochs = 8\n')
    out = tmp_path / "dkd"
    r = _distill("--config", cfg, "--method-arg", "warmup=0", "--temperature", 3, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    c = _json(out / "manifest.json")["config"]
    assert c["method_args"] == {"temperature": 3.0, "alpha": 1.0, "beta": 2, "ce_weight": 1.0, "warmup": 0}
    assert c["temperature"] == 3.0 and c["alpha"] is None and c["loss"] is None


class _Interrupt(Exception):
    pass


def test_fitnets_resume_in_the_kd_phase_equals_uninterrupted(teachers, tmp_path, monkeypatch):
    args = ["--method", "fitnets", "--teacher", teachers["small"], "--model", "mlp", "--model-arg", "hidden=16",
            "--epochs", 3, "--batch-size", 128, "--quiet"]
    ref = tmp_path / "ref"
    assert _distill(*args, "--out", ref).exit_code == 0
    from distill.methods.fitnets import FitNets

    real, calls = FitNets.feature_loss, {"kd": 0}

    def crashing(self, phase, batch, adapters):
        if phase == "kd":
            calls["kd"] += 1
            if calls["kd"] == 15:  # inside the second KD epoch (11 steps per epoch)
                raise _Interrupt
        return real(self, phase, batch, adapters)

    out = tmp_path / "run"
    monkeypatch.setattr(FitNets, "feature_loss", crashing)
    with pytest.raises(_Interrupt):
        _distill(*args, "--out", out)
    monkeypatch.setattr(FitNets, "feature_loss", real)
    assert (out / "phase-1-hints" / "checkpoint.pt").exists() and (out / "checkpoint.pt").exists()
    r = _distill(*args, "--out", out)
    assert r.exit_code == 2 and "--resume" in r.output
    assert _distill(*args, "--resume", "--out", out).exit_code == 0
    assert _json(out / "manifest.json")["resumed_from_epoch"] == 1 and not (out / "phase-1-hints").exists()
    a, b = load_model(ref)[0].state_dict(), load_model(out)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_born_again_generations(teachers, tmp_path, digits):
    out = tmp_path / "ban"
    r = _distill("--teacher", teachers["small"], "--generations", 2, "--epochs", 8, "--batch-size", 64, "--quiet",
                 "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["gen-01", "gen-02", "manifest.json", "metrics.json"]
    g1, g2 = (_json(out / g / "manifest.json") for g in ("gen-01", "gen-02"))
    assert g1["stage"] == g2["stage"] == "student"
    assert g1["config"]["teacher"] == str(teachers["small"]) and g2["config"]["teacher"] == str(out / "gen-01")
    assert (g1["config"]["train"]["seed"], g2["config"]["train"]["seed"]) == (0, 1)
    assert _json(out / "gen-02" / "model.json")["kwargs"] == {"hidden": [64]}  # the teacher's architecture
    top, m = _json(out / "manifest.json"), _json(out / "metrics.json")
    assert top["stage"] == "generations" and top["generations"] == ["gen-01", "gen-02"]
    assert [g["test_errors"] for g in m["generations"]] == [_json(out / g / "metrics.json")["test_errors"]
                                                            for g in ("gen-01", "gen-02")]
    assert m["generations"][1]["teacher_test_errors"] == m["generations"][0]["test_errors"]
    assert m["test_errors"] == m["generations"][1]["test_errors"]
    probs = sum(torch.softmax(predict_logits(load_model(out / g)[0], digits.x_test), 1) for g in ("gen-01", "gen-02"))
    assert m["ensemble"]["test_errors"] == int((probs.argmax(1).numpy() != digits.y_test).sum())
    assert "ensemble of 2 generations" in r.output
    # the ensemble of generations is a teacher: the folder itself, or the ad-hoc list of its generations
    for teacher in (out, m["ensemble_teacher"]):
        s = tmp_path / f"s{len(str(teacher))}"
        r = _distill("--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=16", "--epochs", 8, "--quiet",
                     "--out", s)
        assert r.exit_code == 0, r.output
        sm = _json(s / "metrics.json")
        assert _json(s / "manifest.json")["teacher"]["stage"] == "adhoc-ensemble"
        assert sm["teacher_test_errors"] == m["ensemble"]["test_errors"]
