"""Stage ``train-generalist``: one model trained on hard labels; a teacher like any other.

Hard-label baselines of students are generalist runs too (kind ``baseline`` in a pipeline).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from generalist.imported import ImportConfig
from generalist.imported import run as run_import
from kdens.artifacts import write_manifest
from kdens.config import GeneralistConfig, to_dict
from kdens.data import stratified_subset
from kdens.evaluate import evaluate_model
from kdens.models import build_for_data, load_model
from kdens.runs import check_augmentation, data_config, load_data, prepare_run_dir, run_data, train_model
from kdens.train import CHECKPOINT


def run(cfg: GeneralistConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Train the generalist described by ``cfg`` into ``run_dir`` and return the folder.

    An :class:`generalist.imported.ImportConfig` (``kdens import-model``, or ``kdens run``'s
    ``[generalist]`` table in its import form) imports a model trained elsewhere instead.
    """
    if isinstance(cfg, ImportConfig):
        return run_import(cfg, run_dir, resume=resume, force=force, progress=progress)
    t0 = time.time()
    run_dir = Path(run_dir)
    # Validate everything that can fail on bad input before the first write.
    data = load_data(dataclasses.asdict(cfg))
    build_for_data(cfg.model, data, cfg.model_args)
    check_augmentation(data, cfg.train)
    prepare_run_dir(run_dir, resume, force, "generalist")
    x, y = data.x_train, data.y_train
    if cfg.train_fraction < 1.0:
        keep = stratified_subset(y, cfg.train_fraction, cfg.split_seed)
        x, y = x[keep], y[keep]
    # a student's hard-label baseline is a generalist run in kdens run's baselines/<student>/:
    # label its progress with its stage name there, not as a second "generalist"
    desc = f"baseline:{run_dir.name}" if run_dir.parent.name == "baselines" else "generalist"
    _, _, metrics = train_model(run_dir, data, cfg.model, cfg.model_args, cfg.train, x=x, y=y,
                                resume=resume, progress=progress, desc=desc)
    config = to_dict(cfg)
    write_manifest(run_dir, stage="generalist", config=config, data_fingerprint=data.fingerprint,
                   seed=cfg.train.seed, wall_seconds=round(time.time() - t0, 3), metrics=metrics,
                   extra={"data": data.describe(), "data_config": data_config({"config": config})})
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: the manifest and weights supersede it
    return run_dir


def evaluate(run_dir: Path, manifest: dict) -> dict:
    """``kdens evaluate`` of a single-model run (a generalist, a baseline or a student)."""
    model, spec = load_model(run_dir)
    return {"stage": manifest["stage"], "run": str(run_dir), "model": spec["name"],
            **evaluate_model(model, run_data(manifest))}
