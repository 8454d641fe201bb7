"""``kdens distill``: the command line of the distillation stage."""

from __future__ import annotations

import os
from pathlib import Path

import click

from distill.methods import METHODS
from kdens.app.cli_common import CONTEXT, RUN_KEYS, data_options, layers, print_metrics, run_options, train_options



@click.command("distill", context_settings=CONTEXT)
@click.option("--teacher", type=str,
              help="Teacher run folder (generalist, student, ensemble, specialists, generations), or several "
                   "joined by commas; tfkd-virtual needs none.")
@data_options
@click.option("--model", type=str,
              help="mlp, cnn, lenet5, mobilenet, package.module:factory, or a tree student: tree (decision tree) "
                   "or gbt (histogram gradient boosting), fitted to the soft targets [the teacher's].")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Model argument, repeatable: hidden=1200,1200 dropout=0.5; tree: max_depth=8 "
                   "min_samples_leaf=1; gbt: max_iter=100 max_leaf_nodes=31 learning_rate=0.1.")
@click.option("--method", type=str, metavar="NAME",
              help=f"Distillation method: {', '.join(METHODS)} [kd]; see docs/methods.md.")
@click.option("--method-arg", "method_args", multiple=True, metavar="KEY=VALUE",
              help="Setting of the method, repeatable (defaults from its paper): beta=8 warmup=20.")
@click.option("--hint", multiple=True, metavar="T_MODULE:S_MODULE",
              help="Feature methods: teacher and student modules to match, repeatable; NAME/in is a module's "
                   "input [head/in:head/in, the last hidden layers].")
@click.option("--generations", type=click.IntRange(min=1), metavar="N",
              help="Born-again generations: gen-01..gen-N under --out, each taught by the one before.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              help="Softening temperature T of the method [its paper's; 4 for kd].")
@click.option("--alpha", type=click.FloatRange(0, 1), help="Weight of the hard-label loss of kd/logits [0.1].")
@click.option("--loss", type=click.Choice(["kd", "soft", "logits"]),
              help="Alias of --method for kd: alpha*CE + (1-alpha)*T^2*KL; soft: T^2*KL; logits: L2 of logits.")
@click.option("--transfer", type=str, metavar="SET",
              help="train | val | fraction=F | omit=C1,C2 | unlabeled=PATH | munge=N[,p=P,s=S] (MUNGE pseudo-data) | "
                   "impressions=N[,beta=1:0.1,t=20,iters=1500,lr=0.01,batch=256,l2=0,clip=step] (data-free: data impressions "
                   "optimised against the teacher, Nayak et al. 2019) [train].")
@click.option("--fix-bias/--no-fix-bias", default=None,
              help="After omit=: fit one bias shift of the omitted classes on validation [off].")
@click.option("--baseline", type=str, metavar="RUN",
              help="Hard-label run of the same student; reports gap_recovered.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Soft-target cache folder [a soft_targets folder beside --out].")
@click.option("--feature-cache-mb", type=str, metavar="MB|auto",
              help="Feature methods without --jitter: keep the teacher's hint features in memory up to MB, else "
                   "memory-mapped in --cache-dir; 0 runs the teacher online [auto: a quarter of free memory].")
@train_options
@run_options
def distill_cmd(**flags):
    """Distill a teacher into a small student (Hinton et al. 2015, or another --method).

    Logit methods (kd, soft, logits, dkd, dist, lskd, tfkd-self) read the teacher's scores over
    the transfer set, computed once and cached: a second student with another T, method or
    architecture reuses them (with --jitter the teacher runs online instead). Feature methods
    (fitnets, fsp, rkd) match hidden layers (--hint); without --jitter the teacher's features are
    computed once, kept in memory or on disk by --feature-cache-mb. tfkd-virtual
    needs no teacher. Tree students (--model tree|gbt, kd or soft) are fitted once to the soft
    targets, with their hard-label twin, and stored as ONNX. --data, --val-fraction and --split-seed default to the teacher's own
    (from its manifest), not to digits; --model defaults to a single-model teacher's architecture.

    \b
    Example:
      kdens distill --teacher runs/fm/generalist --model mlp --model-arg hidden=800,800 \\
          --temperature 4 --alpha 0.1 --epochs 30 --out runs/fm/student
      kdens distill --teacher runs/fm/generalist --model mlp --method dkd --method-arg beta=2 \\
          --out runs/fm/student-dkd
      kdens distill --teacher runs/fm/generalist --model mlp --method fitnets --hint body.1:body.1 \\
          --out runs/fm/student-fitnets
      kdens distill --teacher runs/fm/generalist --generations 3 --out runs/fm/born-again
      kdens distill --teacher runs/fm/generalist --model mlp --transfer omit=3 --fix-bias \\
          --out runs/fm/student-no3
      kdens distill --teacher runs/fm/generalist --model lenet5 --model-arg width=0.5 \\
          --transfer impressions=24000 --temperature 20 --out runs/fm/zskd
      kdens distill --teacher runs/fm/generalist --model tree --model-arg max_depth=10 \\
          --transfer munge=60000 --out runs/fm/student-tree
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
    if cfg.generations is not None:
        m = read_json(run_dir / "metrics.json")
        for g in m["generations"]:
            click.echo(f"{run_dir / g['run']}: test_errors={g['test_errors']}  teacher_test_errors="
                       f"{g['teacher_test_errors']}  gap_recovered={g['gap_recovered']}")
        if "ensemble" in m:
            click.echo(f"ensemble of {len(m['generations'])} generations: test_errors={m['ensemble']['test_errors']} "
                       f"(usable as --teacher {run_dir})")
        return
    # how the soft targets were had comes first (it happened first): the result line ends the output
    metrics = read_json(run_dir / "metrics.json")
    soft = metrics.get("soft_targets") or {}
    if metrics.get("teacher_features"):
        click.echo(f"teacher features: {metrics['teacher_features']} "
                   f"({'reused' if soft.get('reused') else 'built'} in {soft.get('build_seconds', 0):.2f}s)"
                   if metrics["teacher_features"] != "online" else "teacher features: online (every batch)")
    elif soft and not soft.get("online"):
        how = "precomputed (--teacher scores)" if soft.get("precomputed") else \
            "reused" if soft.get("reused") else "built"
        click.echo(f"soft targets: {how} (build {soft.get('build_seconds', 0):.2f}s)")
    print_metrics(run_dir, ("test_accuracy", "test_errors", "teacher_test_errors", "teacher_agreement",
                             "gap_recovered", "train_seconds"))
