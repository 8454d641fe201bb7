"""Which k-means should find the specialists' groups? (issue 17, item 4)

For each finished generalist run, its softmax predictions on its validation split (what
``kdens train-specialists`` clusters) are clustered by ``specialists.cluster.ConfusionClusterer``
with the default affinity (``normalized``) and each candidate algorithm, once per k-means
seed (10 seeds), and for each K given. Reported per (run, K, algorithm):

* **stability**: the mean (and smallest) adjusted Rand index (ARI) between the groupings
  of every pair of seeds, and how many distinct groupings the seeds found;
* **ARI against the true groups**, when the run's data is an .npz holding ``groups``
  (the many-class set of ``bench/many_class.py``): mean and worst over the seeds;
* **inertia** relative to the lowest found for that (run, K) by any candidate and seed
  (k-means' own objective on the same matrix: 0% = as good as the best found);
* seconds per fit.

Candidates: ``minibatch`` with n_init=10 (the default before issue 17), ``kmeans`` (Lloyd)
with n_init=10 and 100, and both with n_init=1 for scale. Where the true groups are known,
their own inertia (the true partition scored by k-means' objective on the same matrix) says
whether finding them is a search problem (true inertia lowest) or not (the objective prefers
another grouping, and more restarts cannot help).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_clustering.py \\
        --run digits-s0=runs/clu/digits-s0 --run fm=runs/fm/mlp256 \\
        --run mc-g32-s0=runs/many-class/s0/g32 --k digits-s0=3,4,5 --k fm=3,4,5 \\
        --out bench/results/clustering
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATES = {"minibatch, n_init=10": ("minibatch", 10), "kmeans, n_init=10": ("kmeans", 10),
              "kmeans, n_init=100": ("kmeans", 100), "minibatch, n_init=1": ("minibatch", 1),
              "kmeans, n_init=1": ("kmeans", 1)}
SEEDS = list(range(10))


def predictions(run: Path) -> tuple[np.ndarray, list[list[int]] | None]:
    """(validation softmax (N, C), the true groups if the data .npz carries them)."""
    import torch

    from kdens.artifacts import read_manifest
    from kdens.models import load_model
    from kdens.runs import data_config, run_data
    from kdens.train import predict_logits

    man = read_manifest(run, "generalist")
    data = run_data(man)
    model, _ = load_model(run)
    p = torch.softmax(predict_logits(model, data.x_val).double(), 1).numpy()
    spec = Path(str(data_config(man)["data"]))
    truth = None
    if spec.suffix == ".npz" and spec.is_file():
        with np.load(spec, allow_pickle=False) as z:
            if "groups" in z.files:
                truth = [[int(k) for k in g.split(",")] for g in str(z["groups"]).split(";")]
    return p, truth


def labels_of(groups: list[list[int]], num_classes: int) -> np.ndarray:
    lab = np.full(num_classes, -1)
    for i, g in enumerate(groups):
        lab[g] = i
    return lab


def measure(p: np.ndarray, k: int, truth: list[list[int]] | None) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from specialists.cluster import ConfusionClusterer, seed_stability

    out: dict = {}
    for name, (algo, n_init) in CANDIDATES.items():
        fits, seconds = [], []
        for s in SEEDS:
            t0 = time.perf_counter()
            est = ConfusionClusterer(k, "normalized", algo, random_state=s, n_init=n_init).fit(p)
            seconds.append(time.perf_counter() - t0)
            fits.append(est)
        stab = seed_stability(ConfusionClusterer(k, "normalized", algo, random_state=SEEDS[0], n_init=n_init), p,
                              len(SEEDS))
        rec = {"algorithm": algo, "n_init": n_init, "stability": stab,
               "inertia": [f.inertia_ for f in fits], "seconds_per_fit": float(np.mean(seconds)),
               "groups_seed0": fits[0].all_groups_}
        if truth is not None:
            ari = [adjusted_rand_score(labels_of(truth, p.shape[1]), f.labels_) for f in fits]
            rec.update(ari_true_mean=float(np.mean(ari)), ari_true_min=float(np.min(ari)),
                       exact_true=int(sum(a == 1.0 for a in ari)))
        out[name] = rec
    best = min(min(r["inertia"]) for r in out.values())
    for r in out.values():
        r["excess_inertia_pct"] = float(100 * (np.mean(r["inertia"]) / best - 1)) if best > 0 else 0.0
    if truth is not None:
        aff = fits[0].affinity_.T  # (C, C): one point per class
        lab = labels_of(truth, p.shape[1])
        true_inertia = float(sum(((aff[lab == c] - aff[lab == c].mean(0)) ** 2).sum() for c in np.unique(lab)))
        for r in out.values():
            r["true_groups_excess_inertia_pct"] = float(100 * (true_inertia / best - 1))
    return out


def table(results: dict) -> str:
    lines = ["| run | K | candidate | mean pairwise ARI (min) | distinct groupings / 10 seeds | ARI vs true groups, "
             "mean (min) | exact / 10 | excess inertia (true groups') | ms per fit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run, per_k in results.items():
        for k, per_c in per_k.items():
            for name, r in per_c.items():
                st = r["stability"]
                tru = (f"{r['ari_true_mean']:.3f} ({r['ari_true_min']:.3f})", str(r["exact_true"])) \
                    if "ari_true_mean" in r else ("-", "-")
                lines.append(f"| {run} | {k} | {name} | {st['mean_pairwise_ari']:.3f} ({st['min_pairwise_ari']:.3f}) | "
                             f"{st['distinct_partitions']} | {tru[0]} | {tru[1]} | {r['excess_inertia_pct']:.1f}%"
                             + (f" ({r['true_groups_excess_inertia_pct']:.1f}%)" if "true_groups_excess_inertia_pct" in r
                                else "") + " | "
                             f"{1000 * r['seconds_per_fit']:.0f} |")
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    """Per candidate, means over every (run, K)."""
    rows: dict[str, dict[str, list]] = {}
    for per_k in results.values():
        for per_c in per_k.values():
            for name, r in per_c.items():
                d = rows.setdefault(name, {"stab": [], "true": [], "excess": [], "ms": []})
                d["stab"].append(r["stability"]["mean_pairwise_ari"])
                d["excess"].append(r["excess_inertia_pct"])
                d["ms"].append(1000 * r["seconds_per_fit"])
                if "ari_true_mean" in r:
                    d["true"].append(r["ari_true_mean"])
    lines = ["| candidate | mean pairwise ARI over seeds (mean over runs, K) | ARI vs true groups (many-class) | "
             "excess inertia | ms per fit |", "|---|---|---|---|---|"]
    for name, d in rows.items():
        tru = f"{np.mean(d['true']):.3f}" if d["true"] else "-"
        lines.append(f"| {name} | {np.mean(d['stab']):.3f} | {tru} | {np.mean(d['excess']):.1f}% | "
                     f"{np.mean(d['ms']):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="NAME=RUN", help="a finished generalist run")
    ap.add_argument("--k", action="append", default=[], metavar="NAME=K1,K2",
                    help="cluster counts for a run [its true group count, else 3,4,5]")
    ap.add_argument("--out", default="bench/results/clustering", help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    ks = {n: [int(v) for v in s.split(",")] for n, s in (a.split("=", 1) for a in args.k)}
    results: dict = {}
    for item in args.run:
        name, run = item.split("=", 1)
        p, truth = predictions(Path(run))
        results[name] = {k: measure(p, k, truth) for k in ks.get(name, [len(truth)] if truth else [3, 4, 5])}
        print(f"{name}: done", flush=True)
    md = "Summary (mean over runs and K):\n\n" + summary(results) + "\nEvery run and K:\n\n" + table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                                    "seeds": SEEDS, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md, end="")


if __name__ == "__main__":
    main()
