"""What every student path settles before it learns: the data, the transfer set, the soft targets.

Shared by the network path (``distill.stage``) and the tree path (``distill.trees_stage``):
the data settings a student inherits from its teacher, the check that teacher and data
agree, the transfer set (``--transfer``) and the teacher's scores over it from the
soft-target cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from distill.cache import cache_key
from distill.config import DistillConfig
from distill.loop import cached_targets
from distill.munge import munge
from distill.teachers import (
    Teacher,
    cache_options,
    soft_scores_depend_on_temperature,
    soft_scores_fn,
)
from distill.transfer import TransferSpec, omit_classes, stratified_fraction
from kdens.artifacts import sha256_file
from kdens.data import Dataset, load_unlabeled
from kdens.errors import ConfigError, DataError


def default_cache_dir(run_dir: Path) -> Path:
    """``runs/<exp>/soft_targets`` for a student in ``runs/<exp>/<name>``: found by every student."""
    return Path(run_dir).parent / "soft_targets"


def _scale(data: Dataset) -> np.ndarray | None:
    """The training split's per-feature (or per-channel, as (C, 1, 1)) std, for MUNGE's neighbour
    search, when the data has one (``kdens.data.normalization``: features, images not in [0, 1])."""
    norm = data.normalization
    if not norm:
        return None
    std = np.asarray(norm["std"], np.float32)
    return std if norm.get("per") == "feature" else std.reshape(-1, 1, 1)


def transfer_set(spec: TransferSpec, data: Dataset, seed: int) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """The transfer set's inputs, labels (None if unlabeled) and a description for the manifest."""
    if spec.kind == "val":
        x, y = data.x_val, data.y_val
        if len(y) == 0:
            raise ConfigError("--transfer val needs a validation split; set --val-fraction > 0")
    elif spec.kind == "fraction":
        keep = stratified_fraction(data.y_train, spec.fraction, seed)
        x, y = data.x_train[keep], data.y_train[keep]
    elif spec.kind == "omit":
        keep = omit_classes(data.y_train, spec.classes, num_classes=data.num_classes)
        x, y = data.x_train[keep], data.y_train[keep]
    elif spec.kind == "munge":
        x, y = munge(data.x_train, spec.count, spec.p, spec.s, seed, std=_scale(data)), None
    elif spec.kind == "unlabeled":
        x, y = load_unlabeled(Path(spec.path)), None
        if tuple(x.shape[1:]) != tuple(data.input_shape):
            raise DataError(f"--transfer {spec}: images are {tuple(x.shape[1:])}, the data's are "
                            f"{tuple(data.input_shape)}; they must match the teacher's inputs")
        if len(x) == 0:
            raise DataError(f"--transfer {spec}: the file holds no images")
    else:
        x, y = data.x_train, data.y_train
    info = {"spec": str(spec), "examples": int(len(x)), "labeled": y is not None}
    if spec.kind == "munge":  # how neighbours were chosen (also in the cache key: it changes the pseudo-data)
        info["neighbours"] = "standardized" if _scale(data) is not None else "raw"
    if spec.kind == "unlabeled":
        info["sha256"] = sha256_file(Path(spec.path))
    return x, y, info


def resolve_data(cfg: DistillConfig, teacher: Teacher | None) -> DistillConfig:
    """Fill the data settings left unset (data, val_fraction, split_seed, layout, ...) with the teacher's own
    (digits' defaults without a teacher)."""
    tdc = teacher.data_config if teacher is not None else {"data": "digits", "val_fraction": 0.1, "split_seed": 0}
    keys = ("data", "val_fraction", "split_seed", "layout", "label_column", "test_fraction", "image_size")
    return dataclasses.replace(cfg, **{k: getattr(cfg, k) if getattr(cfg, k) is not None else tdc.get(k)
                                       for k in keys})


def check_compatible(teacher: Teacher, data: Dataset, what: str = "the teacher") -> None:
    if teacher.num_classes != data.num_classes or tuple(teacher.input_shape) != tuple(data.input_shape):
        raise DataError(
            f"{what} predicts {teacher.num_classes} classes from inputs {tuple(teacher.input_shape)}, but "
            f"--data {data.name} has {data.num_classes} classes of {tuple(data.input_shape)}; "
            "distill on data of the teacher's kind (or leave --data unset to use the teacher's)"
        )




def soft_cache_key(teacher: Teacher, temperature: float, data: Dataset, spec: TransferSpec, transfer_info: dict,
                   hashes: list) -> tuple[str, float | None]:
    """The soft-target cache key for ``teacher`` at ``temperature``, and the T it depends on (None if not)."""
    soft_t = float(temperature) if soft_scores_depend_on_temperature(teacher) else None
    extra = {"teacher": cache_options(teacher), "unlabeled_sha256": transfer_info.get("sha256")}
    if "neighbours" in transfer_info:
        extra["munge_neighbours"] = transfer_info["neighbours"]
    if soft_t is not None:
        extra["soft_temperature"] = soft_t
    return cache_key(hashes, data.fingerprint, str(spec), extra), soft_t


def soft_targets(teacher: Teacher, temperature: float, data: Dataset, spec: TransferSpec, x_tr: np.ndarray,
                 transfer_info: dict, hashes: list, cache_dir: Path, device, batch_size: int,
                 progress: bool) -> tuple[torch.Tensor, dict]:
    """The teacher's soft scores over the transfer set from the cache (built once), and the cache facts.

    Scores ``s`` (N, C) with ``softmax(s / T)`` the soft targets at ``temperature``
    (distill.teachers: "Soft targets at a temperature T"); T enters the cache key only for
    teachers whose scores depend on it (arithmetic ensembles). Network and tree students
    (distill/trees.py) read the same cache.
    """
    soft_fn = soft_scores_fn(teacher, temperature)
    key, soft_t = soft_cache_key(teacher, temperature, data, spec, transfer_info, hashes)
    meta = {"teacher_manifest_hashes": hashes, "teacher": teacher.describe(),
            "data_fingerprint": data.fingerprint, "transfer": str(spec), "soft_temperature": soft_t}
    targets, info = cached_targets(cache_dir, key, x_tr, soft_fn, device, batch_size, progress, meta)
    return targets, {
        "online": False, "reused": bool(info["reused"]), "soft_temperature": soft_t,
        "build_seconds": round(float(info["build_seconds"]), 3), "load_seconds": round(float(info["seconds"]), 3),
        "key": key, "path": info["path"]}

