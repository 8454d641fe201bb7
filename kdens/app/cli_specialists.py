"""``kdens train-specialists``: the command line of the specialists stage."""

from __future__ import annotations

import click

from kdens.app.cli_common import CONTEXT, RUN_KEYS, layers, run_options, train_options


@click.command("train-specialists", context_settings=CONTEXT)
@click.option("--generalist", type=str, metavar="RUN", help="Folder of a finished kdens train-generalist run.")
@click.option("--clusters", type=click.IntRange(min=1), metavar="K",
              help="k-means clusters of the classes; groups of one class get no specialist.")
@click.option("--groups", type=str, metavar="GROUPS",
              help='Class groups by hand instead of --clusters: "0,2,4,6;5,7,9".')
@click.option("--affinity", type=click.Choice(["covariance", "normalized", "correlation"]),
              help="Matrix whose columns k-means clusters [normalized].")
@click.option("--cluster-algorithm", type=click.Choice(["kmeans", "minibatch"]),
              help="Lloyd or online (as in the paper) k-means [kmeans].")
@click.option("--cluster-restarts", type=click.IntRange(min=1), metavar="N",
              help="k-means restarts; the lowest-inertia grouping is kept [100].")
@click.option("--top-n", type=click.IntRange(min=1),
              help="Specialists of the generalist's top-n classes take part [1].")
@click.option("--init", type=click.Choice(["exact", "fitted-row"]),
              help="Start exactly as the generalist restricted to the group (dustbin logit = log-sum-exp of the "
                   "other logits), or with a linear dustbin row fitted to it [exact].")
@click.option("--drop-unhelpful/--keep-unhelpful", default=None,
              help="Drop a specialist that does not lower the validation NLL (or loses correct answers) where it "
                   "takes part; its group is left to the generalist [drop].")
@click.option("--rank", type=click.IntRange(min=0), help="Train only specialists m with m mod W = R [RANK or 0].")
@click.option("--world-size", type=click.IntRange(min=1),
              help="Number of ranks W sharing the specialists [WORLD_SIZE or 1].")
@train_options
@run_options
def train_specialists(**flags):
    """Train specialists for the generalist's confusable classes and combine them (Hinton et al. 2015, sec. 5).

    The generalist's predictions on its validation split are clustered into groups of
    classes it confuses (clusters.json, clusters.png). Each group gets a specialist
    (spec-00 ...): the generalist's architecture with the group's classes plus a dustbin,
    started exactly as the generalist restricted to the group (its copy, dustbin logit =
    log-sum-exp of the other classes' logits; --init fitted-row: a fitted linear dustbin row),
    trained on batches half from the group, dustbin corrected.
    Each specialist is then checked on the validation split as the combination uses it;
    one that does not help is dropped (--keep-unhelpful keeps it) and its group left to the
    generalist. The generalist and its active specialists are combined on the test split
    (metrics.json). Data and architecture are the generalist's; a specialist's epoch is
    one pass over its group's examples. A rerun skips finished specialists; --resume
    continues an interrupted one; ranks share them (m mod W).

    \b
    Example:
      kdens train-specialists --generalist runs/fm/generalist --clusters 3 --epochs 5 --lr 0.01 \\
          --out runs/fm/specialists
      kdens train-specialists --generalist runs/d/generalist --groups "3,5,8;1,7" --out runs/d/spec
      kdens evaluate runs/fm/specialists
    """
    from kdens.artifacts import read_json
    from kdens.config import build
    from specialists.config import SpecialistsConfig
    from specialists.stage import pending_specialists, run

    opts = {k: flags[k] for k in RUN_KEYS}
    rank, world = flags.pop("rank"), flags.pop("world_size")
    file_layer, flag_layer, out = layers(opts["config_file"], ("train-specialists", "specialists"), dict(flags))
    cfg = build(SpecialistsConfig, file_layer, flag_layer)
    run_dir = run(cfg, out, resume=opts["resume"], force=opts["force"], progress=not opts["quiet"],
                  rank=rank, world_size=world)
    if not (run_dir / "manifest.json").exists():
        waiting = ", ".join(f"spec-{m:02d}" for m in pending_specialists(run_dir))
        click.echo(f"{run_dir}: this rank's specialists are done; waiting for {waiting} (the call that "
                   "finishes the last one writes metrics.json and manifest.json)")
        return
    m = read_json(run_dir / "metrics.json")
    for g, names in zip(m["groups"], m["group_class_names"]):
        click.echo(f"group {g}: {', '.join(names)}")
    st = read_json(run_dir / "clusters.json").get("stability") or {}
    if st:
        click.echo(f"k-means stability over seeds {st['seeds'][0]}..{st['seeds'][-1]}: mean pairwise adjusted Rand "
                   f"index {st['mean_pairwise_ari']:.3f} ({st['distinct_partitions']} distinct groupings)")
    for d in m.get("dropped", []):
        click.echo(f"dropped {d['run']} (group {d['group']}): {d['reason']}; the generalist serves its group")
    cov = m["covered"]
    covered = (f"on covered classes {cov['generalist_accuracy']:.4f} -> {cov['combined_accuracy']:.4f} "
               f"(n={cov['count']})" if cov["count"] else "no specialist used: the combination is the generalist")
    click.echo(f"{run_dir}: generalist test_accuracy={m['generalist']['test_accuracy']:.4f}  "
               f"combined test_accuracy={m['combined']['test_accuracy']:.4f}  {covered}  "
               f"train_seconds={m['train_seconds']:.1f}")
