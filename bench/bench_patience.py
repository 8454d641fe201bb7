"""Early stopping against a cosine schedule (issue 17, item 1): the old default, --patience 10,
beside the new one (no early stopping: every epoch runs, the best validation epoch is kept).

Each case trains the same generalist twice per seed through the real CLI and records test
errors, the epochs run, the best epoch, the learning rate when a run stopped, and wall time:

* digits, MLP-16, 150 epochs (the embedded default data);
* many-class (``bench/many_class.py``, 100 classes, 20,000 / 5,000 images), MLP-16, SGD lr 0.2,
  150 epochs: the case the issue found (stopped at epoch 34 with the learning rate still high);
* Fashion-MNIST, MLP-256, 30 epochs (seed 0 only unless --fm-seeds says otherwise).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_patience.py --runs runs/patience --out bench/results/patience
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import kdens_child  # noqa: E402
import many_class  # noqa: E402

POLICIES = {"patience 10 (old default)": ["--patience", "10"], "off (new default)": []}


def cases(runs: Path, seeds: list[int], fm_seeds: list[int]) -> list[tuple[str, list[str], list[int]]]:
    mc = runs / "many-class.npz"
    if not mc.exists():
        many_class.write(mc, 20_000, 5_000, seed=0, noise=0.15)
    out = [("digits MLP-16, 150 epochs", ["--data", "digits", "--model", "mlp", "--model-arg", "hidden=16",
                                           "--epochs", "150"], seeds),
           ("many-class MLP-16, lr 0.2, 150 epochs", ["--data", str(mc), "--model", "mlp", "--model-arg", "hidden=16",
                                                      "--lr", "0.2", "--epochs", "150"], seeds)]
    if Path("/usr/share/datasets/fashion-mnist").is_dir() and fm_seeds:
        out.append(("Fashion-MNIST MLP-256, 30 epochs", ["--data", "fashion-mnist", "--model", "mlp", "--model-arg",
                                                         "hidden=256", "--epochs", "30"], fm_seeds))
    return out


def train(out: Path, args: list[str], log: Path) -> dict:
    if not (out / "manifest.json").exists():
        full = ["train-generalist", *args, "--quiet", "--resume", "--out", str(out)]
        rc = kdens_child.run(full, log)
        if rc:
            raise SystemExit(f"failed (exit {rc}): kdens {' '.join(full)}; see {log}")
    m = json.loads((out / "metrics.json").read_text())
    m["wall_seconds"] = json.loads((out / "manifest.json").read_text()).get("wall_seconds")
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/patience"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/patience")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fm-seeds", default="0")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    fm_seeds = [int(s) for s in a.fm_seeds.split(",") if s]
    a.runs.mkdir(parents=True, exist_ok=True)
    log = a.out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name, args, case_seeds in cases(a.runs, seeds, fm_seeds):
        slug = name.split(",")[0].replace(" ", "-").lower()
        for policy, flags in POLICIES.items():
            per_seed = []
            for s in case_seeds:
                tag = "p10" if flags else "off"
                m = train(a.runs / f"{slug}-{tag}-s{s}", [*args, "--seed", str(s), *flags], log)
                per_seed.append({k: m.get(k) for k in ("test_errors", "test_accuracy", "epochs_run", "epochs_planned",
                                                        "best_epoch", "stopped_early", "lr_at_stop", "wall_seconds")})
            rows.append({"case": name, "policy": policy, "command_flags": [*args, *flags], "seeds": case_seeds,
                         "runs": per_seed})
    lines = ["| case | early stopping | test errors per seed (mean) | epochs run per seed | lr at stop | wall s (sum) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        errs = [x["test_errors"] for x in r["runs"]]
        lrs = ", ".join(f"{x['lr_at_stop']:.3g}" if x.get("lr_at_stop") else "-" for x in r["runs"])
        lines.append(f"| {r['case']} | {r['policy']} | {' / '.join(map(str, errs))} ({statistics.mean(errs):.1f}) | "
                     f"{' / '.join(str(x['epochs_run']) for x in r['runs'])} | {lrs} | "
                     f"{sum(x['wall_seconds'] or 0 for x in r['runs']):.0f} |")
    a.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "wall_seconds": time.time() - t0}, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
