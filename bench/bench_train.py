"""Training throughput: kdens.train.fit vs a bare PyTorch loop doing the same arithmetic.

Same model (mlp 1200-1200), data, batch size, optimizer (SGD, Nesterov momentum, weight
decay on weights only), per-step LR, no jitter, no validation pass. The two are run
alternately in one process so machine noise hits both; the median ratio is reported.

    .venv/bin/python bench/bench_train.py --data fashion-mnist --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kdens.data import load_dataset
from kdens.models import build_model
from kdens.train import TrainConfig, _make_optimizer, fit


def bare_epoch(model, x, y, cfg: TrainConfig, seed: int) -> float:
    """The plainest loop: shuffle, slice, forward, CE, backward, step."""
    opt = _make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t = time.perf_counter()
    perm = torch.randperm(len(x), generator=g)
    for idx in perm.split(cfg.batch_size):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--hidden", default="1200,1200")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    hidden = [int(h) for h in args.hidden.split(",")]
    cfg = TrainConfig(epochs=1, batch_size=128, patience=None, device="cpu", seed=0)
    kd, bare = [], []
    for rep in range(args.reps + 1):  # the first round warms up allocators and caches
        m = build_model("mlp", ds.num_classes, ds.input_shape, hidden=hidden)
        r = fit(m, x, y, None, None, cfg, progress=False)
        m2 = build_model("mlp", ds.num_classes, ds.input_shape, hidden=hidden)
        b = bare_epoch(m2, x, y, cfg, seed=rep)
        if rep:
            kd.append(r.history[0]["seconds"])
            bare.append(b)
    ratio = statistics.median(k / b for k, b in zip(kd, bare))
    result = {"data": args.data, "model": f"mlp {args.hidden}", "examples": len(y), "threads": args.threads,
              "kdens_epoch_s": kd, "bare_epoch_s": bare, "median_ratio": round(ratio, 3),
              "target": "<= 1.2"}
    print(json.dumps(result, indent=2))
    if args.out:
        from kdens.artifacts import atomic_write_json
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
