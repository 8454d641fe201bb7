"""Every distillation method on one dataset, same teacher, same student, same epochs, 3 seeds.

Trains (or reuses) one teacher and, per seed, a hard-label baseline of the student's
architecture; then distills the student with every ``--method`` at its paper defaults,
plus three variants: born-again generations, DKD with a 1-epoch warmup (its paper warmup of
20 epochs spans the whole of a 20-epoch run) and DIST at its paper's CIFAR-100 setting. Each
job is a single-threaded ``kdens`` process, ``--jobs`` of them at a time (default 1).
Reports test errors (mean and sd over seeds), the share of the teacher-baseline gap
recovered, and the wall time per training epoch relative to ``kd``
(``train_seconds / epochs_run`` from each run's metrics: the training loop with its
validation pass, the online teacher of feature methods included, kd's one-off soft-target
cache build excluded). The tfkd-self teacher is the seed's own hard-label baseline (the
pretrained student). Early stopping is off (--patience 1000): every run trains all epochs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_methods.py --runs runs/digits-methods \\
        --seeds 0,1,2 --epochs 20 --out bench/results/methods-digits

Other data, teachers and students (issue 14's Fashion-MNIST and MNIST tables): ``--data``
takes any ``--data`` of kdens, ``--teacher RUN`` reuses a trained teacher run folder (else
``--teacher-model`` / ``--teacher-arg`` are trained for ``--teacher-epochs``), ``--student-model``
and ``--student-arg`` set the student, ``--methods`` picks a subset, ``--flags`` adds kdens flags
to every baseline and student (e.g. ``"--val-fraction 0 --weight-decay 0"``):

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_methods.py --data fashion-mnist \\
        --teacher-model cnn --teacher-epochs 30 --student-model cnn --student-arg width=8 \\
        --runs runs/fm-methods --epochs 30 --out bench/results/methods-fm-cnn
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import kdens_child  # noqa: E402
METHODS = ["kd", "soft", "logits", "fitnets", "fsp", "rkd", "dkd", "dist", "lskd", "tfkd-self", "tfkd-virtual"]
# variants: --methods spelling (also the run-folder stem) -> (table label, kdens flags)
VARIANTS = {"dkd-w1": ("dkd (warmup=1)", ["--method", "dkd", "--method-arg", "warmup=1"]),
            "born-again": ("born-again kd, 2 generations", ["--method", "kd", "--generations", "2"]),
            # the DIST paper's CIFAR-100 setting (the default is its ImageNet one: tau = beta = gamma = 1)
            "dist-cifar": ("dist (tau=4, beta=gamma=2)", ["--method", "dist", "--method-arg", "temperature=4",
                                                           "--method-arg", "beta=2", "--method-arg", "gamma=2"])}


def _run_all(todo: list[tuple[str, list[str]]], jobs: int, log: Path, status: dict) -> None:
    """Run (name, kdens args) jobs, ``jobs`` processes at a time (each single-threaded)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name, result in zip([n for n, _ in todo], pool.map(lambda j: kdens_child.step(j[1], log), todo)):
            status[name] = result


def _m(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text()) if (run / "manifest.json").exists() else {}


def _stats(xs: list) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/digits-methods"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--data", default="digits", help="any kdens --data (digits, fashion-mnist, mnist, a file)")
    ap.add_argument("--teacher", type=Path, help="a trained teacher run folder to reuse (else one is trained)")
    ap.add_argument("--teacher-model", default="cnn", help="teacher architecture to train (built-in small cnn)")
    ap.add_argument("--teacher-arg", action="append", default=[], help="teacher --model-arg (repeatable)")
    ap.add_argument("--teacher-epochs", type=int, help="teacher epochs [--epochs]")
    ap.add_argument("--student-model", default="mlp", help="student architecture [mlp]")
    ap.add_argument("--student-arg", action="append", help="student --model-arg (repeatable) [hidden=64 for mlp]")
    ap.add_argument("--student", help="old spelling of one --student-arg")
    ap.add_argument("--methods",
                    help="comma-separated subset of the methods and variants (dkd-w1, born-again, dist-cifar) [all]")
    ap.add_argument("--flags", default="", help="extra kdens flags for every baseline and student, one string")
    ap.add_argument("--jobs", type=int, default=1,
                    help="kdens processes at once, one thread each (per-epoch times are comparable only "
                         "between runs that shared the machine alike) [1]")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    args.runs.mkdir(parents=True, exist_ok=True)
    log = args.runs / "bench.log"
    t0 = time.time()
    extra = shlex.split(args.flags)
    common = ["--data", args.data, "--epochs", str(args.epochs), "--patience", "1000", "--quiet", *extra]
    s_args = args.student_arg or ([args.student] if args.student else
                                  (["hidden=64"] if args.student_model == "mlp" else []))
    student = ["--model", args.student_model, *(x for a in s_args for x in ("--model-arg", a))]
    student_desc = " ".join([args.student_model, *s_args])
    wanted = args.methods.split(",") if args.methods else None
    known = METHODS + list(VARIANTS)
    if wanted and not set(wanted) <= set(known):
        raise SystemExit(f"--methods: unknown {sorted(set(wanted) - set(known))}; known: {', '.join(known)}")
    if args.teacher:
        teacher = args.teacher
        status = {"teacher": "reused" if (teacher / "manifest.json").exists() else f"{teacher} is not a finished run"}
        teacher_desc = str(teacher)
    else:
        teacher = args.runs / "teacher"
        t_args = [x for a in args.teacher_arg for x in ("--model-arg", a)]
        t_epochs = args.teacher_epochs or args.epochs
        status = {"teacher": kdens_child.step(["train-generalist", "--data", args.data, "--model", args.teacher_model, *t_args,
                                 "--epochs", str(t_epochs), "--patience", "1000", "--quiet", "--seed", "0",
                                 "--out", str(teacher)], log)}
        teacher_desc = f"{' '.join([args.teacher_model, *args.teacher_arg])} (seed 0, {t_epochs} epochs)"
    if status["teacher"] not in ("ok", "reused"):
        raise SystemExit(f"teacher: {status['teacher']}")
    # baselines first (every student of a seed needs its own), then every student; --jobs of them at once
    bases = {seed: args.runs / f"baseline-s{seed}" for seed in seeds}
    todo = [(b.name, ["train-generalist", *student, *common, "--seed", str(seed), "--out", str(b)])
            for seed, b in bases.items()]
    _run_all(todo, args.jobs, log, status)
    jobs = [(m, m, ["--method", m]) for m in METHODS] + [(k, *v) for k, v in VARIANTS.items()]
    jobs = [j for j in jobs if wanted is None or j[0] in wanted]
    students = []  # (seed, name, out)
    todo = []
    for seed in seeds:
        base = bases[seed]
        for slug, name, flags in jobs:
            out = args.runs / f"{slug}-s{seed}"
            t = str(base) if slug == "tfkd-self" else str(teacher)
            model = [] if slug == "tfkd-self" else student  # self-training copies the pretrained student
            todo.append((out.name, ["distill", "--teacher", t, *model, *flags, *common, "--seed", str(seed),
                                    "--baseline", str(base), "--out", str(out)]))
            students.append((seed, name, out))
    _run_all(todo, args.jobs, log, status)
    rows: dict[str, list[dict]] = {}
    for seed, name, out in students:
        m = _m(out)
        row = {"seed": seed, "status": status[out.name], "test_errors": m.get("test_errors"),
               "baseline_test_errors": _m(bases[seed]).get("test_errors"), "gap_recovered": m.get("gap_recovered"),
               "epochs_run": m.get("epochs_run"), "train_seconds": m.get("train_seconds")}
        gens = m.get("generations")
        if gens:  # born-again: every generation's epochs
            row["epochs_run"] = sum(g["epochs_run"] for g in gens)
        if row["epochs_run"] and row["train_seconds"]:
            row["epoch_seconds"] = row["train_seconds"] / row["epochs_run"]
        if "ensemble" in m:
            row["ensemble_test_errors"] = m["ensemble"]["test_errors"]
        rows.setdefault(name, []).append(row)
    tm = _m(teacher)
    kd_secs = [r["epoch_seconds"] for r in rows.get("kd", []) if r.get("epoch_seconds")]
    kd_epoch = statistics.median(kd_secs) if kd_secs else None
    table = []
    for name, rs in rows.items():
        e_mean, e_sd = _stats([r["test_errors"] for r in rs])
        g_mean, g_sd = _stats([r["gap_recovered"] for r in rs])
        secs = [r["epoch_seconds"] for r in rs if r.get("epoch_seconds")]
        table.append({"method": name, "test_errors": [r["test_errors"] for r in rs], "errors_mean": e_mean,
                      "errors_sd": e_sd, "gap_mean": g_mean, "gap_sd": g_sd,
                      "epoch_seconds_median": statistics.median(secs) if secs else None,
                      "epoch_time_vs_kd": statistics.median(secs) / kd_epoch if secs and kd_epoch else None,
                      "epochs_run": rs[0].get("epochs_run"),
                      "ensemble_test_errors": [r.get("ensemble_test_errors") for r in rs if "ensemble_test_errors" in r],
                      "status": sorted({r["status"] for r in rs})})
    b_mean, b_sd = _stats([_m(args.runs / f"baseline-s{s}").get("test_errors") for s in seeds])
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_end": list(os.getloadavg()),
           "wall_seconds": round(time.time() - t0, 1), "seeds": seeds, "epochs": args.epochs,
           "data": args.data, "teacher": teacher_desc, "student": student_desc,
           "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_methods.py " + shlex.join(argv or sys.argv[1:])}
    doc = {"env": env, "teacher_test_errors": tm.get("test_errors"), "baseline_errors_mean": b_mean,
           "baseline_errors_sd": b_sd, "table": table, "runs": rows, "status": status}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1) + "\n")
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    n_test = (round(tm["test_errors"] / (1 - tm["test_accuracy"])) if tm.get("test_accuracy", 1) < 1
              else "all")
    lines = [f"# Distillation methods on {args.data} ({len(seeds)} seeds, {args.epochs} epochs)", "",
             f"Command: `{env['command']}`", "",
             f"Teacher {env['teacher']}: {tm.get('test_errors')} test errors of {n_test}. Student {student_desc}; "
             f"hard-label baseline {fmt(b_mean)} +- {fmt(b_sd)} errors. Wall {env['wall_seconds']:.0f} s on "
             f"{env['cpus']} CPUs shared with other work, one thread per job.", "",
             "| method | test errors (per seed) | mean +- sd | gap recovered (mean +- sd) | epochs run | "
             "s/epoch | per epoch vs kd |", "|---|---|---|---|---|---|---|"]
    for r in table:
        ens = f"; ensemble of generations {r['ensemble_test_errors']}" if r["ensemble_test_errors"] else ""
        bad = "" if set(r["status"]) <= {"ok", "reused"} else f" ({'; '.join(r['status'])})"
        lines.append(f"| {r['method']} | {r['test_errors']}{ens}{bad} | {fmt(r['errors_mean'])} +- "
                     f"{fmt(r['errors_sd'])} | {fmt(r['gap_mean'], '.2f')} +- {fmt(r['gap_sd'], '.2f')} | "
                     f"{r['epochs_run']} | {fmt(r['epoch_seconds_median'], '.3f')} | "
                     f"{fmt(r['epoch_time_vs_kd'], '.2f')}x |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
