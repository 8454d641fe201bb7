"""Ensemble benchmark on Fashion-MNIST through the real CLI (issue: teachers, ensembles).

Trains a K-member ensemble (``kdens train-ensemble``, members differing by seed) and
writes a markdown table of every member and the ensemble: test accuracy, errors, NLL,
ECE (15 bins), the members' disagreement, and whether the ensemble beats its best
member in accuracy and in NLL (the issue's target for 5 cnns). The ensemble's own
``--combine`` row comes from its metrics.json; the other combination of the same
members is computed here for comparison.

``--jobs N`` shares the members among N single-threaded ``kdens`` processes
(``--rank r --world-size N``); the last one to finish writes the ensemble's metrics and
manifest. A rerun continues an interrupted ensemble (``--resume``) and skips finished
members; a finished ensemble is only read.

    .venv/bin/python bench/bench_ensemble.py --data fashion-mnist --model cnn --members 5 \\
        --epochs 15 --jobs 2 --out runs/fm/ensemble-cnn5 --report bench/results/ensemble
    .venv/bin/python bench/bench_ensemble.py --data digits --members 3 --epochs 1 \\
        --out /tmp/ens --report /tmp/ens-report                     # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere


def train(args: argparse.Namespace, log: Path) -> float:
    """Run the ensemble's rank processes (skipped when it is finished); wall seconds."""
    out = Path(args.out)
    if (out / "manifest.json").exists():
        return 0.0
    cmd = [sys.executable, "-m", "kdens", "train-ensemble", "--data", args.data, "--model", args.model,
           "--members", str(args.members), "--epochs", str(args.epochs), "--combine", args.combine,
           "--seed", str(args.seed), "--quiet", "--resume", "--out", str(out)]
    for item in args.model_arg:
        cmd += ["--model-arg", item]
    cmd += args.extra.split() if args.extra else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    jobs = max(1, min(args.jobs, args.members))

    def one(rank: int) -> int:
        full = cmd + (["--rank", str(rank), "--world-size", str(jobs)] if jobs > 1 else [])
        with open(log.with_name(f"{log.stem}.rank{rank}.log"), "a") as f:
            f.write("$ " + " ".join(full) + "\n")
            f.flush()
            return subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  check=False).returncode

    t0 = time.time()
    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(one, range(jobs)))
    if any(codes) or not (out / "manifest.json").exists():
        raise SystemExit(f"train-ensemble failed (exit codes {codes}); see {log.parent}/{log.stem}.rank*.log")
    return time.time() - t0


def other_combination(out: Path, method: str, temperature: float) -> dict:
    """The same members combined with the other method (computed here, not by the run)."""
    from ensembles.stage import ensemble_report, member_logits
    from kdens.runs import run_data
    from kdens.models import load_model

    man = json.loads((out / "manifest.json").read_text())
    data = run_data(man)
    models = [load_model(out / name)[0] for name in man["members"]]
    return ensemble_report(member_logits(models, data.x_test), data.y_test, None, None, method, temperature)


def table(m: dict, other: dict, args: argparse.Namespace, wall: float) -> str:
    def row(name: str, e: dict) -> str:
        return (f"| {name} | {e['test_accuracy']:.4f} | {e['test_errors']} | {e['test_nll']:.4f} | "
                f"{e['test_ece']:.4f} |")

    title = (f"Ensemble of {m['num_members']} `{' '.join([args.model + '`', *args.model_arg])} on {args.data}, "
             f"{args.epochs} epochs, seeds {args.seed}..{args.seed + m['num_members'] - 1}; test split; "
             f"T={m['temperature']:g}")
    lines = [title, "", "| model | accuracy | errors | NLL | ECE |", "|---|---|---|---|---|"]
    lines += [row(f"{e['run']} (seed {e['seed']})", e) for e in m["members"]]
    lines.append(row(f"**ensemble, {m['method']}**", m["ensemble"]))
    lines.append(row(f"ensemble, {other['method']} (same members)", other["ensemble"]))
    best_acc, best_nll = m["best_member_test_accuracy"], m["best_member_test_nll"]
    yes = {True: "yes", False: "**no**"}
    lines += ["", f"Disagreement between members (mean over pairs, test top-1): {m['disagreement']:.4f}",
              (f"Beats its best member in accuracy: {yes[m['beats_best_member_accuracy']]} "
               f"({m['test_accuracy']:.4f} vs {best_acc:.4f})"),
              (f"Beats its best member in NLL: {yes[m['beats_best_member_nll']]} "
               f"({m['test_nll']:.4f} vs {best_nll:.4f})"),
              f"Member training time (sum): {m['train_seconds']:.0f} s; this run's wall time: {wall:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--model-arg", action="append", default=[], help="repeatable KEY=VALUE")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0, help="member k uses seed + k")
    ap.add_argument("--combine", default="arithmetic", choices=["arithmetic", "geometric"])
    ap.add_argument("--jobs", type=int, default=2, help="parallel single-threaded rank processes")
    ap.add_argument("--extra", default="", help="more train-ensemble flags, space-separated (e.g. '--jitter 2')")
    ap.add_argument("--out", default="runs/fm/ensemble-cnn5", help="the ensemble's run folder")
    ap.add_argument("--report", default="bench/results/ensemble", help="writes REPORT.md and REPORT.json")
    args = ap.parse_args(argv)

    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    wall = train(args, report.with_suffix(".log"))
    out = Path(args.out)
    m = json.loads((out / "metrics.json").read_text())
    other = other_combination(out, "geometric" if m["method"] == "arithmetic" else "arithmetic", m["temperature"])
    md = table(m, other, args, wall)
    result = {"command": " ".join([sys.executable, *sys.argv]), "run": str(out), "metrics": m,
              "other_combination": {k: other[k] for k in ("method", "ensemble", "disagreement")},
              "target_met": bool(m["beats_best_member_accuracy"] and m["beats_best_member_nll"]),
              "wall_seconds": round(wall, 1)}
    report.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    report.with_suffix(".md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
