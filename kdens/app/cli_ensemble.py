"""``kdens train-ensemble``: the command line of the ensemble stage."""

from __future__ import annotations

import click

from kdens.app.cli_common import (CONTEXT, RUN_KEYS, data_options, layers, model_options, print_metrics,
                                  run_options, train_options)


@click.command("train-ensemble", context_settings=CONTEXT)
@data_options
@model_options
@click.option("--members", type=click.IntRange(min=2), help="Number of members K; member k uses seed + k.")
@click.option("--member-models", type=str, metavar="SPECS",
              help='Architectures cycled over the members instead of --model: "mlp:hidden=64;cnn:size=small".')
@click.option("--combine", type=click.Choice(["arithmetic", "geometric"]),
              help="Mean of the members' probabilities, or their normalized product [arithmetic].")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              help="T of the reported ensemble and member NLL/ECE [1].")
@click.option("--rank", type=click.IntRange(min=0), help="Train only members k with k mod W = R [RANK or 0].")
@click.option("--world-size", type=click.IntRange(min=1),
              help="Number of ranks W sharing the members [WORLD_SIZE or 1].")
@train_options
@run_options
def train_ensemble(**flags):
    """Train K members (seeds seed..seed+K-1) and combine them into one teacher.

    Each member is an ordinary run folder (member-00 ...) that can be evaluated, distilled
    or deployed on its own. A rerun skips finished members; --resume continues an
    interrupted one. Ranks share the members (k mod W); the call that finds every member
    finished writes the ensemble's metrics.json and manifest.json.

    \b
    Example:
      kdens train-ensemble --data fashion-mnist --model cnn --members 5 --epochs 15 \\
          --out runs/fm/ensemble
      kdens train-ensemble --data digits --member-models "mlp:hidden=64;cnn:size=small" \\
          --members 4 --combine geometric --out runs/d/ensemble-mixed
      kdens train-ensemble --data digits --model mlp --members 4 --rank 1 --world-size 2 \\
          --out runs/d/ensemble-shared     # the second of two machines sharing one folder
    """
    from ensembles.config import EnsembleConfig
    from ensembles.stage import pending_members, run
    from kdens.artifacts import read_json
    from kdens.config import build

    opts = {k: flags[k] for k in RUN_KEYS}
    rank, world = flags.pop("rank"), flags.pop("world_size")
    file_layer, flag_layer, out = layers(opts["config_file"], ("train-ensemble", "ensemble"), dict(flags))
    cfg = build(EnsembleConfig, file_layer, flag_layer)
    run_dir = run(cfg, out, resume=opts["resume"], force=opts["force"], progress=not opts["quiet"],
                  rank=rank, world_size=world)
    if not (run_dir / "manifest.json").exists():
        waiting = ", ".join(f"member-{k:02d}" for k in pending_members(cfg, run_dir))
        click.echo(f"{run_dir}: this rank's members are done; waiting for {waiting} (the call that "
                   "finishes the last member writes metrics.json and manifest.json)")
        return
    print_metrics(run_dir, ("test_accuracy", "test_errors", "test_nll", "best_member_test_accuracy",
                             "disagreement", "train_seconds"))
    m = read_json(run_dir / "metrics.json")
    click.echo(f"beats its best member: accuracy {m['beats_best_member_accuracy']}, "
               f"NLL {m['beats_best_member_nll']}")
