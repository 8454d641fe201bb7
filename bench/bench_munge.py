"""MUNGE pseudo-data as the only transfer set (Buciluǎ, Caruana & Niculescu-Mizil 2006), issue 15.

One teacher per dataset; per seed, the same small MLP student four ways, every one a `kdens`
command a user would type (finished runs are reused, so the benchmark resumes):

* ``hard``: trained on the training split's hard labels (the baseline);
* ``real``: distilled on the training split itself (teacher's probabilities: T = 1, alpha = 0);
* ``munge-Kx``: distilled on K x (training split size) MUNGE pseudo-examples only, labelled by
  the teacher (T = 1; no example of the training split is a training example of the student,
  though MUNGE builds its pseudo-examples from them).

Same epochs for every student, so a larger pseudo-set also means more steps (as in the paper,
which trained to convergence on each size). Datasets (``--sets``):

* ``tabular``: the generated CSV of ``bench_trees.write_tabular`` (6 classes, 10 features in
  natural units from grams to pascals, 8,000 rows; 20% test, 10% of the rest validation).
  Teacher MLP 256-256, 60 epochs; student MLP 16.
* ``fashion-mnist``: the 784 pixels as features of an MLP. Teacher MLP 256, 10 epochs; student
  MLP 16.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_munge.py --runs runs/munge --sets tabular --seeds 0,1,2 \\
        --out bench/results/munge-tabular
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
from bench_trees import write_tabular  # noqa: E402

SETS = {
    "tabular": {"teacher": ["--model", "mlp", "--model-arg", "hidden=256,256", "--epochs", "60"],
                "student": ["--model", "mlp", "--model-arg", "hidden=16"], "epochs": 60, "munge": (1, 5, 20)},
    "fashion-mnist": {"teacher": ["--model", "mlp", "--model-arg", "hidden=256", "--epochs", "10"],
                      "student": ["--model", "mlp", "--model-arg", "hidden=16"], "epochs": 10, "munge": (1, 3)},
}


def kdens(args: list[str], log: Path) -> None:
    """One kdens command, unless its --out is finished."""
    out = Path(args[args.index("--out") + 1])
    if (out / "manifest.json").exists():
        return
    print("$ kdens " + " ".join(args), flush=True)
    rc = kdens_child.run([*args, "--quiet", "--resume"], log)
    if rc:
        raise SystemExit(f"kdens {' '.join(args)} failed (exit {rc}); see {log}")


def one_set(name: str, runs: Path, seeds: list[int], log: Path) -> dict:
    spec = SETS[name]
    root = runs / name
    data = (["--data", str(write_tabular(runs / "tabular.csv")), "--label-column", "label", "--test-fraction", "0.2"]
            if name == "tabular" else ["--data", "fashion-mnist"])
    teacher = root / "teacher"
    kdens(["train-generalist", *data, *spec["teacher"], "--seed", "0", "--out", str(teacher)], log)
    n_train = json.loads((teacher / "manifest.json").read_text())["data"]["train"]
    epochs = ["--epochs", str(spec["epochs"])]
    rows: dict[str, list[dict]] = {}
    for s in seeds:
        seed = ["--seed", str(s)]
        hard = root / f"hard-s{s}"
        kdens(["train-generalist", *data, *spec["student"], *epochs, *seed, "--out", str(hard)], log)
        students = [("real", ["--transfer", "train"])]
        students += [(f"munge-{k}x", ["--transfer", f"munge={k * n_train}"]) for k in spec["munge"]]
        got = {"hard": json.loads((hard / "metrics.json").read_text())}
        for sname, flags in students:
            out = root / f"{sname}-s{s}"
            kdens(["distill", "--teacher", str(teacher), *spec["student"], "--temperature", "1", "--alpha", "0",
                   *flags, *epochs, *seed, "--baseline", str(hard), "--out", str(out)], log)
            got[sname] = json.loads((out / "metrics.json").read_text())
        for sname, m in got.items():
            rows.setdefault(sname, []).append({"seed": s, "test_errors": m["test_errors"],
                                               "train_examples": m.get("train_examples"),
                                               "gap_recovered": m.get("gap_recovered"),
                                               "teacher_agreement": m.get("teacher_agreement"),
                                               "train_seconds": m.get("train_seconds")})
    tm = json.loads((teacher / "metrics.json").read_text())
    n_test = round(tm["test_errors"] / (1 - tm["test_accuracy"]))
    return {"dataset": name, "n_train": n_train, "n_test": n_test, "teacher_test_errors": tm["test_errors"],
            "rows": rows}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def markdown(res: dict) -> str:
    lines = [f"**{res['dataset']}**: teacher {res['teacher_test_errors']} test errors of {res['n_test']}; "
             f"{res['n_train']:,} training rows.", "",
             "| student (MLP 16) | transfer examples | test errors per seed (mean) | share of the teacher-hard gap "
             "(mean) | agreement with teacher (mean) |", "|---|---|---|---|---|"]
    for name, rs in res["rows"].items():
        errs = [r["test_errors"] for r in rs]
        gaps = [r["gap_recovered"] for r in rs]
        agree = [r["teacher_agreement"] for r in rs]
        g = _mean(gaps)
        a = _mean(agree)
        lines.append(f"| {name} | {rs[0]['train_examples']:,} | {' / '.join(map(str, errs))} "
                     f"({statistics.mean(errs):.1f}) | "
                     + (" / ".join("n/a" if x is None else f"{100 * x:.0f}%" for x in gaps)
                        + (f" ({100 * g:.0f}%)" if g is not None else "") if name != "hard" else "0% by definition")
                     + f" | {'-' if a is None else f'{100 * a:.2f}%'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/munge"))
    ap.add_argument("--sets", default="tabular")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json, OUT.md and OUT.log")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    a.runs.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    log = a.out.with_suffix(".log")
    t0 = time.time()
    results = [one_set(name, a.runs, seeds, log) for name in a.sets.split(",")]
    doc = {"results": results, "seeds": seeds, "wall_seconds": round(time.time() - t0, 1),
           "command": "OMP_NUM_THREADS=1 .venv/bin/python bench/bench_munge.py " + " ".join(argv or sys.argv[1:])}
    a.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    text = "\n\n".join(markdown(r) for r in results)
    a.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
