"""``kdens train-generalist`` and ``kdens import-model``: the command lines of the generalist stage."""

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


@click.command("import-model", context_settings=CONTEXT)
@click.option("--onnx", type=str, metavar="FILE", help="An ONNX classifier to import (run by ONNX Runtime).")
@click.option("--model", type=str, help="package.module:factory building the PyTorch network (with --weights).")
@click.option("--weights", type=str, metavar="FILE",
              help="Its weights: .safetensors, or a state_dict saved with torch.save (read weights-only).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="The factory's argument, repeatable, as the model was trained with.")
@data_options
@run_options
def import_model(**flags):
    """Import a teacher trained outside kdens as a generalist run folder.

    \b
    The folder works wherever a generalist does: kdens distill --teacher, train-specialists
    --generalist (PyTorch imports), evaluate, deploy (PyTorch imports), report. The model sees
    the inputs as kdens loads them (uint8 images scaled to [0, 1], NCHW or, for an ONNX file
    that wants it, NHWC) and answers one score per class of --data, in sorted label order.
    \b
    Examples:
      kdens import-model --data own-data/photos --onnx teacher.onnx --out runs/photos/teacher
      PYTHONPATH=. kdens import-model --data digits --model mynets:big_cnn --model-arg width=64 \\
          --weights big_cnn.safetensors --out runs/d/teacher
    """
    from generalist.imported import ImportConfig, run
    from kdens.config import build

    opts = {k: flags[k] for k in RUN_KEYS}
    file_layer, flag_layer, out = layers(opts["config_file"], ("import-model",), dict(flags))
    cfg = build(ImportConfig, file_layer, flag_layer)
    run_dir = run(cfg, out, resume=opts["resume"], force=opts["force"], progress=not opts["quiet"])
    print_metrics(run_dir, keys=("test_accuracy", "test_errors", "val_accuracy", "params"))
