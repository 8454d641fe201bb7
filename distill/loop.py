"""The distillation loop's parts: loss functions for ``kdens.train.fit``, soft targets, DDP.

``kdens.train.fit`` is the one training loop; distillation only swaps its loss. The
loss sees the batch's row indices into the transfer set, so cached teacher scores are
one device-resident tensor indexed per step (no numpy, no host round trip); under
torchrun every rank scores a slice of the transfer set when the cache is built. With
jitter the cached scores would describe images the student never saw, so the teacher
runs online on the augmented batch instead.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from distill.cache import build_or_load, load_finished, score_rows, shard_bounds, store
from kdens.errors import KdensError, ModelError, TrainingError
from kdens.train import distributed

DistillLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


# ---------------------------------------------------------------- losses for fit()

def cached_loss_fn(loss: DistillLoss, targets: Tensor) -> Callable:
    """``fit`` loss whose teacher scores are rows ``idx`` of ``targets`` (N, C), same device."""

    def loss_fn(logits: Tensor, xb: Tensor, yb: Tensor | None, idx: Tensor) -> Tensor:
        return loss(logits, targets[idx], yb)  # targets[idx]: (B, C)

    return loss_fn


def online_loss_fn(loss: DistillLoss, teacher: Callable[[Tensor], Tensor]) -> Callable:
    """``fit`` loss that asks the teacher about the batch the student saw (after --augment and jitter).

    ``teacher`` maps a batch to the scores the loss softens by T: the stage passes
    ``distill.teachers.soft_scores_fn(teacher, T)``, the same function the cache is built with.
    """

    last: list = [None, None]  # (batch, its scores): a mixup step asks twice about one batch (two labels)

    def loss_fn(logits: Tensor, xb: Tensor, yb: Tensor | None, idx: Tensor) -> Tensor:
        if last[0] is not xb:
            with torch.inference_mode():
                scores = teacher(xb)  # (B, C)
            # an inference-mode tensor cannot take part in autograd; a plain copy can
            last[0], last[1] = xb, scores.to(logits.device).clone()
        return loss(logits, last[1], yb)

    return loss_fn


# ---------------------------------------------------------------- torch.distributed

def init_distributed(device: str) -> tuple[bool, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), if not joined already.

    Args:
        device: the ``--device`` setting ('auto', 'cpu', 'cuda', 'cuda:K').

    Returns:
        (whether this call created the group, the device this rank should train on):
        on CUDA each rank takes ``cuda:LOCAL_RANK`` and NCCL; on CPU gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world <= 1 or torch.distributed.is_initialized():
        return False, device
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return True, device


def agree(error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so no rank waits forever at a barrier.

    The failing rank re-raises its own error; the others raise a TrainingError.
    """
    rank, world = distributed()
    if world > 1:
        flag = torch.tensor([1 if error is not None else 0])
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag)
        if error is None and int(flag) > 0:
            raise TrainingError(f"rank {rank}: another rank failed; see its error message")
    if error is not None:
        raise error


# ---------------------------------------------------------------- soft targets

def cached_targets(cache_dir: Path, key: str, x: np.ndarray, teacher: Callable[[Tensor], Tensor],
                   device: torch.device, batch_size: int, progress: bool, meta: dict) -> tuple[Tensor, dict]:
    """Teacher scores over ``x`` from the cache (built once, sharded across ranks) as a tensor on ``device``.

    ``teacher`` maps a batch to scores (``distill.teachers.soft_scores_fn``); ``key`` must
    name everything they depend on, the temperature included when they depend on it. Under
    torchrun a missing cache is built by every rank: each scores its contiguous slice of
    ``x`` (:func:`distill.cache.shard_bounds`), rank 0 gathers the slices and writes the
    cache atomically, and the others wait for it.

    Returns:
        (scores (N, C) float32 on ``device``, the cache's info dict).
    """
    rank, world = distributed()
    if world == 1:
        _, info = build_or_load(cache_dir, key, x, teacher, batch_size, device, progress, meta=meta)
    else:
        info = _sharded(cache_dir, key, x, teacher, device, batch_size, progress and rank == 0, meta, rank, world)
    arr = np.load(info["path"], mmap_mode="r")
    # one copy into the device's memory; per step the loss only indexes it
    return torch.from_numpy(np.array(arr, dtype=np.float32)).to(device), info


def _sharded(cache_dir: Path, key: str, x, teacher, device, batch_size: int, progress: bool, meta: dict,
             rank: int, world: int) -> dict:
    t0 = time.perf_counter()
    n = len(x)
    found = torch.zeros(1, dtype=torch.long, device=_comm_device())
    if rank == 0:
        arr, info = load_finished(cache_dir, key, n)
        found += int(arr is not None)
        if arr is None and info["why"] is not None:
            warnings.warn(f"soft-target cache {Path(cache_dir) / key}: {info['why']}; rebuilding it", RuntimeWarning,
                          stacklevel=3)
    torch.distributed.broadcast(found, 0)  # every rank takes rank 0's answer: no rank builds what another reads
    if int(found):
        _, info = load_finished(cache_dir, key, n, verify=rank == 0)
        return info
    err, part = None, np.empty((0, 0), np.float32)
    lo, hi = shard_bounds(n, rank, world)
    try:
        part = score_rows(x[lo:hi], teacher, batch_size, device, progress)  # (hi - lo, C)
    except (KdensError, OSError) as e:
        err = e
    agree(err)
    classes = torch.tensor([part.shape[1] if len(part) else 0], device=_comm_device())
    torch.distributed.all_reduce(classes, op=torch.distributed.ReduceOp.MAX)
    rows = -(-n // world)  # the largest shard's rows: every slice is padded to it for the gather
    mine = torch.zeros(rows, int(classes), dtype=torch.float32, device=_comm_device())
    if len(part):
        mine[: len(part)] = torch.from_numpy(part)
    gathered = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
    torch.distributed.gather(mine, gathered, dst=0)
    info: dict = {}
    if rank == 0:
        try:
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            scores = np.concatenate([g[: b - a].cpu().numpy() for g, (a, b) in zip(gathered, bounds)])  # (N, C)
            info = store(cache_dir, key, scores, meta=meta, batch_size=batch_size, device=device,
                         seconds=time.perf_counter() - t0, extra={"shards": [list(b) for b in bounds]})
        except (KdensError, OSError) as e:
            err = e
    agree(err)  # doubles as the barrier: the other ranks read the finished cache
    if rank != 0:
        _, info = load_finished(cache_dir, key, n, verify=False)
        info = {**info, "reused": False}
    return info


def _comm_device() -> torch.device:
    """Where collective tensors live: the GPU under NCCL, the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- the omitted classes' bias

def output_head(model: nn.Module) -> nn.Linear:
    """The model's ``head`` (the registry convention), which ``--fix-bias`` shifts."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ModelError("--fix-bias needs a student whose output layer is an nn.Linear with a bias "
                         "named 'head' (every registry model has one)")
    return head


@torch.no_grad()
def shift_bias(model: nn.Module, classes: list[int] | tuple[int, ...], shift: float) -> None:
    """Add ``shift`` to the output bias of each class in ``classes`` (Hinton et al. 2015, sec. 3)."""
    head = output_head(model)
    head.bias[list(classes)] += float(shift)
