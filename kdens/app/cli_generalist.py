"""``kdens train-generalist``: the command line of the generalist stage."""

from __future__ import annotations

import click

from kdens.app.cli_common import (CONTEXT, RUN_KEYS, data_options, layers, model_options, print_metrics,
                                  run_options, train_options)


@click.command("train-generalist", context_settings=CONTEXT)
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
    from generalist.stage import run
    from kdens.config import GeneralistConfig, build

    opts = {k: flags[k] for k in RUN_KEYS}
    file_layer, flag_layer, out = layers(opts["config_file"], ("train-generalist", "generalist"), dict(flags))
    cfg = build(GeneralistConfig, file_layer, flag_layer)
    run_dir = run(cfg, out, resume=opts["resume"], force=opts["force"], progress=not opts["quiet"])
    print_metrics(run_dir)
