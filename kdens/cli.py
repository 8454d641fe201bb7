"""The ``kdens`` command line: parse, build a config, call one stage, print a summary.

Only this module imports every stage. Library errors (``KdensError``) become one line on
stderr and exit code 2; a failed deploy gate exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kdens import __version__
from kdens.cli_common import (_CONTEXT, _RUN_KEYS, _layers, _print_metrics, data_options,  # noqa: F401
                               model_options, run_options, train_options)
from kdens.errors import GateFailed, KdensError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GateFailed as e:
            click.echo(f"Gate failed: {e}", err=True)
            ctx.exit(1)
        except KdensError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings=_CONTEXT)
@click.version_option(__version__, prog_name="kdens")
def cli():
    """kdens: distill an ensemble or generalist+specialists into one small student, and ship it.

    \b
    Stages hand over through run folders:
      kdens train-generalist --data digits --model mlp --out runs/d/generalist
      kdens train-ensemble --data digits --model cnn --members 5 --out runs/d/ensemble
      kdens train-specialists --generalist runs/d/generalist --clusters 3 --out runs/d/specialists
      kdens distill --teacher runs/d/specialists --model mlp --model-arg hidden=64 --out runs/d/student
      kdens deploy --model runs/d/student --target onnx --quantize int8 --out runs/d/deploy
      kdens bench runs/d/deploy
      kdens evaluate runs/d/specialists
    \b
    Or all of it from one file, reusing finished stages:
      kdens run examples/digits.toml
    """


# ------------------------------------------------------------------ commands

@cli.command("train-generalist", context_settings=_CONTEXT)
@data_options
@model_options
@click.option("--train-fraction", type=click.FloatRange(0, 1, min_open=True),
              help="Train on a seeded, class-stratified fraction of the training split [1.0].")
@train_options
@run_options
def train_generalist(**flags):
    """Train a generalist teacher on hard labels.

    \b
    Example:
      kdens train-generalist --data fashion-mnist --model mlp --model-arg hidden=1200,1200 \\
          --model-arg dropout=0.5 --model-arg input_dropout=0.2 --jitter 2 --epochs 30 \\
          --out runs/fm/generalist
    """
    from kdens import generalist
    from kdens.config import GeneralistConfig, build

    opts = {k: flags[k] for k in _RUN_KEYS}
    file_layer, flag_layer, out = _layers(opts["config_file"], ("train-generalist", "generalist"), dict(flags))
    cfg = build(GeneralistConfig, file_layer, flag_layer)
    run_dir = generalist.run(cfg, out, resume=opts["resume"], force=opts["force"], progress=not opts["quiet"])
    _print_metrics(run_dir)


@cli.command("evaluate", context_settings=_CONTEXT)
@click.argument("run_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the JSON here.")
def evaluate(run_dir: Path, out: Path | None):
    """Evaluate a trained run folder on its test split and print JSON.

    \b
    Example:
      kdens evaluate runs/d/generalist --out eval.json
    """
    from kdens.evaluate import evaluate_run

    result = evaluate_run(run_dir)
    text = json.dumps(result, indent=2)
    if out:
        from kdens.artifacts import atomic_write_text
        atomic_write_text(out, text + "\n")
    click.echo(text)


def _register() -> None:
    # Stage commands live beside this module (one file per stage keeps each small); they
    # import their stage lazily, so `kdens --help` stays fast.
    from kdens.cli_deploy import bench_cmd, deploy
    from kdens.cli_distill import distill
    from kdens.cli_ensemble import train_ensemble
    from kdens.cli_pipeline import report_cmd, run_cmd
    from kdens.cli_specialists import train_specialists

    cli.add_command(train_ensemble)
    cli.add_command(train_specialists)
    cli.add_command(distill)
    cli.add_command(deploy)
    cli.add_command(bench_cmd)
    cli.add_command(run_cmd)
    cli.add_command(report_cmd)


_register()


def main() -> None:
    cli(prog_name="kdens")


if __name__ == "__main__":
    main()
