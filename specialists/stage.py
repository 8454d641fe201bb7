"""Stage ``train-specialists``: a generalist plus specialists for its confusable classes.

Hinton, Vinyals & Dean (2015), section 5. From a finished generalist run:

1. its softmax predictions on the validation split (never the test split) are clustered
   (``specialists.cluster.ConfusionClusterer``, seeded), or the groups are given by hand;
   groups of one class get no specialist. ``clusters.json`` and ``clusters.png``.
2. one specialist per group, ``spec-00`` ... (``specialists.train``): an ordinary run
   folder (weights, model.json, metrics, history, manifest with stage ``specialist``),
   started as the generalist restricted to its group (``specialists.model``), trained on
   half-group batches, dustbin corrected.
3. when every specialist is finished: the generalist and its active specialists are
   combined on the test split (``specialists.teacher.Combiner``) and scored as in the
   paper's Tables 3-4 (``specialists.evaluate.breakdown``): ``metrics.json``, then
   ``manifest.json`` (stage ``specialists``) last.

Specialists are independent, so ranks share them out (specialist m on rank ``m mod W``)
without a process group, like ensemble members: whichever call finds them all finished
writes the combination's metrics and manifest. Everything that can fail on bad input is
checked before the first write.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from kdens import metrics as M
from kdens.artifacts import (
    MANIFEST,
    atomic_write_json,
    read_json,
    read_manifest,
    sha256_file,
    to_json,
    write_manifest,
)
from kdens.config import to_dict
from kdens.data import Dataset, stratified_subset
from kdens.errors import ArtifactError, ConfigError, DataError
from kdens.imported import require_torch
from kdens.runs import check_augmentation, data_config, prepare_run_dir, run_data, run_key, same_settings, sub_run_plan
from kdens.models import load_model
from kdens.shard import pin_local_gpu, rank_and_world, shard  # noqa: F401 (re-exported)
from kdens.train import CHECKPOINT, predict_logits
from specialists.check import RULE, check_specialists
from specialists.cluster import ConfusionClusterer, parse_groups, seed_stability
from specialists.config import SpecialistsConfig
from specialists.evaluate import breakdown
from specialists.plot import save_covariance_heatmap
from specialists.teacher import TOL, Combiner, resolve_generalist
from specialists.train import specialist_train_config, task_metrics, train_specialist

CLUSTERS, HEATMAP = "clusters.json", "clusters.png"


def spec_dir(run_dir: Path, m: int) -> Path:
    return Path(run_dir) / f"spec-{m:02d}"


# ---------------------------------------------------------------- reading the generalist

def load_data(manifest: dict) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """A run's dataset (fingerprint checked) and the training examples it saw."""
    data, cfg = run_data(manifest), data_config(manifest)
    x, y = data.x_train, data.y_train
    if cfg["train_fraction"] < 1.0:
        keep = stratified_subset(y, cfg["train_fraction"], cfg["split_seed"])
        x, y = x[keep], y[keep]
    return data, x, y


def _generalist_info(gen_dir: Path, folder: Path, gen_hash: str, given: str) -> dict:
    """Where the generalist is, three ways (resolve_generalist tries them), and its manifest's hash."""
    absolute = gen_dir.resolve()
    return {"path": given, "absolute_path": str(absolute),
            "relative_path": os.path.relpath(absolute, Path(folder).resolve()), "manifest_sha256": gen_hash}


# ---------------------------------------------------------------- step 1: groups

def find_groups(cfg: SpecialistsConfig, gen_model, data: Dataset, gen_hash: str) -> dict:
    """Cluster the generalist's validation predictions (or parse --groups); the clusters.json record.

    Raises:
        ConfigError: bad --groups or --clusters, or no group of two or more classes.
    """
    c = data.num_classes
    p = torch.softmax(predict_logits(gen_model, data.x_val).double(), 1).numpy()  # (N_val, C)
    settings = {"generalist_manifest_sha256": gen_hash, "clusters": cfg.clusters, "groups": cfg.groups,
                "affinity": cfg.affinity, "cluster_algorithm": cfg.cluster_algorithm,
                "cluster_restarts": cfg.cluster_restarts, "seed": cfg.train.seed}
    if cfg.groups is not None:
        try:
            groups = parse_groups(cfg.groups, c)
        except ConfigError as e:
            raise ConfigError(f"--groups {cfg.groups!r}: {e}") from None
        grouped = {k for g in groups for k in g}
        all_groups = sorted(groups + [[k] for k in range(c) if k not in grouped])
        cov, aff, inertia, stability = np.cov(p, rowvar=False), None, None, None
    else:
        if cfg.clusters > c:
            raise ConfigError(f"--clusters {cfg.clusters} must be <= {c}, the number of classes")
        est = ConfusionClusterer(cfg.clusters, cfg.affinity, cfg.cluster_algorithm, random_state=cfg.train.seed,
                                 n_init=cfg.cluster_restarts).fit(p)
        groups, all_groups, inertia = est.groups_, est.all_groups_, est.inertia_
        stability = {**seed_stability(est, p), "n_init": est.n_init}  # the same clustering under other seeds
        cov, aff = est.covariance_, est.affinity_
        if not groups:
            raise ConfigError(f"--clusters {cfg.clusters} found no group of 2 or more classes to give a specialist "
                              f"(clusters: {all_groups}); try another --clusters or --affinity, or give --groups")
    names = data.class_names
    return {
        "groups": groups, "class_names": [[names[k] for k in g] for g in groups],
        "all_groups": all_groups, "all_class_names": [[names[k] for k in g] for g in all_groups],
        "source": "groups" if cfg.groups is not None else "k-means",
        "affinity": cfg.affinity if cfg.groups is None else None,
        "cluster_algorithm": cfg.cluster_algorithm if cfg.groups is None else None,
        "cluster_restarts": cfg.cluster_restarts if cfg.groups is None else None,
        "n_clusters": cfg.clusters, "inertia": inertia, "stability": stability, "split": "validation",
        "examples": len(p),
        "classes": names, "covariance": cov, "affinity_matrix": aff, "settings": settings,
    }


# ---------------------------------------------------------------- step 2: specialists

def _plan(sdir: Path, group: list[int], cfg: SpecialistsConfig, fingerprint: str, gen_hash: str,
          resume: bool, force: bool) -> str:
    """'done' (finished with these settings) or 'train'; raises before any write if neither is safe."""
    man = read_json(sdir / MANIFEST) if (sdir / MANIFEST).exists() else None
    # how the combination is done does not change a specialist; which generalist it came from
    # is compared by its manifest's hash instead of its path
    matches = man is not None and (
        man.get("stage") == "specialist" and man.get("data_fingerprint") == fingerprint
        and man.get("specialist", {}).get("group") == list(group)
        and man.get("generalist", {}).get("manifest_sha256") == gen_hash
        and same_settings(man.get("config", {}), to_dict(cfg), ignore=("top_n", "generalist", "drop_unhelpful")))
    return sub_run_plan(sdir, "specialist", matches, resume, force)


def run(cfg: SpecialistsConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True, rank: int | None = None, world_size: int | None = None) -> Path:
    """Find the groups, train this rank's specialists into ``run_dir``; combine when all are finished.

    Args:
        cfg: the stage's settings.
        run_dir: the folder (specialists go into ``spec-NN`` sub-folders).
        resume: continue an interrupted specialist from its checkpoint.
        force: retrain finished specialists and overwrite a finished run.
        progress: progress bars.
        rank, world_size: train only specialists m with ``m mod world_size == rank``;
            default torchrun's ``RANK`` / ``WORLD_SIZE``, else all of them.

    Returns:
        ``run_dir``; it holds ``manifest.json`` only once every specialist is finished.

    Raises:
        ConfigError, DataError, ModelError, ArtifactError: bad input or an unsafe folder,
            before anything is written.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    r, world = rank_and_world(rank, world_size)
    # Validate everything that can fail on bad input before the first write.
    gen_dir = Path(cfg.generalist)
    gen_man = read_manifest(gen_dir, "generalist")
    data_cfg = data_config(gen_man)
    data, x, y = load_data(gen_man)
    check_augmentation(data, cfg.train)
    if not len(data.y_val):
        raise DataError(f"--generalist {gen_dir} was trained with --val-fraction 0; specialists need its "
                        "validation split (for clustering and early stopping): retrain it with --val-fraction > 0")
    gen_model, gen_spec = load_model(gen_dir)
    require_torch(gen_model, gen_dir, "each specialist starts as a trainable copy of the generalist's network")
    if cfg.top_n > data.num_classes:
        raise ConfigError(f"--top-n {cfg.top_n} must be <= {data.num_classes}, the number of classes")
    if cfg.train.batch_size < 2:
        raise ConfigError(f"--batch-size {cfg.train.batch_size} must be >= 2: half of each batch is the group")
    gen_hash = sha256_file(gen_dir / MANIFEST)
    if (run_dir / MANIFEST).exists() and not force:
        raise ArtifactError(f"{run_dir} already holds finished specialists; choose another --out, "
                            "or pass --force to retrain")
    record = find_groups(cfg, gen_model, data, gen_hash)
    if (run_dir / CLUSTERS).exists() and not force:
        old = read_json(run_dir / CLUSTERS)
        if old.get("settings") != json.loads(to_json(record["settings"])) or old.get("groups") != record["groups"]:
            raise ArtifactError(f"{run_dir}/{CLUSTERS} holds groups made with other settings or another generalist; "
                                "use another --out, or pass --force to start over")
    groups = record["groups"]
    mine = shard(len(groups), r, world)
    plans = {m: _plan(spec_dir(run_dir, m), groups[m], cfg, data.fingerprint, gen_hash, resume, force)
             for m in mine}
    pin_local_gpu(cfg.train.device, world)

    run_dir.mkdir(parents=True, exist_ok=True)
    if force:
        (run_dir / MANIFEST).unlink(missing_ok=True)
    if force or not (run_dir / HEATMAP).exists():
        save_covariance_heatmap(record["covariance"], groups, data.class_names, run_dir / HEATMAP)
    if force or not (run_dir / CLUSTERS).exists():
        atomic_write_json(run_dir / CLUSTERS, record)
    for m in mine:
        if plans[m] == "train":
            _train_one(cfg, m, groups, run_dir, gen_dir, gen_model, gen_spec, gen_hash, data, data_cfg, x, y,
                       resume, force, progress)
    if not pending_specialists(run_dir, len(groups)):
        _finish(cfg, run_dir, groups, gen_dir, gen_model, gen_hash, data, data_cfg, world, t0)
    return run_dir


def pending_specialists(run_dir: Path, num_specialists: int | None = None) -> list[int]:
    """Specialists without a manifest yet (trained by other ranks, or not yet)."""
    if num_specialists is None:
        num_specialists = len(read_json(Path(run_dir) / CLUSTERS)["groups"])
    return [m for m in range(num_specialists) if not (spec_dir(run_dir, m) / MANIFEST).exists()]


def _train_one(cfg, m, groups, run_dir, gen_dir, gen_model, gen_spec, gen_hash, data, data_config, x, y,
               resume, force, progress) -> None:
    t0 = time.time()
    group, sdir = groups[m], spec_dir(run_dir, m)
    prepare_run_dir(sdir, resume, force, f"specialist {m}")
    train = specialist_train_config(cfg.train, m)
    key = run_key("specialist", group, gen_hash, train.to_dict(), data.fingerprint, len(y), cfg.init)
    metrics = train_specialist(sdir, group, gen_model, gen_spec, x, y, data.x_val, data.y_val, data.x_test,
                               data.y_test, train, key=key, resume=resume, progress=progress, desc=sdir.name,
                               init=cfg.init)
    names = [data.class_names[k] for k in group]
    write_manifest(sdir, stage="specialist", config=to_dict(cfg), inputs={str(gen_dir / MANIFEST): gen_hash},
                   data_fingerprint=data.fingerprint, seed=train.seed, wall_seconds=round(time.time() - t0, 3),
                   metrics=metrics,
                   extra={"data": data.describe(), "data_config": data_config,
                          "specialist": {"index": m, "of": len(groups), "group": list(group), "class_names": names},
                          "generalist": _generalist_info(gen_dir, sdir, gen_hash, cfg.generalist)})
    (sdir / CHECKPOINT).unlink(missing_ok=True)  # finished: the manifest and weights supersede it


# ---------------------------------------------------------------- step 3: the combination

def combined_report(combiner: Combiner, x, y, class_names: list[str], batch_size: int = 2048,
                    table_groups: list[list[int]] | None = None) -> dict:
    """Generalist vs generalist + specialists on (x, y): the paper's Tables 3-4 and more.

    ``table_groups``: the groups of the per-group table (default the combiner's; the stage
    passes every group found, so a group whose specialist was dropped still gets its row).

    Returns:
        ``generalist`` and ``combined`` (test_accuracy, test_errors, test_nll, test_ece);
        ``covered`` (examples whose true class is in some group); ``conditional``
        (examples where some specialist is active); ``by_covering`` (by the number of
        active specialists whose group holds the true class); ``per_group``; how often
        specialists are active; the solver's iterations, seconds and largest KKT
        residual; and the combined test_* metrics repeated at top level.
    """
    groups = combiner.groups
    log_pg, log_q, active = combiner.scores(x, batch_size)  # (N, C), (N, C), (N, M)
    y = np.asarray(y)
    b = breakdown(log_pg, log_q, y, groups, active)
    if table_groups is not None:  # per_group depends only on the true classes, not on who was active
        b["per_group"] = breakdown(log_pg, log_q, y, table_groups, np.zeros((len(y), len(table_groups)), bool))[
            "per_group"]
    covered = np.isin(y, [k for g in groups for k in g])

    def scores(s):
        s = s.numpy()
        return {"test_accuracy": M.accuracy(s, y), "test_errors": M.errors(s, y), "test_nll": M.nll(s, y),
                "test_ece": M.ece(s, y)}

    def on(mask):
        g, c = log_pg.numpy()[mask], log_q.numpy()[mask]
        return {"count": int(mask.sum()), "generalist_accuracy": M.accuracy(g, y[mask]),
                "combined_accuracy": M.accuracy(c, y[mask]),
                "delta_correct": M.errors(g, y[mask]) - M.errors(c, y[mask])}

    gen, comb = scores(log_pg), scores(log_q)
    return {
        "top_n": combiner.top_n, "groups": groups, "group_class_names": [[class_names[k] for k in g] for g in groups],
        "generalist": gen, "combined": comb,
        "covered": {"classes": sorted(int(k) for g in groups for k in g), **on(covered)},
        "conditional": b["any_active"], "by_covering": b["by_covering"],
        "per_group": [{**e, "class_names": [class_names[k] for k in e["group"]]} for e in b["per_group"]],
        "active": {"share_with_any": float(active.any(1).double().mean()) if len(y) else float("nan"),
                   "mean_per_example": float(active.sum(1).double().mean()) if len(y) else float("nan"),
                   "share_per_specialist": active.double().mean(0).tolist()},
        "solver": {"tol": TOL, "iterations": combiner.iterations, "seconds": round(combiner.solver_seconds, 4),
                   "max_kkt_residual": combiner.max_kkt_residual},
        **comb,
    }


def _finish(cfg, run_dir, groups, gen_dir, gen_model, gen_hash, data, data_config, world, t0) -> None:
    """Check the finished specialists on the validation split, combine the kept ones on the test split;
    metrics.json (and the check in clusters.json), then the manifest."""
    dirs = [spec_dir(run_dir, m) for m in range(len(groups))]
    for d, g in zip(dirs, groups):  # one finished by another rank must match this call's settings too
        _plan(d, g, cfg, data.fingerprint, gen_hash, False, False)
    models = [load_model(d)[0] for d in dirs]
    bs = cfg.train.eval_batch_size
    checks = check_specialists(gen_model, models, groups, data.x_val, data.y_val, cfg.top_n, bs)
    keep = [c["keep"] or not cfg.drop_unhelpful for c in checks]
    kept = [m for m in range(len(groups)) if keep[m]]
    combiner = Combiner(gen_model, [models[m] for m in kept], [groups[m] for m in kept], cfg.top_n, check_kkt=True)
    report = combined_report(combiner, data.x_test, data.y_test, data.class_names, bs, table_groups=groups)
    own = [read_json(d / "metrics.json") for d in dirs]
    report["specialists"] = [
        {"run": d.name, "group": g, "seed": specialist_train_config(cfg.train, m).seed, "used": keep[m],
         **{k: s.get(k) for k in ("test_accuracy", "test_generalist_accuracy", "test_in_group_accuracy",
                                  "test_generalist_in_group_accuracy", "val_nll", "val_generalist_nll",
                                  "val_nll_uncorrected", "oversampling_factor", "init", "init_max_abs_logprob_diff",
                                  "best_epoch", "epochs_run", "params", "train_seconds")},
         "validation_check": checks[m]}
        for m, (d, g, s) in enumerate(zip(dirs, groups, own))]
    report["dropped"] = [{"run": dirs[m].name, "group": groups[m],
                          "class_names": [data.class_names[k] for k in groups[m]], "reason": checks[m]["reason"]}
                         for m in range(len(groups)) if not keep[m]]
    report["validation_check"] = {"enabled": cfg.drop_unhelpful, "rule": RULE, "split": "validation",
                                  "examples": len(data.y_val)}
    report["train_seconds"] = round(sum(s.get("train_seconds", 0.0) for s in own), 3)
    clusters = read_json(run_dir / CLUSTERS)
    clusters["validation_check"] = {**report["validation_check"], "used": [groups[m] for m in kept],
                                    "dropped": report["dropped"],
                                    "checks": [{"run": d.name, "group": g, **c} for d, g, c in zip(dirs, groups, checks)]}
    atomic_write_json(run_dir / CLUSTERS, clusters)
    atomic_write_json(run_dir / "metrics.json", report)
    inputs = {str(gen_dir / MANIFEST): gen_hash, **{str(d / MANIFEST): sha256_file(d / MANIFEST) for d in dirs}}
    dirs, groups = [dirs[m] for m in kept], [groups[m] for m in kept]  # the manifest lists what the teacher uses
    names = [[data.class_names[k] for k in g] for g in groups]
    write_manifest(run_dir, stage="specialists", config=to_dict(cfg), inputs=inputs,
                   data_fingerprint=data.fingerprint, seed=cfg.train.seed, wall_seconds=round(time.time() - t0, 3),
                   metrics={k: report[k] for k in ("generalist", "combined", "covered", "test_accuracy")},
                   extra={"data": data.describe(), "data_config": data_config, "groups": groups,
                          "group_class_names": names, "specialists": [d.name for d in dirs],
                          "dropped": [e["run"] for e in report["dropped"]], "world_size": world,
                          "generalist": _generalist_info(gen_dir, run_dir, gen_hash, cfg.generalist)})


# ---------------------------------------------------------------- kdens evaluate

def evaluate_specialists(run_dir: Path, manifest: dict) -> dict:
    """``kdens evaluate`` of a specialists run: the combination's report, recomputed from the weights."""
    from specialists.teacher import load_teacher

    teacher = load_teacher(run_dir)
    data, _, _ = load_data(manifest)
    teacher.combiner.check_kkt = True
    run_dir = Path(run_dir)
    every = read_json(run_dir / CLUSTERS).get("groups") if (run_dir / CLUSTERS).exists() else None
    report = combined_report(teacher.combiner, data.x_test, data.y_test, data.class_names, table_groups=every)
    return {"stage": "specialists", "run": str(run_dir), **report}


def evaluate_specialist(run_dir: Path, manifest: dict) -> dict:
    """``kdens evaluate`` of one specialist folder: its |S| + 1-way task, beside the folded generalist."""
    run_dir = Path(run_dir)
    data, _, _ = load_data(manifest)
    group = manifest["specialist"]["group"]
    model, _ = load_model(run_dir)
    gen, _ = load_model(resolve_generalist(run_dir, manifest))
    return {"stage": "specialist", "run": str(run_dir), "group": group,
            "class_names": manifest["specialist"].get("class_names"),
            **task_metrics(model, gen, group, data.x_test, data.y_test, "test_"),
            **task_metrics(model, gen, group, data.x_val, data.y_val, "val_")}
