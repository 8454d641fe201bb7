"""`kdens train-ensemble` end to end on digits: real members (tiny MLPs), real files, resume, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ensembles.config import EnsembleConfig, parse_member_spec
from kdens import metrics as M
from kdens.artifacts import sha256_file
from kdens.app.cli import KdensGroup, evaluate
from kdens.app.cli_ensemble import train_ensemble
from kdens.config import build
from kdens.errors import ConfigError
from kdens.models import load_model
from kdens.train import CHECKPOINT, predict_logits

GEN_FILES = ["history.json", "manifest.json", "metrics.json", "model.json", "model.safetensors"]
ENS_FILES = ["manifest.json", "member-00", "member-01", "member-02", "metrics.json"]
MEMBERS = ["--model", "mlp", "--model-arg", "hidden=32", "--members", "3", "--epochs", "5", "--batch-size", "64",
           "--quiet"]
METRICS = ("test_accuracy", "test_errors", "test_nll", "test_ece")
TIMING = ("train_seconds",)


def _cli():
    group = KdensGroup()  # the kdens group's error handling (KdensError -> exit 2), without relying on registration
    group.add_command(train_ensemble)
    group.add_command(evaluate)
    return group


def _invoke(*args):
    return CliRunner().invoke(_cli(), [*map(str, args)], catch_exceptions=False)


def _ens(*args):
    return _invoke("train-ensemble", *args)


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _logits(run: Path, x) -> torch.Tensor:
    """Members' logits (K, N, C), each member loaded on its own from its folder."""
    dirs = sorted(p for p in run.iterdir() if p.name.startswith("member-"))
    return torch.stack([predict_logits(load_model(d)[0], x) for d in dirs]).double()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _without_timing(m):
    if isinstance(m, dict):
        return {k: _without_timing(v) for k, v in m.items() if k not in TIMING}
    if isinstance(m, list):
        return [_without_timing(v) for v in m]
    return m


@pytest.fixture(scope="session")
def ens(tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "arith"
    r = _ens(*MEMBERS, "--out", out)
    assert r.exit_code == 0, r.output
    return out


def test_files_metrics_and_manifest(ens, digits):
    assert sorted(p.name for p in ens.iterdir()) == ENS_FILES
    for k in range(3):
        assert sorted(p.name for p in (ens / f"member-{k:02d}").iterdir()) == GEN_FILES
    m = _json(ens / "metrics.json")
    assert m["method"] == "arithmetic" and m["temperature"] == 1.0 and m["num_members"] == 3
    assert len(m["members"]) == 3
    for entry in (m["ensemble"], *m["members"]):
        for key in (*METRICS, "val_accuracy", "val_errors", "val_nll", "val_ece"):
            assert key in entry, key
    for key in ("disagreement", "val_disagreement", "best_member_test_accuracy", "beats_best_member_accuracy",
                "beats_best_member_nll", *METRICS, "val_accuracy", "val_nll"):
        assert key in m, key

    # recomputed independently from the members' own weights on the test split
    z = _logits(ens, digits.x_test)  # (K, N, C)
    mix = torch.softmax(z, 2).mean(0)  # (N, C): the arithmetic mean of probabilities
    y = digits.y_test
    assert m["ensemble"]["test_errors"] == m["test_errors"] == int((mix.argmax(1).numpy() != y).sum())
    assert m["test_nll"] == pytest.approx(float(-mix[np.arange(len(y)), y].log().mean()), rel=1e-5)
    assert m["test_ece"] == pytest.approx(M.ece(mix.log().numpy(), y), abs=1e-5)
    top = z.argmax(2)
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert m["disagreement"] == pytest.approx(np.mean([float((top[i] != top[j]).double().mean()) for i, j in pairs]))
    assert 0 < m["disagreement"] < 0.5  # different seeds, still the same task
    # each member's entry is that member's own metrics.json (scored at T = 1)
    for k, entry in enumerate(m["members"]):
        own = _json(ens / f"member-{k:02d}" / "metrics.json")
        assert entry["run"] == f"member-{k:02d}" and entry["seed"] == k
        assert entry["test_errors"] == own["test_errors"]
        assert entry["test_nll"] == pytest.approx(own["test_nll"], rel=1e-5)
    # Jensen: -log(mean_k p_k(y)) <= mean_k -log p_k(y), example by example, so also on average
    assert m["test_nll"] <= np.mean([e["test_nll"] for e in m["members"]])
    assert m["best_member_test_accuracy"] == max(e["test_accuracy"] for e in m["members"])

    man = _json(ens / "manifest.json")
    assert man["stage"] == "ensemble" and man["data_fingerprint"] == digits.fingerprint
    assert man["config"]["members"] == 3 and man["config"]["combine"] == "arithmetic"
    assert man["config"]["train"]["epochs"] == 5 and man["members"] == ["member-00", "member-01", "member-02"]
    member_manifests = [ens / f"member-{k:02d}" / "manifest.json" for k in range(3)]
    assert man["inputs"] == {str(p): sha256_file(p) for p in member_manifests}
    for k, p in enumerate(member_manifests):
        mm = _json(p)
        assert mm["stage"] == "generalist" and mm["config"]["train"]["seed"] == k
        assert mm["config"]["model_args"] == {"hidden": 32} and mm["ensemble_member"] == {"index": k, "of": 3}


def test_a_member_is_the_generalist_of_its_seed(ens, tmp_path):
    from kdens.app.cli_generalist import train_generalist

    group = _cli()
    group.add_command(train_generalist)
    gen = tmp_path / "gen1"
    r = CliRunner().invoke(group, ["train-generalist", "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "5",
                                   "--batch-size", "64", "--seed", "1", "--quiet", "--out", str(gen)])
    assert r.exit_code == 0, r.output
    a, b = load_model(ens / "member-01")[0].state_dict(), load_model(gen)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and it evaluates, like any generalist
    r = _invoke("evaluate", ens / "member-01")
    assert r.exit_code == 0 and json.loads(r.output)["test_errors"] == _json(gen / "metrics.json")["test_errors"]


def test_evaluate_recomputes_the_metrics(ens):
    r = _invoke("evaluate", ens)
    assert r.exit_code == 0, r.output
    ev, m = json.loads(r.output), _json(ens / "metrics.json")
    assert ev["stage"] == "ensemble" and ev["method"] == "arithmetic"
    for key in METRICS:
        assert ev["ensemble"][key] == pytest.approx(m["ensemble"][key], rel=1e-9)
        assert [e[key] for e in ev["members"]] == pytest.approx([e[key] for e in m["members"]], rel=1e-9)
    assert ev["disagreement"] == m["disagreement"]


def test_geometric_from_config_table(ens, tmp_path, digits):
    cfg = tmp_path / "e.toml"
    cfg.write_text('[train-ensemble]\nmodel = "mlp"\nmodel-arg = { hidden = 32 }\nmembers = 3\nepochs = 9\n'
                   'batch-size = 64\ncombine = "geometric"\ntemperature = 2.0\n')
    out = tmp_path / "geo"
    r = _ens("--config", cfg, "--epochs", 5, "--temperature", 1, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    man, m = _json(out / "manifest.json"), _json(out / "metrics.json")
    assert man["config"]["combine"] == "geometric" and man["config"]["temperature"] == 1.0  # flag > file
    assert man["config"]["train"]["epochs"] == 5 and man["config"]["train"]["batch_size"] == 64
    assert m["method"] == "geometric" and sorted(p.name for p in out.iterdir()) == ENS_FILES
    # same seeds and settings: the same members as the arithmetic run, combined otherwise
    for k in range(3):
        name = f"member-{k:02d}"
        assert (out / name / "model.safetensors").read_bytes() == (ens / name / "model.safetensors").read_bytes()
    z = _logits(out, digits.x_test)
    prod = torch.softmax(z, 2).prod(0) ** (1 / 3)  # (N, C), not normalized
    q = prod / prod.sum(1, keepdim=True)
    y = digits.y_test
    assert m["test_nll"] == pytest.approx(float(-q[np.arange(len(y)), y].log().mean()), rel=1e-5)
    assert m["test_nll"] != pytest.approx(_json(ens / "metrics.json")["test_nll"], rel=1e-3)
    # the normalizer sum_c prod_k p_k(c)^(1/K) is <= 1, so this NLL too is <= the members' mean
    assert m["test_nll"] <= np.mean([e["test_nll"] for e in m["members"]])
    # an [ensemble] table works too
    cfg.write_text(cfg.read_text().replace("[train-ensemble]", "[ensemble]"))
    r = _ens("--config", cfg, "--epochs", 1, "--members", 2, "--quiet", "--out", tmp_path / "geo2")
    assert r.exit_code == 0, r.output
    assert _json(tmp_path / "geo2" / "manifest.json")["config"]["temperature"] == 2.0


class _Interrupt(Exception):
    pass


def test_interrupted_member_resumes_and_finished_ones_are_kept(ens, tmp_path, monkeypatch, digits):
    import torch.nn.functional as F

    import kdens.runs as gen_mod

    real_fit = gen_mod.fit
    trained = []
    steps = -(-len(digits.y_train) // 64)

    def counting_fit(*args, desc="train", **kw):
        trained.append(desc)
        if desc == "member-01" and crash["on"]:
            calls = {"n": 0}

            def crashing_ce(logits, xb, yb, idx):  # the default loss, failing inside epoch 3
                calls["n"] += 1
                if calls["n"] == 2 * steps + 5:
                    raise _Interrupt
                return F.cross_entropy(logits, yb)
            kw["loss_fn"] = crashing_ce
        return real_fit(*args, desc=desc, **kw)

    crash = {"on": True}
    monkeypatch.setattr(gen_mod, "fit", counting_fit)
    out = tmp_path / "run"
    with pytest.raises(_Interrupt):
        _ens(*MEMBERS, "--out", out)
    assert trained == ["member-00", "member-01"]
    assert (out / "member-01" / CHECKPOINT).exists() and not (out / "member-01" / "manifest.json").exists()
    assert not (out / "member-02").exists() and not (out / "manifest.json").exists()
    kept = {f: _stamp(out / "member-00" / f) for f in GEN_FILES}

    crash["on"] = False
    r = _ens(*MEMBERS, "--out", out)
    assert r.exit_code == 2 and "--resume" in r.output and "member-01" in r.output
    trained.clear()
    r = _ens(*MEMBERS, "--resume", "--out", out)
    assert r.exit_code == 0, r.output
    assert trained == ["member-01", "member-02"]  # member-00 was not trained again
    assert {f: _stamp(out / "member-00" / f) for f in GEN_FILES} == kept
    assert sorted(p.name for p in out.iterdir()) == ENS_FILES
    assert not (out / "member-01" / CHECKPOINT).exists()
    # the resumed member equals the uninterrupted one
    for k in range(3):
        name = f"member-{k:02d}"
        assert (out / name / "model.safetensors").read_bytes() == (ens / name / "model.safetensors").read_bytes()
    assert _without_timing(_json(out / "metrics.json")) == _without_timing(_json(ens / "metrics.json"))


def test_two_ranks_in_sequence_equal_one_call(ens, tmp_path, monkeypatch):
    out = tmp_path / "sharded"
    r = _ens(*MEMBERS, "--rank", 0, "--world-size", 2, "--out", out)
    assert r.exit_code == 0, r.output
    assert "waiting for member-01" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["member-00", "member-02"]  # no metrics, no manifest yet
    monkeypatch.setenv("RANK", "1")  # torchrun's variables stand in for the flags
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = _ens(*MEMBERS, "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ENS_FILES
    for k in range(3):
        name = f"member-{k:02d}"
        assert (out / name / "model.safetensors").read_bytes() == (ens / name / "model.safetensors").read_bytes()
    assert _without_timing(_json(out / "metrics.json")) == _without_timing(_json(ens / "metrics.json"))
    man = _json(out / "manifest.json")
    assert man["world_size"] == 2 and man["config"] == _json(ens / "manifest.json")["config"]


def test_member_models_are_cycled(tmp_path):
    out = tmp_path / "mixed"
    r = _ens("--member-models", "mlp:hidden=16;cnn:size=small,hidden=16", "--members", 3, "--epochs", 2,
             "--batch-size", 64, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    specs = [_json(out / f"member-{k:02d}" / "model.json") for k in range(3)]
    assert [s["name"] for s in specs] == ["mlp", "cnn", "mlp"]
    assert specs[1]["kwargs"] == {"size": "small", "hidden": 16} and specs[2]["kwargs"] == {"hidden": 16}
    assert [e["seed"] for e in _json(out / "metrics.json")["members"]] == [0, 1, 2]


def test_finished_members_of_other_settings_are_refused(ens, tmp_path):
    out = tmp_path / "half"
    assert _ens(*MEMBERS, "--rank", 0, "--world-size", 2, "--out", out).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    r = _ens(*MEMBERS, "--epochs", 3, "--out", out)
    assert r.exit_code == 2 and "other settings" in r.output
    assert sorted(p.name for p in out.iterdir()) == before and not (out / "member-01").exists()


@pytest.mark.parametrize("args,message", [
    (["--model", "mlp", "--members", "1"], "x>=2"),
    (["--members", "3"], "--model is required"),
    (["--model", "mlp", "--member-models", "mlp;cnn", "--members", "3"], "not both"),
    (["--member-models", "mlp:64", "--members", "2"], "must look like key=value"),
    (["--member-models", "mlp;resnet", "--members", "2"], "valid: mlp, cnn, lenet5"),
    (["--model", "mlp", "--model-arg", "dropout=2", "--members", "2"], "dropout=2"),
    (["--model", "mlp", "--members", "2", "--combine", "harmonic"], "harmonic"),
    (["--model", "mlp", "--members", "2", "--rank", "2", "--world-size", "2"], "--rank 2"),
    (["--model", "mlp", "--members", "2", "--data", "nowhere"], "no such dataset"),
    (["--model", "mlp", "--members", "2", "--temperature", "0"], "temperature"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "e"
    r = _ens(*args, "--epochs", 1, "--quiet", "--out", out)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--members"):
        build(EnsembleConfig, {"model": "mlp", "members": 1})
    with pytest.raises(ConfigError, match="--combine"):
        EnsembleConfig(members=2, model="mlp", combine="mean")
    with pytest.raises(ConfigError, match="--temperature"):
        EnsembleConfig(members=2, model="mlp", temperature=float("inf"))
    with pytest.raises(ConfigError, match="missing required setting.*--members"):
        build(EnsembleConfig, {"model": "mlp"})
    with pytest.raises(ConfigError, match="unknown config key 'member'"):
        build(EnsembleConfig, {"model": "mlp", "member": 3})
    cfg = build(EnsembleConfig, {"members": 4, "member_models": ["mlp:hidden=8", "lenet5"], "seed": 7})
    assert [(m.model, m.model_args, m.train.seed) for m in map(cfg.member, range(4))] == [
        ("mlp", {"hidden": 8}, 7), ("lenet5", {}, 8), ("mlp", {"hidden": 8}, 9), ("lenet5", {}, 10)]


def test_parse_member_spec():
    assert parse_member_spec("mlp") == ("mlp", {})
    assert parse_member_spec(" mlp:hidden=64,64,dropout=0.5 ") == ("mlp", {"hidden": [64, 64], "dropout": 0.5})
    assert parse_member_spec("cnn:size=small") == ("cnn", {"size": "small"})
    assert parse_member_spec("pkg.mod:factory") == ("pkg.mod:factory", {})
    assert parse_member_spec("pkg.mod:factory:width=3,bn=true") == ("pkg.mod:factory", {"width": 3, "bn": True})
    for bad in (":hidden=3", "mlp:64", "mlp:=3"):
        with pytest.raises(ConfigError, match="member-models"):
            parse_member_spec(bad)
