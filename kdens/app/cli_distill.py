"""``kdens distill``: the command line of the distillation stage."""

from __future__ import annotations

import os
from pathlib import Path

import click

from kdens.app.cli_common import (CONTEXT, RUN_KEYS, data_options, layers, model_options, print_metrics,
                                  run_options, train_options)


@click.command("distill", context_settings=CONTEXT)
@click.option("--teacher", type=str,
              help="Teacher run folder (generalist, ensemble, specialists), or several joined by commas.")
@data_options
@model_options
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              help="Softening temperature T of the soft term [4].")
@click.option("--alpha", type=click.FloatRange(0, 1), help="Weight of the hard-label loss [0.1].")
@click.option("--loss", type=click.Choice(["kd", "soft", "logits"]),
              help="kd: alpha*CE + (1-alpha)*T^2*KL; soft: T^2*KL; logits: L2 of logits [kd].")
@click.option("--transfer", type=str, metavar="SET",
              help="train | val | fraction=F | omit=C1,C2 | unlabeled=PATH [train].")
@click.option("--fix-bias/--no-fix-bias", default=None,
              help="After omit=: fit one bias shift of the omitted classes on validation [off].")
@click.option("--baseline", type=str, metavar="RUN",
              help="Hard-label run of the same student; reports gap_recovered.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Soft-target cache folder [a soft_targets folder beside --out].")
@train_options
@run_options
def distill_cmd(**flags):
    """Distill a teacher into a small student on its soft targets (Hinton et al. 2015).

    Teacher scores over the transfer set are computed once and cached; a second student
    with another T, alpha or architecture reuses them. With --jitter the teacher runs
    online on the augmented batches instead. --data, --val-fraction and --split-seed
    default to the teacher's own (from its manifest), not to digits.

    \b
    Example:
      kdens distill --teacher runs/fm/generalist --model mlp --model-arg hidden=800,800 \\
          --temperature 4 --alpha 0.1 --epochs 30 --out runs/fm/student
      kdens distill --teacher runs/fm/generalist --model mlp --transfer omit=3 --fix-bias \\
          --out runs/fm/student-no3
    """
    from distill.config import DistillConfig
    from distill.stage import run
    from kdens.artifacts import read_json
    from kdens.config import build

    opts = {k: flags[k] for k in RUN_KEYS}
    file_layer, flag_layer, out = layers(opts["config_file"], ("distill",), dict(flags))
    cfg = build(DistillConfig, file_layer, flag_layer)
    run_dir = run(cfg, out, resume=opts["resume"], force=opts["force"], progress=not opts["quiet"])
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 writes and reports
        return
    # how the soft targets were had comes first (it happened first): the result line ends the output
    soft = read_json(run_dir / "metrics.json").get("soft_targets", {})
    if not soft.get("online"):
        click.echo(f"soft targets: {'reused' if soft.get('reused') else 'built'} "
                   f"(build {soft.get('build_seconds', 0):.2f}s)")
    print_metrics(run_dir, ("test_accuracy", "test_errors", "teacher_test_errors", "teacher_agreement",
                             "gap_recovered", "train_seconds"))
