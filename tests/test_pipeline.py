"""``kdens run`` end to end on digits: reuse, invalidation, --from, interruption, gates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdens.app.cli import cli
from kdens.errors import GateFailed
from kdens.app.pipeline import STATE, run_pipeline
from kdens.app.plan import load_plan

FIXTURES = Path(__file__).parent / "fixtures"

TOML = """
name = "tiny"
pythonpath = ["{fixtures}"]
[data]
data = "digits"
[generalist]
model = "mlp"
model_args = {{ hidden = [32] }}
epochs = 3
batch_size = 64
[[distill]]
name = "student"
model = "{student}"
model_args = {{ hidden = 16 }}
temperature = {temperature}
alpha = 0.3
epochs = 3
batch_size = 64
[deploy]
targets = ["onnx:float"]
batch_sizes = [1]
{gate}
[bench]
threads = 1
batch_sizes = [1]
[report]
html = false
"""


def _write(tmp_path: Path, temperature=4, student="interrupting_model:factory", gate="") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(TOML.format(fixtures=FIXTURES, temperature=temperature, student=student, gate=gate))
    return path


def _run(config: Path, out: Path, **kw) -> tuple[list[str], dict]:
    lines: list[str] = []
    run_pipeline(load_plan(config, out=out), progress=False, log=lines.append, **kw)
    return lines, {s["name"]: s for s in json.loads((out / STATE).read_text())["stages"]}


def _status(lines: list[str]) -> dict[str, str]:
    """'[3/6] student: reused (unchanged)' -> {'student': 'reused'}: each stage's decision line."""
    out = {}
    for line in lines:
        if line.startswith("["):
            name, _, rest = line.split("] ", 1)[1].partition(": ")
            out.setdefault(name, rest.split(" ")[0])
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    config, out = _write(tmp), tmp / "exp"
    lines, stages = _run(config, out)
    return tmp, config, out, lines, stages


def test_first_run_does_every_stage_and_writes_the_report(first):
    _, _, out, lines, stages = first
    assert list(stages) == ["generalist", "baseline:student", "student", "deploy:onnx-float", "bench"]
    assert all(s["status"] == "done" and s["manifest_sha256"] for s in stages.values())
    student = json.loads((out / "students/student/metrics.json").read_text())
    assert student["baseline_test_errors"] == json.loads((out / "baselines/student/metrics.json").read_text())[
        "test_errors"]
    assert (out / "deploy/onnx-float/model.onnx").exists() and (out / "deploy/bench.json").exists()
    assert (out / "report.md").exists()


def test_the_report_and_the_terminal_lead_with_the_file_to_ship(first):
    _, _, out, lines, _ = first
    text = (out / "report.md").read_text()
    assert text.split("\n## ")[1].startswith("Summary")  # the first section
    ship = next(line for line in lines if line.startswith("ship: "))
    path = Path(ship.split()[1])
    assert path.name == "model.onnx" and path.exists() and str(path) in text
    assert any(line.startswith("hard-label student (baseline:student):") for line in lines)
    assert any(line.startswith("distilled student (student):") and "gap recovered" in line for line in lines)


def test_second_run_reuses_everything(first):
    _, config, out, _, before = first
    lines, stages = _run(config, out)
    assert set(_status(lines).values()) == {"reused"}
    assert {n: s["manifest_sha256"] for n, s in stages.items()} == {n: s["manifest_sha256"] for n, s in
                                                                    before.items()}


def test_a_moved_experiment_on_another_machine_is_still_reused(first, tmp_path, monkeypatch):
    """Another folder, another core count (the deploy's default threads), another home: all reused."""
    import shutil

    from deploy import common

    _, config, out, _, _ = first
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    monkeypatch.setattr(common, "all_cores", lambda: 7)
    monkeypatch.setenv("HOME", str(tmp_path / "other-home"))
    assert common.DeployOptions().thread_counts() == (1, 7)
    lines, _ = _run(config, moved)
    assert set(_status(lines).values()) == {"reused"}, lines


def test_changed_student_redoes_it_and_everything_downstream_only(first, tmp_path):
    tmp, _, out, _, before = first
    config = _write(tmp_path, temperature=2)
    lines, stages = _run(config, out)
    status = _status(lines)
    assert status == {"generalist": "reused", "baseline:student": "reused", "student": "run",
                      "deploy:onnx-float": "run", "bench": "run"}
    assert stages["student"]["manifest_sha256"] != before["student"]["manifest_sha256"]
    assert json.loads((out / "students/student/manifest.json").read_text())["config"]["temperature"] == 2.0
    # back to the first file: the student's config changed again, so it is redone once more
    lines, _ = _run(first[1], out)
    assert _status(lines)["student"] == "run" and _status(lines)["generalist"] == "reused"


def test_from_forces_a_redo_from_that_stage(first):
    _, config, out, _, _ = first
    lines, _ = _run(config, out, from_stage="deploy")
    assert _status(lines) == {"generalist": "reused", "baseline:student": "reused", "student": "reused",
                              "deploy:onnx-float": "run", "bench": "run"}


def test_dry_run_writes_nothing(first, tmp_path):
    _, config, _, _, _ = first
    fresh = tmp_path / "fresh"
    lines: list[str] = []
    run_pipeline(load_plan(config, out=fresh), dry_run=True, log=lines.append)
    assert set(_status(lines).values()) == {"would"} and not fresh.exists()


def test_interrupted_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    config, out = _write(tmp_path), tmp_path / "exp"
    flag = tmp_path / "interrupt-now"
    flag.touch()
    monkeypatch.setenv("KDENS_TEST_INTERRUPT", str(flag))
    monkeypatch.setenv("KDENS_TEST_INTERRUPT_AFTER", "30")  # digits: 21 batches of 64 an epoch -> in epoch 2
    with pytest.raises(KeyboardInterrupt):
        _run(config, out)
    state = {s["name"]: s for s in json.loads((out / STATE).read_text())["stages"]}
    # the baseline (same user model) was interrupted; the generalist before it is finished
    assert state["generalist"]["status"] == "done" and state["baseline:student"]["status"] == "running"
    assert (out / "baselines/student/checkpoint.pt").exists() and not (out / "baselines/student/manifest.json").exists()
    lines, stages = _run(config, out)
    status = _status(lines)
    assert status["generalist"] == "reused" and status["baseline:student"] == "resume"
    history = json.loads((out / "baselines/student/history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert all(s["status"] in ("done", "reused") for s in stages.values())


def test_failed_gate_keeps_going_then_exits_1(tmp_path):
    config = _write(tmp_path, student="mlp", gate="max_latency_ms = 0.000001")
    config.write_text(config.read_text().replace("hidden = 16", "hidden = [16]"))
    out = tmp_path / "exp"
    with pytest.raises(GateFailed, match="deploy:onnx-float"):
        _run(config, out)
    state = {s["name"]: s for s in json.loads((out / STATE).read_text())["stages"]}
    assert state["deploy:onnx-float"]["status"] == "gate-failed" and state["bench"]["status"] == "done"
    assert (out / "report.md").exists()
    r = CliRunner().invoke(cli, ["run", str(config), "--out", str(out), "--quiet"])
    assert r.exit_code == 1 and "reused" in r.output  # a reused failure still fails


def test_cli_bad_config_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[generalist]\nmodel = "mlp"\nepochz = 3\n')
    r = CliRunner().invoke(cli, ["run", str(bad)])
    assert r.exit_code == 2 and "epochz" in r.output and "Traceback" not in r.output
    assert not (Path(os.getcwd()) / "runs" / "bad").exists()


def test_the_readme_main_job(tmp_path, monkeypatch):
    """examples/digits.toml end to end (what `make demo` runs), then a second run that reuses it all."""
    import time

    root = Path(__file__).resolve().parents[1]
    plan = load_plan(root / "examples" / "digits.toml", out=tmp_path / "digits")
    t0 = time.time()
    run_pipeline(plan, progress=False, log=lambda line: None)
    first = time.time() - t0
    out = tmp_path / "digits"
    pngs = sorted((out / "report").glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "report.html").exists() and "data:image/png;base64" in (out / "report.html").read_text()
    kinds = {s["kind"] for s in json.loads((out / STATE).read_text())["stages"]}
    assert kinds == {"generalist", "ensemble", "specialists", "baseline", "student", "deploy", "bench"}
    lines: list[str] = []
    t0 = time.time()
    run_pipeline(load_plan(root / "examples" / "digits.toml", out=out), progress=False, log=lines.append)
    assert set(_status(lines).values()) == {"reused"}
    # a reported ratio, not a timing assertion: print it for the log
    print(f"digits pipeline: first run {first:.1f} s, second {time.time() - t0:.1f} s")
