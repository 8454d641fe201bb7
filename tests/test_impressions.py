"""Data impressions (Nayak et al. 2019): the similarity and label math, impressions the teacher classifies as
sampled, resumable batches, refusals, and a student distilled from impressions alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distill.impressions import class_similarity, generate, optimise, sample_targets, value_range
from distill.teachers import ModelTeacher
from distill.transfer import parse_transfer
from kdens.app.cli import cli
from kdens.data import load_dataset
from kdens.errors import ConfigError, ModelError
from kdens.models import build_model

SPEC = "impressions=600,iters=150,batch=200"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "teacher"
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mlp", "--model-arg", "hidden=64",
                                 "--epochs", "20", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mlp", "--model-arg", "hidden=32",
                                 "--epochs", "5", "--quiet", "--out", str(out.parent / "other")])
    assert r.exit_code == 0, r.output  # a second member for an ad-hoc ensemble teacher
    return out


def test_class_similarity_is_row_min_max_normalised_cosine():
    w = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.1], [0.0, 2.0]])
    s = class_similarity(w).numpy()
    wn = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
    cos = wn @ wn.T
    expect = (cos - cos.min(1, keepdims=True)) / (cos.max(1, keepdims=True) - cos.min(1, keepdims=True))
    assert np.allclose(s, expect)
    assert np.allclose(np.diag(s), 1.0) and np.allclose(s.min(1), 0.0)
    assert s[0].argsort()[-2] == 1  # class 1's row points nearly along class 0's


def test_soft_labels_split_evenly_over_betas_and_classes_and_are_seeded():
    sim = class_similarity(torch.randn(5, 7, generator=torch.Generator().manual_seed(0))).numpy()
    y, drawn = sample_targets(sim, 1001, (1.0, 0.1), seed=3)
    assert y.shape == (1001, 5) and np.allclose(y.sum(1), 1.0, atol=1e-5) and (y >= 0).all()
    assert (drawn["betas"] == 1.0).sum() == 501 and (drawn["betas"] == 0.1).sum() == 500
    assert set(np.bincount(drawn["classes"][drawn["betas"] == 1.0])) <= {100, 101}
    # a larger beta draws labels closer to the class's similarity profile: its own class wins more often
    own = y[np.arange(1001), drawn["classes"]] == y.max(1)
    assert own[drawn["betas"] == 1.0].mean() > own[drawn["betas"] == 0.1].mean()
    assert np.array_equal(sample_targets(sim, 1001, (1.0, 0.1), seed=3)[0], y)
    assert not np.array_equal(sample_targets(sim, 1001, (1.0, 0.1), seed=4)[0], y)


def test_optimised_inputs_reach_their_labels_and_stay_in_range():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).eval()
    model.requires_grad_(False)
    y = torch.eye(4)[torch.tensor([0, 1, 2, 3, 2])] * 0.9 + 0.025  # (5, 4)
    lo, hi = torch.full((1, 6), -2.0), torch.full((1, 6), 3.0)
    x0 = torch.rand(5, 6) * 5 - 2
    start = -(y * torch.log_softmax(model(x0) / 20, 1)).sum(1)
    x, ce = optimise(model, y, x0, lo, hi, t=20.0, iters=300, lr=0.05)
    assert (ce < start).all() and (x >= -2).all() and (x <= 3).all() and (x == 3).any() | (x == -2).any()


def test_the_l2_penalty_shrinks_impressions_and_clip_end_lets_them_leave_the_range_until_the_last_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).eval()
    model.requires_grad_(False)
    y = torch.eye(4)[torch.tensor([0, 1, 2, 3, 2])] * 0.9 + 0.025  # (5, 4)
    wide, x0 = (torch.full((1, 6), -50.0), torch.full((1, 6), 50.0)), torch.rand(5, 6) * 2 - 1
    plain, _ = optimise(model, y, x0, *wide, t=20.0, iters=300, lr=0.05)
    shrunk, _ = optimise(model, y, x0, *wide, t=20.0, iters=300, lr=0.05, l2=1.0)
    assert shrunk.pow(2).sum() < 0.5 * plain.pow(2).sum()  # the penalty's pull towards 0 is visible
    # a range the plain optimum leaves: clipping every step holds x inside, clipping at the end lets
    # Adam go outside first; both end inside it, at different points
    lo, hi = torch.full((1, 6), -0.5), torch.full((1, 6), 0.5)
    assert (plain.abs() > 0.5).any()
    step, _ = optimise(model, y, x0, lo, hi, t=20.0, iters=300, lr=0.05)
    end, _ = optimise(model, y, x0, lo, hi, t=20.0, iters=300, lr=0.05, clip_every_step=False)
    for x in (step, end):
        assert (x >= -0.5).all() and (x <= 0.5).all()
    assert not torch.equal(step, end)
    assert torch.equal(end, plain.clamp(-0.5, 0.5))  # unclipped until the end: the wide run, clipped once


def test_value_range_is_unit_for_scaled_images_and_the_extremes_otherwise():
    digits = load_dataset("digits")
    lo, hi = value_range(digits)
    assert lo.shape == (1, 1, 1, 1) and lo.item() == 0.0 and hi.item() == 1.0
    rng = np.random.default_rng(0)
    feats = type(digits)(**{**digits.__dict__, "x_train": (rng.normal(size=(50, 3)) * [1, 10, 100]).astype(np.float32),
                            "normalization": {"mean": [0, 0, 0], "std": [1, 10, 100], "per": "feature"}})
    lo, hi = value_range(feats)
    assert lo.shape == (1, 3) and np.allclose(lo, feats.x_train.min(0)) and np.allclose(hi, feats.x_train.max(0))


def test_impressions_are_classified_as_sampled_in_range_and_resume_skips_finished_batches(teacher_dir, tmp_path):
    teacher = ModelTeacher(teacher_dir)
    data = load_dataset("digits")
    spec = parse_transfer(SPEC)
    x, y, info = generate(teacher, spec, data, seed=0, cache_dir=tmp_path, progress=False)
    assert x.shape == (600, 1, 8, 8) and x.min() >= 0.0 and x.max() <= 1.0
    pred = teacher(torch.from_numpy(x)).argmax(1).numpy()
    agree = (pred == y.argmax(1)).mean()
    assert agree > 0.8 and info["teacher_argmax_matches_sampled"] == pytest.approx(agree, abs=1e-4)
    assert info["batches"] == 3 and info["reused_batches"] == 0
    folder = tmp_path / f"impressions-{info['key']}"
    # an interrupted run: batch 2 never written, no manifest; the rerun makes batch 2 only
    (folder / "manifest.json").unlink()
    (folder / "batch-00002.npy").unlink()
    kept = {b: (folder / f"batch-0000{b}.npy").stat().st_mtime_ns for b in (0, 1)}
    x2, _, info2 = generate(teacher, spec, data, seed=0, cache_dir=tmp_path, progress=False)
    assert info2["reused_batches"] == 2 and info2["batches"] == 3
    assert all((folder / f"batch-0000{b}.npy").stat().st_mtime_ns == t for b, t in kept.items())
    assert np.allclose(x2, x, atol=1e-5)  # batch 2 depends only on the seed and its index
    x3, _, info3 = generate(teacher, spec, data, seed=0, cache_dir=tmp_path, progress=False)
    assert info3["reused_batches"] == 3 and np.array_equal(x3, x2)  # finished: read back, checked by hash
    np.save(folder / "batch-00001.npy", np.zeros((200, 1, 8, 8), np.float32))
    with pytest.raises(Exception, match="does not match"):
        generate(teacher, spec, data, seed=0, cache_dir=tmp_path, progress=False)


def test_a_student_distilled_from_impressions_alone_beats_chance(teacher_dir, tmp_path):
    out = tmp_path / "s"
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher_dir), "--model", "mlp", "--model-arg", "hidden=32",
                                 "--transfer", "impressions=1000,iters=150,batch=500", "--temperature", "20", "--alpha", "0",
                                 "--epochs", "30", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["training_examples_seen"] == 0 and m["data"]["train"] == 0
    assert m["transfer"]["spec"] == "impressions=1000,beta=1.0:0.1,t=20.0,iters=150,lr=0.01,batch=500"
    assert m["transfer"]["examples"] == 900 and m["transfer"]["validation"]["examples"] == 100
    assert m["data"]["val"] == 100  # the validation split is held-out impressions, not training data
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.6 and metrics["train_examples"] == 900  # chance is 0.1


@pytest.mark.parametrize("args, why", [
    (["--transfer", "impressions=0"], "N > 0"),
    (["--transfer", "impressions=-3"], "N > 0"),
    (["--transfer", "impressions=100,beta=0"], "beta must be a finite number > 0"),
    (["--transfer", "impressions=100,gamma=2"], "not 'gamma=2'"),
    (["--transfer", "impressions=100", "--teacher", "{t},{o}"], "must be one torch network"),
    (["--transfer", "impressions=100", "--method", "tfkd-virtual", "--model", "mlp", "--teacher", None], "give --teacher"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(teacher_dir, tmp_path, args, why):
    teacher = ["--teacher", str(teacher_dir)]
    if "--teacher" in args:
        i = args.index("--teacher")
        teacher, args = ([] if args[i + 1] is None else ["--teacher", args[i + 1].format(t=teacher_dir, o=teacher_dir.parent / "other")]), \
            args[:i] + args[i + 2:]
    out = tmp_path / "bad"
    r = CliRunner().invoke(cli, ["distill", *teacher, "--model", "mlp", *args, "--epochs", "1", "--quiet",
                                 "--out", str(out)])
    assert r.exit_code == 2, r.output
    assert why in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and not (tmp_path / "soft_targets").exists()


def test_impression_specs_parse_to_the_papers_defaults_and_round_trip():
    spec = parse_transfer("impressions=24000")
    assert (spec.count, spec.betas, spec.t, spec.iters, spec.lr, spec.labeled) == (24000, (1.0, 0.1), 20.0, 1500,
                                                                                  0.01, False)
    other = parse_transfer("impressions=10, beta=2:1:0.5, t=4, iters=3, lr=0.1, batch=5")
    assert str(parse_transfer(str(other))) == str(other) and other.betas == (2.0, 1.0, 0.5)
    with pytest.raises(ConfigError, match="at least one impression per beta"):
        parse_transfer("impressions=2,beta=1:0.5:0.1")
    assert (spec.l2, spec.clip) == (0.0, "step") and "l2" not in str(spec) and "clip" not in str(spec)
    levers = parse_transfer("impressions=10,l2=0.001,clip=end")
    assert (levers.l2, levers.clip) == (0.001, "end") and str(parse_transfer(str(levers))) == str(levers)
    for bad, why in (("clip=never", "clip='never' is not one of step, end"), ("l2=-1", "l2 must be a finite")):
        with pytest.raises(ConfigError, match=why):
            parse_transfer(f"impressions=10,{bad}")


def test_lenet5_half_halves_the_filters():
    full, half = build_model("lenet5", 10, (1, 28, 28)), build_model("lenet5", 10, (1, 28, 28), width=0.5)
    assert [m.out_channels for m in half.features if isinstance(m, torch.nn.Conv2d)] == [3, 8]
    assert [m.out_channels for m in full.features if isinstance(m, torch.nn.Conv2d)] == [6, 16]
    with pytest.raises(ModelError, match="width=0"):
        build_model("lenet5", 10, (1, 28, 28), width=0)
