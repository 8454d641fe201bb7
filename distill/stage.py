"""Stage ``distill``: train a small student from a teacher by a distillation method (``--method``).

Reads the teacher run folder(s), picks the transfer set, and trains with
``kdens.train.fit`` and the method's loss: logit methods read the teacher's scores from
the soft-target cache (online under jitter), feature methods read the teacher's hidden layers
with hooks on both networks (``distill.online``; its features computed once under a memory
budget, ``distill.feature_cache``, online under jitter), ``tfkd-virtual`` needs no teacher. Then it
optionally fixes the omitted classes' biases and writes ``model.safetensors``,
``model.json``, ``metrics.json``, ``history.json`` and ``manifest.json`` (last) into the
student's folder. ``--generations N`` chains students (``distill.generations``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distill import feature_cache, impressions, online
from distill.cache import cache_key
from distill.config import DistillConfig
from distill.loop import (
    agree,
    cached_loss_fn,
    init_distributed,
    online_loss_fn,
    output_head,
    shift_bias,
)
from distill.methods import make_method
from distill.prepare import (
    check_compatible,
    default_cache_dir,
    resolve_data,
    soft_cache_key,
    soft_targets,
    transfer_set,
)
from distill.resolve import check_teacher, resolve_model, unlabeled
from distill.scores import ScoresTeacher, refuse_online
from distill.teachers import (Teacher, load_teacher, soft_scores_depend_on_temperature, soft_scores_fn,
                              split_teacher_spec, teacher_log_probs)
from distill.transfer import TransferSpec, fit_bias_shift
from distill.trees import is_tree
from kdens import metrics as M
from kdens.artifacts import (
    MANIFEST,
    atomic_write_json,
    read_manifest,
    sha256_file,
    write_manifest,
)
from kdens.config import to_dict
from kdens.data import Dataset
from kdens.errors import ConfigError, DataError, KdensError
from kdens.evaluate import evaluate_model
from kdens.models import (
    build_for_data,
    count_params,
    load_model,
    model_spec,
    save_model,
)
from kdens.runs import check_augmentation, load_data, prepare_run_dir, run_key
from kdens.train import CHECKPOINT, distributed, fit, predict_logits, resolve_device, schedule_metrics

STUDENT_FILES = ["history.json", "manifest.json", "metrics.json", "model.json", "model.safetensors"]


def _impressions(teacher: Teacher | None, cfg: DistillConfig, spec: TransferSpec, data: Dataset, cache_dir: Path,
                 progress: bool) -> tuple[np.ndarray, None, dict, Dataset]:
    """Data impressions as the transfer set, and the data the student may see: no training example.

    The student's validation split is a held-out ``val_fraction`` of the impressions, labelled by
    the teacher's argmax (early stopping and the health check then measure agreement with the
    teacher on unseen impressions); the training and validation examples are dropped from the
    dataset, whose test split serves only the final report.
    """
    x, _, info = impressions.generate(teacher, spec, data, cfg.split_seed, cache_dir, progress=progress)
    n_val = round(cfg.val_fraction * len(x)) if cfg.val_fraction else 0
    n_val = min(max(n_val, 1 if cfg.val_fraction else 0), len(x) - 1)
    x_tr, x_val = x[:len(x) - n_val], x[len(x) - n_val:]
    y_val = teacher_log_probs(teacher, x_val, cfg.train.eval_batch_size).argmax(1).numpy().astype(np.int64)
    info = {**info, "examples": int(len(x_tr)), "validation": {
        "examples": int(n_val), "source": "held-out impressions labelled by the teacher's argmax"}}
    empty = slice(0, 0)
    data = dataclasses.replace(data, x_train=data.x_train[empty], y_train=data.y_train[empty], x_val=x_val,
                               y_val=y_val)
    return x_tr, None, info, data


def _baseline_errors(run_dir: Path, data: Dataset, batch_size: int) -> tuple[int, str]:
    """Test errors of a hard-label run on this data's test split, and its manifest's sha256."""
    read_manifest(run_dir, ("generalist", "student"))
    model, spec = load_model(run_dir)
    if spec["num_classes"] != data.num_classes or tuple(spec["input_shape"]) != tuple(data.input_shape):
        raise DataError(f"--baseline {run_dir} was trained for {spec['num_classes']} classes of "
                        f"{tuple(spec['input_shape'])}, not this data's {data.num_classes} of {data.input_shape}")
    errors = M.errors(predict_logits(model, data.x_test, batch_size).numpy(), data.y_test)
    return errors, sha256_file(run_dir / MANIFEST)


def run(cfg: DistillConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Distill the teacher named by ``cfg`` into a student in ``run_dir`` and return the folder.

    With ``cfg.generations`` = N the folder holds born-again generations ``gen-01`` ... ``gen-N``
    (``distill.generations``) and a summary manifest. Under torchrun (``WORLD_SIZE`` > 1) each
    rank calls this; the stage joins the process group, rank 0 builds the cache and writes
    every file, and ``fit`` shards each batch.
    """
    if is_tree(cfg.model):  # fitted once, not trained: its own small path
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"--model {cfg.model} is fitted in one process; run it without torchrun")
        from distill.trees_stage import run as run_tree

        return run_tree(cfg, Path(run_dir), resume=resume, force=force, progress=progress)
    created, device_str = init_distributed(cfg.train.device)
    try:
        if cfg.generations is not None:
            from distill.generations import run_generations

            return run_generations(cfg, Path(run_dir), resume, force, progress,
                                   lambda c, d, r, f, p: _run(c, d, r, f, p, device_str))
        return _run(cfg, Path(run_dir), resume, force, progress, device_str)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _run(cfg: DistillConfig, run_dir: Path, resume: bool, force: bool, progress: bool, device_str: str) -> Path:
    t0 = time.time()
    rank, world = distributed()
    if device_str != cfg.train.device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device_str))
    device = resolve_device(cfg.train.device)
    notes: dict = {"alpha_requested": cfg.alpha}
    err = features = None
    try:  # everything that can fail on bad input happens before the first write
        teacher_paths = split_teacher_spec(cfg.teacher) if cfg.teacher is not None else []
        teacher = load_teacher(teacher_paths, device) if teacher_paths else None
        method = make_method(cfg.method, cfg.method_args)
        check_teacher(method, teacher, cfg.teacher, world)
        refuse_online(teacher, cfg)
        cfg = resolve_model(resolve_data(cfg, teacher), teacher)
        data = load_data(dataclasses.asdict(cfg))
        if isinstance(teacher, ScoresTeacher):
            teacher.check_data(data)
            teacher.rows(cfg.transfer_spec, data, cfg.split_seed)  # refuses transfer sets of new inputs
        elif teacher is not None:
            check_compatible(teacher, data)
        check_augmentation(data, cfg.train)
        spec = cfg.transfer_spec
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(run_dir)
        if spec.kind == "impressions":  # data-free: the student's data holds no training example
            x_tr, y_tr, transfer_info, data = _impressions(teacher, cfg, spec, data, cache_dir, progress and rank == 0)
        else:
            x_tr, y_tr, transfer_info = transfer_set(spec, data, cfg.split_seed)
        if y_tr is None:
            cfg, method = unlabeled(cfg, method, spec, notes)
        student = _build_student(cfg, data)
        if cfg.fix_bias:
            output_head(student)
        if method.features:
            features = online.prepare(method, teacher.model, student, cfg.hint, x_tr, data.input_shape,
                                      cfg.train.seed)
        baseline = _baseline_errors(Path(cfg.baseline), data, cfg.train.eval_batch_size) if cfg.baseline else None
        cfg = dataclasses.replace(cfg, cache_dir=str(cache_dir))
        if rank == 0:
            prepare_run_dir(run_dir, resume, force, "student")
            if method.features:
                online.check_interrupted(run_dir, method.phases(cfg.train.epochs), resume, force)
    except KdensError as e:
        err = e
    agree(err)

    teacher_fp = getattr(teacher, "data_fingerprint", None)
    notes["teacher_data_fingerprint"] = teacher_fp
    notes["data_differs_from_teacher"] = teacher_fp is not None and teacher_fp != data.fingerprint
    hashes = list(teacher.manifest_hashes) if teacher is not None else []
    mspec = model_spec(cfg.model, data.num_classes, data.input_shape, cfg.model_args, data.normalization)
    # the device stays out of the key: under DDP on CUDA each rank trains on its own cuda:K
    train_key = {k: v for k, v in cfg.train.to_dict().items() if k != "device"}
    rkey_parts = ["student", mspec, train_key, data.fingerprint, str(spec), cfg.method, cfg.method_args,
                  cfg.hint, hashes]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    phases = None
    feature_info = None
    taught = _taught_classes(spec, data.num_classes)  # what the after-training check judges
    if features is not None:  # feature methods: the teacher's features computed once, or online every batch
        store, feature_info = _teacher_features(features, cfg, data, spec, x_tr, transfer_info, hashes, device)
        cache_info = {"online": store is None, "reused": feature_info["reused"],
                      "build_seconds": feature_info["build_seconds"], "key": feature_info["key"],
                      "soft_temperature": None}
        # the path taken stays out of the run key: memory, disk and online train the same student
        result, phases = online.train(method, features, x_tr, y_tr, data.x_val, data.y_val, cfg.train, run_dir,
                                      resume=resume, run_key=run_key(*rkey_parts), progress=progress, store=store,
                                      check_classes=taught)
        student = features.trainee.student
    else:
        loss_fn, cache_info = _logit_loss_fn(method, teacher, cfg, data, spec, x_tr, transfer_info, hashes,
                                             device, progress and rank == 0)
        result = fit(student, x_tr, y_tr, data.x_val, data.y_val, cfg.train, loss_fn=loss_fn, ckpt_dir=run_dir,
                     resume=resume, run_key=run_key(*rkey_parts, cache_info["key"]), progress=progress,
                     desc="student", on_epoch=lambda e: method.set_epoch(e, cfg.train.epochs),
                     check_classes=taught)
    if rank != 0:
        return run_dir

    metrics = _student_metrics(student, teacher, data, cfg, result, len(x_tr), baseline, cache_info)
    if feature_info is not None:
        metrics["teacher_features"] = feature_info["path"]
    if phases is not None:  # every phase counts (the hint / FSP stage trains before --epochs)
        metrics.update(phases=phases, epochs_run=sum(p["epochs_run"] for p in phases),
                       epochs_planned=sum(p["epochs"] for p in phases),
                       train_seconds=round(sum(p["seconds"] for p in phases), 3))
    save_model(run_dir, student, mspec)  # the student alone: adapters are not part of it
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "history.json", result.history)
    inputs = {str(p / MANIFEST) if p.is_dir() else str(p): sha256_file(p / MANIFEST if p.is_dir() else p)
              for p in teacher_paths}
    if cfg.baseline:
        inputs[str(Path(cfg.baseline) / MANIFEST)] = baseline[1]
    extra = {"data": data.describe(), "teacher": teacher.describe() if teacher is not None else None,
             "teacher_manifest_hashes": hashes, "transfer": transfer_info, "soft_targets": cache_info,
             "world_size": world, "resumed_from_epoch": result.resumed_from_epoch, **notes}
    if spec.kind == "impressions":
        extra["training_examples_seen"] = 0
    if features is not None:
        extra["features"] = {**features.describe(), "teacher_features": feature_info}
    write_manifest(run_dir, stage="student", config=to_dict(cfg), inputs=inputs,
                   data_fingerprint=data.fingerprint, seed=cfg.train.seed,
                   wall_seconds=round(time.time() - t0, 3), metrics=metrics, extra=extra)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # finished: the manifest and weights supersede it
    if features is not None:
        online.finish(run_dir, method, cfg.train.epochs)
    return run_dir


def _logit_loss_fn(method, teacher: Teacher | None, cfg: DistillConfig, data: Dataset, spec: TransferSpec,
                   x_tr: np.ndarray, transfer_info: dict, hashes: list, device, progress: bool):
    """``fit``'s loss for a logit method: cached teacher scores, online under jitter, or no teacher."""
    if teacher is None or method.teacher == "none":
        def free(logits, xb, yb, idx):
            return method.loss(logits, None, yb)

        return free, {"online": False, "reused": False, "build_seconds": 0.0, "key": None, "teacher": False}
    temperature = method.temperature if method.temperature is not None else 1.0
    if isinstance(teacher, ScoresTeacher):  # the scores are the cache: take the transfer set's rows
        key, _ = soft_cache_key(teacher, temperature, data, spec, transfer_info, hashes)
        return cached_loss_fn(method.loss, teacher.targets(spec, data, cfg.split_seed, device)), {
            "online": False, "reused": False, "precomputed": True, "build_seconds": 0.0, "soft_temperature": None,
            "key": key, "path": str(teacher.path)}
    if cfg.train.jitter > 0 or cfg.train.augment:
        # jittered / augmented inputs change every step: a cache of the clean images would be the wrong
        # targets; online, the teacher scores exactly the views the student sees
        soft_t = float(temperature) if soft_scores_depend_on_temperature(teacher) else None
        return online_loss_fn(method.loss, soft_scores_fn(teacher, temperature)), {
            "online": True, "reused": False, "build_seconds": 0.0, "key": None, "soft_temperature": soft_t}
    targets, info = soft_targets(teacher, temperature, data, spec, x_tr, transfer_info, hashes,
                                 Path(cfg.cache_dir), device, cfg.train.eval_batch_size, progress)
    return cached_loss_fn(method.loss, targets), info


def _teacher_features(features: online.FeatureSetup, cfg: DistillConfig, data: Dataset, spec: TransferSpec,
                      x_tr: np.ndarray, transfer_info: dict, hashes: list, device):
    """A feature method's teacher: its logits and hint features over the transfer set (``distill.feature_cache``),
    or (None, info) to run it online every batch."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x_tr).tobytes())  # the transfer set itself: a MUNGE set depends on its seed too
    extra = {"kind": "teacher_features", "hints": [str(hint.teacher) for hint in features.hints],
             "inputs_sha256": h.hexdigest(), "unlabeled_sha256": transfer_info.get("sha256")}
    key = cache_key(hashes, data.fingerprint, str(spec), extra)
    meta = {"teacher_manifest_hashes": hashes, "data_fingerprint": data.fingerprint, "transfer": str(spec),
            "hints": extra["hints"], "inputs_sha256": extra["inputs_sha256"]}
    return feature_cache.provide(features, x_tr, setting=cfg.feature_cache_mb, jitter=cfg.train.jitter,
                                 cache_dir=Path(cfg.cache_dir), key=key, device=device,
                                 batch_size=cfg.train.eval_batch_size, meta=meta, augment=cfg.train.augment)


def _build_student(cfg: DistillConfig, data: Dataset):
    torch.manual_seed(cfg.train.seed)  # the run's seed also fixes the initial weights
    return build_for_data(cfg.model, data, cfg.model_args)[0]


def _taught_classes(spec: TransferSpec, num_classes: int) -> list[int] | None:
    """The classes an ``omit=`` transfer set holds, which the after-training check judges; else None (all).

    A student never shown a class cannot be expected to predict it before its bias fix (the
    paper's 7s-and-8s student is at 47% error then): judging it on every class would refuse
    the experiment itself as a failed training.
    """
    if spec.kind != "omit":
        return None
    return [c for c in range(num_classes) if c not in spec.classes]


def _omitted_test_rows(spec: TransferSpec, y_test) -> np.ndarray | None:
    """Boolean mask of the test examples whose class ``omit=`` left out of the transfer set, else None."""
    if spec.kind != "omit":
        return None
    return np.isin(np.asarray(y_test), list(spec.classes))


def _student_metrics(student, teacher: Teacher | None, data: Dataset, cfg: DistillConfig, result, n_transfer: int,
                     baseline: tuple[int, str] | None, cache_info: dict) -> dict:
    """The foundation's metrics plus the method, the teacher comparison, bias fix and cache facts.

    ``loss`` repeats ``method`` (the report's distillation table has shown ``loss`` since
    before there were methods beyond kd / soft / logits).
    """
    bs = cfg.train.eval_batch_size
    student.to("cpu")
    fix = None
    omitted = _omitted_test_rows(cfg.transfer_spec, data.y_test)
    if cfg.fix_bias:
        classes = list(cfg.transfer_spec.classes)
        z_before = predict_logits(student, data.x_test, bs).numpy()
        shift, info = fit_bias_shift(predict_logits(student, data.x_val, bs).numpy(), data.y_val, classes)
        shift_bias(student, classes, shift)
        fix = {"bias_shift": shift, "test_errors_before_bias_fix": M.errors(z_before, data.y_test),
               "omitted_test_errors_before_bias_fix": M.errors(z_before[omitted], np.asarray(data.y_test)[omitted]),
               "bias_fit": info}
    metrics = evaluate_model(student, data, bs)
    metrics.update(params=count_params(student), train_seconds=round(result.seconds, 3),
                   **schedule_metrics(result, cfg.train), train_examples=int(n_transfer),
                   training_check=result.health, method=cfg.method, method_args=dict(cfg.method_args),
                   hint=list(cfg.hint),
                   temperature=cfg.temperature, alpha=cfg.alpha, loss=cfg.method, transfer=cfg.transfer)
    if isinstance(teacher, ScoresTeacher):  # scores of the training rows only: no test comparison
        y_all = np.empty(len(teacher.scores), np.int64)  # labels in the scores' row order
        y_all[data.train_rows], y_all[data.val_rows] = data.y_train, data.y_val
        rows = teacher.rows(cfg.transfer_spec, data, cfg.split_seed)
        metrics.update(teacher_transfer_accuracy=M.accuracy(teacher.scores[rows], y_all[rows]))
    elif teacher is not None:
        s_test = predict_logits(student, data.x_test, bs).numpy()  # (N, C)
        t_test = teacher_log_probs(teacher, data.x_test, bs).numpy()  # (N, C)
        metrics.update(teacher_agreement=M.agreement(s_test, t_test),
                       teacher_test_accuracy=M.accuracy(t_test, data.y_test),
                       teacher_test_errors=M.errors(t_test, data.y_test))
    if omitted is not None:  # the paper counts the errors on the omitted class (133 of its 1010 threes)
        z_after = predict_logits(student, data.x_test, bs).numpy()  # the test split may be memory-mapped
        metrics.update(omitted_test_examples=int(omitted.sum()),
                       omitted_test_errors=M.errors(z_after[omitted], np.asarray(data.y_test)[omitted]))
    if fix is not None:
        fix["test_errors_after_bias_fix"] = metrics["test_errors"]
        metrics.update(fix)
    if baseline is not None:
        b, t, s = baseline[0], metrics.get("teacher_test_errors"), metrics["test_errors"]
        metrics["baseline_test_errors"] = b
        # undefined unless the teacher beats the baseline by more than the split's noise
        metrics["gap_recovered"], why = M.gap_recovered(b, t, s)
        if why:
            metrics["gap_recovered_note"] = why
        worse = M.worse_than_baseline(b, s)
        if worse:  # it learned something (kdens.health passed) but is damaged: say so, with what to try
            clip = "--grad-clip 5 (a high T scales the soft gradient by T^2), " if cfg.train.grad_clip is None else ""
            advice = f"things to try: {clip}more --epochs, another --temperature or --alpha, a lower --lr"
            metrics["worse_than_baseline"] = worse
            print(f"warning: {worse}; {advice}", file=sys.stderr, flush=True)
    metrics["soft_targets"] = ({k: cache_info[k] for k in ("online", "reused", "build_seconds", "precomputed")
                                if k in cache_info} if cache_info.get("teacher", True) else None)
    return metrics
