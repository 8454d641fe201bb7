"""Distillation under torchrun: 2 CPU processes (gloo) train the same student as one process.

DDP splits each global batch between the ranks (``idx[rank::2]``) and averages their
gradients; with an even batch size, an even transfer set, no dropout and no jitter that
is the full batch's gradient up to float32 summation order, so the weights agree to a
small tolerance (stated below) rather than bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.config import DistillConfig
from distill.stage import run
from kdens.config import GeneralistConfig, build
from kdens.models import load_model

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # max |w_ddp - w_single| after 3 epochs (measured 4.5e-8): float32 summation order only
LAUNCH = "import sys; from kdens.app.cli_distill import distill_cmd; distill_cmd(sys.argv[1:], prog_name='kdens distill')\n"


def _even_fraction(y: np.ndarray) -> float:
    from distill.transfer import stratified_fraction

    for f in (0.5, 0.45, 0.55, 0.4, 0.6):
        if len(stratified_fraction(y, f, 0)) % 2 == 0:
            return f
    raise AssertionError("no candidate fraction gives an even transfer set")


def test_two_ranks_match_one_process(tmp_path, digits):
    from generalist import stage as generalist

    teacher = generalist.run(build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [32]},
                                                      "epochs": 3, "batch_size": 64}),
                             tmp_path / "gen", progress=False)
    frac = _even_fraction(digits.y_train)  # with an even batch size every batch splits in two equal halves
    flags = {"teacher": str(teacher), "model": "mlp", "model_args": {"hidden": [16]}, "transfer": f"fraction={frac}",
             "temperature": 3.0, "alpha": 0.2, "epochs": 3, "batch_size": 32, "device": "cpu"}
    single = run(build(DistillConfig, flags), tmp_path / "single", progress=False)

    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    args = ["--teacher", str(teacher), "--model", "mlp", "--model-arg", "hidden=16", "--transfer", f"fraction={frac}",
            "--temperature", "3", "--alpha", "0.2", "--epochs", "3", "--batch-size", "32", "--device", "cpu",
            "--quiet", "--cache-dir", str(tmp_path / "ddp_cache"), "--out", str(tmp_path / "ddp")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ddp = tmp_path / "ddp"
    manifest = json.loads((ddp / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["stage"] == "student"
    assert sorted(p.name for p in ddp.iterdir()) == ["history.json", "manifest.json", "metrics.json",
                                                      "model.json", "model.safetensors"]
    assert manifest["soft_targets"]["reused"] is False  # rank 0 built it, once
    assert len(list((tmp_path / "ddp_cache").iterdir())) == 1

    # the cache the two ranks built (each scored half the transfer set) is the one process's cache
    (one,), (two,) = (tmp_path / "soft_targets").iterdir(), (tmp_path / "ddp_cache").iterdir()
    assert one.name == two.name  # the same key: teacher, data and transfer set
    shards = json.loads((two / "manifest.json").read_text())["shards"]
    assert len(shards) == 2 and shards[0][0] == 0 and shards[0][1] == shards[1][0] > 0
    np.testing.assert_allclose(np.load(two / "logits.npy"), np.load(one / "logits.npy"), rtol=0, atol=1e-5)
    assert shards[1][1] == len(np.load(one / "logits.npy"))

    a, b = load_model(single)[0].state_dict(), load_model(ddp)[0].state_dict()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < ATOL, f"DDP weights differ from one process by {diff:.2e}"
    ma = json.loads((single / "metrics.json").read_text())
    mb = json.loads((ddp / "metrics.json").read_text())
    assert abs(ma["test_errors"] - mb["test_errors"]) <= 1
    assert ma["teacher_agreement"] == pytest.approx(mb["teacher_agreement"], abs=2 / len(digits.y_test))
    assert ma["val_nll"] == pytest.approx(mb["val_nll"], abs=1e-3)


SHARDED = """
import sys, numpy as np, torch
from pathlib import Path
from distill.loop import cached_targets
torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
teacher = torch.nn.Linear(5, 3).eval()
x = np.random.default_rng(0).normal(size=(101, 5)).astype(np.float32)
rank, lines = torch.distributed.get_rank(), []
for _ in range(2):  # built sharded, then found and reused by every rank
    scores, info = cached_targets(Path(sys.argv[1]), "k", x, teacher, torch.device("cpu"), 16, False, {})
    lines.append(f"{rank} {info['reused']} {float(scores.sum())}\\n")
# one file per rank: two ranks printing to one pipe can interleave their lines
(Path(sys.argv[1]).parent / f"rank{rank}.txt").write_text("".join(lines))
torch.distributed.destroy_process_group()
"""


def test_sharded_cache_with_uneven_shards_equals_one_process(tmp_path):
    import torch

    from distill.cache import build_or_load

    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(line.split() for k in (0, 1) for line in (tmp_path / f"rank{k}.txt").read_text().splitlines())
    assert [(r, reused) for r, reused, _ in lines] == [("0", "False"), ("0", "True"), ("1", "False"), ("1", "True")]
    assert len({total for *_, total in lines}) == 1  # every rank trains on the same scores

    manifest = json.loads((tmp_path / "cache" / "k" / "manifest.json").read_text())
    assert manifest["shards"] == [[0, 50], [50, 101]] and manifest["shape"] == [101, 3]
    torch.manual_seed(0)
    teacher = torch.nn.Linear(5, 3).eval()
    x = np.random.default_rng(0).normal(size=(101, 5)).astype(np.float32)
    single, _ = build_or_load(tmp_path / "single", "k", x, teacher, 16, "cpu", False)
    sharded = np.load(tmp_path / "cache" / "k" / "logits.npy")
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-6)
    # the sharded cache is an ordinary one: a single process finds it, checksum verified
    again, info = build_or_load(tmp_path / "cache", "k", x, teacher, 16, "cpu", False)
    assert info["reused"] and np.array_equal(again, sharded)
