"""How much a teacher says beyond the label: its softmax at a few temperatures on the training split.

A teacher that is almost always certain gives a temperature-1 loss almost nothing but the
label. This prints, per temperature T, over the training images: the mean probability of the
teacher's top class, the median probability mass on all other classes, and the share of images
whose other classes hold more than 1% (BENCHMARKS 6 uses it to explain why DIST at tau = 1
trails on MNIST but not on Fashion-MNIST):

    OMP_NUM_THREADS=1 .venv/bin/python bench/teacher_softness.py --teacher runs/hinton-mnist/generalist \\
        --data mnist --val-fraction 0 --temperatures 1,2,4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.teachers import load_teacher, teacher_log_probs  # noqa: E402
from kdens.data import load_dataset  # noqa: E402


def softness(log_probs: torch.Tensor, temperature: float) -> dict:
    """Top-class probability, other-class mass and the share of rows with other mass > 1%, at T."""
    # log-probabilities differ from logits by a per-row constant, which the softmax ignores
    top = torch.softmax(log_probs.double() / temperature, dim=1).max(dim=1).values
    other = 1.0 - top
    return {"temperature": temperature, "mean_top_probability": round(float(top.mean()), 4),
            "median_other_mass": float(f"{float(other.median()):.3g}"),
            "share_other_mass_over_1pct": round(float((other > 0.01).double().mean()), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="a trained teacher run folder")
    ap.add_argument("--data", required=True, help="any kdens --data")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="as the distillation runs used [0.1]")
    ap.add_argument("--temperatures", default="1,2,4")
    args = ap.parse_args(argv)
    data = load_dataset(args.data, val_fraction=args.val_fraction)
    lp = teacher_log_probs(load_teacher(args.teacher), data.x_train)
    rows = [softness(lp, float(t)) for t in args.temperatures.split(",")]
    print(json.dumps({"teacher": args.teacher, "data": args.data, "train_images": len(lp), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
