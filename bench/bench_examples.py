"""Every example pipeline on 5 seeds: does `kdens run examples/<name>.toml` pass whatever the seed?

    OMP_NUM_THREADS=1 python bench/bench_examples.py                       # digits and user-model, seeds 0-4
    OMP_NUM_THREADS=1 python bench/bench_examples.py --only user-model --seeds 0,1

Each seed is the example file as shipped with one line added to each training table
(`seed = S` in [generalist], [ensemble], [specialists] and every [[distill]]), run by
`kdens run ... --quiet` in a fresh folder, one after another on one core. A seed passes
when the command exits 0: every stage trained above chance (kdens.health), every deploy
gate held. The examples run as written: KDENS_EPOCHS_CAP (the docs harness's smoke-test
cap) is refused here. examples/fashion-mnist.toml is left out unless asked for with
--include-fashion-mnist: it takes hours per seed on a CPU, and needs the
dataset-fashion-mnist package.

Writes bench/results/examples.json and prints the table BENCHMARKS.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TABLES = re.compile(r"^\s*(\[(generalist|ensemble|specialists)\]|\[\[distill\]\])")


def seeded(text: str, seed: int) -> str:
    """The example with ``seed = S`` as the first key of every training table."""
    out = []
    for line in text.splitlines():
        out.append(line)
        if TRAIN_TABLES.match(line):
            out.append(f"seed = {seed}")
    return "\n".join(out) + "\n"


def run_one(example: Path, seed: int, work: Path) -> dict:
    """One seed of one example in its own folder; returns the outcome and the headline metrics."""
    folder = work / f"{example.stem}-s{seed}"
    shutil.copytree(example.parent, folder / "examples")  # user models sit beside their file
    config = folder / "examples" / example.name
    config.write_text(seeded(example.read_text(), seed))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "kdens", "run", str(config), "--out", str(folder / "exp"), "--quiet"],
                       cwd=folder, env=env, capture_output=True, text=True)
    row = {"example": example.name, "seed": seed, "exit_code": r.returncode, "seconds": round(time.time() - t0, 1)}
    if r.returncode != 0:
        row["error"] = (r.stderr.strip().splitlines() or ["(no message)"])[-1][:600]
    state = folder / "exp" / "pipeline.json"
    for stage in json.loads(state.read_text())["stages"] if state.exists() else []:
        metrics = folder / "exp" / stage["dir"] / ("report.json" if stage["kind"] == "deploy" else "metrics.json")
        if stage["status"] in ("done", "gate-failed") and metrics.exists():
            m = json.loads(metrics.read_text())
            acc = m.get("test_accuracy", m.get("accuracy", m.get("combined", {}).get("test_accuracy")))
            if acc is not None:
                row.setdefault("test_accuracy", {})[stage["name"]] = round(float(acc), 4)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| example | seed | exit | wall (s) | test accuracy per stage |", "|---|---|---|---|---|"]
    for r in rows:
        accs = ", ".join(f"{k} {v:.4f}" for k, v in (r.get("test_accuracy") or {}).items())
        lines.append(f"| {r['example']} | {r['seed']} | {r['exit_code']} | {r['seconds']:.0f} | "
                     f"{accs}{' — ' + r['error'][:240] if r.get('error') else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds [0,1,2,3,4]")
    ap.add_argument("--only", action="append", help="an example's name (digits, user-model); repeatable")
    ap.add_argument("--include-fashion-mnist", action="store_true",
                    help="also run examples/fashion-mnist.toml (hours per seed on a CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "examples.json")
    ap.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    ap.add_argument("--examples", type=Path, default=ROOT / "examples",
                    help="the examples folder to run [examples/]: e.g. an older version's, for a before/after")
    args = ap.parse_args()
    if os.environ.get("KDENS_EPOCHS_CAP"):
        sys.exit("KDENS_EPOCHS_CAP is set: this benchmark runs the examples as written; unset it")
    examples = sorted(args.examples.resolve().glob("*.toml"))
    if args.only:
        examples = [e for e in examples if e.stem in args.only]
    if not args.include_fashion_mnist:
        skipped = [e.name for e in examples if tomllib.loads(e.read_text()).get("data", {}).get("data") == "fashion-mnist"]
        for name in skipped:
            print(f"skipped {name}: hours per seed on a CPU (pass --include-fashion-mnist to run it)")
        examples = [e for e in examples if e.name not in skipped]
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="kdens-bench-examples-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for example in examples:
        for seed in seeds:
            rows.append(run_one(example, seed, work))
            r = rows[-1]
            print(f"{r['example']} seed {seed}: exit {r['exit_code']} in {r['seconds']:.0f} s"
                  + (f": {r['error']}" if r.get("error") else ""), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    passed = sum(r["exit_code"] == 0 for r in rows)
    doc = {"command": "OMP_NUM_THREADS=1 python bench/bench_examples.py " + " ".join(sys.argv[1:]),
           "seeds": seeds, "passed": passed, "runs": len(rows), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(rows))
    print(f"{passed}/{len(rows)} example runs passed")


if __name__ == "__main__":
    main()
