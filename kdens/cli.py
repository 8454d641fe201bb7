"""The ``kdens`` command line: parse, build a config, call one stage, print a summary.

Only this module imports every stage. Library errors (``KdensError``) become one line on
stderr and exit code 2; a failed deploy gate exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kdens import __version__
from kdens.errors import GateFailed, KdensError

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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
      kdens evaluate runs/d/generalist
    """


# ------------------------------------------------------------------ shared options

def train_options(f):
    """Flags of the shared training loop; each overrides the config file when given."""
    opts = [
        click.option("--epochs", type=click.IntRange(min=1), help="Passes over the training data [20]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Examples per step [128]."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="Optimizer [sgd]."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True),
                     help="Peak learning rate [0.05 sgd, 1e-3 adamw]."),
        click.option("--momentum", type=click.FloatRange(0, 1), help="SGD momentum [0.9]."),
        click.option("--weight-decay", type=click.FloatRange(min=0), help="Weight decay [5e-4 sgd, 1e-2 adamw]."),
        click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), help="LR schedule [cosine]."),
        click.option("--max-norm", type=click.FloatRange(min=0, min_open=True),
                     help="Max L2 norm of each unit's incoming weights [off]."),
        click.option("--jitter", type=click.IntRange(min=0), help="Random translation, pixels [0]."),
        click.option("--patience", type=click.IntRange(min=1), help="Early-stopping patience, epochs [10]."),
        click.option("--device", type=str, help="auto, cpu or cuda [auto]."),
        click.option("--amp/--no-amp", default=None, help="bf16 autocast on CUDA [on]."),
        click.option("--seed", type=int, help="Seed for init, shuffling, jitter, dropout [0]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def data_options(f):
    opts = [
        click.option("--data", type=str,
                     help="digits, fashion-mnist, a folder of IDX files, or an .npz [digits]."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
                     help="Validation share of the training set [0.1]."),
        click.option("--split-seed", type=int, help="Seed of the validation split [0]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def model_options(f):
    f = click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Model argument, repeatable: hidden=1200,1200 dropout=0.5.")(f)
    return click.option("--model", type=str, help="mlp, cnn, lenet5 or package.module:factory.")(f)


def run_options(f):
    opts = [
        click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                     help="TOML file with the same keys as the flags; flags override it."),
        click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Run folder to write."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --out."),
        click.option("--force", is_flag=True, help="Overwrite a finished run in --out."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_RUN_KEYS = ("config_file", "out", "resume", "force", "quiet")


def _layers(config_file: Path | None, names: tuple[str, ...], flags: dict) -> tuple[dict, dict, Path | None]:
    """(file layer, flag layer, out) for config.build; flags left unset are dropped."""
    from kdens.config import load_toml, section

    file_layer = section(load_toml(config_file), names) if config_file else {}
    out = flags.pop("out", None) or file_layer.pop("out", None)
    flag_layer = {k: v for k, v in flags.items() if v is not None and v != () and k not in _RUN_KEYS}
    if not out:
        raise click.UsageError("--out is required (or 'out' in the config file)")
    return file_layer, flag_layer, Path(out)


def _print_metrics(run_dir: Path, keys=("test_accuracy", "test_errors", "val_accuracy", "train_seconds")):
    m = json.loads((run_dir / "metrics.json").read_text())
    shown = "  ".join(f"{k}={m[k]:.4f}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}"
                      for k in keys if k in m)
    click.echo(f"{run_dir}: {shown}")


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


def _not_built(name: str, issue: str):
    @cli.command(name, context_settings={**_CONTEXT, "ignore_unknown_options": True},
                 help=f"Not built yet: {issue}.", short_help=f"(not built yet: {issue})")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def stub(args):
        click.echo(f"Error: 'kdens {name}' is not built yet ({issue}).", err=True)
        sys.exit(2)
    return stub


def _register() -> None:
    # Stage commands live beside this module (one file per stage keeps each small); they
    # import their stage lazily, so `kdens --help` stays fast.
    from kdens.cli_deploy import bench_cmd, deploy

    cli.add_command(deploy)
    cli.add_command(bench_cmd)


_register()

_STUBS = {
    "train-ensemble": "teachers issue",
    "train-specialists": "teachers issue",
    "distill": "distillation issue",
    "run": "pipeline issue",
}
for _name, _issue in _STUBS.items():
    _not_built(_name, _issue)


def main() -> None:
    cli(prog_name="kdens")


if __name__ == "__main__":
    main()
