"""Cached teacher features: a feature method's epoch with the teacher online vs computed once.

One teacher (mlp 1200-1200, one epoch: its accuracy does not matter here) and one student
(mlp 800-800) trained by ``--method fitnets`` (the hint phase and the KD phase both read the
teacher) three times with the same seed: ``--feature-cache-mb 0`` (the teacher runs on every
batch), ``auto`` (its logits and hint features held in memory) and a budget too small for them
(a memory-mapped .npy in the cache folder, built by the first such run and reused by a second).
Reported per path: seconds per epoch over both phases (the stage's own per-phase timings), the
one-off cost of computing the features, and the test errors (equal on every path: the cache
changes where the teacher's numbers come from, not the numbers).

    .venv/bin/python bench/bench_feature_cache.py --threads 1 --out bench/results/feature_cache.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from distill.config import DistillConfig
from distill.stage import run as distill
from kdens.artifacts import atomic_write_json, atomic_write_text
from kdens.config import GeneralistConfig, build


def _student(teacher: Path, out: Path, cache: Path, budget, args) -> dict:
    cfg = build(DistillConfig, {"teacher": str(teacher), "model": "mlp", "model_args": {"hidden": [800, 800]},
                                "method": "fitnets", "hint": ["body.2:body.2"], "transfer": f"fraction={args.fraction}",
                                "epochs": args.epochs, "batch_size": 128, "patience": None, "seed": 0,
                                "device": "cpu", "feature_cache_mb": budget, "cache_dir": str(cache)})
    t0 = time.perf_counter()
    distill(cfg, out, progress=False)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    info = json.loads((out / "manifest.json").read_text())["features"]["teacher_features"]
    epochs = sum(p["epochs_run"] for p in m["phases"])
    return {"budget": budget, "path": m["teacher_features"], "reused": info["reused"],
            "mb": round(info["bytes"] / 2**20, 1),
            "seconds_per_epoch": round(sum(p["seconds"] for p in m["phases"]) / epochs, 3),
            "phases": {p["phase"]: round(p["seconds"] / p["epochs_run"], 3) for p in m["phases"]},
            "features_seconds": info["build_seconds"], "wall_seconds": round(wall, 2), "epochs": epochs,
            "train_examples": m["train_examples"], "test_errors": m["test_errors"], "test_nll": m["test_nll"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--fraction", type=float, default=0.2, help="transfer set: this share of the training split")
    ap.add_argument("--epochs", type=int, default=2, help="KD epochs (the hint phase adds a quarter, at least 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/feature_cache.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from generalist import stage as generalist

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gcfg = build(GeneralistConfig, {"model": "mlp", "data": args.data, "model_args": {"hidden": [1200, 1200]},
                                        "epochs": 1, "patience": None, "device": "cpu",
                                        "train_fraction": args.fraction})
        teacher = generalist.run(gcfg, work / "teacher", progress=False)
        rows = [_student(teacher, work / name, work / "cache", budget, args)
                for name, budget in (("online", 0.0), ("memory", "auto"), ("disk", 1.0), ("disk-again", 1.0))]
    base = rows[0]["seconds_per_epoch"]
    for r in rows:
        r["speedup_vs_online"] = round(base / r["seconds_per_epoch"], 2)
    meta = {"data": args.data, "fraction": args.fraction, "threads": args.threads, "teacher": "mlp 1200-1200",
            "student": "mlp 800-800", "method": "fitnets", "hint": "body.2:body.2",
            "command": f".venv/bin/python bench/bench_feature_cache.py --data {args.data} --fraction {args.fraction} "
                       f"--epochs {args.epochs} --threads {args.threads} --out {args.out}"}
    atomic_write_json(args.out, {**meta, "rows": rows})
    lines = [("| path | budget (MB) | features (MB) | reused | s / epoch | hints s/ep | kd s/ep | features built (s) | "
              "speedup | test errors |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['budget']} | {r['mb']} | {r['reused']} | {r['seconds_per_epoch']} | "
                     f"{r['phases'].get('hints')} | {r['phases'].get('kd')} | {r['features_seconds']} | "
                     f"{r['speedup_vs_online']}x | {r['test_errors']} |")
    text = "\n".join([meta["command"], "", *lines]) + "\n"
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
