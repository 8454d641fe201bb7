"""#17: early stopping never cuts a schedule silently, and gap_recovered only beyond sampling noise."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kdens import metrics as M
from kdens.config import TrainConfig
from kdens.train import early_stop_note


def _run(args):
    from kdens.app.cli import cli
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_the_default_runs_the_whole_schedule(tmp_path):
    assert TrainConfig().patience is None
    out = tmp_path / "g"
    r = _run(["train-generalist", "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "12", "--quiet",
              "--out", out])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == m["epochs_planned"] == 12 and m["stopped_early"] is False
    assert 1 <= m["best_epoch"] <= 12 and "note:" not in r.output and early_stop_note(m) is None


def test_a_stop_is_said_on_the_result_line(tmp_path):
    out = tmp_path / "g"
    # patience 1 on digits: the first epoch whose validation loss does not improve ends the run
    r = _run(["train-generalist", "--model", "mlp", "--model-arg", "hidden=32", "--epochs", "60", "--patience", "1",
              "--quiet", "--out", out])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["stopped_early"] is True and m["epochs_run"] < m["epochs_planned"] == 60 and m["patience"] == 1
    assert 0 < m["lr_at_stop"] < m["lr_start"] == pytest.approx(0.05)
    note = r.output.strip().splitlines()[-1]
    assert note == "note: " + early_stop_note(m)
    assert f"epoch {m['epochs_run']} of 60" in note and f"best epoch ({m['best_epoch']})" in note
    assert f"{m['lr_at_stop']:.3g}" in note and "--patience" in note
    # and the report's stages table says it beside the epochs
    from kdens.app.report import _main_metrics
    from kdens.app.report_data import StageView

    view = StageView({"name": "g", "kind": "generalist", "status": "done"}, out,
                     json.loads((out / "manifest.json").read_text()), m)
    assert _main_metrics(view)[3] == f"{m['epochs_run']} epochs of 60 (stopped early, lr still {m['lr_at_stop']:.2g})"


@pytest.mark.parametrize("b, t, s, expected", [
    (146, 67, 74, (146 - 74) / (146 - 67)),    # the paper's MNIST table: a lead far beyond noise
    (1500, 1494, 1480, None),                  # a 6-error lead: the -57.5 of the issue becomes n/a
    (100, 80, 90, None),                       # 20 <= 2 * sqrt(180) = 26.8
    (100, 70, 85, 0.5),                        # 30 > 2 * sqrt(170) = 26.1
])
def test_gap_recovered_only_beyond_noise(b, t, s, expected):
    gap, why = M.gap_recovered(b, t, s)
    if expected is None:
        assert gap is None and "sampling noise" in why and f"{b} - {t} = {b - t}" in why
    else:
        assert gap == pytest.approx(expected) and why is None


def test_gap_recovered_when_the_teacher_is_worse():
    gap, why = M.gap_recovered(50, 60, 55)
    assert gap is None and why.startswith("the teacher (60 test errors) is not better than the baseline (50)")


def test_gap_recovered_needs_all_three_counts():
    assert M.gap_recovered(None, 10, 12) == (None, "needs the baseline's, the teacher's and the student's test errors")


def test_distill_says_why_gap_is_na(tmp_path):
    teacher, base, student = tmp_path / "t", tmp_path / "b", tmp_path / "s"
    common = ["--model", "mlp", "--model-arg", "hidden=32", "--epochs", "8", "--quiet"]
    assert _run(["train-generalist", *common, "--out", teacher]).exit_code == 0
    # the baseline is the same recipe: its lead over the teacher is noise whatever the seeds give
    assert _run(["train-generalist", *common, "--seed", "1", "--out", base]).exit_code == 0
    r = _run(["distill", "--teacher", teacher, "--baseline", base, *common, "--out", student])
    assert r.exit_code == 0, r.output
    m = json.loads((student / "metrics.json").read_text())
    assert m["gap_recovered"] is None and m["gap_recovered_note"] == M.gap_recovered(
        m["baseline_test_errors"], m["teacher_test_errors"], m["test_errors"])[1]
    assert "gap_recovered=n/a" in r.output and f"gap_recovered n/a: {m['gap_recovered_note']}" in r.output


@pytest.mark.parametrize("b, s, worse", [
    (291, 8083, True),    # the 30-30 at T = 8, unclipped: learned something, wrecked
    (907, 953, False),    # kd on the Fashion-MNIST small CNN: 46 worse, within 2 * sqrt(1860) = 86
    (100, 130, False),    # 30 <= 2 * sqrt(230) = 30.3
    (100, 131, True),     # 31 > 2 * sqrt(231) = 30.4
    (50, 40, False),      # better than the baseline
    (None, 40, False),
])
def test_worse_than_baseline_only_beyond_noise(b, s, worse):
    why = M.worse_than_baseline(b, s)
    assert (why is not None) == worse
    if why:
        assert why.startswith(f"the student makes {s} test errors, its hard-label baseline {b}")


def test_distill_warns_when_the_student_ends_worse_than_its_baseline(tmp_path):
    """A run that passes kdens.health (it learned) but ends far below its baseline is flagged, not silent."""
    teacher, student = tmp_path / "t", tmp_path / "s"
    common = ["--model", "mlp", "--model-arg", "hidden=32", "--quiet"]
    assert _run(["train-generalist", *common, "--epochs", "8", "--out", teacher]).exit_code == 0
    # 5 epochs of a 32-unit student against the 8-epoch teacher as its own baseline: learned, far behind
    r = _run(["distill", "--teacher", teacher, "--baseline", teacher, *common, "--epochs", "5", "--out", student])
    assert r.exit_code == 0, r.output
    m = json.loads((student / "metrics.json").read_text())
    assert m["training_check"]["passed"] is True
    assert m["worse_than_baseline"] == M.worse_than_baseline(m["baseline_test_errors"], m["test_errors"])
    assert f"warning: {m['worse_than_baseline']}; things to try: --grad-clip 5" in r.output
