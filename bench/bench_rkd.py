"""RKD's angle term per training step: autograd through the N^3 angles vs the hand-derived gradient.

For each batch size, one step of the angle loss (teacher angles, student angles, smooth L1,
backward to the student's features) computed two ways on the same random ReLU features
(student 800 wide, teacher 1200, as the MNIST pair; ``--student-width 64 --teacher-width 64``
for the digits MLPs): the readable definition ``angles`` differentiated by autograd (what
``rkd`` trained with before: explicit differences for features no wider than the batch,
float64 Gram arithmetic otherwise) and ``rkd_angle``, which kdens trains with now. The two
are timed alternately, repeat by repeat, so that load on the machine hits both alike;
reported: the median milliseconds per step of each, their ratio, and how far the new loss
and gradient are from the old (relative).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rkd.py --out bench/results/rkd.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distill.methods.rkd import angles, rkd_angle
from kdens.artifacts import atomic_write_json, atomic_write_text


def _autograd_step(s: torch.Tensor, t: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        target = angles(t)
    loss = F.smooth_l1_loss(angles(s), target)
    (g,) = torch.autograd.grad(loss, s)
    return loss.item(), g


def _kdens_step(s: torch.Tensor, t: torch.Tensor) -> tuple[float, torch.Tensor]:
    loss = rkd_angle(s, t)
    (g,) = torch.autograd.grad(loss, s)
    return loss.item(), g


def _time(fn, s, t) -> float:
    t0 = time.perf_counter()
    fn(s, t)
    return (time.perf_counter() - t0) * 1000


def measure(batch: int, student_width: int, teacher_width: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(batch)
    s = torch.relu(torch.randn(batch, student_width, generator=gen)).requires_grad_(True)
    t = torch.relu(torch.randn(batch, teacher_width, generator=gen))
    (l_old, g_old), (l_new, g_new) = _autograd_step(s, t), _kdens_step(s, t)  # also the warm-up
    old, new = [], []
    for _ in range(repeats):
        old.append(_time(_autograd_step, s, t))
        new.append(_time(_kdens_step, s, t))
    m_old, m_new = statistics.median(old), statistics.median(new)
    return {"batch": batch, "autograd_ms": round(m_old, 2), "kdens_ms": round(m_new, 2),
            "speedup": round(m_old / m_new, 2), "loss_rel_diff": abs(l_new - l_old) / abs(l_old),
            "grad_rel_diff": ((g_new - g_old).abs().max() / g_old.abs().max()).item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,128,256", help="comma-separated batch sizes")
    ap.add_argument("--student-width", type=int, default=800)
    ap.add_argument("--teacher-width", type=int, default=1200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("bench/results/rkd.json"))
    args = ap.parse_args(argv)
    rows = [measure(int(b), args.student_width, args.teacher_width, args.repeats) for b in args.batches.split(",")]
    result = {"threads": torch.get_num_threads(), "student_width": args.student_width,
              "teacher_width": args.teacher_width, "repeats": args.repeats, "rows": rows}
    atomic_write_json(args.out, result)
    title = (f"RKD angle term, one step (student {args.student_width} wide, teacher {args.teacher_width}; "
             f"{torch.get_num_threads()} thread(s), median of {args.repeats})")
    lines = [title, "",
             "| batch | autograd ms | kdens ms | speedup | loss rel. diff | grad rel. diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['autograd_ms']} | {r['kdens_ms']} | {r['speedup']}x | "
              f"{r['loss_rel_diff']:.1e} | {r['grad_rel_diff']:.1e} |" for r in rows]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
