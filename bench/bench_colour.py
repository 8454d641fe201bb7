"""Colour images end to end (issue 12): uint8 NHWC RGB data to an int8 TFLite file that takes it.

Data: ``bench/colour_shapes.py`` -- 8 left-right symmetric shapes on random-colour 16x16 RGB
backgrounds, stored as uint8 NHWC; 2,000 training images (10% of them validation) and 1,000
test images. Every run uses ``--augment crop,flip`` (reflect-pad 2 px and crop back, mirror
with p = 1/2) and AdamW, lr 0.003, batch 64, 15 epochs, patience 15 (no early cut):

* **teacher**: ``cnn`` (width 32, three conv blocks, BatchNorm, hidden 128, dropout 0.1);
* **hard-label student**: ``mobilenet`` (width 0.5, last 128), trained on the labels alone;
* **distilled student**: the same ``mobilenet`` distilled from the teacher (kd, T = 4, alpha
  0.1); under augmentation the teacher runs online on exactly the views the student sees;
* **int8 artifact**: ``kdens deploy --target tflite --quantize int8`` of the distilled student;
  the file takes the uint8 NHWC test arrays as they are (its report's ``input`` entry), and its
  accuracy is measured on them in ai_edge_litert (and tflite-runtime 2.14 where its venv exists).

One seed (0): a single run per line, so differences of a point or two are within noise.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_colour.py --runs runs/colour --out bench/results/colour
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from colour_shapes import CLASS_NAMES, make  # noqa: E402

RECIPE = ["--augment", "crop,flip", "--optimizer", "adamw", "--lr", "0.003", "--batch-size", "64",
          "--epochs", "15", "--patience", "15", "--seed", "0"]
TEACHER = ["--model", "cnn", "--model-arg", "size=small", "--model-arg", "width=32", "--model-arg", "depth=3",
           "--model-arg", "hidden=128", "--model-arg", "batchnorm=true", "--model-arg", "dropout=0.1"]
STUDENT = ["--model", "mobilenet", "--model-arg", "width=0.5", "--model-arg", "last=128"]


class Runner:
    """Runs kdens commands one at a time, single-threaded, logging them; finished folders are reused."""

    def __init__(self, log: Path):
        self.log = log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        self.commands: list[str] = []
        self.cpu_seconds = 0.0

    def run(self, done: Path, *args, allowed: tuple[int, ...] = (0,)) -> None:
        cmd = [sys.executable, "-m", "kdens", *map(str, args)]
        self.commands.append(" ".join(cmd))
        if done.exists():
            return
        with open(self.log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            t0, c0 = time.time(), os.times()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, check=False).returncode
            c1 = os.times()
            cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
            self.cpu_seconds += cpu
            f.write(f"# rc={rc} wall={time.time() - t0:.1f}s cpu={cpu:.1f}s\n")
        if rc not in allowed:
            raise SystemExit(f"failed (exit {rc}): {' '.join(cmd)}; see {self.log}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=Path("runs/colour"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "colour")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    a = p.parse_args(argv)
    a.runs.mkdir(parents=True, exist_ok=True)
    data = a.runs / "data.npz"
    if not data.exists():  # the generator's defaults: 16x16, noise 0.05, seed 0 (test: seed + 1,000,003)
        (xa, ya), (xb, yb) = make(a.train, 16, 0, 0.05), make(a.test, 16, 1_000_003, 0.05)
        np.savez_compressed(data, x_train=xa, y_train=ya, x_test=xb, y_test=yb, class_names=np.array(CLASS_NAMES))
    r = Runner(a.runs / "log.txt")
    t0 = time.time()
    r.run(a.runs / "teacher" / "manifest.json", "train-generalist", "--data", data, *TEACHER, *RECIPE, "--quiet",
          "--out", a.runs / "teacher")
    r.run(a.runs / "hard" / "manifest.json", "train-generalist", "--data", data, *STUDENT, *RECIPE, "--quiet",
          "--out", a.runs / "hard")
    r.run(a.runs / "distilled" / "manifest.json", "distill", "--teacher", a.runs / "teacher", *STUDENT, *RECIPE,
          "--temperature", "4", "--alpha", "0.1", "--quiet", "--out", a.runs / "distilled")
    r.run(a.runs / "deploy" / "tflite-int8" / "manifest.json", "deploy", "--model", a.runs / "distilled",
          "--target", "tflite", "--quantize", "int8", "--threads", "1", "--batch-sizes", "1,32",
          "--out", a.runs / "deploy", allowed=(0, 1))  # a failed check is a result: its report says which

    def metrics(name: str) -> dict:
        m = json.loads((a.runs / name / "metrics.json").read_text())
        man = json.loads((a.runs / name / "manifest.json").read_text())
        return {"test_accuracy": m["test_accuracy"], "params": m.get("params"),
                "wall_seconds": man.get("wall_seconds"), "augment": man["config"]["train"].get("augment")}

    rep = json.loads((a.runs / "deploy" / "tflite-int8" / "report.json").read_text())
    result = {
        "data": {"spec": str(data), "train": a.train, "test": a.test, "image": "16x16 RGB uint8 NHWC",
                 "classes": CLASS_NAMES},
        "seed": 0,
        "teacher": metrics("teacher"), "hard_student": metrics("hard"), "distilled_student": metrics("distilled"),
        "soft_targets": json.loads((a.runs / "distilled" / "metrics.json").read_text()).get("soft_targets"),
        "int8_tflite": {"accuracy": rep["accuracy"], "float_accuracy": rep["float_accuracy"],
                        "agreement": rep["agreement"], "size_bytes": rep["size_bytes"], "input": rep["input"],
                        "verdict": rep["verdict"], "failures": rep.get("failures"),
                        "tflite_runtime": {k: rep["runtimes"].get("tflite_runtime", {}).get(k)
                                           for k in ("loads", "agreement", "agreement_host_runtime", "error")},
                        "latency_b1_t1_p50_ms": rep["latency_ms"].get("b1_t1", {}).get("p50")},
        "commands": r.commands,
        "wall_seconds_this_call": round(time.time() - t0, 1),
        "cpu_seconds_this_call": round(r.cpu_seconds, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    t = result
    rows = [("teacher (cnn, BN)", t["teacher"]), ("hard-label student (mobilenet 0.5)", t["hard_student"]),
            ("distilled student (mobilenet 0.5, T=4, alpha=0.1)", t["distilled_student"])]
    md = ["| model | params | test accuracy (%) |", "|---|---|---|"]
    md += [f"| {name} | {m['params']} | {100 * m['test_accuracy']:.2f} |" for name, m in rows]
    md.append(f"| int8 TFLite of the distilled student (uint8 NHWC input) | | {100 * rep['accuracy']:.2f} |")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
