"""Reproduce BENCHMARKS.md: every benchmark, in dependency order, with the commands it lists.

    make bench            # or: .venv/bin/python bench/run_all.py [--only NAME ...]

Long (hours on 2 CPU cores; needs `apt-get install dataset-fashion-mnist`). Finished runs
are reused (each stage skips a run folder whose manifest exists), so an interrupted
`make bench` continues where it stopped. Long jobs run single-threaded, two at a time:
on a 2-core machine that beats one 2-thread job whenever anything else is running.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PY = sys.executable
KD = [PY, "-m", "kdens"]
FM = ["--data", "fashion-mnist"]


def kdens_if_missing(out: str, *args: str) -> list[str] | None:
    return None if (Path(out) / "manifest.json").exists() else [*KD, *args, "--out", out, "--quiet"]


SWEEP = ["--data", "fashion-mnist", "--alpha", "0.1", "--seeds", "0", "--epochs", "15", "--grad-clip", "5",
         "--jobs", "2", "--runs", "runs/fm/sweep"]

STEPS: dict[str, list] = {
    "generalists": [
        kdens_if_missing("runs/fm/generalist", "train-generalist", *FM, "--model", "mlp", "--model-arg",
                         "hidden=1200,1200", "--model-arg", "dropout=0.5", "--model-arg", "input_dropout=0.2",
                         "--jitter", "2", "--epochs", "30", "--seed", "0"),
        kdens_if_missing("runs/fm/teacher-adamw150", "train-generalist", *FM, "--model", "mlp", "--model-arg",
                         "hidden=1200,1200", "--model-arg", "dropout=0.5", "--model-arg", "input_dropout=0.2",
                         "--jitter", "2", "--epochs", "150", "--optimizer", "adamw", "--lr", "0.001",
                         "--patience", "1000", "--seed", "0"),
        kdens_if_missing("runs/fm/cnn", "train-generalist", *FM, "--model", "cnn", "--model-arg", "width=32",
                         "--model-arg", "hidden=128", "--epochs", "15", "--seed", "0"),
    ],
    "throughput": [[PY, "bench/bench_train.py", "--data", "fashion-mnist", "--reps", "3", "--threads", "2",
                    "--out", "bench/results/train_throughput_quiet.json"]],
    "distill": [[PY, "bench/bench_distill.py", "--teacher", "runs/fm/cnn", "--runs", "runs/fm", "--epochs", "15",
                 "--seeds", "0,1,2", "--temperature", "20", "--grad-clip", "5", "--jobs", "2",
                 "--out", "bench/results/distill-cnn-T20-clip5"],
                # the paper's shapes: the 1200-1200 MLP teacher (BENCHMARKS.md links the hard-label
                # baselines above into runs/fm/mlpt; without the links they are retrained)
                [PY, "bench/bench_distill.py", "--teacher", "runs/fm/teacher-adamw150", "--runs", "runs/fm/mlpt",
                 "--epochs", "15", "--seeds", "0,1,2", "--temperature", "20", "--grad-clip", "5", "--jobs", "2",
                 "--out", "bench/results/distill-mlpteacher-T20-clip5"],
                [PY, "bench/bench_distill_speed.py", "--threads", "1", "--subset", "3000", "--reps", "40"]],
    "ensemble": [[PY, "bench/bench_ensemble.py", "--data", "fashion-mnist", "--model", "cnn", "--members", "5",
                  "--epochs", "6", "--jobs", "2", "--out", "runs/fm/ensemble-cnn5", "--report",
                  "bench/results/ensemble"]],
    "specialists": [[PY, "bench/bench_specialists.py", "--generalist", "runs/fm/cnn", "--clusters", "3",
                     "--seeds", "0,1,2", "--epochs", "6", "--extra", "--lr 0.01", "--jobs", "1",
                     "--out", "runs/fm/specialists-cnn-e6", "--report", "bench/results/specialists"]],
    "combine": [[PY, "bench/bench_combine.py", "--top-n", "1,2", "--threads", "1", "--json",
                 "bench/results/combine.json"]],
    "deploy": [[PY, "bench/bench_deploy.py", "--reuse"],
               [PY, "bench/bench_ort_formats.py", "--deploy", "runs/fm/deploy-cnn", "--rounds", "80",
                "--out", "bench/results/ort_formats_cnn_80rounds.json"]],
    # issue #18: every example pipeline as shipped, 5 seeds (fashion-mnist.toml left out: hours per seed)
    "examples": [[PY, "bench/bench_examples.py"]],
    # torchdistill needs torchvision, which does not import beside the CPU torch 2.13.0 wheel:
    # it runs from its own venv (install commands in bench/bench_torchdistill.py's docstring)
    "torchdistill": [[".venv-bench/bin/python", "bench/bench_torchdistill.py", "--teacher", "runs/fm/cnn",
                      "--student", "800,800", "--temperature", "20", "--alpha", "0.1", "--grad-clip", "5",
                      "--epochs", "5", "--reps", "1", "--out", "bench/results/torchdistill"]],
    # every --method on digits (BENCHMARKS.md section 6); the torchdistill parity check runs from its
    # own venv (bench/parity_torchdistill.py's docstring)
    "methods": [[PY, "bench/bench_methods.py", "--runs", "runs/digits-methods", "--seeds", "0,1,2", "--epochs", "20",
                 "--out", "bench/results/methods-digits"]],
    # issue #6 items 2-4; one runs folder, so hard-big-s0 and cnn-big-T4-s0 serve all three
    "sweep": [[PY, "bench/bench_sweep.py", *SWEEP, "--teacher", "cnn=runs/fm/cnn", "--student", "big=800,800",
               "--student", "tiny=30,30", "--temperatures", "1,2,2.5,4,8,20",
               "--out", "bench/results/sweep-temperature"],
              # member-02 is the ensemble's best member on validation (member-01 on test)
              [PY, "bench/bench_sweep.py", *SWEEP, "--teacher", "ensemble=runs/fm/ensemble-cnn5", "--teacher",
               "member=runs/fm/ensemble-cnn5/member-02", "--student", "big=800,800", "--temperatures", "4,20",
               "--out", "bench/results/sweep-ensemble"],
              [PY, "bench/bench_sweep.py", *SWEEP, "--teacher", "cnn=runs/fm/cnn", "--teacher",
               "specialists=runs/fm/specialists-cnn-e6/seed-0", "--student", "big=800,800", "--temperatures", "4",
               "--out", "bench/results/sweep-specialists"],
              # the distillation issue's longer schedule, and consistent augmentation (online teacher)
              [PY, "bench/bench_sweep.py", "--data", "fashion-mnist", "--alpha", "0.1", "--seeds", "0", "--epochs", "30",
               "--grad-clip", "5", "--jobs", "2", "--runs", "runs/fm/sweep30",
               "--teacher", "cnn=runs/fm/cnn", "--student", "big=800,800", "--temperatures", "4",
               "--out", "bench/results/sweep-30epochs"],
              kdens_if_missing("runs/fm/x/T4-jit2-e40", "distill", "--teacher", "runs/fm/cnn", *FM, "--model", "mlp",
                               "--model-arg", "hidden=800,800", "--temperature", "4", "--alpha", "0.1", "--jitter", "2",
                               "--epochs", "40", "--grad-clip", "5", "--seed", "0",
                               "--baseline", "runs/fm/sweep30/hard-big-s0")],
    # issue 17: the many-class benchmark (its own generator; ~45 CPU-minutes), then the clustering
    # comparison on its generalists, three digits generalists and one Fashion-MNIST generalist
    "many-class": [[PY, "bench/bench_many_class.py", "--runs", "runs/many-class", "--seeds", "0,1,2",
                    "--out", "bench/results/many-class"]],
    "clustering": [*(kdens_if_missing(f"runs/clu/digits-s{s}", "train-generalist", "--data", "digits", "--model", "mlp",
                                      "--model-arg", "hidden=256,256", "--model-arg", "dropout=0.2", "--epochs", "40",
                                      "--batch-size", "32", "--patience", "40", "--seed", str(s)) for s in range(3)),
                   kdens_if_missing("runs/clu/fm-mlp256", "train-generalist", *FM, "--model", "mlp", "--model-arg",
                                    "hidden=256", "--lr", "0.1", "--epochs", "10", "--patience", "10", "--seed", "0"),
                   [PY, "bench/bench_clustering.py",
                    *(f"--run=digits-s{s}=runs/clu/digits-s{s}" for s in range(3)), "--run=fashion-mnist=runs/clu/fm-mlp256",
                    *(f"--run=many-class-{g}-s{s}=runs/many-class/s{s}/{g}" for g in ("g16", "g32") for s in range(3)),
                    *(f"--k=digits-s{s}=3,4,5" for s in range(3)), "--k=fashion-mnist=3,4,5",
                    "--out", "bench/results/clustering"]],
    # issue 12: colour images end to end (uint8 NHWC, --augment crop,flip, mobilenet, int8 TFLite; ~5 CPU-minutes)
    "colour": [[PY, "bench/bench_colour.py", "--runs", "runs/colour", "--out", "bench/results/colour"]],
    # issue 15: data-free distillation on MNIST (ZSKD's LeNet-5 -> LeNet-5-Half, scaled down; ~30 CPU-minutes)
    "impressions": [[PY, "bench/bench_impressions.py", "--runs", "runs/zskd-mnist", "--impressions", "3000",
                     "--iters", "200", "--di-epochs", "40,200", "--out", "bench/results/impressions-mnist"]],
    # issue 15: tree students on a generated tabular set and on Fashion-MNIST (~70 minutes on a loaded machine)
    "trees": [[PY, "bench/bench_trees.py", "--runs", "runs/trees", "--sets", "tabular",
               "--out", "bench/results/trees-tabular"],
              [PY, "bench/bench_trees.py", "--runs", "runs/trees", "--sets", "fashion-mnist",
               "--out", "bench/results/trees-fashion-mnist"]],
    # issue 12: tabular features end to end, data bigger than memory
    "tabular": [[PY, "bench/bench_tabular.py", "--out", "bench/results/tabular"]],
    "big-data": [[PY, "bench/bench_big_data.py", "--out", "bench/results/big-data"]],
    # issue 14: cached teacher features vs online
    "feature-cache": [[PY, "bench/bench_feature_cache.py", "--data", "fashion-mnist", "--fraction", "0.2", "--epochs",
                       "2", "--threads", "1", "--out", "bench/results/feature_cache.json"]],
    # issue 14: rkd's angle term per step, autograd vs the hand-derived gradient (about a minute)
    "rkd": [[PY, "bench/bench_rkd.py", "--out", "bench/results/rkd.json"],
            [PY, "bench/bench_rkd.py", "--student-width", "64", "--teacher-width", "64", "--out",
             "bench/results/rkd-64.json"]],
    # issue 17: early stopping against the cosine schedule (old default vs new, ~1 CPU-hour)
    "patience": [[PY, "bench/bench_patience.py", "--runs", "runs/patience", "--out", "bench/results/patience"]],
    # issue 13: the paper's MNIST table, consistent teaching and 3% of the data, 3 seeds (CPU-hours)
    "mnist-table": [[PY, "bench/bench_mnist.py", "--parts", "table,consistent,bteacher,three,temperature,omit",
                     "--seeds", "0,1,2", "--runs", "runs/mnist", "--out", "bench/results/mnist"]],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(STEPS), help="run just these steps")
    args = ap.parse_args()
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    single = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, cmds in STEPS.items():
        if args.only and name not in args.only:
            continue
        for cmd in cmds:
            if cmd is None:
                print(f"[{name}] reused", flush=True)
                continue
            if not Path(cmd[0]).exists() and cmd[0] != PY:
                print(f"[{name}] skipped: {cmd[0]} is missing (see {cmd[1]} for how to make it)", file=sys.stderr)
                continue
            print(f"[{name}] $ {' '.join(cmd)}", flush=True)
            env = os.environ if name == "throughput" else single  # throughput measures the 2-thread loop
            if subprocess.run(cmd, env=env).returncode != 0:
                print(f"[{name}] failed; fix it and rerun `make bench` (finished runs are reused)", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
