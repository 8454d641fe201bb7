import json

import pytest
from click.testing import CliRunner

from kdens.app.cli import cli

GEN_FILES = ["history.json", "manifest.json", "metrics.json", "model.json", "model.safetensors"]


def _run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_train_generalist_end_to_end(tmp_path):
    out = tmp_path / "gen"
    r = _run(["train-generalist", "--data", "digits", "--model", "mlp", "--model-arg", "hidden=64",
              "--epochs", "8", "--batch-size", "64", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == GEN_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_errors", "val_accuracy", "val_nll", "params", "train_seconds"):
        assert key in metrics
    assert metrics["test_accuracy"] > 0.9
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "generalist" and manifest["config"]["train"]["epochs"] == 8
    assert manifest["data_fingerprint"] and manifest["versions"]["torch"]
    # a finished folder is not clobbered
    r = _run(["train-generalist", "--model", "mlp", "--out", str(out), "--quiet"])
    assert r.exit_code == 2 and "already holds a finished generalist" in r.output
    # evaluate reads it back and agrees with metrics.json
    r = _run(["evaluate", str(out)])
    assert r.exit_code == 0
    assert json.loads(r.output)["test_accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "runs.toml"
    cfg.write_text('[train-generalist]\ndata = "digits"\nmodel = "mlp"\nepochs = 1\nbatch-size = 64\n'
                   'model_args = { hidden = [16] }\n')
    out = tmp_path / "g"
    r = _run(["train-generalist", "--config", str(cfg), "--epochs", "2", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["train"]["epochs"] == 2 and m["config"]["train"]["batch_size"] == 64
    assert m["config"]["model_args"] == {"hidden": [16]}
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "mlp"\nepoch = 3\n')
    r = _run(["train-generalist", "--config", str(bad), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "unknown config key 'epoch'" in r.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,message", [
    (["--data", "nowhere", "--model", "mlp"], "no such dataset"),
    (["--model", "resnet"], "valid: mlp, cnn, lenet5"),
    (["--model", "mlp", "--model-arg", "hidden"], "key=value"),
    (["--model", "mlp", "--model-arg", "dropout=2"], "dropout=2"),
    (["--model", "mlp", "--device", "cuda"], "CUDA is not available"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "o"
    r = _run(["train-generalist", *args, "--out", str(out)])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    assert not out.exists()


def test_corrupt_idx_exits_2(idx_folder, tmp_path):
    p = idx_folder / "t10k-labels-idx1-ubyte"
    p.write_bytes(p.read_bytes()[:-3])
    r = _run(["train-generalist", "--data", str(idx_folder), "--model", "mlp", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "truncated" in r.output


def test_idx_folder_trains(idx_folder, tmp_path):
    r = _run(["train-generalist", "--data", str(idx_folder), "--model", "mlp", "--epochs", "10",
              "--batch-size", "16", "--out", str(tmp_path / "o"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["test_accuracy"] > 0.8


def test_interrupted_folder_needs_resume(tmp_path, digits):
    from kdens.models import build_model
    from kdens.train import TrainConfig, fit

    out = tmp_path / "g"
    # an interrupted run leaves a checkpoint and no manifest
    fit(build_model("mlp", 10, (1, 8, 8), hidden=[16]), digits.x_train, digits.y_train, None, None,
        TrainConfig(epochs=1), ckpt_dir=out, progress=False, run_key="x")
    r = _run(["train-generalist", "--model", "mlp", "--out", str(out)])
    assert r.exit_code == 2 and "--resume" in r.output


def test_run_missing_config_exits_2(tmp_path):
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.toml")])
    assert r.exit_code == 2 and "nope.toml" in r.output and "Traceback" not in r.output


def test_config_file_out_is_overridden_by_the_flag(tmp_path):
    """The README's config file holds `out`; `--out` overrides it like any other key."""
    cfg = tmp_path / "runs.toml"
    cfg.write_text(f'[train-generalist]\nmodel = "mlp"\nmodel_args = {{ hidden = [16] }}\nepochs = 2\n'
                   f'batch-size = 64\nout = "{tmp_path / "from-file"}"\n')
    r = _run(["train-generalist", "--config", str(cfg), "--out", str(tmp_path / "other"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "other" / "manifest.json").exists() and not (tmp_path / "from-file").exists()
    r = _run(["train-generalist", "--config", str(cfg), "--quiet"])
    assert r.exit_code == 0 and (tmp_path / "from-file" / "manifest.json").exists()


def test_unknown_key_lists_only_what_help_shows(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "mlp"\ngamma = 0.5\n')  # a TrainConfig field without a flag
    r = _run(["train-generalist", "--config", str(bad), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "unknown config key 'gamma'" in r.output
    listed = r.output.split("valid keys", 1)[1].split(": ", 1)[1].strip().split(", ")
    help_text = _run(["train-generalist", "--help"]).output
    assert listed and all(f"--{key}" in help_text for key in listed), listed
    assert "out" in listed and "model-arg" in listed and "eval-batch-size" not in listed


def test_stopped_early_only_when_epochs_were_left(digits):
    from kdens.models import build_model
    from kdens.train import TrainConfig, fit

    m = build_model("mlp", 10, (1, 8, 8), hidden=[32])
    fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=4, batch_size=64),
        progress=False)
    # no learning from here on: epochs 2 and 3 do not improve, and patience 2 runs out at the last one
    still = fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                TrainConfig(epochs=3, patience=2, batch_size=64), loss_fn=lambda z, xb, yb, idx: 0 * z.sum(),
                progress=False)
    assert len(still.history) == 3 and still.stopped_early is False
    early = fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                TrainConfig(epochs=5, patience=2, batch_size=64), loss_fn=lambda z, xb, yb, idx: 0 * z.sum(),
                progress=False)
    assert len(early.history) == 3 and early.stopped_early is True


def test_distill_result_line_comes_last(tmp_path):
    teacher = tmp_path / "t"
    assert _run(["train-generalist", "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "3",
                 "--batch-size", "64", "--quiet", "--out", str(teacher)]).exit_code == 0
    for name, word in (("s1", "built"), ("s2", "reused")):
        r = _run(["distill", "--teacher", str(teacher), "--model", "mlp", "--model-arg", "hidden=16",
                  "--epochs", "3", "--batch-size", "64", "--quiet", "--out", str(tmp_path / name)])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 0 and lines[0].startswith(f"soft targets: {word}"), lines
        assert lines[-1].startswith(f"{tmp_path / name}: test_accuracy="), lines
