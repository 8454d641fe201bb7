"""Stage ``train-ensemble``: K independently trained members combined into one teacher.

Hinton, Vinyals & Dean (2015), section 3: an ensemble of separately trained nets is the
cumbersome model whose knowledge distillation transfers. Each member is an ordinary
generalist run folder ``member-00`` ... ``member-(K-1)`` (weights, metrics, history and
its own manifest, stage ``generalist``), trained by ``kdens.runs.train_model``
with seed ``seed + k``. When every member is finished the stage scores the members and
their combination on the test and validation splits (``metrics.json``) and writes the
ensemble's ``manifest.json`` last.

Members are independent, so ranks share them out (member k goes to rank ``k mod W``)
without a process group: each rank trains its own members, and whichever call finds all
members finished afterwards - the last rank to finish, or any rerun - writes the
ensemble's metrics and manifest (identical files if two happen to do it).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ensembles.combine import ensemble_metrics
from ensembles.config import EnsembleConfig
from kdens.artifacts import (
    MANIFEST,
    atomic_write_json,
    read_json,
    read_manifest,
    sha256_file,
    write_manifest,
)
from kdens.config import to_dict
from kdens.data import Dataset
from kdens.errors import ArtifactError
from kdens.runs import load_data, prepare_run_dir, run_data, same_settings, sub_run_plan, train_model
from kdens.models import build_for_data, load_model
from kdens.shard import pin_local_gpu, rank_and_world, shard  # noqa: F401 (re-exported)
from kdens.train import CHECKPOINT, predict_logits

METRIC_KEYS = ("accuracy", "errors", "nll", "ece")


def member_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"member-{k:02d}"


# ---------------------------------------------------------------- pure scoring

def _prefixed(prefix: str, m: dict | None) -> dict:
    if m is None:
        return {f"{prefix}{k}": float("nan") for k in METRIC_KEYS}
    return {f"{prefix}{k}": m[k] for k in METRIC_KEYS}


def ensemble_report(test_logits: torch.Tensor, y_test, val_logits: torch.Tensor | None, y_val,
                    method: str, temperature: float) -> dict:
    """Ensemble and per-member metrics on the test (and validation) split.

    Args:
        test_logits: members' logits on the test split, (K, N_test, C).
        y_test: test labels (N_test,).
        val_logits: members' logits on the validation split (K, N_val, C), or None.
        y_val: validation labels, or None.
        method: 'arithmetic' or 'geometric' (``ensembles.combine.combine_log_probs``).
        temperature: T of every softmax (members and ensemble alike, so NLL/ECE compare).

    Returns:
        ``ensemble`` and ``members`` (list) with test_/val_ accuracy, errors, nll, ece (15
        bins); ``disagreement`` (test, mean over member pairs of differing top-1) and
        ``val_disagreement``; whether the ensemble beats its best member; and the
        ensemble's test_/val_ metrics repeated at top level like every metrics.json.
    """
    t = ensemble_metrics(test_logits, y_test, method, temperature)
    v = ensemble_metrics(val_logits, y_val, method, temperature) if val_logits is not None and len(y_val) else None
    ens = {**_prefixed("test_", t["ensemble"]), **_prefixed("val_", v and v["ensemble"])}
    members = [{**_prefixed("test_", m), **_prefixed("val_", v and v["members"][k])}
               for k, m in enumerate(t["members"])]
    best_acc = max(m["test_accuracy"] for m in members)
    best_nll = min(m["test_nll"] for m in members)
    return {
        "method": method,
        "temperature": float(temperature),
        "num_members": len(members),
        "ensemble": ens,
        "members": members,
        "disagreement": t["disagreement"],
        "val_disagreement": v["disagreement"] if v else float("nan"),
        "mean_member_test_accuracy": float(np.mean([m["test_accuracy"] for m in members])),
        "best_member_test_accuracy": best_acc,
        "mean_member_test_nll": float(np.mean([m["test_nll"] for m in members])),
        "best_member_test_nll": best_nll,
        "beats_best_member_accuracy": ens["test_accuracy"] > best_acc,
        "beats_best_member_nll": ens["test_nll"] < best_nll,
        **{k: ens[k] for k in ("test_accuracy", "test_errors", "test_nll", "test_ece", "val_accuracy", "val_nll")},
    }


def member_logits(models: list, x, batch_size: int = 2048) -> torch.Tensor:
    """Stacked logits (K, N, C) of the members on ``x``, float32 on the CPU."""
    return torch.stack([predict_logits(m, x, batch_size) for m in models])


# ---------------------------------------------------------------- the I/O shell

def _member_plan(mdir: Path, expected: dict, fingerprint: str, resume: bool, force: bool) -> str:
    """'done' (finished with these settings), or 'train'; raises before any write if neither is safe."""
    man = read_json(mdir / MANIFEST) if (mdir / MANIFEST).exists() else None
    matches = man is not None and (man.get("stage") == "generalist" and man.get("data_fingerprint") == fingerprint
                                   and same_settings(man.get("config", {}), expected))
    return sub_run_plan(mdir, "member", matches, resume, force)


def run(cfg: EnsembleConfig, run_dir: Path, *, resume: bool = False, force: bool = False, progress: bool = True,
        rank: int | None = None, world_size: int | None = None) -> Path:
    """Train this rank's members into ``run_dir``; combine when all K are finished.

    Args:
        cfg: the ensemble's settings.
        run_dir: the ensemble's folder (members go into ``member-NN`` sub-folders).
        resume: continue an interrupted member from its checkpoint.
        force: retrain finished members and overwrite a finished ensemble.
        progress: progress bars.
        rank, world_size: train only members k with ``k mod world_size == rank``;
            default torchrun's ``RANK`` / ``WORLD_SIZE``, else all members.

    Returns:
        ``run_dir``; it holds ``manifest.json`` only once every member is finished.

    Raises:
        ConfigError, DataError, ModelError, ArtifactError: bad input or an unsafe folder,
            before anything is written.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    r, world = rank_and_world(rank, world_size)
    # Validate everything that can fail on bad input before the first write.
    data = load_data(dataclasses.asdict(cfg))
    for name, kwargs in cfg.architectures():
        build_for_data(name, data, kwargs)
    if (run_dir / MANIFEST).exists() and not force:
        raise ArtifactError(f"{run_dir} already holds a finished ensemble; choose another --out, "
                            "or pass --force to retrain")
    mine = shard(cfg.members, r, world)
    plans = {k: _member_plan(member_dir(run_dir, k), to_dict(cfg.member(k)), data.fingerprint, resume, force)
             for k in mine}
    pin_local_gpu(cfg.train.device, world)

    if force:
        (run_dir / MANIFEST).unlink(missing_ok=True)
    for k in mine:
        if plans[k] == "train":
            _train_member(cfg, k, run_dir, data, resume, force, progress)
    if all((member_dir(run_dir, k) / MANIFEST).exists() for k in range(cfg.members)):
        _combine(cfg, run_dir, data, world, t0)
    return run_dir


def pending_members(cfg: EnsembleConfig, run_dir: Path) -> list[int]:
    """Members without a manifest yet (trained by other ranks, or not yet)."""
    return [k for k in range(cfg.members) if not (member_dir(run_dir, k) / MANIFEST).exists()]


def _train_member(cfg: EnsembleConfig, k: int, run_dir: Path, data: Dataset, resume: bool, force: bool,
                  progress: bool) -> None:
    t0 = time.time()
    mcfg = cfg.member(k)
    mdir = member_dir(run_dir, k)
    prepare_run_dir(mdir, resume, force, f"ensemble member {k}")
    _, _, metrics = train_model(mdir, data, mcfg.model, mcfg.model_args, mcfg.train, resume=resume,
                                progress=progress, desc=mdir.name)
    write_manifest(mdir, stage="generalist", config=to_dict(mcfg), data_fingerprint=data.fingerprint,
                   seed=mcfg.train.seed, wall_seconds=round(time.time() - t0, 3), metrics=metrics,
                   extra={"data": data.describe(), "ensemble_member": {"index": k, "of": cfg.members}})
    (mdir / CHECKPOINT).unlink(missing_ok=True)  # finished: the manifest and weights supersede it


def _combine(cfg: EnsembleConfig, run_dir: Path, data: Dataset, world: int, t0: float) -> None:
    """Score the finished members and their combination; write metrics.json, then the manifest."""
    dirs = [member_dir(run_dir, k) for k in range(cfg.members)]
    for k, d in enumerate(dirs):  # a member finished by another rank must match this call's settings too
        _member_plan(d, to_dict(cfg.member(k)), data.fingerprint, False, False)
    models = [load_model(d)[0] for d in dirs]
    bs = cfg.train.eval_batch_size
    val = member_logits(models, data.x_val, bs) if len(data.y_val) else None
    report = ensemble_report(member_logits(models, data.x_test, bs), data.y_test, val, data.y_val,
                             cfg.combine, cfg.temperature)
    member_metrics = [read_json(d / "metrics.json") for d in dirs]
    for k, (entry, mm) in enumerate(zip(report["members"], member_metrics)):
        mcfg = cfg.member(k)
        entry.update(run=dirs[k].name, model=mcfg.model, model_args=mcfg.model_args, seed=mcfg.train.seed,
                     params=mm.get("params"), train_seconds=mm.get("train_seconds"), epochs_run=mm.get("epochs_run"))
    report.update(params=int(sum(mm.get("params", 0) for mm in member_metrics)),
                  train_seconds=round(sum(mm.get("train_seconds", 0.0) for mm in member_metrics), 3))
    atomic_write_json(run_dir / "metrics.json", report)
    inputs = {str(d / MANIFEST): sha256_file(d / MANIFEST) for d in dirs}
    write_manifest(run_dir, stage="ensemble", config=to_dict(cfg), inputs=inputs,
                   data_fingerprint=data.fingerprint, seed=cfg.train.seed,
                   wall_seconds=round(time.time() - t0, 3), metrics=report,
                   extra={"data": data.describe(), "members": [d.name for d in dirs], "world_size": world})


def evaluate_ensemble(run_dir: Path, manifest: dict) -> dict:
    """``kdens evaluate`` of an ensemble run: ensemble and per-member test metrics, recomputed."""
    run_dir = Path(run_dir)
    data = run_data(manifest)
    cfg = manifest["config"]
    names = manifest.get("members") or [f"member-{k:02d}" for k in range(cfg["members"])]
    models = []
    for name in names:
        read_manifest(run_dir / name, "generalist")
        models.append(load_model(run_dir / name)[0])
    val = member_logits(models, data.x_val) if len(data.y_val) else None
    report = ensemble_report(member_logits(models, data.x_test), data.y_test, val, data.y_val,
                             cfg.get("combine", "arithmetic"), float(cfg.get("temperature", 1.0)))
    for name, entry in zip(names, report["members"]):
        entry["run"] = name
    return {"stage": "ensemble", "run": str(run_dir), **report}
