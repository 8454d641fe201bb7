"""Progress inside long epochs: bars on a terminal, plain lines in a log, nothing with --quiet."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

from kdens import progress as P
from kdens.app.cli import cli


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _epochs(stream, monkeypatch, epochs=2, steps=5, **patch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    for k, v in patch.items():
        monkeypatch.setattr(P, k, v)
    shown = P.Progress("student", epochs, 0, steps, stream=stream)
    for e in range(epochs):
        shown.start_epoch(e)
        for s in range(steps):
            shown.step(s)
        shown.end_epoch({"epoch": e + 1, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.9})
    shown.close()
    return stream.getvalue()


def test_a_log_gets_one_line_per_epoch_and_no_carriage_returns(monkeypatch):
    text = _epochs(io.StringIO(), monkeypatch)
    assert "\r" not in text
    assert text.splitlines() == [f"student: epoch {e}/2  loss=0.5000  val_loss=0.4000  val_acc=0.9000  "
                                 + text.splitlines()[e - 1].rsplit("  ", 1)[1] for e in (1, 2)]
    long = _epochs(io.StringIO(), monkeypatch, LINE_EVERY_S=0.0)  # a long epoch: a line now and then
    assert "\r" not in long and "student: epoch 1/2  step 3/5" in long and "left in this epoch" in long


def test_a_terminal_gets_a_step_bar_once_an_epoch_runs_long(monkeypatch):
    quick = _epochs(Terminal(), monkeypatch)
    assert "epoch" in quick and "step" not in quick
    slow = _epochs(Terminal(), monkeypatch, STEP_BAR_AFTER_S=-1.0)
    assert "epoch 1/2" in slow and "step" in slow  # "  epoch 1/2: 40%|... 2/5 [... <00:00, ... step/s]"


@pytest.mark.parametrize("quiet", [True, False])
def test_cli_progress_is_silenced_by_quiet(tmp_path, monkeypatch, quiet):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    r = CliRunner().invoke(cli, ["train-generalist", "--model", "mlp", "--model-arg", "hidden=16", "--epochs", "2",
                                 "--batch-size", "64", "--out", str(tmp_path / "g")] + (["--quiet"] if quiet else []))
    assert r.exit_code == 0, r.output
    assert "\r" not in r.output  # CliRunner's streams are not a terminal: lines, never bars
    epoch_lines = [ln for ln in r.output.splitlines() if ln.startswith("generalist: epoch")]
    assert len(epoch_lines) == (0 if quiet else 2)


def test_a_baseline_is_labelled_by_its_stage_name(tmp_path, monkeypatch, capsys):
    from generalist import stage
    from kdens.config import GeneralistConfig, build

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [16]}, "epochs": 1, "batch_size": 64})
    stage.run(cfg, tmp_path / "baselines" / "student")
    err = capsys.readouterr().err
    assert "baseline:student: epoch 1/1" in err and "generalist:" not in err
