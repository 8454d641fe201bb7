"""Training that fails says so: at chance, dead or diverged runs exit 1 with advice that fits them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdens import health
from kdens.app.cli import cli
from kdens.errors import TrainingFailed
from kdens.train import TrainConfig


def _cli(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture
def shuffled_npz(tmp_path) -> Path:
    """Tiny, learnable images (3 classes of 8x8 bars) whose labels were shuffled: nothing to learn."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, 8, 8))
        for i, c in enumerate(y):
            x[i, :, 2 * c + 1] = 250
        return x.astype(np.uint8), rng.permutation(y).astype(np.int64)  # labels no longer match images

    xtr, ytr = make(600)
    xte, yte = make(60)
    path = tmp_path / "shuffled.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path


def test_the_binomial_rule():
    # 20 of 100 against 1/10: P(X >= 20) = 0.0020 is not < 0.001; 22 of 100 is (0.00042)
    assert health.chance_test(20, 100, 0.1) == pytest.approx(0.00198, rel=0.02)
    assert health.chance_test(22, 100, 0.1) < health.ALPHA
    y = np.array([0] * 80 + [1] * 10 + [2] * 10)  # majority class 80%: chance is 0.8, not 1/3
    always_zero = torch.tensor([[5.0, 0.0, 0.0]]).repeat(100, 1)
    with pytest.raises(TrainingFailed, match=r"not clearly above chance \(80.0%, the majority class"):
        health.check_learned(always_zero, y, [], TrainConfig(), "gen")
    tiny = health.check_learned(torch.eye(3)[[0, 1, 2]], np.array([0, 1, 2]), [], TrainConfig(), "gen")
    assert tiny["checked"] is False and "cannot show accuracy above chance" in tiny["reason"]
    good = health.check_learned(torch.eye(3)[y] * 5, y, [], TrainConfig(), "gen")
    assert good["passed"] and good["val_correct"] == 100 and good["p_value"] < 1e-6


def test_a_student_taught_only_some_classes_is_judged_on_those():
    # the paper's 7s-and-8s student: right on every 7 and 8, never predicts the other classes
    y = np.arange(200) % 10
    logits = torch.full((200, 10), -20.0)
    logits[torch.arange(200), torch.as_tensor(np.where(np.isin(y, [7, 8]), y, 7))] = 20.0
    with pytest.raises(TrainingFailed, match="never got below"):  # on every class it looks broken
        health.check_learned(logits, y, [], TrainConfig(), "student")
    record = health.check_learned(logits, y, [], TrainConfig(), "student", classes=[7, 8])
    assert record["passed"] and record["val_examples"] == 40 and record["val_correct"] == 40
    assert record["classes_checked"] == [7, 8]
    with pytest.raises(TrainingFailed):  # and a student wrong on the taught classes still fails
        health.check_learned(logits, y, [], TrainConfig(), "student", classes=[0, 1])


def test_advice_never_repeats_a_setting_in_force():
    same = torch.zeros(10, 10)
    with pytest.raises(TrainingFailed) as e:
        health.check_alive(same, 2, TrainConfig(grad_clip=5.0, lr=0.05), "student")
    assert "--grad-clip" not in str(e.value) and "--lr 0.005" in str(e.value) and "epoch 3" in str(e.value)
    with pytest.raises(TrainingFailed) as e:
        health.check_alive(same, 0, TrainConfig(), "student")
    assert "--grad-clip 5" in str(e.value) and "--force" in str(e.value)
    flat = [{"train_loss": 2.303, "train_accuracy": 0.1, "val_loss": 2.30}] * 3
    y = np.arange(100) % 10
    with pytest.raises(TrainingFailed) as e:
        health.check_learned(torch.zeros(100, 10), y, flat, TrainConfig(optimizer="adamw", lr=0.001), "s")
    assert "--optimizer" not in str(e.value) and "--lr 0.01" in str(e.value) and "barely moved" in str(e.value)



def test_a_capped_smoke_run_at_chance_warns_and_finishes(capsys):
    y = np.arange(100) % 10
    flat = [{"train_loss": 2.303, "train_accuracy": 0.1, "val_loss": 2.30}]
    record = health.check_learned(torch.zeros(100, 10), y, flat, TrainConfig(epochs=30, epochs_cap=1), "s")
    assert record["passed"] is False and record["waived"] == "KDENS_EPOCHS_CAP=1"
    assert "not failed: KDENS_EPOCHS_CAP=1 cut it to 1 of its 30 epochs" in capsys.readouterr().err
    with pytest.raises(TrainingFailed):  # a cap that cut nothing waives nothing
        health.check_learned(torch.zeros(100, 10), y, flat, TrainConfig(epochs=1, epochs_cap=1), "s")


def test_shuffled_labels_exit_1_and_leave_no_checkpoint(shuffled_npz, tmp_path):
    out = tmp_path / "gen"
    r = _cli(["train-generalist", "--data", str(shuffled_npz), "--model", "mlp", "--model-arg", "hidden=32",
              "--epochs", "3", "--batch-size", "32", "--quiet", "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "Training failed: generalist: validation accuracy" in r.output and "not clearly above chance" in r.output
    assert "Traceback" not in r.output and "--force" in r.output
    assert not (out / "manifest.json").exists() and not (out / "checkpoint.pt").exists()


def test_a_student_at_chance_exits_1(tmp_path):
    teacher = tmp_path / "teacher"
    r = _cli(["train-generalist", "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "2",
              "--batch-size", "64", "--quiet", "--out", str(teacher)])
    assert r.exit_code == 0, r.output
    assert json.loads((teacher / "metrics.json").read_text())["training_check"]["passed"] is True
    # lr 1e-7: the student never leaves its random start, so it ends at chance
    r = _cli(["distill", "--teacher", str(teacher), "--model", "mlp", "--model-arg", "hidden=16", "--lr", "1e-7",
              "--epochs", "2", "--batch-size", "64", "--quiet", "--out", str(tmp_path / "student")])
    assert r.exit_code == 1, r.output
    assert "Training failed: student: validation accuracy" in r.output
    assert "--optimizer adamw and --lr 0.001" in r.output  # a flat loss: Adam's steps do not vanish
    assert not (tmp_path / "student" / "manifest.json").exists()


PIPELINE = """
name = "chance"
[data]
data = "digits"
[generalist]
model = "mlp"
model_args = {{ hidden = [32] }}
epochs = 2
batch_size = 64
[[distill]]
name = "tiny"
model = "mlp"
model_args = {{ hidden = [16] }}
lr = {lr}
grad_clip = 5.0
epochs = 2
batch_size = 64
baseline = false
[report]
html = false
"""


def test_kdens_run_names_its_own_keys_and_flags(tmp_path):
    config = tmp_path / "chance.toml"
    config.write_text(PIPELINE.format(lr="1e-7"))
    r = _cli(["run", str(config), "--out", str(tmp_path / "exp"), "--quiet"])
    assert r.exit_code == 1, r.output
    msg = r.output.split("Training failed: ", 1)[1]
    assert msg.startswith("stage tiny: validation accuracy")
    assert 'optimizer = "adamw" and lr = 0.001 in the [[distill]] table with name = "tiny"' in msg
    assert f"rerun `kdens run {config}`" in msg and "--from tiny" in msg
    assert "--force" not in msg and "grad_clip" not in msg and "--lr" not in msg
    state = json.loads((tmp_path / "exp" / "pipeline.json").read_text())
    assert [s["status"] for s in state["stages"]] == ["done", "failed"]


def test_epochs_cap_is_honoured_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("KDENS_EPOCHS_CAP", "2")
    out = tmp_path / "gen"
    r = _cli(["train-generalist", "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "30",
              "--batch-size", "64", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["epochs_cap"] == 2 and metrics["stopped_early"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["train"]["epochs"] == 30 and manifest["config"]["train"]["epochs_cap"] == 2
    monkeypatch.setenv("KDENS_EPOCHS_CAP", "soon")
    r = _cli(["train-generalist", "--model", "mlp", "--out", str(tmp_path / "bad"), "--quiet"])
    assert r.exit_code == 2 and "KDENS_EPOCHS_CAP='soon' must be a positive whole number" in r.output
    monkeypatch.delenv("KDENS_EPOCHS_CAP")
    assert "epochs_cap" not in TrainConfig().to_dict()  # off: run keys and manifests as before the cap
