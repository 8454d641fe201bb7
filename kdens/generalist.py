"""Stage ``train-generalist``: one model trained on hard labels; a teacher like any other."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from kdens import metrics as M
from kdens.artifacts import MANIFEST, atomic_write_json, write_manifest
from kdens.config import GeneralistConfig, to_dict
from kdens.data import Dataset, load_dataset, stratified_subset
from kdens.errors import ArtifactError
from kdens.models import build_model, count_params, model_spec, save_model
from kdens.train import CHECKPOINT, TrainConfig, fit, predict_logits


def prepare_run_dir(run_dir: Path, resume: bool, force: bool, what: str) -> None:
    """Refuse to clobber finished or interrupted work unless asked; called before any write."""
    run_dir = Path(run_dir)
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


def train_model(run_dir: Path, data: Dataset, model_name: str, model_args: dict, train: TrainConfig,
                *, x=None, y=None, resume: bool = False, progress: bool = True, desc: str = "generalist",
                extra_key=None) -> tuple[object, dict, dict]:
    """Train one supervised model into ``run_dir`` (weights, metrics, history; no manifest).

    Shared by the generalist stage and ensemble members. Returns (model, spec, metrics).
    """
    x = data.x_train if x is None else x
    y = data.y_train if y is None else y
    torch.manual_seed(train.seed)  # the run's seed also fixes the initial weights
    model = build_model(model_name, data.num_classes, data.input_shape, **model_args)
    spec = model_spec(model_name, data.num_classes, data.input_shape, model_args)
    key = run_key(spec, train.to_dict(), data.fingerprint, len(y), extra_key)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit(model, x, y, data.x_val, data.y_val, train, ckpt_dir=run_dir, resume=resume,
                 run_key=key, progress=progress, desc=desc)
    metrics = evaluate_model(model, data, train.eval_batch_size)
    metrics.update(params=count_params(model), train_seconds=round(result.seconds, 3),
                   best_epoch=result.best_epoch, epochs_run=len(result.history),
                   stopped_early=result.stopped_early, train_examples=int(len(y)))
    save_model(run_dir, model, spec)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "history.json", result.history)
    return model, spec, metrics


def evaluate_model(model, data: Dataset, batch_size: int = 2048) -> dict:
    """Test and validation metrics of a model on a dataset (the keys every metrics.json has)."""
    test = predict_logits(model, data.x_test, batch_size).numpy()
    out = {"test_accuracy": M.accuracy(test, data.y_test), "test_errors": M.errors(test, data.y_test),
           "test_nll": M.nll(test, data.y_test), "test_ece": M.ece(test, data.y_test)}
    if len(data.y_val):
        val = predict_logits(model, data.x_val, batch_size).numpy()
        out.update(val_accuracy=M.accuracy(val, data.y_val), val_nll=M.nll(val, data.y_val))
    else:
        out.update(val_accuracy=float("nan"), val_nll=float("nan"))
    return out


def run(cfg: GeneralistConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Train the generalist described by ``cfg`` into ``run_dir`` and return the folder."""
    t0 = time.time()
    run_dir = Path(run_dir)
    # Validate everything that can fail on bad input before the first write.
    data = load_dataset(cfg.data, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed)
    build_model(cfg.model, data.num_classes, data.input_shape, **cfg.model_args)
    prepare_run_dir(run_dir, resume, force, "generalist")
    x, y = data.x_train, data.y_train
    if cfg.train_fraction < 1.0:
        keep = stratified_subset(y, cfg.train_fraction, cfg.split_seed)
        x, y = x[keep], y[keep]
    _, _, metrics = train_model(run_dir, data, cfg.model, cfg.model_args, cfg.train, x=x, y=y,
                                resume=resume, progress=progress)
    write_manifest(run_dir, stage="generalist", config=to_dict(cfg), data_fingerprint=data.fingerprint,
                   seed=cfg.train.seed, wall_seconds=round(time.time() - t0, 3), metrics=metrics,
                   extra={"data": data.describe()})
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: the manifest and weights supersede it
    return run_dir
