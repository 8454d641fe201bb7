"""Sharding independent jobs (ensemble members, specialists) across processes.

Each job k goes to rank k mod W. The rank and world size come from flags or torchrun's
``RANK`` / ``WORLD_SIZE``; no process group is needed because the jobs never talk.
"""

from __future__ import annotations

import os

from kdens.errors import ConfigError


def shard(num_jobs: int, rank: int, world_size: int) -> list[int]:
    """The jobs rank ``rank`` of ``world_size`` runs: k with k mod W == rank."""
    return [k for k in range(num_jobs) if k % world_size == rank]


def rank_and_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torchrun's ``RANK`` / ``WORLD_SIZE``, else (0, 1); checked."""
    try:
        world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
        r = int(rank if rank is not None else os.environ.get("RANK", "0"))
    except ValueError:
        raise ConfigError(f"RANK / WORLD_SIZE must be integers, got {os.environ.get('RANK')!r} / "
                          f"{os.environ.get('WORLD_SIZE')!r}") from None
    if world < 1:
        raise ConfigError(f"--world-size {world} must be >= 1")
    if not 0 <= r < world:
        raise ConfigError(f"--rank {r} must lie in [0, --world-size {world})")
    return r, world


def pin_local_gpu(device: str, world: int) -> None:
    """Under torchrun each local rank takes its own GPU, so 'cuda' then means that one."""
    local = os.environ.get("LOCAL_RANK")
    if world > 1 and local is not None:
        import torch

        from kdens.train import resolve_device

        if resolve_device(device).type == "cuda":
            torch.cuda.set_device(int(local))
