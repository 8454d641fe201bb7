"""The distillation loop's parts: loss functions for ``kdens.train.fit``, soft targets, DDP.

``kdens.train.fit`` is the one training loop; distillation only swaps its loss. The
loss sees the batch's row indices into the transfer set, so cached teacher scores are
one device-resident tensor indexed per step (no numpy, no host round trip). With
jitter the cached scores would describe images the student never saw, so the teacher
runs online on the augmented batch instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from distill.cache import build_or_load
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

    def loss_fn(logits: Tensor, xb: Tensor, yb: Tensor | None, idx: Tensor) -> Tensor:
        with torch.inference_mode():
            scores = teacher(xb)  # (B, C)
        # an inference-mode tensor cannot take part in autograd; a plain copy can
        return loss(logits, scores.to(logits.device).clone(), yb)

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
    """Teacher scores over ``x`` from the cache (built once, on rank 0) as a tensor on ``device``.

    ``teacher`` maps a batch to scores (``distill.teachers.soft_scores_fn``); ``key`` must
    name everything they depend on, the temperature included when they depend on it.

    Returns:
        (scores (N, C) float32 on ``device``, the cache's info dict).
    """
    rank, world = distributed()
    err, info = None, {}
    if rank == 0:
        try:
            _, info = build_or_load(cache_dir, key, x, teacher, batch_size, device, progress, meta=meta)
        except (KdensError, OSError) as e:
            err = e
    agree(err)  # doubles as the barrier: the other ranks read the finished cache
    if rank != 0:
        _, info = build_or_load(cache_dir, key, x, teacher, batch_size, device, False, meta=meta)
    arr = np.load(info["path"], mmap_mode="r")
    # one copy into the device's memory; per step the loss only indexes it
    return torch.from_numpy(np.array(arr, dtype=np.float32)).to(device), info


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
