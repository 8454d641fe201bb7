"""Throughput of the generalist + specialists combination (specialists.combine.combine).

Random Fashion-MNIST-shaped problems: C = 10 classes, the three groups the clusterer
finds on Fashion-MNIST, softmax outputs of Gaussian logits. Reports examples/second
(best of --repeats), the solver's iteration count and the largest stationarity (KKT)
residual. Not a test; run it by hand:

    .venv/bin/python bench/bench_combine.py                 # N=200,000, top-1, 2 threads
    .venv/bin/python bench/bench_combine.py --top-n 1,2,3 --threads 1 --json out.json

The machine's load average is printed too: on a shared 2-core box, 2 threads contend
with other processes and can be several times slower than 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from specialists.combine import active_specialists, combine, kkt_residual

GROUPS = [[0, 2, 4, 6], [5, 7, 9], [1, 3, 8]]  # T-shirt/Pullover/Coat/Shirt, footwear, the rest


def problem(n: int, dtype: torch.dtype, scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p_g = torch.softmax(torch.randn(n, 10, generator=g, dtype=torch.float64) * scale, 1).to(dtype)
    specs = [
        torch.softmax(torch.randn(n, len(s) + 1, generator=g, dtype=torch.float64) * scale, 1).to(dtype)
        for s in GROUPS
    ]
    return p_g, specs


def run(n: int, top_n: int, dtype: torch.dtype, tol: float, repeats: int, scale: float) -> dict:
    p_g, specs = problem(n, dtype, scale)
    active = active_specialists(p_g, GROUPS, top_n)
    combine(p_g[:1000], [s[:1000] for s in specs], GROUPS, active[:1000], tol=tol)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        log_q, n_iter = combine(p_g, specs, GROUPS, active, tol=tol)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    active_specialists(p_g, GROUPS, top_n)
    t_active = time.perf_counter() - t0
    return {
        "n": n,
        "top_n": top_n,
        "dtype": str(dtype).replace("torch.", ""),
        "tol": tol,
        "seconds": min(times),
        "examples_per_s": n / min(times),
        "iterations": n_iter,
        "rows_with_2plus_active": int((active.sum(1) >= 2).sum()),
        "max_kkt_residual": float(kkt_residual(log_q, p_g, specs, GROUPS, active).max()),
        "active_specialists_seconds": t_active,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="examples per problem (default 200,000)")
    ap.add_argument("--top-n", default="1", help="comma-separated top-n values (default 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--tol", type=float, default=1e-6, help="solver tolerance (default 1e-6)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported (default 3)")
    ap.add_argument("--scale", type=float, default=3.0, help="std of the random logits (default 3)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load:.2f}, N={args.n:,}")
    results = []
    for top_n in [int(t) for t in args.top_n.split(",")]:
        for dtype in (torch.float32, torch.float64):
            r = run(args.n, top_n, dtype, args.tol, args.repeats, args.scale)
            results.append(r)
            print(
                f"top-{top_n} {r['dtype']:>7}: {r['examples_per_s']:>12,.0f} ex/s  "
                f"({r['seconds'] * 1e3:7.1f} ms, {r['iterations']:2d} iterations, "
                f"{r['rows_with_2plus_active']:,} rows with >= 2 active, "
                f"max KKT residual {r['max_kkt_residual']:.1e})"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": args.threads, "load_average": load, "torch": torch.__version__}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
