"""`kdens train-specialists` end to end on digits: a real generalist, real specialists, real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import specialists.train as spec_train
from generalist import stage as gen_stage
from kdens import metrics as M
from kdens.artifacts import sha256_file
from kdens.app.cli import KdensGroup, evaluate
from kdens.app.cli_specialists import train_specialists
from kdens.config import GeneralistConfig, build
from kdens.errors import ConfigError, DataError
from kdens.models import load_model
from kdens.train import CHECKPOINT, predict_logits
from specialists.config import SpecialistsConfig
from specialists.train import fold_log_probs, half_group_sampler, remap_labels

SPEC_FILES = ["history.json", "manifest.json", "metrics.json", "model.json", "model.safetensors"]
RUN_FILES = ["clusters.json", "clusters.png", "manifest.json", "metrics.json", "spec-00", "spec-01"]
GROUPS = [[3, 5, 8], [1, 7]]
TRAIN = ["--epochs", "2", "--batch-size", "64", "--quiet", "--keep-unhelpful"]  # drop: test_specialists_check.py
TIMING = ("train_seconds", "seconds", "wall_seconds")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on a shared 2-core box
    yield
    torch.set_num_threads(n)


def _cli():
    group = KdensGroup()  # the kdens group's error handling (KdensError -> exit 2), without relying on registration
    group.add_command(train_specialists)
    group.add_command(evaluate)
    return group


def _invoke(*args):
    return CliRunner().invoke(_cli(), [*map(str, args)], catch_exceptions=False)


def _spec(gen, *args):
    return _invoke("train-specialists", "--generalist", gen, *TRAIN, *args)


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _without_timing(m):
    if isinstance(m, dict):
        return {k: _without_timing(v) for k, v in m.items() if k not in TIMING}
    if isinstance(m, list):
        return [_without_timing(v) for v in m]
    return m


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A small digits generalist: mlp hidden=32, 5 epochs."""
    torch.set_num_threads(1)
    cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [32]}, "epochs": 5, "batch_size": 64})
    return gen_stage.run(cfg, tmp_path_factory.mktemp("gen") / "generalist", progress=False)


@pytest.fixture(scope="module")
def run(gen, tmp_path_factory):
    """Specialists for the hand-given groups 3,5,8 and 1,7."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("spec") / "run"
    r = _spec(gen, "--groups", "3,5,8;1,7", "--out", out)
    assert r.exit_code == 0, r.output
    return out


# ---------------------------------------------------------------- pieces


def test_remap_and_fold():
    assert remap_labels([0, 3, 5, 8, 9, 1], [3, 5, 8]).tolist() == [3, 0, 1, 2, 3, 3]
    log_p = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), 1)
    f = fold_log_probs(log_p, [4, 1])
    assert f.shape == (4, 3)
    torch.testing.assert_close(f[:, :2], log_p[:, [4, 1]])
    torch.testing.assert_close(f[:, 2].exp(), log_p[:, [0, 2, 3, 5]].exp().sum(1))
    torch.testing.assert_close(torch.logsumexp(f, 1), torch.zeros(4, dtype=torch.float64))


def test_sampler_is_half_group_and_deterministic(digits):
    y = digits.y_train
    group = [3, 5, 8]
    sampler = half_group_sampler(y, group, 64)
    batches = sampler(0, torch.Generator().manual_seed(0))
    in_group = np.isin(y, group)
    for b in batches:
        b = b.numpy()
        assert len(b) % 2 == 0 and in_group[b].sum() == len(b) // 2  # exactly half from the group
        assert len(set(b.tolist())) == len(b)
    seen = np.concatenate([b.numpy() for b in batches])
    assert sorted(seen[in_group[seen]]) == sorted(np.flatnonzero(in_group))  # one pass over the group
    assert max(len(b) for b in batches) == 64 and len(batches) == math.ceil(in_group.sum() / 32)
    again = sampler(0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = sampler(1, torch.Generator().manual_seed(1))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    # a rest smaller than the group is cycled: still half and half
    tiny = half_group_sampler(np.array([0] * 50 + [1] * 3), [0], 10)(0, torch.Generator().manual_seed(0))
    assert all(int((b < 50).sum()) == len(b) // 2 for b in tiny)
    with pytest.raises(DataError, match="needs both"):
        half_group_sampler(y, list(range(10)), 64)


# ---------------------------------------------------------------- the stage


def test_files_clusters_and_manifests(run, gen, digits):
    assert sorted(p.name for p in run.iterdir()) == RUN_FILES
    for m in range(2):
        assert sorted(p.name for p in (run / f"spec-{m:02d}").iterdir()) == SPEC_FILES
    cl = _json(run / "clusters.json")
    for key in ("groups", "class_names", "all_groups", "covariance", "affinity", "inertia", "split", "settings"):
        assert key in cl, key
    assert cl["groups"] == [[1, 7], [3, 5, 8]] and cl["class_names"] == [["1", "7"], ["3", "5", "8"]]
    assert cl["all_groups"] == [[0], [1, 7], [2], [3, 5, 8], [4], [6], [9]]
    assert cl["split"] == "validation" and cl["examples"] == len(digits.y_val)
    assert cl["stability"] is None  # groups given by hand: no k-means to repeat
    g_model, _ = load_model(gen)
    p = torch.softmax(predict_logits(g_model, digits.x_val).double(), 1).numpy()
    np.testing.assert_allclose(cl["covariance"], np.cov(p, rowvar=False), atol=1e-12)  # validation, not test

    man = _json(run / "manifest.json")
    assert man["stage"] == "specialists" and man["data_fingerprint"] == digits.fingerprint
    assert man["specialists"] == ["spec-00", "spec-01"] and man["groups"] == cl["groups"]
    files = [gen / "manifest.json", run / "spec-00" / "manifest.json", run / "spec-01" / "manifest.json"]
    assert man["inputs"] == {str(p): sha256_file(p) for p in files}
    for m, g in enumerate(cl["groups"]):
        sm = _json(run / f"spec-{m:02d}" / "manifest.json")
        assert sm["stage"] == "specialist" and sm["seed"] == m and sm["specialist"]["group"] == g
        assert sm["inputs"] == {str(gen / "manifest.json"): sha256_file(gen / "manifest.json")}
        assert _json(run / f"spec-{m:02d}" / "model.json")["num_classes"] == len(g) + 1


def test_clusters_from_kmeans(gen, tmp_path, digits):
    out = tmp_path / "km"
    r = _spec(gen, "--clusters", 2, "--affinity", "correlation", "--epochs", 1, "--out", out)
    assert r.exit_code == 0, r.output
    cl, m = _json(out / "clusters.json"), _json(out / "metrics.json")
    assert cl["source"] == "k-means" and cl["affinity"] == "correlation" and cl["n_clusters"] == 2
    assert cl["cluster_algorithm"] == "kmeans" and cl["cluster_restarts"] == 100  # the defaults (issue 17)
    st = cl["stability"]  # the same clustering under k-means seeds 0..9 (the run's seed first)
    assert st["seeds"] == list(range(10)) and st["n_init"] == 100 and st["share_like_first"] > 0
    assert -1 <= st["min_pairwise_ari"] <= st["mean_pairwise_ari"] <= 1 and 1 <= st["distinct_partitions"] <= 10
    assert isinstance(cl["inertia"], float) and len(cl["all_groups"]) == 2
    assert sorted(k for g in cl["all_groups"] for k in g) == list(range(10))
    assert cl["groups"] == [g for g in cl["all_groups"] if len(g) >= 2]  # singletons get no specialist
    assert m["groups"] == cl["groups"]
    specs = [f"spec-{i:02d}" for i in range(len(cl["groups"]))]
    assert sorted(p.name for p in out.iterdir()) == ["clusters.json", "clusters.png", "manifest.json",
                                                     "metrics.json", *specs]


def test_metrics_and_breakdown(run, gen, digits):
    m = _json(run / "metrics.json")
    for key in ("generalist", "combined", "covered", "conditional", "by_covering", "per_group", "solver", "active",
                "specialists", "test_accuracy", "top_n"):
        assert key in m, key
    y = digits.y_test
    g_model, _ = load_model(gen)
    gen_lp = torch.log_softmax(predict_logits(g_model, digits.x_test).double(), 1).numpy()
    assert m["generalist"]["test_accuracy"] == M.accuracy(gen_lp, y)
    from specialists.teacher import load_teacher

    teacher = load_teacher(run)
    log_q = teacher(torch.as_tensor(digits.x_test)).double().numpy()
    assert m["combined"]["test_accuracy"] == pytest.approx(M.accuracy(log_q, y)) == m["test_accuracy"]
    # active = the generalist's top-1 class lies in the group
    top = gen_lp.argmax(1)
    active = np.stack([np.isin(top, g) for g in m["groups"]], 1)  # (N, M)
    assert m["conditional"]["count"] == int(active.any(1).sum())
    assert m["conditional"]["generalist_correct"] == int((top == y)[active.any(1)].sum())
    assert m["conditional"]["combined_correct"] == int((log_q.argmax(1) == y)[active.any(1)].sum())
    assert sum(e["count"] for e in m["by_covering"]) == len(y)
    assert (sum(e["delta_correct"] for e in m["by_covering"])
            == m["generalist"]["test_errors"] - m["combined"]["test_errors"])
    covering = (active & np.stack([np.isin(y, g) for g in m["groups"]], 1)).sum(1)
    assert [e["count"] for e in m["by_covering"]] == [int((covering == k).sum()) for k in range(covering.max() + 1)]
    cov = m["covered"]
    mask = np.isin(y, [1, 3, 5, 7, 8])
    assert cov["classes"] == [1, 3, 5, 7, 8] and cov["count"] == int(mask.sum())
    assert cov["combined_accuracy"] == pytest.approx(float((log_q.argmax(1) == y)[mask].mean()))
    assert [e["count"] for e in m["per_group"]] == [int(np.isin(y, g).sum()) for g in m["groups"]]
    assert m["solver"]["tol"] == 1e-6 and m["solver"]["max_kkt_residual"] < 1e-6
    assert [s["run"] for s in m["specialists"]] == ["spec-00", "spec-01"]


def test_teacher_interface(run, gen, digits):
    from distill.teachers import cache_options, load_teacher, soft_scores_depend_on_temperature, soft_scores_fn
    from specialists.teacher import SpecialistsTeacher

    t = load_teacher(str(run))
    assert isinstance(t, SpecialistsTeacher) and t.stage == "specialists"
    assert t.num_classes == 10 and t.input_shape == (1, 8, 8) and t.class_names == digits.class_names
    assert t.data_config == {"data": "digits", "val_fraction": 0.1, "split_seed": 0, "train_fraction": 1.0,
                             "layout": "auto", "label_column": None, "test_fraction": 0.2, "image_size": None}
    assert t.data_fingerprint == digits.fingerprint and len(t.manifest_hashes) == 4
    assert t.manifest_hashes[:2] == [sha256_file(run / "manifest.json"), sha256_file(gen / "manifest.json")]
    x = torch.as_tensor(digits.x_test)
    log_q = t(x)
    assert log_q.shape == (len(x), 10) and log_q.dtype == torch.float32
    torch.testing.assert_close(torch.logsumexp(log_q.double(), 1), torch.zeros(len(x), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # where no specialist is active, q is the generalist's distribution
    gen_lp = torch.log_softmax(predict_logits(load_model(gen)[0], x).double(), 1)
    idle = ~np.isin(gen_lp.argmax(1).numpy(), [1, 3, 5, 7, 8])
    assert 0 < idle.sum() < len(x)
    torch.testing.assert_close(log_q[idle].double(), gen_lp[idle], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(log_q[~idle].double(), gen_lp[~idle], atol=1e-3)
    assert not soft_scores_depend_on_temperature(t)
    assert torch.equal(soft_scores_fn(t, 7.0)(x[:20]), t(x[:20]))  # log q at every T
    d = t.describe()
    assert json.loads(json.dumps(d)) == d == t.describe()
    assert "run" not in json.dumps(cache_options(t))  # location-free cache key
    from specialists.teacher import load_teacher as load_specialists

    t3 = load_specialists(run, top_n=3)  # more specialists take part: another teacher, another cache key
    assert t3.top_n == 3 and cache_options(t3) != cache_options(t)
    assert not torch.allclose(t3(x), log_q, atol=1e-4)


def test_evaluate(run):
    r = _invoke("evaluate", run)
    assert r.exit_code == 0, r.output
    ev, m = json.loads(r.output), _json(run / "metrics.json")
    assert ev["stage"] == "specialists"
    for key in ("generalist", "combined", "covered", "conditional", "by_covering", "per_group"):
        assert _without_timing(ev[key]) == _without_timing(m[key]), key
    r = _invoke("evaluate", run / "spec-01")
    assert r.exit_code == 0, r.output
    ev, sm = json.loads(r.output), _json(run / "spec-01" / "metrics.json")
    assert ev["stage"] == "specialist" and ev["group"] == [3, 5, 8]
    for key in ("test_accuracy", "test_nll", "test_generalist_accuracy", "val_nll"):
        assert ev[key] == pytest.approx(sm[key], rel=1e-9), key


class _Interrupt(Exception):
    pass


def test_interrupted_specialist_resumes_and_finished_ones_are_kept(run, gen, tmp_path, monkeypatch, digits):
    import torch.nn.functional as F

    real_fit = spec_train.fit
    trained = []
    crash = {"on": True}
    steps = math.ceil(int(np.isin(digits.y_train, [3, 5, 8]).sum()) / 32)  # spec-01's batches per epoch

    def counting_fit(*args, desc="train", **kw):
        trained.append(desc)
        if desc == "spec-01" and crash["on"]:
            calls = {"n": 0}

            def crashing_ce(logits, xb, yb, idx):  # the default loss, failing inside epoch 2
                calls["n"] += 1
                if calls["n"] == steps + 3:
                    raise _Interrupt
                return F.cross_entropy(logits, yb)
            kw["loss_fn"] = crashing_ce
        return real_fit(*args, desc=desc, **kw)

    monkeypatch.setattr(spec_train, "fit", counting_fit)
    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        _spec(gen, "--groups", "3,5,8;1,7", "--out", out)
    assert trained == ["spec-00", "spec-01"]
    assert (out / "spec-01" / CHECKPOINT).exists() and not (out / "spec-01" / "manifest.json").exists()
    assert not (out / "manifest.json").exists()
    kept = {f: _stamp(out / "spec-00" / f) for f in SPEC_FILES}
    crash["on"] = False
    r = _spec(gen, "--groups", "3,5,8;1,7", "--out", out)
    assert r.exit_code == 2 and "--resume" in r.output and "spec-01" in r.output
    trained.clear()
    r = _spec(gen, "--groups", "3,5,8;1,7", "--resume", "--out", out)
    assert r.exit_code == 0, r.output
    assert trained == ["spec-01"]  # spec-00 was not trained again
    assert {f: _stamp(out / "spec-00" / f) for f in SPEC_FILES} == kept
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES and not (out / "spec-01" / CHECKPOINT).exists()
    for name in ("spec-00", "spec-01"):  # the resumed specialist equals the uninterrupted one
        assert (out / name / "model.safetensors").read_bytes() == (run / name / "model.safetensors").read_bytes()
    assert _without_timing(_json(out / "metrics.json")) == _without_timing(_json(run / "metrics.json"))
    r = _spec(gen, "--groups", "3,5,8;1,7", "--out", out)  # finished: refused without --force
    assert r.exit_code == 2 and "--force" in r.output


def test_two_ranks_in_sequence_equal_one_call(run, gen, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    r = _spec(gen, "--groups", "3,5,8;1,7", "--rank", 1, "--world-size", 2, "--out", out)
    assert r.exit_code == 0, r.output
    assert "waiting for spec-00" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["clusters.json", "clusters.png", "spec-01"]
    monkeypatch.setenv("RANK", "0")  # torchrun's variables stand in for the flags
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = _spec(gen, "--groups", "3,5,8;1,7", "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    for name in ("spec-00", "spec-01"):
        assert (out / name / "model.safetensors").read_bytes() == (run / name / "model.safetensors").read_bytes()
    assert _without_timing(_json(out / "metrics.json")) == _without_timing(_json(run / "metrics.json"))
    assert _json(out / "manifest.json")["world_size"] == 2


def test_config_table_and_flags(run, gen, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[train-specialists]\ngeneralist = "{gen}"\ngroups = "3,5,8;1,7"\nepochs = 9\n'
                   'batch-size = 64\ntop-n = 2\n')
    out = tmp_path / "cfg"
    r = _invoke("train-specialists", "--config", cfg, "--epochs", 2, "--top-n", 1, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    man = _json(out / "manifest.json")
    assert man["config"]["train"]["epochs"] == 2 and man["config"]["top_n"] == 1  # flags > file
    assert man["config"]["train"]["batch_size"] == 64 and man["config"]["groups"] == "3,5,8;1,7"
    for name in ("spec-00", "spec-01"):  # the same settings as the fixture's run: the same specialists
        assert (out / name / "model.safetensors").read_bytes() == (run / name / "model.safetensors").read_bytes()
    cfg.write_text(cfg.read_text().replace("[train-specialists]", "[specialists]"))
    r = _invoke("train-specialists", "--config", cfg, "--epochs", 1, "--quiet", "--out", tmp_path / "cfg2")
    assert r.exit_code == 0, r.output
    assert _json(tmp_path / "cfg2" / "manifest.json")["config"]["top_n"] == 2


@pytest.mark.parametrize("args,message", [
    (["--clusters", "2"], "--generalist"),
    (["--generalist", "{gen}"], "--clusters K is required"),
    (["--generalist", "{gen}", "--clusters", "2", "--groups", "1,7"], "not both"),
    (["--generalist", "{gen}", "--groups", "1,10"], "out of range"),
    (["--generalist", "{gen}", "--groups", "3;1,7"], "at least 2"),
    (["--generalist", "{gen}", "--groups", "1,7;7,8"], "disjoint"),
    (["--generalist", "{gen}", "--clusters", "11"], "--clusters 11"),
    (["--generalist", "{gen}", "--clusters", "1"], "no group of 2 or more"),
    (["--generalist", "{gen}", "--clusters", "2", "--top-n", "11"], "--top-n 11"),
    (["--generalist", "{gen}", "--clusters", "2", "--affinity", "cosine"], "cosine"),
    (["--generalist", "{gen}", "--clusters", "2", "--batch-size", "1"], "--batch-size 1"),
    (["--generalist", "{gen}", "--clusters", "2", "--rank", "2", "--world-size", "2"], "--rank 2"),
    (["--generalist", "{gen}/nowhere", "--clusters", "2"], "does not exist"),
    (["--generalist", "{run}", "--clusters", "2"], "expected generalist"),
])
def test_bad_input_exits_2_and_writes_nothing(gen, run, tmp_path, args, message):
    out = tmp_path / "s"
    args = [a.format(gen=gen, run=run) for a in args]
    r = _invoke("train-specialists", *args, "--epochs", 1, "--quiet", "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="missing required setting.*--generalist"):
        build(SpecialistsConfig, {"clusters": 3})
    with pytest.raises(ConfigError, match="--top-n"):
        SpecialistsConfig(generalist="g", clusters=3, top_n=0)
    with pytest.raises(ConfigError, match="--cluster-algorithm"):
        SpecialistsConfig(generalist="g", clusters=3, cluster_algorithm="spectral")
    with pytest.raises(ConfigError, match="unknown config key 'cluster'"):
        build(SpecialistsConfig, {"generalist": "g", "cluster": 3})
    cfg = build(SpecialistsConfig, {"generalist": "g", "groups": "1,2", "seed": 4, "top-n": 2})
    assert cfg.train.seed == 4 and cfg.top_n == 2 and cfg.clusters is None
