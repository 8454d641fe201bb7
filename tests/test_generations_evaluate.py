"""``kdens evaluate`` on a generations folder (``kdens distill --generations N``): every generation and their
ensemble, recomputed from the saved models after the hash checks; a damaged generation exits 2 naming the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdens.app.cli import cli
from kdens.config import GeneralistConfig, build

_LINE = re.compile(r"^(?P<label>.+): test_accuracy=(?P<acc>[0-9.]+)  test_errors=(?P<err>\d+)  "
                   r"test_nll=(?P<nll>[0-9.]+)$")


def _kdens(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def _json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def ban(tmp_path_factory):
    """Three born-again generations of a small MLP on digits."""
    from generalist import stage as generalist

    root = tmp_path_factory.mktemp("ban")
    cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [64]}, "epochs": 8, "batch_size": 64})
    teacher = generalist.run(cfg, root / "teacher", progress=False)
    r = _kdens("distill", "--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=32", "--generations", 3,
               "--epochs", 6, "--batch-size", 64, "--quiet", "--out", root / "ban")
    assert r.exit_code == 0, r.output
    return root / "ban"


def test_evaluate_prints_each_generation_and_the_ensemble(ban, tmp_path):
    r = _kdens("evaluate", ban, "--out", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 4, r.output
    parsed = [_LINE.match(line) for line in lines]
    assert all(parsed), r.output
    summary = _json(ban / "metrics.json")
    assert [p["label"] for p in parsed] == [f"{ban}/gen-0{k}" for k in (1, 2, 3)] + ["ensemble of 3 generations"]
    # the numbers the summary recorded, recomputed from the saved models
    for p, g in zip(parsed, summary["generations"]):
        assert int(p["err"]) == g["test_errors"] and float(p["acc"]) == pytest.approx(g["test_accuracy"], abs=1e-4)
    assert int(parsed[3]["err"]) == summary["ensemble"]["test_errors"]
    assert float(parsed[3]["acc"]) == pytest.approx(summary["ensemble"]["test_accuracy"], abs=1e-4)
    # the JSON (--out, or --json on stdout) carries the same, per generation and for the ensemble
    ev = _json(tmp_path / "eval.json")
    assert ev["stage"] == "generations" and [g["run"] for g in ev["generations"]] == ["gen-01", "gen-02", "gen-03"]
    for g, rec in zip(ev["generations"], summary["generations"]):
        assert g["test_errors"] == rec["test_errors"] == g["recorded_test_errors"]
        assert g["test_nll"] == pytest.approx(_json(ban / g["run"] / "metrics.json")["test_nll"], rel=1e-9)
    assert ev["ensemble"]["test_accuracy"] == pytest.approx(summary["ensemble"]["test_accuracy"], rel=1e-9)
    r = _kdens("evaluate", ban, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["ensemble"]["test_errors"] == summary["ensemble"]["test_errors"]


def _damage_weights(run: Path):
    f = run / "gen-02" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF
    f.write_bytes(bytes(raw))
    return "gen-02/model.safetensors differs from the sha256"


def _drop_architecture(run: Path):
    (run / "gen-03" / "model.json").unlink()
    return "gen-03/model.json is missing"


def _edit_manifest(run: Path):
    f = run / "gen-01" / "manifest.json"
    m = _json(f)
    m["seed"] = 99
    f.write_text(json.dumps(m))
    return "gen-01/manifest.json differs from the sha256"


def _drop_generation(run: Path):
    shutil.rmtree(run / "gen-02")
    return "gen-02 does not exist"


@pytest.mark.parametrize("damage", [_damage_weights, _drop_architecture, _edit_manifest, _drop_generation])
def test_a_damaged_generation_exits_2_naming_the_file(ban, tmp_path, damage):
    run = tmp_path / "ban"
    shutil.copytree(ban, run)
    assert _kdens("evaluate", run).exit_code == 0  # the copy is sound before the damage
    want = damage(run)
    r = _kdens("evaluate", run, "--out", tmp_path / "eval.json")
    assert r.exit_code == 2, r.output
    assert len(r.output.strip().splitlines()) == 1 and want in r.output, r.output
    assert not (tmp_path / "eval.json").exists()
