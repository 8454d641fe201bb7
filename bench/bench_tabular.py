"""Tabular features end to end: a CSV in natural units -> teacher -> distilled MLP -> int8 ONNX, beside a
scikit-learn logistic regression.

The data is scikit-learn's ``make_classification`` (5 classes, 16 features of which 8 informative
and 4 redundant, two clusters per class, 1% flipped labels), each feature then given its own
scale (10^-3 to 10^4) and offset, so the columns look like raw measurements; written as
``train.csv`` and ``test.csv``. Every kdens step is the CLI a user would type, run in a child
process; the floor is ``StandardScaler + LogisticRegression`` fitted on the same training rows
(kdens holds out 10% of them for validation; the floor uses them all).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_tabular.py --out bench/results/tabular
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_data(folder: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=16, n_informative=8, n_redundant=4, n_classes=5,
                               n_clusters_per_class=2, flip_y=0.01, random_state=seed)
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 4, x.shape[1])
    offset = rng.uniform(-5, 5, x.shape[1]) * scale * 10
    x = x * scale + offset  # natural units: columns from ~1e-3 to ~1e5, none centred
    cut = n * 4 // 5
    header = ",".join(f"f{j:02d}" for j in range(x.shape[1])) + ",label"
    for name, rows, labels in (("train.csv", x[:cut], y[:cut]), ("test.csv", x[cut:], y[cut:])):
        lines = [header] + [",".join(f"{v:.6g}" for v in r) + f",c{c}" for r, c in zip(rows, labels)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return x[:cut], y[:cut], x[cut:], y[cut:]


def kdens(args: list[str], log: list[dict]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kdens", *args], env=env, capture_output=True, text=True)
    log.append({"command": "kdens " + shlex.join(args), "seconds": round(time.perf_counter() - t0, 1),
                "exit": proc.returncode})
    if proc.returncode != 0:
        raise SystemExit(f"kdens {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def floor(x_tr, y_tr, x_te, y_te) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_tr, y_tr)
    return {"test_accuracy": float((lr.predict(x_te) == y_te).mean()), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=None, help="results prefix: writes PREFIX.json and PREFIX.md")
    a = p.parse_args(argv)
    res: dict = {"argv": sys.argv[1:], "rows": a.rows, "seed": a.seed}
    log: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kdens-tabular-") as tmp:
        w = Path(tmp)
        x_tr, y_tr, x_te, y_te = make_data(w, a.rows, a.seed)
        res["feature_ranges"] = [[float(lo), float(hi)] for lo, hi in zip(x_tr.min(0), x_tr.max(0))]
        data = f"{w / 'train.csv'},{w / 'test.csv'}"
        # --patience 10: the default when these numbers were measured (early stopping is off by default now)
        common = ["--epochs", str(a.epochs), "--optimizer", "adamw", "--batch-size", "128", "--patience", "10",
                  "--quiet"]
        kdens(["train-generalist", "--data", data, "--model", "mlp", "--model-arg", "hidden=256,256",
               *common, "--out", str(w / "teacher")], log)
        kdens(["train-generalist", "--data", data, "--model", "mlp", "--model-arg", "hidden=32",
               *common, "--out", str(w / "twin")], log)
        kdens(["distill", "--teacher", str(w / "teacher"), "--model", "mlp", "--model-arg", "hidden=32",
               "--temperature", str(a.temperature), "--alpha", str(a.alpha), *common, "--baseline", str(w / "twin"),
               "--out", str(w / "student")], log)
        kdens(["deploy", "--model", str(w / "student"), "--target", "onnx", "--quantize", "int8", "--threads", "1",
               "--batch-sizes", "1", "--out", str(w / "deploy")], log)
        for name in ("teacher", "twin", "student"):
            m = json.loads((w / name / "metrics.json").read_text())
            res[name] = {"test_accuracy": m["test_accuracy"], "params": m.get("params")}
        rep = json.loads((w / "deploy" / "onnx-int8" / "report.json").read_text())
        res["onnx_int8"] = {k: rep.get(k) for k in ("accuracy", "float_accuracy", "agreement", "size_bytes",
                                                    "float_size_bytes", "latency_ms")}
    res["logistic_regression"] = floor(x_tr, y_tr, x_te, y_te)
    res["commands"] = log
    text = report(res)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_name(a.out.name + ".json").write_text(json.dumps(res, indent=2) + "\n")
        a.out.with_name(a.out.name + ".md").write_text(text + "\n")
    return 0


def report(res: dict) -> str:
    q = res["onnx_int8"]
    rows = [("teacher MLP 256-256", res["teacher"]["test_accuracy"], res["teacher"]["params"]),
            ("hard-label MLP-32 (twin)", res["twin"]["test_accuracy"], res["twin"]["params"]),
            ("distilled MLP-32 (PyTorch)", res["student"]["test_accuracy"], res["student"]["params"]),
            ("distilled MLP-32, ONNX int8", q["accuracy"], None),
            ("StandardScaler + LogisticRegression", res["logistic_regression"]["test_accuracy"], None)]
    lines = ["| model | test accuracy | parameters |", "|---|---|---|"]
    lines += [f"| {n} | {100 * acc:.2f}% | {p if p is not None else ''} |" for n, acc, p in rows]
    lines += ["", f"int8 file {q['size_bytes']:,} bytes (float {q['float_size_bytes']:,}); agreement with the "
              f"float model {q['agreement']:.4f}; latency {json.dumps(q['latency_ms'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
