"""The soft-target cache: teacher scores over the transfer set, computed once.

Running an ensemble or a generalist plus specialists over the transfer set costs far
more than one student epoch, and the scores do not change between epochs or between
students. They are computed once, in batches, into ``<cache_dir>/<key>/logits.npy``
(a float32 (N, C) array opened as a read-only memory map), next to a
``manifest.json`` written last.

Crash safety: the array is written to a temp file in the same folder, flushed and
moved into place with ``os.replace``; the manifest (shape, dtype, sha256 of the array
bytes) follows the same way. A folder without a valid manifest is an unfinished
build. Any mismatch between manifest and array (shape, dtype, checksum) is reported
with a warning and the cache is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from kdens.artifacts import FILE_MODE, atomic_write_json
from kdens.errors import ArtifactError, ConfigError, DataError, ModelError

CACHE_FORMAT = 1
"""Bumped when the cache layout changes; part of every key."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def cache_key(
    teacher_manifest_hashes: list[str],
    data_fingerprint: str,
    transfer: str,
    extra: dict | None = None,
) -> str:
    """sha256 of the canonical JSON of everything that determines the teacher scores.

    Args:
        teacher_manifest_hashes: sha256 of each teacher's manifest, in the order the
            teacher combines them (order is kept: it can matter, e.g. generalist first).
        data_fingerprint: the dataset's fingerprint.
        transfer: canonical transfer spec (``str(TransferSpec)``).
        extra: anything else that changes the scores (combination rule, temperature of
            an ensemble, top-n of specialists, ...). Must be JSON-serializable; key
            order does not matter, but ``1`` and ``1.0`` differ.

    Returns:
        64 hex characters.

    Raises:
        ConfigError: ``extra`` is not JSON-serializable.
    """
    payload = {
        "format": CACHE_FORMAT,
        "teachers": [str(h) for h in teacher_manifest_hashes],
        "data": str(data_fingerprint),
        "transfer": str(transfer),
        "extra": extra if extra is not None else {},
    }
    try:
        text = json.dumps(
            payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cache key extras must be plain JSON values (no NaN): {e}") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _sha256_file_data(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    flat = arr.reshape(-1)
    step = 1 << 22  # hash in 16 MiB chunks so a large memmap is never copied whole
    for i in range(0, flat.size, step):
        h.update(np.ascontiguousarray(flat[i : i + step]).tobytes())
    return h.hexdigest()


def _try_load(d: Path, key: str, n: int, verify: bool) -> tuple[np.memmap | None, str | None]:
    """The finished cache in ``d``, or (None, why it cannot be used)."""
    manifest_path, logits_path = d / "manifest.json", d / "logits.npy"
    if not manifest_path.exists():
        if logits_path.exists():
            return None, "found logits.npy without manifest.json (an interrupted build)"
        return None, None  # nothing there: a plain miss, no warning
    try:
        m = json.loads(manifest_path.read_text())
        shape = tuple(int(s) for s in m["shape"])
        if m.get("key") != key or m.get("dtype") != "float32" or not m.get("complete"):
            return None, f"manifest.json does not describe a finished float32 cache for key {key}"
        arr = np.load(logits_path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"cannot read the cache ({type(e).__name__}: {e})"
    if arr.dtype != np.float32 or arr.shape != shape or arr.ndim != 2:
        return None, f"logits.npy is {arr.dtype}{arr.shape}, manifest says float32{shape}"
    if shape[0] != n:
        return None, f"cache holds {shape[0]} rows but the transfer set has {n} examples"
    if verify and _sha256_file_data(arr) != m.get("sha256"):
        return None, "logits.npy does not match the checksum in manifest.json (corrupt)"
    return arr, None


def build_or_load(
    cache_dir: Path,
    key: str,
    x: np.ndarray,
    teacher_fn: Callable[[Tensor], Tensor],
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    meta: dict | None = None,
    verify: bool = True,
) -> tuple[np.memmap, dict]:
    """Load the teacher scores for ``x`` from the cache, or compute and store them.

    Args:
        cache_dir: folder holding one sub-folder per key.
        key: from ``cache_key``; names the sub-folder.
        x: transfer-set inputs (N, ...), any float dtype; sent to ``teacher_fn`` as
            float32 batches on ``device``.
        teacher_fn: maps a batch (B, ...) to teacher scores (B, C) (logits or
            log-probabilities). Called under ``torch.inference_mode``; a module must
            already be in eval mode.
        batch_size: examples per teacher call.
        device: where batches are sent.
        progress: show a tqdm bar while computing.
        meta: extra JSON-serializable provenance stored in the manifest (teacher
            hashes, data fingerprint, transfer spec).
        verify: re-hash the array on load and compare with the manifest (about 1 s
            per GB); turn off only for arrays too large to re-read.

    Returns:
        ``(scores, info)``: scores is a read-only float32 memmap (N, C); info has
        ``reused`` (bool), ``seconds`` (this call's wall time), ``build_seconds``,
        ``path`` and ``shape``.

    Raises:
        ConfigError: bad key or batch size.
        DataError: empty transfer set.
        ModelError: the teacher returns the wrong shape, NaN or +inf.
    """
    t0 = time.perf_counter()
    if not _KEY_RE.match(key):
        raise ConfigError(f"cache key {key!r} must be a plain file name (letters, digits, _ . -)")
    if int(batch_size) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    n = len(x)
    if n == 0:
        raise DataError("the transfer set is empty: there is nothing to compute soft targets for")
    d = Path(cache_dir) / key
    manifest_path, logits_path = d / "manifest.json", d / "logits.npy"

    arr, why = _try_load(d, key, n, verify)
    if arr is not None:
        m = json.loads(manifest_path.read_text())
        return arr, {
            "reused": True,
            "seconds": time.perf_counter() - t0,
            "build_seconds": float(m.get("seconds", 0.0)),
            "path": str(logits_path),
            "shape": list(arr.shape),
        }
    if why is not None:
        warnings.warn(f"soft-target cache {d}: {why}; rebuilding it", RuntimeWarning, stacklevel=2)

    if isinstance(teacher_fn, torch.nn.Module) and teacher_fn.training:
        warnings.warn(
            "teacher module is in training mode (dropout/batch-norm active); call .eval() "
            "so the cached soft targets are deterministic",
            RuntimeWarning,
            stacklevel=2,
        )
    d.mkdir(parents=True, exist_ok=True)
    # the old manifest goes first: from here on the folder reads as unfinished
    manifest_path.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=d, prefix="logits.npy.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        sha, c = _compute(tmp, x, teacher_fn, int(batch_size), device, progress)
        os.replace(tmp, logits_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    atomic_write_json(
        manifest_path,
        {
            "stage": "soft_targets",
            "format": CACHE_FORMAT,
            "key": key,
            "shape": [n, c],
            "dtype": "float32",
            "sha256": sha,
            "seconds": seconds,
            "batch_size": int(batch_size),
            "device": str(device),
            "meta": meta if meta is not None else {},
            "complete": True,
        },
    )
    arr, why = _try_load(d, key, n, verify=False)
    if arr is None:  # only if another process replaced the files under us
        raise ArtifactError(f"soft-target cache {d} changed while it was written: {why}")
    return arr, {
        "reused": False,
        "seconds": time.perf_counter() - t0,
        "build_seconds": seconds,
        "path": str(logits_path),
        "shape": [n, c],
    }


def _compute(
    path: Path,
    x: np.ndarray,
    teacher_fn: Callable[[Tensor], Tensor],
    batch_size: int,
    device: str | torch.device,
    progress: bool,
) -> tuple[str, int]:
    """Fill ``path`` with teacher scores (N, C) float32; return (sha256 of data, C)."""
    from tqdm.auto import tqdm

    from kdens.progress import on_terminal

    n = len(x)
    h = hashlib.sha256()
    out: np.memmap | None = None
    c = -1
    # a bar only on a terminal: in a log its carriage-return updates are noise (kdens.progress)
    bar = tqdm(total=n, disable=not (progress and on_terminal()), desc="soft targets", unit="ex")
    with torch.inference_mode(), bar:
        for i in range(0, n, batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32))
            scores = teacher_fn(xb.to(device))  # (B, C)
            b = len(xb)
            if not isinstance(scores, Tensor) or scores.ndim != 2 or scores.shape[0] != b:
                got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ModelError(f"teacher must return scores of shape ({b}, C), got {got}")
            if out is None:
                c = int(scores.shape[1])
                out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, c))
            elif scores.shape[1] != c:
                raise ModelError(f"teacher returned {scores.shape[1]} classes, earlier batches {c}")
            block = scores.detach().float().cpu().numpy()  # (B, C)
            # -inf is a legitimate log-probability of 0; NaN and +inf are teacher bugs
            if np.isnan(block).any() or np.isposinf(block).any():
                raise ModelError(
                    f"teacher returned NaN or +inf scores for examples {i}..{i + b - 1}"
                )
            out[i : i + b] = block
            h.update(np.ascontiguousarray(block).tobytes())
            bar.update(b)
    assert out is not None  # n > 0 was checked by the caller
    out.flush()
    del out  # close the map before os.replace (required on Windows, harmless elsewhere)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return h.hexdigest(), c


# ---------------------------------------------------------------- sharded builds (torchrun)

def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``n`` that ``rank`` of ``world`` scores: contiguous, sizes differing by one at most."""
    return n * rank // world, n * (rank + 1) // world


def load_finished(cache_dir: Path, key: str, n: int, verify: bool = True) -> tuple[np.memmap | None, dict]:
    """The finished cache for ``key`` (and its info dict), or (None, {"why": ...}) when there is none."""
    t0 = time.perf_counter()
    d = Path(cache_dir) / key
    arr, why = _try_load(d, key, n, verify)
    if arr is None:
        return None, {"why": why}
    m = json.loads((d / "manifest.json").read_text())
    return arr, {"reused": True, "seconds": time.perf_counter() - t0, "build_seconds": float(m.get("seconds", 0.0)),
                 "path": str(d / "logits.npy"), "shape": list(arr.shape)}


def score_rows(x, teacher_fn: Callable[[Tensor], Tensor], batch_size: int, device: str | torch.device,
               progress: bool = False) -> np.ndarray:
    """Teacher scores (N, C) float32 of ``x`` in memory: one rank's shard of a sharded build.

    Checked like a single-process build (shape, NaN, +inf), by going through the same code
    into a temporary file that is read back and removed.
    """
    if len(x) == 0:
        return np.empty((0, 0), np.float32)
    with tempfile.TemporaryDirectory(prefix="kdens-shard-") as tmp:
        path = Path(tmp) / "scores.npy"
        _compute(path, x, teacher_fn, int(batch_size), device, progress)
        return np.load(path)


def store(cache_dir: Path, key: str, scores: np.ndarray, *, meta: dict | None, batch_size: int,
          device: str | torch.device, seconds: float, extra: dict | None = None) -> dict:
    """Write gathered scores (N, C) as a finished cache: array then manifest, each atomically.

    Returns:
        the info dict of :func:`build_or_load` (``reused`` False).
    """
    if not _KEY_RE.match(key):
        raise ConfigError(f"cache key {key!r} must be a plain file name (letters, digits, _ . -)")
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    d = Path(cache_dir) / key
    d.mkdir(parents=True, exist_ok=True)
    manifest_path, logits_path = d / "manifest.json", d / "logits.npy"
    manifest_path.unlink(missing_ok=True)  # from here on the folder reads as unfinished
    fd, tmp_name = tempfile.mkstemp(dir=d, prefix="logits.npy.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            np.lib.format.write_array(f, scores, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, logits_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_json(manifest_path, {
        "stage": "soft_targets", "format": CACHE_FORMAT, "key": key, "shape": list(scores.shape),
        "dtype": "float32", "sha256": _sha256_file_data(scores), "seconds": seconds,
        "batch_size": int(batch_size), "device": str(device), "meta": meta if meta is not None else {},
        **(extra or {}), "complete": True})
    return {"reused": False, "seconds": seconds, "build_seconds": seconds, "path": str(logits_path),
            "shape": list(scores.shape)}
