"""The README's main job (examples/digits.toml) on 3 student seeds: does distillation visibly pay?

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_demo.py --out runs/bench-demo \
        --report bench/results/demo

Runs the whole pipeline once per seed in one experiment folder: the teachers (seed 0) are
trained by the first run and reused by the others; each seed redoes the students, their
hard-label twin (same 10% of the training images, same recipe, hard labels), deploy and bench.
Records test errors per seed, their mean and spread, and the first run's wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

from kdens.app.pipeline import run_pipeline
from kdens.app.plan import build_plan
from kdens.config import load_toml
from kdens.errors import GateFailed

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"hard-label twin": "baselines/student", "distilled (specialists)": "students/student",
        "distilled (ensemble)": "students/student-from-ensemble", "teacher (specialists)": "specialists"}


def errors(folder: Path) -> int:
    m = json.loads((folder / "metrics.json").read_text())
    return int(m["test_errors"] if "test_errors" in m else m["combined"]["test_errors"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "examples" / "digits.toml"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/bench-demo")
    p.add_argument("--report", default="bench/results/demo")
    a = p.parse_args()
    doc = load_toml(Path(a.config))
    out, per_seed, walls = Path(a.out), {}, {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        d = copy.deepcopy(doc)
        for table in d["distill"]:
            table["seed"] = seed
        plan = build_plan(d, out=out)
        t0 = time.time()
        try:
            run_pipeline(plan, progress=False, log=lambda line: None)
        except GateFailed as e:  # recorded, not fatal: the comparison is about the students
            print(f"seed {seed}: a deploy gate failed: {e}")
        walls[seed] = round(time.time() - t0, 1)
        per_seed[seed] = {name: errors(out / rel) for name, rel in RUNS.items()}
        print(f"seed {seed}: {per_seed[seed]}  ({walls[seed]} s)")
    summary = {}
    for name in RUNS:
        xs = [per_seed[s][name] for s in per_seed]
        summary[name] = {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                         "per_seed": xs}
    diff = [per_seed[s]["hard-label twin"] - per_seed[s]["distilled (specialists)"] for s in per_seed]
    result = {"config": a.config, "seeds": list(per_seed), "test_examples": 359, "errors": summary,
              "twin_minus_distilled": {"mean": statistics.mean(diff), "min": min(diff), "per_seed": diff},
              "wall_seconds": walls}
    report = Path(a.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| model | test errors per seed | mean ± sd |", "|---|---|---|"]
    for name, v in summary.items():
        lines.append(f"| {name} | {', '.join(map(str, v['per_seed']))} | {v['mean']:.1f} ± {v['sd']:.1f} |")
    report.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
