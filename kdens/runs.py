"""Run folders as the stages share them: guarding a folder, fingerprinting a run, training one
model into a folder, and answering "what data did this run use" from a manifest.

Spine code: every stage may call it, and it imports no stage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from kdens.artifacts import MANIFEST, atomic_write_json, to_json
from kdens.config import pixel_augments
from kdens.data import Dataset, load_dataset
from kdens.errors import ArtifactError, ConfigError
from kdens.evaluate import evaluate_model
from kdens.models import build_for_data, count_params, save_model
from kdens.train import CHECKPOINT, TrainConfig, fit, schedule_metrics

DATA_DEFAULTS = {"data": "digits", "val_fraction": 0.1, "split_seed": 0, "train_fraction": 1.0, "layout": "auto",
                 "label_column": None, "test_fraction": 0.2, "image_size": None}
_LOADER_KEYS = ("val_fraction", "split_seed", "layout", "label_column", "test_fraction", "image_size")
"""The settings that decide which examples a run saw, with the defaults of runs that predate them."""


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, what: str) -> None:
    """Refuse to clobber finished or interrupted work unless asked; called before any write."""
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"--out {run_dir}: {folder} is a file, not a folder; choose another --out")
    if (run_dir / MANIFEST).exists() and not force:
        raise ArtifactError(
            f"{run_dir} already holds a finished {what}; choose another --out, or pass --force to retrain"
        )
    if (run_dir / CHECKPOINT).exists() and not (resume or force):
        raise ArtifactError(
            f"{run_dir} holds an interrupted {what} ({CHECKPOINT}); pass --resume to continue it "
            "or --force to start over"
        )
    if force:
        (run_dir / MANIFEST).unlink(missing_ok=True)
        if not resume:
            (run_dir / CHECKPOINT).unlink(missing_ok=True)


def run_key(*parts) -> str:
    """Fingerprint of everything that determines a training run (for resume checks)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def data_config(manifest: dict) -> dict:
    """The data settings a run used: ``data``, ``val_fraction``, ``split_seed``, ``train_fraction``.

    Stages record them as ``data_config`` in their manifest; runs that did not (single-model
    runs keep them in ``config``) are read from their config with the defaults they ran with.
    """
    cfg = manifest.get("data_config") or manifest.get("config") or {}
    return {k: default if cfg.get(k) is None else cfg[k] for k, default in DATA_DEFAULTS.items()}


def load_data(config: dict) -> Dataset:
    """The dataset a data config (``data_config`` keys, or a stage config's) describes."""
    cfg = {k: default if config.get(k) is None else config[k] for k, default in DATA_DEFAULTS.items()}
    return load_dataset(cfg["data"], **{k: cfg[k] for k in _LOADER_KEYS})


def run_data(manifest: dict) -> Dataset:
    """The dataset a run was trained on, checked against the fingerprint in its manifest."""
    data = load_data(data_config(manifest))
    recorded = manifest.get("data_fingerprint")
    if recorded is not None and data.fingerprint != recorded:
        raise ArtifactError(
            f"the data behind {data_config(manifest)['data']!r} changed since this run was made "
            f"(fingerprint {data.fingerprint[:12]} != {str(recorded)[:12]}); retrain"
        )
    return data


def check_augmentation(data: Dataset, train: TrainConfig) -> None:
    """Refuse augmentation the data cannot take: ``--jitter`` and ``--augment`` move pixels, and
    feature vectors have none."""
    if train.jitter and data.layout == "features":
        raise ConfigError(f"--jitter {train.jitter} shifts images by pixels, but {data.name} holds feature vectors "
                          "(layout features); drop --jitter")
    moving = pixel_augments(train.augment)
    if moving and data.layout == "features":
        raise ConfigError(f"--augment {','.join(moving)} crops and flips images, but {data.name} holds "
                          "feature vectors (layout features); drop it (mixup works on features)")


def train_model(run_dir: Path, data: Dataset, model_name: str, model_args: dict, train: TrainConfig,
                *, x=None, y=None, resume: bool = False, progress: bool = True, desc: str = "generalist",
                extra_key=None) -> tuple[object, dict, dict]:
    """Train one supervised model into ``run_dir`` (weights, metrics, history; no manifest).

    Shared by the generalist stage, hard-label baselines and ensemble members. Returns
    (model, spec, metrics).
    """
    check_augmentation(data, train)
    x = data.x_train if x is None else x
    y = data.y_train if y is None else y
    torch.manual_seed(train.seed)  # the run's seed also fixes the initial weights
    model, spec = build_for_data(model_name, data, model_args)
    key = run_key(spec, train.to_dict(), data.fingerprint, len(y), extra_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit(model, x, y, data.x_val, data.y_val, train, ckpt_dir=run_dir, resume=resume,
                 run_key=key, progress=progress, desc=desc)
    metrics = evaluate_model(model, data, train.eval_batch_size)
    metrics.update(params=count_params(model), train_seconds=round(result.seconds, 3),
                   **schedule_metrics(result, train), train_examples=int(len(y)),
                   training_check=result.health)
    if train.epochs_cap is not None:  # a smoke-test run: say so wherever its numbers are read
        metrics["epochs_cap"] = train.epochs_cap
    save_model(run_dir, model, spec)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "history.json", result.history)
    return model, spec, metrics


def same_settings(recorded: dict, current: dict, ignore: tuple[str, ...] = ()) -> bool:
    """Whether a recorded config (read back from a manifest) equals ``current``.

    Compared as JSON reads them back (tuples are lists), leaving out ``ignore`` keys and the
    training device: where a model trained does not change what it is.
    """
    def comparable(cfg: dict) -> dict:
        cfg = {k: v for k, v in json.loads(to_json(cfg)).items() if k not in ignore}
        cfg["train"] = {k: v for k, v in cfg.get("train", {}).items() if k != "device"}
        return cfg

    return comparable(recorded) == comparable(current)


def sub_run_plan(folder: Path, what: str, matches: bool | None, resume: bool, force: bool) -> str:
    """'done' or 'train' for one sub-run (an ensemble member, a specialist); raises before any write
    when neither is safe.

    Args:
        folder: the sub-run's folder.
        what: how errors name it ("member", "specialist").
        matches: whether its finished manifest was made with today's settings (None: no manifest).
        resume, force: the stage's flags.
    """
    folder = Path(folder)
    if (folder / MANIFEST).exists() and not force:
        if not matches:
            raise ArtifactError(f"{folder} holds a {what} trained with other settings or data; use another "
                                "--out, or pass --force to retrain")
        return "done"
    if (folder / CHECKPOINT).exists() and not (resume or force):
        raise ArtifactError(f"{folder} holds an interrupted {what} ({CHECKPOINT}); pass --resume to continue "
                            "it or --force to start over")
    return "train"
