"""Cached teacher features (``distill.feature_cache``): a feature method trains the same student whether the
teacher's features come from memory, from a memory-mapped cache on disk, or from the teacher online; the disk
cache is keyed, reused, rebuilt when damaged; --jitter and a budget of 0 keep the teacher online."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from distill import feature_cache as fc
from distill import online
from distill.methods import make_method
from kdens.app.cli import cli
from kdens.config import GeneralistConfig, build
from kdens.errors import ConfigError, ModelError
from kdens.models import build_model, load_model

DISK_MB = "0.01"  # 10 kB: digits' 1,295 training rows x (10 logits + 64 hint units) float32 (383 kB) go to disk


def _distill(*args):
    return CliRunner().invoke(cli, ["distill", *map(str, args)], catch_exceptions=False)


def _json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from generalist import stage as generalist

    cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [64]}, "epochs": 8, "batch_size": 64})
    return generalist.run(cfg, tmp_path_factory.mktemp("teacher") / "gen", progress=False)


def _student(teacher, out, method, budget, *more):
    r = _distill("--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=32", "--method", method,
                 "--epochs", 6, "--batch-size", 64, "--feature-cache-mb", budget, "--quiet", "--out", out, *more)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("method", ["fitnets", "rkd"])
def test_memory_and_disk_train_the_same_student_as_online(teacher, tmp_path, method):
    paths = {"online": "0", "memory": "auto", "disk": DISK_MB}
    outs = {p: _student(teacher, tmp_path / p, method, b, "--cache-dir", tmp_path / "cache") for p, b in paths.items()}
    for path, out in outs.items():
        assert f"teacher features: {path}" in out
    metrics = {p: _json(tmp_path / p / "metrics.json") for p in paths}
    weights = {p: load_file(tmp_path / p / "model.safetensors") for p in paths}
    for path in ("memory", "disk"):
        m = metrics[path]
        assert m["teacher_features"] == path and m["soft_targets"]["online"] is False
        assert m["test_errors"] == metrics["online"]["test_errors"]
        assert m["test_nll"] == pytest.approx(metrics["online"]["test_nll"], rel=1e-5)
        for k, w in weights["online"].items():
            torch.testing.assert_close(weights[path][k], w, rtol=1e-4, atol=1e-5)
    assert metrics["online"]["teacher_features"] == "online" and metrics["online"]["soft_targets"]["online"]
    info = _json(tmp_path / "disk" / "manifest.json")["features"]["teacher_features"]
    n = metrics["disk"]["train_examples"]
    assert info["path"] == "disk" and info["bytes"] == 4 * n * (10 + 64) and not info["reused"]
    # the disk cache: the teacher's logits and hint layer over the transfer set, with a manifest written last
    d = Path(info["dir"])
    assert sorted(p.name for p in d.iterdir()) == ["feature-00.npy", "logits.npy", "manifest.json"]
    model, _ = load_model(teacher)
    logits = np.load(d / "logits.npy", mmap_mode="r")
    assert logits.shape == (n, 10)
    from kdens.runs import run_data
    x = torch.as_tensor(run_data(_json(teacher / "manifest.json")).x_train[:50], dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(logits[:50], model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_disk_cache_is_reused_and_rebuilt_when_damaged(teacher, tmp_path):
    cache = tmp_path / "cache"
    _student(teacher, tmp_path / "a", "fitnets", DISK_MB, "--cache-dir", cache)
    info = _json(tmp_path / "a" / "manifest.json")["features"]["teacher_features"]
    # a second student of another width reads the same teacher features
    r = _distill("--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=48", "--method", "fitnets",
                 "--epochs", 6, "--batch-size", 64, "--feature-cache-mb", DISK_MB, "--cache-dir", cache, "--quiet",
                 "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert "teacher features: disk (reused" in r.output
    again = _json(tmp_path / "b" / "manifest.json")["features"]["teacher_features"]
    assert again["reused"] and again["key"] == info["key"]
    # another hint point is another key
    _student(teacher, tmp_path / "c", "fitnets", DISK_MB, "--cache-dir", cache, "--hint", "body.0:body.0")
    other = _json(tmp_path / "c" / "manifest.json")["features"]["teacher_features"]
    assert other["key"] != info["key"] and not other["reused"]
    # a flipped byte in a cached array is caught by its checksum: rebuilt, never used
    f = Path(info["dir"]) / "feature-00.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="feature-00.npy does not match the checksum"):
        _student(teacher, tmp_path / "d", "fitnets", DISK_MB, "--cache-dir", cache)
    assert not _json(tmp_path / "d" / "manifest.json")["features"]["teacher_features"]["reused"]
    a, d = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "d" / "model.safetensors")
    assert all(torch.equal(a[k], d[k]) for k in a)


def test_jitter_keeps_the_teacher_online(teacher, tmp_path):
    """Jittered inputs change every batch: cached features would describe images the student never saw."""
    r = _distill("--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=32", "--method", "rkd",
                 "--epochs", 3, "--batch-size", 64, "--jitter", 1, "--feature-cache-mb", "1000", "--quiet",
                 "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    m = _json(tmp_path / "s" / "metrics.json")
    assert m["teacher_features"] == "online" and m["soft_targets"]["online"]
    assert "--jitter 1" in _json(tmp_path / "s" / "manifest.json")["features"]["teacher_features"]["why"]


def test_augment_keeps_the_teacher_online(teacher, tmp_path):
    """Cropped and flipped views change every batch too: the teacher must score the views the student sees."""
    r = _distill("--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=32", "--method", "rkd",
                 "--epochs", 3, "--batch-size", 64, "--augment", "crop,flip", "--feature-cache-mb", "1000",
                 "--quiet", "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert _json(tmp_path / "s" / "metrics.json")["teacher_features"] == "online"
    assert "--augment crop,flip" in _json(tmp_path / "s" / "manifest.json")["features"]["teacher_features"]["why"]


def test_a_bad_budget_exits_2_and_writes_nothing(teacher, tmp_path):
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher), "--method", "fitnets", "--feature-cache-mb",
                                 "lots", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "--feature-cache-mb 'lots'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_choose_and_budget():
    assert fc.choose(100.0, 0, 2**20, 100 * 2**20)[0] == "memory"
    assert fc.choose(0.5, 0, 2**20, 2**19)[0] == "disk"
    assert fc.choose(0.0, 0, 1, 0)[0] == "online"
    assert fc.choose(100.0, 2, 1, 100 * 2**20)[0] == "online"
    assert fc.choose(100.0, 0, 1, 100 * 2**20, ("crop", "flip")) == ("online", "--augment crop,flip changes the "
                                                                             "inputs every batch")
    assert fc.budget_bytes("2", torch.device("cpu")) == 2 * 2**20
    assert fc.budget_bytes("auto", torch.device("cpu")) > 0
    with pytest.raises(ConfigError, match="-3"):
        fc.parse_budget(-3)


class _NaNAfter(torch.nn.Module):
    """A teacher whose hidden layer turns NaN on the second batch: the build must leave nothing behind."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.calls = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2), 0

    def forward(self, x):
        self.calls += 1
        h = self.body(x)
        return self.head(h * float("nan") if self.calls > 2 else h)


def test_a_failed_disk_build_leaves_no_cache(tmp_path):
    teacher, student = _NaNAfter().eval(), build_model("mlp", 2, (4,), hidden=[3])
    setup = online.prepare(make_method("rkd", {}), teacher, student, ["body:body.0"], np.ones((8, 4), np.float32),
                           (4,), 0)
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    with pytest.raises(ModelError, match="NaN"):
        fc.provide(setup, x, setting=0.0001, jitter=0, cache_dir=tmp_path, key="k1", device=torch.device("cpu"),
                   batch_size=8, meta={})
    assert list((tmp_path / "k1").iterdir()) == []
    # a sound teacher fills a store whose rows are the teacher's own outputs, in memory and on disk
    teacher.calls = -10**9
    for setting, where in ((100.0, "memory"), (0.0001, "disk")):
        store, info = fc.provide(setup, x, setting=setting, jitter=0, cache_dir=tmp_path, key="k2",
                                 device=torch.device("cpu"), batch_size=8, meta={})
        assert info["path"] == where and store.where == where
        idx = torch.tensor([19, 3, 3, 0])
        logits, feats = store.rows(idx)
        with torch.no_grad():
            want = teacher(torch.from_numpy(x[idx.numpy()]))
        torch.testing.assert_close(logits, want)
        torch.testing.assert_close(feats[0], setup.teacher_tap.take()[0])


def test_the_budget_is_a_place_setting_and_the_report_names_the_path():
    """A budget says where the features live, not what the student learns: kdens run keys leave it out."""
    from kdens.app.pipeline import normalize
    from kdens.app.report_sections import _loss

    cfg = {"teacher": "t", "method": "fitnets", "feature_cache_mb": 5.0, "train": {"epochs": 2}}
    assert normalize(cfg, None) == {"teacher": "t", "method": "fitnets", "train": {"epochs": 2}}
    assert _loss({"loss": "fitnets", "teacher_features": "disk"}) == "fitnets (teacher features: disk)"
    assert _loss({"loss": "kd"}) == "kd"
