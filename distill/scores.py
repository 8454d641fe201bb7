"""Precomputed teacher scores: ``kdens distill --teacher scores.npy`` (or ``.npz`` with ``scores``).

A teacher that ran somewhere else may hand over only its answers: an array (N, C) with one
row per example of the training set *as kdens loads it, before the validation split* (the
rows of ``kdens.data.load_dataset(SPEC, val_fraction=0).x_train``, in that order) and one
column per class in kdens's class order. The stage takes the rows of its transfer set from it
(``train``, ``val``, ``fraction=F`` and ``omit=...`` are all subsets of those rows).

Logits or log-probabilities: the two need no telling apart. A per-row constant drops out
of ``softmax(s / T)`` at every T, and log-probabilities are logits minus their row's
log-sum-exp. Probabilities do differ; a file whose every row is non-negative and sums to 1
(within 1e-3) is read as probabilities and its log is used (zeros clamped to 1e-30). An
``.npz`` may carry ``data_fingerprint`` (kdens's fingerprint of the data it was computed
on, ``load_dataset(...).fingerprint``); a different one is refused.

Such a teacher answers no new inputs: methods that run the teacher (feature methods, online
teaching under ``--jitter``) and transfer sets of new inputs (``munge``, ``unlabeled``) refuse
it in one line, and the student's metrics compare with the teacher on the training rows only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill.transfer import TransferSpec, omit_classes, stratified_fraction
from kdens.artifacts import sha256_file
from kdens.errors import ConfigError, DataError
from kdens.imported import looks_like_probabilities
from kdens.runs import DATA_DEFAULTS

SUFFIXES = (".npy", ".npz")
HOW = ("compute them on the training rows of kdens.data.load_dataset(SPEC, val_fraction=0).x_train, "
       "in that order, one column per class in sorted label order")


def is_scores_file(path: str | Path) -> bool:
    """Whether ``--teacher`` names a file of scores rather than a run folder."""
    return Path(path).suffix in SUFFIXES and not Path(path).is_dir()


def _read(path: Path) -> tuple[np.ndarray, str | None]:
    if not path.is_file():
        raise DataError(f"--teacher {path}: no such file; give a .npy of scores (N, C) or an .npz with 'scores'")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "scores" not in z.files:
                    raise DataError(f"--teacher {path} has no array 'scores' (it has {', '.join(z.files) or 'none'}); "
                                    "save the (N, C) scores as np.savez(FILE, scores=...)")
                fp = str(z["data_fingerprint"]) if "data_fingerprint" in z.files else None
                return np.asarray(z["scores"]), fp
        return np.load(path, allow_pickle=False), None
    except ValueError as e:  # object arrays need pickle, which is never allowed
        raise DataError(f"--teacher {path}: not a plain numeric array ({e}); save float scores with np.save") from None
    except (OSError, EOFError) as e:
        raise DataError(f"--teacher {path}: unreadable ({e}); save the scores with np.save or np.savez") from None


class ScoresTeacher:
    """Scores read from a file, one row per training example; answers rows, not inputs."""

    stage = "scores"
    soft_scores_depend_on_temperature = False  # logits: softmax(s / T) is the teacher at T for every T

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw, self.data_fingerprint = _read(self.path)
        if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.number) or raw.shape[1] < 2:
            raise DataError(f"--teacher {self.path} holds a {raw.dtype} array shaped {raw.shape}; scores are "
                            "numbers shaped (examples, classes) with at least 2 classes")
        bad = ~np.isfinite(raw)
        if bad.any():
            row = int(np.flatnonzero(bad.any(1))[0])
            raise DataError(f"--teacher {self.path} holds {int(bad.sum())} non-finite values (NaN or inf; the first "
                            f"in row {row}); scores must be finite logits or log-probabilities (clip -inf to a "
                            "large negative number)")
        self.kind = "probabilities" if looks_like_probabilities(raw) else "logits or log-probabilities"
        scores = np.log(np.clip(raw, 1e-30, None)) if self.kind == "probabilities" else raw
        self.scores = np.ascontiguousarray(scores, dtype=np.float32)  # (N, C)
        self.sha256 = sha256_file(self.path)
        self.num_classes = int(raw.shape[1])
        self.input_shape = None  # answers no inputs
        self.class_names: list = []
        self.manifest_hashes = [self.sha256]
        # the data settings' defaults (a run folder would record its own); --data has no default here
        self.data_config = {k: v for k, v in DATA_DEFAULTS.items() if k != "data"}

    def check_data(self, data) -> None:
        """Refuse scores made for other data: row count, class count, recorded fingerprint."""
        rows = len(data.y_train) + len(data.y_val)
        if self.scores.shape[0] != rows:
            raise DataError(f"--teacher {self.path} has {self.scores.shape[0]} rows, but the training set of --data "
                            f"{data.name} has {rows} examples (before the validation split); {HOW}")
        if self.num_classes != data.num_classes:
            raise DataError(f"--teacher {self.path} has {self.num_classes} columns, but --data {data.name} has "
                            f"{data.num_classes} classes ({', '.join(data.class_names[:6])}"
                            f"{', ...' if data.num_classes > 6 else ''}); {HOW}")
        if self.data_fingerprint is not None and self.data_fingerprint != data.fingerprint:
            raise DataError(f"--teacher {self.path} records data_fingerprint {self.data_fingerprint[:12]}, but --data "
                            f"{data.name} (with its --val-fraction and --split-seed) has {data.fingerprint[:12]}; "
                            "give the data the scores were computed on, or recompute them")

    def rows(self, spec: TransferSpec, data, seed: int) -> np.ndarray:
        """Indices into the scores of the transfer set ``spec`` selects (the stage's ``transfer_set`` order)."""
        train = data.train_rows if data.train_rows is not None else np.arange(len(data.y_train))
        if spec.kind == "train":
            return train
        if spec.kind == "val":
            return data.val_rows if data.val_rows is not None else np.arange(len(data.y_val)) + len(train)
        if spec.kind == "fraction":
            return train[stratified_fraction(data.y_train, spec.fraction, seed)]
        if spec.kind == "omit":
            return train[omit_classes(data.y_train, spec.classes, num_classes=data.num_classes)]
        raise ConfigError(f"--transfer {spec} makes new inputs, but --teacher {self.path} holds scores for the "
                          "training rows only; use --transfer train, val, fraction=F or omit=..., or import the "
                          "teacher itself (kdens import-model)")

    def targets(self, spec: TransferSpec, data, seed: int, device) -> Tensor:
        """The transfer set's teacher scores (N, C) float32 on ``device``."""
        return torch.from_numpy(self.scores[self.rows(spec, data, seed)]).to(device)

    def __call__(self, x: Tensor) -> Tensor:
        raise ConfigError(f"--teacher {self.path} holds precomputed scores and cannot answer new inputs; this "
                          "needs a teacher model (kdens import-model)")

    def describe(self) -> dict:
        return {"stage": self.stage, "path": str(self.path), "sha256": self.sha256,
                "shape": list(self.scores.shape), "scores": self.kind}


def refuse_online(teacher, cfg) -> None:
    """One line for what precomputed scores cannot do: jitter or augment (online), a default student, no --data."""
    if not isinstance(teacher, ScoresTeacher):
        return
    if cfg.train.jitter:
        raise ConfigError(f"--jitter {cfg.train.jitter} asks the teacher about shifted images on every step, but "
                          f"--teacher {teacher.path} holds precomputed scores; drop --jitter, or import the teacher "
                          "model (kdens import-model)")
    if cfg.train.augment:
        raise ConfigError(f"--augment {','.join(cfg.train.augment)} asks the teacher about augmented views (crops, "
                          f"flips, blends) on every step, but --teacher {teacher.path} holds precomputed scores; drop "
                          "--augment, or "
                          "import the teacher model (kdens import-model)")
    if cfg.data is None:
        raise ConfigError(f"--teacher {teacher.path} holds scores, not a run folder that records its data: give "
                          "--data (and --val-fraction / --split-seed if not the defaults) the scores were computed on")
