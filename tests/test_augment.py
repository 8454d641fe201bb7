"""``--augment crop,flip``: the image transforms, where they are refused, where they are recorded, and
an online teacher scoring exactly the views the student trains on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from distill.loop import online_loss_fn
from kdens.app.cli import cli
from kdens.config import GeneralistConfig, TrainConfig, build, parse_augment, to_dict
from kdens.errors import ConfigError
from kdens.train import augment_batch, crop_padding, fit


def test_crop_is_a_window_of_the_reflect_padded_image_and_flip_mirrors():
    x = torch.rand(64, 3, 16, 16)
    p = crop_padding(16, 16)
    assert p == 2 and crop_padding(32, 32) == 4 and crop_padding(24, 20) == 2 and crop_padding(4, 4) == 1
    out = augment_batch(x, ["crop"], torch.Generator().manual_seed(0))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    offsets = set()
    for i in range(len(x)):  # each view is one (2p+1)^2 window of its own padded image
        hits = [(a, b) for a in range(2 * p + 1) for b in range(2 * p + 1)
                if torch.equal(out[i], padded[i, :, a:a + 16, b:b + 16])]
        assert hits, i
        offsets.add(hits[0])
    assert len(offsets) > 5  # the offsets vary across the batch
    flipped = augment_batch(x, ["flip"], torch.Generator().manual_seed(1))
    mirrored = [torch.equal(flipped[i], x[i].flip(2)) for i in range(len(x))]
    assert all(m or torch.equal(flipped[i], x[i]) for i, m in enumerate(mirrored))
    assert 16 <= sum(mirrored) <= 48  # about half
    again = augment_batch(x, ["crop", "flip"], torch.Generator().manual_seed(3))
    assert torch.equal(again, augment_batch(x, ["crop", "flip"], torch.Generator().manual_seed(3)))  # seeded
    assert augment_batch(x, [], torch.Generator()) is x


def test_parse_and_record():
    assert parse_augment("flip, crop") == ["crop", "flip"] and parse_augment(["flip"]) == ["flip"]
    assert parse_augment(None) == [] and parse_augment("none") == []
    with pytest.raises(ConfigError, match="--augment rotate unknown; valid: crop, flip"):
        parse_augment("crop,rotate")
    cfg = build(GeneralistConfig, {"model": "mlp", "augment": ["crop", "flip"]})  # a kdens run / --config table
    assert cfg.train.augment == ["crop", "flip"] and to_dict(cfg)["train"]["augment"] == ["crop", "flip"]
    assert "augment" not in to_dict(build(GeneralistConfig, {"model": "mlp"}))["train"]  # old run keys unchanged


def test_cli_records_augment_and_refuses_it_for_features(tmp_path):
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "cnn", "--model-arg", "size=small",
                                 "--augment", "crop,flip", "--epochs", "3", "--optimizer", "adamw", "--lr", "0.003",
                                 "--quiet", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert manifest["config"]["train"]["augment"] == ["crop", "flip"]
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,y\n" + "\n".join(f"{i},{i % 7},{i % 2}" for i in range(40)) + "\n")
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(csv), "--model", "mlp", "--augment", "flip",
                                 "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "--augment flip crops and flips images" in r.output, r.output
    assert not (tmp_path / "f").exists()
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mlp", "--augment", "rotate",
                                 "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "valid: crop, flip" in r.output and not (tmp_path / "r").exists()


class _Recorder(torch.nn.Module):
    """A tiny net that keeps every training batch it is given."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3 * 8 * 8, 2)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.head(x.flatten(1))


def test_online_teacher_scores_exactly_the_augmented_views():
    rng = np.random.default_rng(0)
    x = rng.random((64, 3, 8, 8), dtype=np.float32)
    y = (x[:, 0].mean((1, 2)) > 0.5).astype(np.int64)
    teacher_seen: list[torch.Tensor] = []

    def teacher(xb):
        teacher_seen.append(xb.detach().clone())
        return torch.zeros(len(xb), 2)

    def loss(logits, scores, yb):
        return F.cross_entropy(logits, yb) + 0.0 * scores.sum()

    student = _Recorder()
    fit(student, x, y, cfg=TrainConfig(epochs=1, batch_size=16, augment=["crop", "flip"], patience=None),
        loss_fn=online_loss_fn(loss, teacher), progress=False)
    assert len(student.seen) == len(teacher_seen) == 4
    for s, t in zip(student.seen, teacher_seen):
        assert torch.equal(s, t)
    clean = torch.from_numpy(x)
    assert not any(torch.equal(s, clean[i * 16:(i + 1) * 16]) for i, s in enumerate(student.seen))


def test_distill_with_augment_runs_the_teacher_online(tmp_path):
    from generalist import stage as generalist

    teacher = generalist.run(build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [64]}, "epochs": 8,
                                                      "batch_size": 64}), tmp_path / "gen", progress=False)
    out = tmp_path / "exp" / "student"
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--model", "mlp", "--model-arg", "hidden=32",
                                 "--epochs", "4", "--batch-size", "64", "--augment", "flip", "--quiet",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["soft_targets"]["online"] is True
    assert json.loads((out / "manifest.json").read_text())["config"]["train"]["augment"] == ["flip"]
    assert not (tmp_path / "exp" / "soft_targets").exists()  # no cache of the clean images
