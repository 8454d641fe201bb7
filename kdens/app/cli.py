"""The ``kdens`` command line: parse, build a config, call one stage, print a summary.

Stage commands live one file per stage (``cli_<stage>.py``) and are registered from the
stage table (``kdens.app.stages``). Library errors become one line on stderr and an exit
code, the scheme of ``kdens.errors``: 1 for a failed gate or training run, 2 for bad input.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdens import __version__
from kdens.app.cli_common import CONTEXT
from kdens.errors import GateFailed, KdensError, TrainingFailed

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class KdensGroup(click.Group):
    """Every command's exit codes, in one place: see ``kdens --help``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GateFailed as e:
            click.echo(f"Gate failed: {e}", err=True)
            ctx.exit(EXIT_FAILED)
        except TrainingFailed as e:
            click.echo(f"Training failed: {e}", err=True)
            ctx.exit(EXIT_FAILED)
        except KdensError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=KdensGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="kdens")
def cli():
    """kdens: distill an ensemble or generalist+specialists into one small student, and ship it.

    \b
    Stages hand over through run folders:
      kdens train-generalist --data digits --model mlp --out runs/d/generalist
      kdens import-model --data digits --onnx teacher.onnx --out runs/d/imported
      kdens train-ensemble --data digits --model cnn --members 5 --out runs/d/ensemble
      kdens train-specialists --generalist runs/d/generalist --clusters 3 --out runs/d/specialists
      kdens distill --teacher runs/d/specialists --model mlp --model-arg hidden=64 --out runs/d/student
      kdens deploy --model runs/d/student --target onnx --quantize int8 --out runs/d/deploy
      kdens bench runs/d/deploy
      kdens evaluate runs/d/specialists
    \b
    Or all of it from one file, reusing finished stages:
      kdens run examples/digits.toml

    \b
    Exit codes, the same for every command:
      0  everything passed
      1  a gate or training failure: a deploy budget or check was missed (the artifact is
         kept), or a run trained but learned nothing usable (diverged, units died, ended
         at chance); the message says what happened and what to change
      2  bad input: a path, file, folder, value or flag to fix (nothing is written)
    """


# ------------------------------------------------------------------ commands

@cli.command("evaluate", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the JSON here.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON for a generations folder too (it prints one line per generation and the ensemble).")
def evaluate(run_dir: Path, out: Path | None, as_json: bool):
    """Evaluate a trained run folder on its test split and print JSON.

    A generations folder (kdens distill --generations N) prints one line per generation and one
    for their ensemble, recomputed from the saved models after their hashes are checked.

    \b
    Example:
      kdens evaluate runs/d/generalist --out eval.json
      kdens evaluate runs/fm/born-again
    """
    from kdens.app.stages import evaluate_run, evaluation_lines

    result = evaluate_run(run_dir)
    text = json.dumps(result, indent=2)
    if out:
        from kdens.artifacts import atomic_write_text
        atomic_write_text(out, text + "\n")
    lines = None if as_json else evaluation_lines(result)
    click.echo("\n".join(lines) if lines is not None else text)


def _register() -> None:
    from kdens.app.cli_generalist import import_model
    from kdens.app.cli_pipeline import report_cmd, run_cmd
    from kdens.app.stages import STAGES

    for kind in STAGES.values():
        if kind.command is not None and kind.command.name not in cli.commands:
            cli.add_command(kind.command)
    cli.add_command(import_model)
    cli.add_command(run_cmd)
    cli.add_command(report_cmd)


_register()


def main() -> None:
    cli(prog_name="kdens")


if __name__ == "__main__":
    main()
