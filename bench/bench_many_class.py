"""Specialists where they pay: the many-class benchmark of issue 17, through the real CLI.

Data: ``bench/many_class.py`` -- 100 classes (10 coarse shapes x 10 fine centre patterns of
their own), 16x16, noise 0.15, +-1 px shifts; 20,000 training (10% of it validation) and
5,000 test images (the issue used 40,000 / 10,000; halved to fit 2 shared CPU cores), plus
60,000 unlabeled images from the same generator for the transfer-set lever.

Per seed (the seed drives the generalist, k-means and the specialists; the data are fixed):

* generalists MLP-16 and MLP-32 (one hidden layer), SGD lr 0.2, 40 epochs;
* specialists on each, 40 epochs, lr 0.05, ``--init exact``, for three groupings: **found** (k-means K=10 on
  the generalist's validation predictions, the default algorithm and affinity), **true**
  (the 10 shapes, ``--groups``) and **random** (a seeded random partition into 10 groups of
  10); the adjusted Rand index of the found groups against the shapes;
* students distilled from generalist + specialists (found groups), T=4, alpha=0.1, the
  generalist's recipe: of the generalist's size (1x) and twice its size (2x: MLP-32 for
  the MLP-16 generalist, MLP-64 for MLP-32), each beside its hard-label twin (same
  architecture and recipe on hard labels; for 1x that is the generalist itself); and the
  MLP-16 student again with alpha 0.9, the one seed-0 lever that beat its twin.

On seed 0 only: levers for the MLP-16 line, where the specialists' gain is large (T = 1, 2, 8;
alpha = 0.5, 0.9; 80 epochs with an 80-epoch twin; 60,000 generated unlabeled images as the
transfer set, alpha = 0). (On the MLP-32 line the teacher is less than a point above the
twin, so a student cannot beat the twin by a point without beating its teacher.)

Every run passes ``--patience`` equal to its epochs, so early stopping never cuts a schedule
short (issue 17, item 1); the best validation epoch is still the one kept. Finished runs are
reused (a folder with a manifest), so an interrupted benchmark continues where it stopped.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_many_class.py --runs runs/many-class \\
        --seeds 0,1,2 --out bench/results/many-class
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import many_class  # noqa: E402

GEN = {"g16": 16, "g32": 32}
GEN_RECIPE = ["--lr", "0.2", "--epochs", "40", "--patience", "40"]
SPEC_RECIPE = ["--epochs", "40", "--patience", "40", "--lr", "0.05"]
SPEC_INIT = ["--init", "exact"]  # the default; the other start is compared by bench/bench_specialist_init.py
KD = {"temperature": 4.0, "alpha": 0.1}
STUDENTS = {"g16": {"1x": 16, "2x": 32}, "g32": {"1x": 32, "2x": 64}}
ALPHA09 = {"g16": "1x"}  # the seed-0 lever that beat its twin (alpha 0.9), repeated on every seed
LEVERS = {  # name: (distill flags, epochs); seed 0, MLP-16 generalist + specialists (found groups) -> MLP-16
    "T1": (["--temperature", "1", "--alpha", "0.1"], 40),
    "T2": (["--temperature", "2", "--alpha", "0.1"], 40),
    "T8": (["--temperature", "8", "--alpha", "0.1"], 40),
    "alpha 0.5": (["--temperature", "4", "--alpha", "0.5"], 40),
    "alpha 0.9": (["--temperature", "4", "--alpha", "0.9"], 40),
    "80 epochs": (["--temperature", "4", "--alpha", "0.1"], 80),
    "60k generated unlabeled (alpha 0)": (["--temperature", "4", "--alpha", "0", "--transfer", "unlabeled={unl}"], 40),
}


class Runner:
    """Runs ``kdens`` commands one at a time (single-threaded), skipping finished run folders."""

    def __init__(self, log: Path):
        self.log = log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.commands: list[str] = []
        self.outs: list[Path] = []

    def kdens(self, out: Path, *args: str) -> dict:
        cmd = [sys.executable, "-m", "kdens", *map(str, args), "--quiet", "--resume", "--out", str(out)]
        self.commands.append(" ".join(cmd))
        self.outs.append(out)
        if not (out / "manifest.json").exists():
            with open(self.log, "a") as f:
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                t0 = time.time()
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, check=False).returncode
                f.write(f"# rc={rc} wall={time.time() - t0:.1f}s\n")
            if rc:
                raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}; see {self.log}")
        return json.loads((out / "metrics.json").read_text())


def manifest_seconds(run: Path) -> float:
    return float(json.loads((run / "manifest.json").read_text()).get("wall_seconds") or 0.0)


def random_groups(seed: int) -> str:
    perm = np.random.default_rng(1000 + seed).permutation(many_class.SHAPES * many_class.PATTERNS)
    return ";".join(",".join(str(k) for k in sorted(perm[i: i + 10])) for i in range(0, len(perm), 10))


def ari_true(run: Path) -> float:
    from sklearn.metrics import adjusted_rand_score

    cl = json.loads((run / "clusters.json").read_text())
    lab = np.full(100, -1)
    for i, g in enumerate(cl["all_groups"]):
        lab[g] = i
    return float(adjusted_rand_score(np.arange(100) // 10, lab))


def one_seed(r: Runner, runs: Path, data: Path, seed: int) -> dict:
    out: dict = {"generalists": {}, "specialists": {}, "students": {}, "seconds": {}}
    sd = runs / f"s{seed}"
    truth = many_class.true_groups()
    for g, hidden in GEN.items():
        m = r.kdens(sd / g, "train-generalist", "--data", data, "--model", "mlp", "--model-arg", f"hidden={hidden}",
                    "--seed", seed, *GEN_RECIPE)
        out["generalists"][g] = {"test_accuracy": m["test_accuracy"], "params": m["params"],
                                 "best_epoch": m["best_epoch"], "seconds": manifest_seconds(sd / g)}
        out["specialists"][g] = {}
        for grouping, how in (("found", ["--clusters", "10"]), ("true", ["--groups", truth]),
                              ("random", ["--groups", random_groups(seed)])):
            run = sd / f"{g}-spec-{grouping}"
            m = r.kdens(run, "train-specialists", "--generalist", sd / g, *how, "--seed", seed, *SPEC_RECIPE,
                        *SPEC_INIT)
            rec = {"generalist": m["generalist"]["test_accuracy"], "combined": m["combined"]["test_accuracy"],
                   "gain": m["combined"]["test_accuracy"] - m["generalist"]["test_accuracy"],
                   "specialists": len(m["specialists"]), "dropped": [d["run"] for d in m.get("dropped", [])],
                   "train_seconds": m["train_seconds"], "seconds": manifest_seconds(run)}
            if grouping == "found":
                cl = json.loads((run / "clusters.json").read_text())
                rec.update(ari_true=ari_true(run), stability=cl.get("stability"))
            out["specialists"][g][grouping] = rec
        teacher = sd / f"{g}-spec-found"
        out["students"][g] = {}
        for size, hidden in STUDENTS[g].items():
            twin_dir = sd / f"g{hidden}" if f"g{hidden}" in GEN else sd / f"hard-{hidden}"
            twin = r.kdens(twin_dir, "train-generalist", "--data", data, "--model", "mlp", "--model-arg",
                           f"hidden={hidden}", "--seed", seed, *GEN_RECIPE)
            st_dir = sd / f"{g}-student-{hidden}"
            st = r.kdens(st_dir, "distill", "--teacher", teacher, "--model", "mlp", "--model-arg", f"hidden={hidden}",
                         "--temperature", KD["temperature"], "--alpha", KD["alpha"], "--seed", seed,
                         "--baseline", twin_dir, *GEN_RECIPE)
            out["students"][g][size] = {"hidden": hidden, "params": st["params"], "distilled": st["test_accuracy"],
                                        "twin": twin["test_accuracy"], "seconds": manifest_seconds(st_dir)}
            if ALPHA09.get(g) == size:
                st = r.kdens(sd / f"{g}-student-{hidden}-alpha0.9", "distill", "--teacher", teacher, "--model", "mlp",
                             "--model-arg", f"hidden={hidden}", "--temperature", KD["temperature"], "--alpha", 0.9,
                             "--seed", seed, "--baseline", twin_dir, *GEN_RECIPE)
                out["students"][g][f"{size}, alpha 0.9"] = {**out["students"][g][size], "distilled": st["test_accuracy"],
                                                            "seconds": manifest_seconds(sd / f"{g}-student-{hidden}-alpha0.9")}
    return out


def levers(r: Runner, runs: Path, data: Path, unlabeled: Path) -> dict:
    sd, out = runs / "s0", {}
    teacher = sd / "g16-spec-found"
    for name, (flags, epochs) in LEVERS.items():
        flags = [f.format(unl=unlabeled) for f in flags]
        recipe = ["--lr", "0.2", "--epochs", str(epochs), "--patience", str(epochs)]
        twin_dir = sd / "g16" if epochs == 40 else sd / f"hard-16-e{epochs}"
        twin = r.kdens(twin_dir, "train-generalist", "--data", data, "--model", "mlp", "--model-arg", "hidden=16",
                       "--seed", 0, *recipe)
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        st_dir = sd / f"lever-{slug}"
        st = r.kdens(st_dir, "distill", "--teacher", teacher, "--model", "mlp", "--model-arg", "hidden=16", *flags,
                     "--seed", 0, "--baseline", twin_dir, *recipe)
        out[name] = {"distilled": st["test_accuracy"], "twin": twin["test_accuracy"], "epochs": epochs,
                     "seconds": manifest_seconds(st_dir)}
    return out


def _ci(values: list[float], pct: bool = True) -> str:
    from bench_specialists import interval

    f = 100.0 if pct else 1.0
    i = interval(values)
    if i["half_width"] is None:
        return f"{f * i['mean']:.2f}"
    return f"{f * i['mean']:.2f} ± {f * i['half_width']:.2f}"


def summarize(per_seed: dict[int, dict], lever: dict | None) -> tuple[dict, str]:
    """The tables of BENCHMARKS.md and their numbers (means and 95% t-intervals over seeds)."""
    seeds = sorted(per_seed)
    col = lambda f: [f(per_seed[s]) for s in seeds]  # noqa: E731
    lines = [f"Seeds {', '.join(map(str, seeds))}; test split (5,000 images); mean ± 95% t-interval half-width "
             "over seeds, accuracy in %.", "",
             "| generalist | params | groups | generalist | + specialists | gain (points) | specialists used "
             "(dropped) | ARI of found groups | specialists' training s |", "|---|---|---|---|---|---|---|---|---|"]
    summary: dict = {"seeds": seeds, "specialists": {}, "students": {}}
    for g in GEN:
        for grouping in ("found", "true", "random"):
            rec = col(lambda o: o["specialists"][g][grouping])
            gen, comb = [x["generalist"] for x in rec], [x["combined"] for x in rec]
            gain = [c - a for a, c in zip(gen, comb)]
            dropped = [len(x["dropped"]) for x in rec]
            ari = _ci([x["ari_true"] for x in rec], pct=False) if grouping == "found" else "-"
            summary["specialists"][f"{g}/{grouping}"] = {"generalist": gen, "combined": comb, "gain": gain,
                                                         "dropped": dropped}
            lines.append(f"| MLP-{GEN[g]} | {per_seed[seeds[0]]['generalists'][g]['params']} | {grouping} | "
                         f"{_ci(gen)} | {_ci(comb)} | {_ci(gain)} | "
                         f"{np.mean([x['specialists'] - d for x, d in zip(rec, dropped)]):.1f} "
                         f"({np.mean(dropped):.1f}) | {ari} | {np.mean([x['train_seconds'] for x in rec]):.0f} |")
    lines += ["", f"Students distilled from generalist + specialists (found groups), T={KD['temperature']:g}, "
              f"alpha={KD['alpha']}, the generalist's recipe. Target: distilled >= twin + 1 point and "
              "distilled - generalist >= 50% of the specialists' gain.", "",
              "| generalist | student | params (x generalist) | distilled | hard-label twin | distilled - twin | "
              "kept share of the specialists' gain | target met (seeds) |", "|---|---|---|---|---|---|---|---|"]
    for g in GEN:
        for size in [*STUDENTS[g], *([f"{ALPHA09[g]}, alpha 0.9"] if g in ALPHA09 else [])]:
            rec = col(lambda o: o["students"][g][size])
            gen = col(lambda o: o["specialists"][g]["found"]["generalist"])
            comb = col(lambda o: o["specialists"][g]["found"]["combined"])
            dist, twin = [x["distilled"] for x in rec], [x["twin"] for x in rec]
            share = [(d - a) / (c - a) if c != a else math.nan for d, a, c in zip(dist, gen, comb)]
            met = [d - t >= 0.01 and s >= 0.5 for d, t, s in zip(dist, twin, share)]
            ratio = rec[0]["params"] / per_seed[seeds[0]]["generalists"][g]["params"]
            summary["students"][f"{g}/{size}"] = {"distilled": dist, "twin": twin, "generalist": gen,
                                                  "combined": comb, "kept_share": share, "target_met": met}
            how = " (alpha 0.9)" if "alpha" in size else ""
            lines.append(f"| MLP-{GEN[g]} | MLP-{rec[0]['hidden']}{how} | {rec[0]['params']} ({ratio:.2f}x) | {_ci(dist)} | "
                         f"{_ci(twin)} | {_ci([d - t for d, t in zip(dist, twin)])} | "
                         f"{100 * np.nanmean(share):.0f}% | {sum(met)}/{len(met)} |")
    if lever:
        s0 = per_seed[0]["specialists"]["g16"]["found"]
        lines += ["", f"Levers, seed 0, MLP-16 student from MLP-16 generalist ({100 * s0['generalist']:.2f}%) + "
                  f"specialists ({100 * s0['combined']:.2f}%); the twin has the same epochs:", "",
                  "| lever | distilled | twin | distilled - twin | kept share of gain |", "|---|---|---|---|---|"]
        base = per_seed[0]["students"]["g16"]["1x"]
        rows = {"T=4, alpha=0.1, 40 epochs (the table above)": {**base, "epochs": 40}, **lever}
        for name, x in rows.items():
            share = (x["distilled"] - s0["generalist"]) / s0["gain"] if s0["gain"] else math.nan
            lines.append(f"| {name} | {100 * x['distilled']:.2f} | {100 * x['twin']:.2f} | "
                         f"{100 * (x['distilled'] - x['twin']):+.2f} | {100 * share:.0f}% |")
        summary["levers"] = rows
    secs = {"generalist MLP-16": col(lambda o: o["generalists"]["g16"]["seconds"]),
            "generalist MLP-32": col(lambda o: o["generalists"]["g32"]["seconds"]),
            **{f"specialists ({gr}) on MLP-{GEN[g]}": col(lambda o, g=g, gr=gr: o["specialists"][g][gr]["seconds"])
               for g in GEN for gr in ("found", "true", "random")},
            **{f"student MLP-{STUDENTS[g][sz]} (from MLP-{GEN[g]} + specialists)":
               col(lambda o, g=g, sz=sz: o["students"][g][sz]["seconds"]) for g in GEN for sz in STUDENTS[g]}}
    lines += ["", "Wall seconds per stage (manifest wall_seconds; mean over seeds, 1 thread, shared machine):", "",
              "| stage | seconds |", "|---|---|"] + [f"| {k} | {np.mean(v):.0f} |" for k, v in secs.items()]
    summary["seconds"] = secs
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/many-class"), help="run folders go under it")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-levers", action="store_true", help="skip the seed-0 levers")
    ap.add_argument("--only-generalists", action="store_true", help="train the generalists and stop")
    ap.add_argument("--out", default="bench/results/many-class", help="writes OUT.json, OUT.md and OUT.log")
    args = ap.parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    r = Runner(out.with_suffix(".log"))
    data, unl = args.runs / "data.npz", args.runs / "unlabeled.npz"
    if not data.exists():
        many_class.write(data, 20_000, 5_000, seed=0, noise=0.15)
    if not unl.exists() and not args.no_levers:
        many_class.write_unlabeled(unl, 60_000, seed=7, noise=0.15)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.only_generalists:
        for s in seeds:
            for g, hidden in GEN.items():
                r.kdens(args.runs / f"s{s}" / g, "train-generalist", "--data", data, "--model", "mlp", "--model-arg",
                        f"hidden={hidden}", "--seed", s, *GEN_RECIPE)
        return
    per_seed = {s: one_seed(r, args.runs, data, s) for s in seeds}
    lever = levers(r, args.runs, data, unl) if not args.no_levers and 0 in seeds else None
    summary, md = summarize(per_seed, lever)
    result = {"command": " ".join([sys.executable, *sys.argv]), "kdens_commands": r.commands,
              "data": {"train": 20_000, "test": 5_000, "noise": 0.15, "generator": "bench/many_class.py"},
              "summary": summary, "per_seed": per_seed, "wall_seconds_this_call": round(time.time() - t0, 1),
              "kdens_runs": len(set(r.outs)),
              "kdens_wall_seconds": round(sum(manifest_seconds(o) for o in set(r.outs)), 1)}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md += (f"\nAll {result['kdens_runs']} kdens runs together: {result['kdens_wall_seconds'] / 60:.0f} minutes wall "
           "(their manifests' wall_seconds), one thread each, one at a time.\n")
    out.with_suffix(".md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
