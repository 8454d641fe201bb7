"""Specialists benchmark through the real CLI (issue: teachers, Hinton et al. 2015 section 5).

For one finished generalist run, trains generalist + specialists (``kdens
train-specialists``) once per seed (the seed drives k-means and the specialists'
training; the generalist is fixed) and reports:

* the class groups found, with class names, per seed;
* generalist vs combined test accuracy overall and on the covered classes (those in
  some group), with a 95% t-interval over the seeds of the combined accuracy and of
  the gain (combined - generalist);
* the conditional accuracy (test examples where some specialist is active, the
  paper's Table 3 setting) and the table by number of active specialists covering the
  true class (the paper's Table 4 shape), averaged over the seeds;
* per-group accuracy, the solver's iterations and time.

Seeds run as parallel single-threaded ``kdens`` processes (``--jobs``); a finished seed
is only read, an interrupted one continues (``--resume``).

    .venv/bin/python bench/bench_specialists.py --generalist runs/fm/cnn --clusters 3 \\
        --seeds 0,1,2,3,4 --epochs 5 --extra "--lr 0.01" --jobs 2 \\
        --out runs/fm/specialists-cnn --report bench/results/specialists
    .venv/bin/python bench/bench_specialists.py --generalist /tmp/g --clusters 3 --seeds 0,1 \\
        --epochs 1 --out /tmp/sp --report /tmp/sp-report          # smoke test on a digits generalist
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere


def command(args: argparse.Namespace, seed: int) -> list[str]:
    cmd = [sys.executable, "-m", "kdens", "train-specialists", "--generalist", args.generalist,
           "--epochs", str(args.epochs), "--top-n", str(args.top_n), "--seed", str(seed), "--quiet", "--resume",
           "--out", str(Path(args.out) / f"seed-{seed}")]
    cmd += ["--groups", args.groups] if args.groups else ["--clusters", str(args.clusters), "--affinity", args.affinity]
    return cmd + (args.extra.split() if args.extra else [])


def train(args: argparse.Namespace, seeds: list[int], log_dir: Path) -> float:
    """Run every unfinished seed (``--jobs`` at a time); wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    todo = [s for s in seeds if not (Path(args.out) / f"seed-{s}" / "manifest.json").exists()]

    def one(seed: int) -> int:
        cmd = command(args, seed)
        with open(log_dir / f"specialists.seed{seed}.log", "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode

    t0 = time.time()
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        codes = dict(zip(todo, pool.map(one, todo)))
    failed = {s: c for s, c in codes.items() if c}
    if failed:
        raise SystemExit(f"train-specialists failed for seeds {failed}; see {log_dir}/specialists.seed*.log")
    return time.time() - t0


def interval(values: list[float]) -> dict:
    """Mean and 95% Student-t interval over seeds (half-width None with one seed)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "half_width": None, "low": None, "high": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    h = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "half_width": h, "low": mean - h, "high": mean + h, "n": n}


def summarize(runs: dict[int, dict]) -> dict:
    """Per-seed numbers and their intervals, from each seed's metrics.json."""
    seeds = sorted(runs)
    col = {
        "generalist": [runs[s]["generalist"]["test_accuracy"] for s in seeds],
        "combined": [runs[s]["combined"]["test_accuracy"] for s in seeds],
        "covered_generalist": [runs[s]["covered"]["generalist_accuracy"] for s in seeds],
        "covered_combined": [runs[s]["covered"]["combined_accuracy"] for s in seeds],
        "conditional_generalist": [runs[s]["conditional"]["generalist_accuracy"] for s in seeds],
        "conditional_combined": [runs[s]["conditional"]["combined_accuracy"] for s in seeds],
    }
    col["gain"] = [c - g for c, g in zip(col["combined"], col["generalist"])]
    col["covered_gain"] = [c - g for c, g in zip(col["covered_combined"], col["covered_generalist"])]
    by_cov: dict[int, dict[str, list]] = {}
    for s in seeds:
        for e in runs[s]["by_covering"]:
            d = by_cov.setdefault(e["n_covering"], {"count": [], "generalist": [], "combined": [], "relative": []})
            d["count"].append(e["count"])
            d["generalist"].append(e["generalist_accuracy"])
            d["combined"].append(e["combined_accuracy"])
            d["relative"].append(e["relative_improvement"])
    return {"seeds": seeds, "per_seed": col, "intervals": {k: interval(v) for k, v in col.items()},
            "by_covering": {k: {kk: [x for x in vv if x is not None] for kk, vv in v.items()}
                            for k, v in sorted(by_cov.items())}}


def _ci(i: dict, pct: bool = True) -> str:
    f = 100.0 if pct else 1.0
    if i["half_width"] is None:
        return f"{f * i['mean']:.2f} (one seed)"
    return f"{f * i['mean']:.2f} ± {f * i['half_width']:.2f}"


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _pct(x: float, sign: str = "") -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:{sign}.2f}"


def other_top_n(args: argparse.Namespace, seeds: list[int], values: list[int]) -> dict:
    """The same trained runs combined with other --top-n (only the combination changes; nothing is retrained)."""
    import torch

    from specialists.stage import combined_report, load_data
    from specialists.teacher import load_teacher

    torch.set_num_threads(1)
    out: dict = {}
    for n in values:
        col: dict[str, list] = {"combined": [], "covered_combined": [], "conditional_combined": [],
                                "conditional_count": [], "covered_gain": []}
        for s in seeds:
            run = Path(args.out) / f"seed-{s}"
            man = json.loads((run / "manifest.json").read_text())
            data, _, _ = load_data(man["data_config"], man["data_fingerprint"])
            rep = combined_report(load_teacher(run, top_n=n).combiner, data.x_test, data.y_test, data.class_names)
            col["combined"].append(rep["combined"]["test_accuracy"])
            col["covered_combined"].append(rep["covered"]["combined_accuracy"])
            col["covered_gain"].append(rep["covered"]["combined_accuracy"] - rep["covered"]["generalist_accuracy"])
            col["conditional_combined"].append(rep["conditional"]["combined_accuracy"])
            col["conditional_count"].append(rep["conditional"]["count"])
        out[n] = {"per_seed": col, "intervals": {k: interval(v) for k, v in col.items() if k != "conditional_count"}}
    return out


def table(runs: dict[int, dict], summ: dict, args: argparse.Namespace, wall: float, others: dict) -> str:
    iv = summ["intervals"]
    how = f"groups `{args.groups}`" if args.groups else f"k-means K={args.clusters}, affinity {args.affinity}"
    title = (f"Generalist `{args.generalist}` + specialists ({how}, {args.epochs} epochs, top-n {args.top_n}"
             f"{', ' + args.extra if args.extra else ''}); test split; seeds {', '.join(map(str, summ['seeds']))}; "
             "mean ± 95% t-interval half-width over seeds, accuracy in %.")
    lines = [title, "", "Groups found:", ""]
    for s in summ["seeds"]:
        named = zip(runs[s]["groups"], runs[s]["group_class_names"])
        groups = "; ".join(f"{g} ({', '.join(n)})" for g, n in named)
        lines.append(f"- seed {s}: {groups}")
    lines += ["", f"| test examples | count (seed {summ['seeds'][0]}) | generalist | combined | gain |",
              "|---|---|---|---|---|"]
    first = runs[summ["seeds"][0]]
    lines.append(f"| all test | {sum(e['count'] for e in first['by_covering'])} | "
                 f"{_ci(iv['generalist'])} | {_ci(iv['combined'])} | {_ci(iv['gain'])} |")
    lines.append(f"| covered classes | {first['covered']['count']} | {_ci(iv['covered_generalist'])} | "
                 f"{_ci(iv['covered_combined'])} | {_ci(iv['covered_gain'])} |")
    lines.append(f"| some specialist active (conditional) | {first['conditional']['count']} | "
                 f"{_ci(iv['conditional_generalist'])} | {_ci(iv['conditional_combined'])} | |")
    lines += ["", "By number of active specialists covering the true class (mean over seeds):", "",
              "| # covering | test examples | generalist | combined | relative accuracy change |",
              "|---|---|---|---|---|"]
    for k, d in summ["by_covering"].items():
        lines.append(f"| {k} | {_mean(d['count']):.0f} | {_pct(_mean(d['generalist']))} | "
                     f"{_pct(_mean(d['combined']))} | {_pct(_mean(d['relative']), '+')}% |")
    lines += ["", "Per group (seed " + str(summ["seeds"][0]) + "):", "",
              "| group | test examples | generalist | combined |", "|---|---|---|---|"]
    for e in first["per_group"]:
        lines.append(f"| {', '.join(e['class_names'])} | {e['count']} | {100 * e['generalist_accuracy']:.2f} | "
                     f"{100 * e['combined_accuracy']:.2f} |")
    if others:
        lines += ["", "The same runs combined with other --top-n (nothing retrained):", "",
                  "| top-n | combined, all | combined, covered classes | gain on covered | conditional (count) |",
                  "|---|---|---|---|---|"]
        for n, o in others.items():
            i = o["intervals"]
            lines.append(f"| {n} | {_ci(i['combined'])} | {_ci(i['covered_combined'])} | "
                         f"{_ci(i['covered_gain'])} | {_ci(i['conditional_combined'])} "
                         f"({_mean(o['per_seed']['conditional_count']):.0f}) |")
    solver = [runs[s]["solver"] for s in summ["seeds"]]
    solver_line = (f"Solver: at most {max(x['iterations'] for x in solver)} iterations, "
                   f"{_mean([x['seconds'] for x in solver]):.3f} s per test pass, largest KKT residual "
                   f"{max(x['max_kkt_residual'] or 0.0 for x in solver):.1e} (tol 1e-6; 0 iterations: at most one "
                   "active specialist per example, solved in closed form).")
    train_s = _mean([runs[s]["train_seconds"] for s in summ["seeds"]])
    time_line = (f"Specialist training time (sum over specialists, mean over seeds): {train_s:.0f} s; "
                 f"this run's wall time {wall:.0f} s.")
    lines += ["", solver_line, time_line]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generalist", default="runs/fm/cnn", help="a finished generalist run folder")
    ap.add_argument("--clusters", type=int, default=3)
    ap.add_argument("--affinity", default="normalized", choices=["covariance", "normalized", "correlation"])
    ap.add_argument("--groups", default=None, help='groups by hand instead of --clusters, e.g. "0,2,4,6;5,7,9"')
    ap.add_argument("--top-n", type=int, default=1)
    ap.add_argument("--also-top-n", default="2,3", help="also combine the trained runs with these top-n ('' for none)")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=2, help="parallel single-threaded seed processes")
    ap.add_argument("--extra", default="", help="more train-specialists flags, space-separated (e.g. '--lr 0.01')")
    ap.add_argument("--out", default="runs/fm/specialists-cnn", help="one run folder per seed goes under it")
    ap.add_argument("--report", default="bench/results/specialists", help="writes REPORT.md and REPORT.json")
    args = ap.parse_args(argv)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    wall = train(args, seeds, report.parent)
    runs = {s: json.loads((Path(args.out) / f"seed-{s}" / "metrics.json").read_text()) for s in seeds}
    summ = summarize(runs)
    others = other_top_n(args, seeds, [int(n) for n in args.also_top_n.split(",") if n.strip()])
    md = table(runs, summ, args, wall, others)
    result = {"command": " ".join([sys.executable, *sys.argv]),
              "train_commands": {s: " ".join(command(args, s)) for s in seeds}, "summary": summ,
              "groups": {s: {"groups": runs[s]["groups"], "class_names": runs[s]["group_class_names"]} for s in seeds},
              "other_top_n": others, "metrics": runs, "wall_seconds": round(wall, 1)}
    report.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    report.with_suffix(".md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
