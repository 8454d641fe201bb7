"""Cached teacher features: the feature methods' teacher pass done once instead of every batch.

A feature method (fitnets, fsp, rkd) reads the teacher's logits and its activations at the
``--hint`` points for every batch. Without augmentation the teacher sees the same inputs
every epoch, so these are computed once over the transfer set, in batches, and each training
step reads rows ``idx`` of them. Where they are kept depends on their size and a budget
(``--feature-cache-mb``):

* ``memory``: they fit the budget; held as float32 tensors on the training device, computed
  afresh by each run (one teacher pass, the cost of about one online epoch);
* ``disk``: they do not; written once as float32 ``.npy`` files in ``<cache_dir>/<key>/``
  (``logits.npy``, ``feature-00.npy``, ...) and read back memory-mapped, a batch at a time.
  Built like the soft-target cache (``distill.cache``): every array to a temp file moved in
  with ``os.replace``, ``manifest.json`` (shapes, sha256 of each array) written last, a
  damaged or unfinished folder rebuilt with a warning, a finished one reused by later runs;
* ``online``: the budget is 0, or ``--augment`` / ``--jitter`` changes the inputs every batch (cached
  features would describe images the student never saw).

The arrays are float32, as the online teacher's outputs are, so a cached run trains the
student on the same numbers as the online one (up to the float rounding of a different
teacher batch size). The key (``distill.cache.cache_key``) holds the teacher manifests'
hashes, the teacher's hint points, the transfer set, the data fingerprint and the sha256 of
the transfer set's inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.cache import CACHE_FORMAT, _sha256_file_data
from distill.loop import agree
from kdens.artifacts import FILE_MODE, atomic_write_json
from kdens.errors import ArtifactError, ConfigError, KdensError, ModelError
from kdens.train import distributed

AUTO = "auto"
_AUTO_FALLBACK_MB = 1024.0
"""The budget of ``auto`` where the free memory cannot be read."""


def parse_budget(value) -> float | str:
    """``--feature-cache-mb``: ``auto`` or a number of MB >= 0; ConfigError naming the value otherwise."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        mb = float(value)
    except (TypeError, ValueError):
        mb = float("nan")
    if isinstance(value, bool) or not mb >= 0 or mb == float("inf"):
        raise ConfigError(f"--feature-cache-mb {value!r} must be a number of MB >= 0 (0: run the teacher online) "
                          f"or {AUTO} (a quarter of the free memory)")
    return mb


def budget_bytes(setting, device: torch.device) -> int:
    """The budget in bytes; ``auto`` is a quarter of the memory free where the features would live."""
    setting = parse_budget(setting)
    if setting != AUTO:
        return int(setting * 2**20)
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
        except OSError:
            pass
    return int(free // 4) if free is not None else int(_AUTO_FALLBACK_MB * 2**20)


def _agreed_budget(setting, device: torch.device) -> int:
    """The smallest budget over the ranks: every rank must take the same path (disk is built by rank 0)."""
    b = budget_bytes(setting, device)
    _, world = distributed()
    if world > 1:
        t = torch.tensor([b], dtype=torch.int64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        b = int(t)
    return b


def choose(setting, jitter: int, nbytes: int, budget: int, augment=()) -> tuple[str, str]:
    """(``online`` | ``memory`` | ``disk``, why) for features of ``nbytes`` under ``budget`` bytes."""
    if augment:
        return "online", f"--augment {','.join(augment)} changes the inputs every batch"
    if jitter > 0:
        return "online", f"--jitter {jitter} changes the inputs every batch"
    if budget <= 0:
        return "online", "--feature-cache-mb 0"
    mb, bmb = nbytes / 2**20, budget / 2**20
    if nbytes <= budget:
        return "memory", f"{mb:.1f} MB fit the budget of {bmb:.1f} MB ({setting})"
    return "disk", f"{mb:.1f} MB exceed the budget of {bmb:.1f} MB ({setting})"


@dataclass
class FeatureStore:
    """The teacher's logits (N, C) and hint features (N, ...) over the transfer set, indexed by row."""

    where: str
    """``memory`` (tensors on the training device) or ``disk`` (read-only memory maps)."""
    logits: Tensor | np.ndarray
    features: list
    device: torch.device

    def rows(self, idx: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Rows ``idx`` (B,) of every array, as float32 tensors on the training device."""
        if self.where == "memory":
            return self.logits[idx], [f[idx] for f in self.features]  # (B, C), [(B, ...)]
        i = idx.cpu().numpy()  # a memmap reads only the rows asked for

        def take(a):
            return torch.from_numpy(np.asarray(a[i], dtype=np.float32)).to(self.device)

        return take(self.logits), [take(f) for f in self.features]


def feature_bytes(n: int, classes: int, shapes: list[tuple]) -> int:
    """Bytes of the float32 logits and hint features of ``n`` examples."""
    return 4 * n * (classes + sum(int(np.prod(s)) for s in shapes))


def _passes(teacher: nn.Module, tap, x, batch_size: int):
    """(start row, logits (B, C), [hint features (B, ...)]) per batch of ``x``, float32, under no_grad."""
    p = next(teacher.parameters(), None)
    t_device = p.device if p is not None else torch.device("cpu")
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            xb = xb if isinstance(xb, Tensor) else torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))
            logits = teacher(xb.to(t_device, torch.float32)).float()  # (B, C)
            feats = [f.float() for f in tap.take()]
            if not (torch.isfinite(logits).all() and all(torch.isfinite(f).all() for f in feats)):
                raise ModelError(f"the teacher gave NaN or inf logits or hint features for examples "
                                 f"{i}..{i + len(xb) - 1}")
            yield i, logits, feats


def build_memory(teacher: nn.Module, tap, x, classes: int, shapes: list[tuple], device: torch.device,
                 batch_size: int) -> FeatureStore:
    """Compute the features into tensors on ``device``."""
    n = len(x)
    logits = torch.empty((n, classes), dtype=torch.float32, device=device)
    feats = [torch.empty((n, *s), dtype=torch.float32, device=device) for s in shapes]
    for i, lb, fb in _passes(teacher, tap, x, batch_size):
        logits[i:i + len(lb)] = lb.to(device)
        for out, f in zip(feats, fb):
            out[i:i + len(f)] = f.to(device)
    return FeatureStore("memory", logits, feats, device)


def _names(k: int) -> list[str]:
    return ["logits.npy"] + [f"feature-{j:02d}.npy" for j in range(k)]


def _try_load(d: Path, key: str, shapes: list[tuple], verify: bool = True) -> tuple[list | None, str | None]:
    """The finished arrays in ``d`` as read-only memmaps, or (None, why they cannot be used)."""
    manifest = d / "manifest.json"
    if not manifest.exists():
        return None, ("found arrays without manifest.json (an interrupted build)"
                      if d.is_dir() and any(d.iterdir()) else None)
    try:
        m = json.loads(manifest.read_text())
        if m.get("key") != key or not m.get("complete") or m.get("dtype") != "float32":
            return None, f"manifest.json does not describe a finished float32 cache for key {key}"
        arrays = [np.load(d / name, mmap_mode="r") for name in _names(len(shapes) - 1)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"cannot read the cache ({type(e).__name__}: {e})"
    for name, a, want, sha in zip(_names(len(shapes) - 1), arrays, shapes, m.get("sha256", [])):
        if a.dtype != np.float32 or tuple(a.shape) != tuple(want):
            return None, f"{name} is {a.dtype}{tuple(a.shape)}, expected float32{tuple(want)}"
        if verify and _sha256_file_data(a) != sha:
            return None, f"{name} does not match the checksum in manifest.json (corrupt)"
    return arrays, None


def build_disk(d: Path, key: str, teacher: nn.Module, tap, x, classes: int, shapes: list[tuple],
               meta: dict, batch_size: int) -> None:
    """Compute the features into ``d``: each array to a temp file moved into place, the manifest last."""
    n = len(x)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").unlink(missing_ok=True)  # from here on the folder reads as unfinished
    names, all_shapes = _names(len(shapes)), [(n, classes), *[(n, *s) for s in shapes]]
    tmps = []
    try:
        for name, shape in zip(names, all_shapes):
            fd, tmp = tempfile.mkstemp(dir=d, prefix=name + ".", suffix=".tmp")
            os.fchmod(fd, FILE_MODE)
            os.close(fd)
            tmps.append(Path(tmp))
        outs = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=s) for t, s in zip(tmps, all_shapes)]
        hashes = [hashlib.sha256() for _ in outs]
        for i, lb, fb in _passes(teacher, tap, x, batch_size):
            for out, h, t in zip(outs, hashes, [lb, *fb]):
                block = np.ascontiguousarray(t.cpu().numpy())  # rows in order: the digest is the file data's
                out[i:i + len(block)] = block
                h.update(block.tobytes())
        for out in outs:
            out.flush()
        del outs  # close the maps before moving the files
        for tmp, name in zip(tmps, names):
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, d / name)
    except BaseException:
        for t in tmps:
            t.unlink(missing_ok=True)
        raise
    atomic_write_json(d / "manifest.json", {
        "stage": "teacher_features", "format": CACHE_FORMAT, "key": key, "dtype": "float32",
        "files": names, "shapes": [list(s) for s in all_shapes], "sha256": [h.hexdigest() for h in hashes],
        "meta": meta, "complete": True})


def load_or_build_disk(d: Path, key: str, teacher: nn.Module, tap, x, classes: int, shapes: list[tuple],
                       device: torch.device, meta: dict, batch_size: int) -> tuple[FeatureStore, bool]:
    """The disk cache in ``d`` (built by rank 0 if missing or damaged) and whether it was reused."""
    n = len(x)
    all_shapes = [(n, classes), *[(n, *s) for s in shapes]]
    rank, _ = distributed()
    err, reused, arrays, why = None, False, None, None
    if rank == 0:
        try:
            arrays, why = _try_load(d, key, all_shapes)
            reused = arrays is not None
            if not reused:
                if why is not None:
                    warnings.warn(f"teacher-feature cache {d}: {why}; rebuilding it", RuntimeWarning, stacklevel=2)
                build_disk(d, key, teacher, tap, x, classes, shapes, meta, batch_size)
        except (KdensError, OSError) as e:
            err = e
    agree(err)  # doubles as the barrier: the other ranks read the finished cache
    if not reused:  # rank 0 checked it above or has just written it
        arrays, why = _try_load(d, key, all_shapes, verify=False)
    if arrays is None:  # only if another process replaced the files under us
        raise ArtifactError(f"teacher-feature cache {d} changed while it was read: {why}")
    return FeatureStore("disk", arrays[0], arrays[1:], device), reused


def provide(setup, x, *, setting, jitter: int, cache_dir: Path, key: str, device: torch.device,
            batch_size: int, meta: dict, augment=()) -> tuple[FeatureStore | None, dict]:
    """The teacher's features for a feature method's run: a FeatureStore, or None to run it online.

    Args:
        setup: ``distill.online.FeatureSetup`` (teacher, its tap, the hint shapes, its class count).
        x: the transfer set's inputs (N, ...).
        setting: ``--feature-cache-mb`` (MB or ``auto``).
        jitter: ``--jitter``; > 0 means online.
        augment: ``--augment``'s names; any means online (the teacher must see each augmented view).
        cache_dir: the cache folder (``--cache-dir``); the disk cache is ``cache_dir / key``.
        key: from ``distill.cache.cache_key``, naming the teacher, hints, transfer set and data.
        device: the training device.
        batch_size: examples per teacher call.
        meta: provenance for the disk cache's manifest.

    Returns:
        (the store or None, info for metrics and the manifest: ``path`` online|memory|disk, ``why``,
        ``bytes``, ``budget_mb``, ``reused``, ``build_seconds``, ``key``, ``dir``).
    """
    t0 = time.perf_counter()
    shapes = [tuple(s) for s in setup.teacher_shapes]
    nbytes = feature_bytes(len(x), setup.teacher_classes, shapes)
    budget = _agreed_budget(setting, device) if jitter == 0 and not augment else 0
    path, why = choose(parse_budget(setting), jitter, nbytes, budget, tuple(augment))
    info = {"path": path, "why": why, "bytes": nbytes, "budget_mb": round(budget / 2**20, 3),
            "setting": parse_budget(setting), "reused": False, "build_seconds": 0.0, "key": None, "dir": None}
    if path == "online":
        return None, info
    if path == "memory":
        store = build_memory(setup.teacher, setup.teacher_tap, x, setup.teacher_classes, shapes, device, batch_size)
    else:
        d = Path(cache_dir) / key
        store, info["reused"] = load_or_build_disk(d, key, setup.teacher, setup.teacher_tap, x,
                                                   setup.teacher_classes, shapes, device, meta, batch_size)
        info.update(key=key, dir=str(d))
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    return store, info
