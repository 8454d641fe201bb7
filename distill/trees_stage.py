"""The distillation stage's tree path: ``kdens distill --model tree|gbt`` (distill/trees.py).

Same teacher loading, data settings, transfer sets (MUNGE included) and soft-target cache
as a network student (``distill.prepare``); then one fit instead of a training loop. The
hard-label twin, the baseline of ``gap_recovered``, is fitted in the same run: the same kind
and settings on the labelled transfer set (on the training split when the transfer set has
no labels), so it is never a network and never of other settings.

The run folder holds ``model.onnx`` (the student, exported with skl2onnx and checked against
scikit-learn on the test set before anything is written), ``rules.txt`` (the tree's rules;
a summary for gbt), ``model.json``, ``sklearn_test_proba.npy`` (scikit-learn's probabilities
on the test split: the reference ``kdens deploy`` compares ONNX Runtime with, so no pickle is
ever written or loaded), ``metrics.json``, ``history.json`` (empty: a fit has no epochs) and
``manifest.json`` last.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path

import numpy as np

from distill import trees
from distill.config import DistillConfig
from distill.methods import make_method
from distill.prepare import (
    check_compatible,
    default_cache_dir,
    resolve_data,
    soft_targets,
    transfer_set,
)
from distill.resolve import unlabeled
from distill.scores import ScoresTeacher
from distill.teachers import load_teacher, split_teacher_spec, teacher_log_probs
from kdens import metrics as M
from kdens.artifacts import (
    MANIFEST,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_file,
    write_manifest,
)
from kdens.config import to_dict
from kdens.data import Dataset
from kdens.errors import ConfigError
from kdens.runs import load_data, prepare_run_dir, run_data

MODEL_FILE = "model.onnx"
RULES_FILE = "rules.txt"
REFERENCE_FILE = "sklearn_test_proba.npy"
PARITY_TOL = 1e-5
"""ONNX Runtime vs scikit-learn: max |probability diff| allowed (float32 thresholds and sums)."""
TREE_FILES = ["history.json", "manifest.json", "metrics.json", "model.json", MODEL_FILE, RULES_FILE, REFERENCE_FILE]


def is_tree_run(run_dir: Path) -> bool:
    """Whether a finished student folder holds a tree student (its model.json says so)."""
    spec = Path(run_dir) / "model.json"
    return spec.exists() and trees.is_tree(read_json(spec).get("name"))


def run(cfg: DistillConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Fit the tree student ``cfg.model`` to the teacher's soft targets into ``run_dir``.

    A fit has no partial state, so ``resume`` redoes it (as a deploy does).
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    trees.check_installed(cfg.model)
    notes: dict = {"alpha_requested": cfg.alpha}
    teacher_paths = split_teacher_spec(cfg.teacher)
    teacher = load_teacher(teacher_paths, "cpu")
    if isinstance(teacher, ScoresTeacher):  # a tree's metrics and twin gap need the teacher's test answers
        raise ConfigError(f"--teacher {teacher.path} holds precomputed scores of the training rows only, but a "
                          f"--model {cfg.model} student is measured against its teacher on the test split; import "
                          "the teacher model (kdens import-model) or distill a network student from the scores")
    method = make_method(cfg.method, cfg.method_args)
    cfg = resolve_data(cfg, teacher)
    data = load_data(dataclasses.asdict(cfg))
    check_compatible(teacher, data)
    spec = cfg.transfer_spec
    x_tr, y_tr, transfer_info = transfer_set(spec, data, cfg.split_seed)
    if y_tr is None:
        cfg, method = unlabeled(cfg, method, spec, notes)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(run_dir)
    cfg = dataclasses.replace(cfg, cache_dir=str(cache_dir))
    prepare_run_dir(run_dir, resume, force, "student")
    run_dir.mkdir(parents=True, exist_ok=True)

    hashes = list(teacher.manifest_hashes)
    temperature = float(cfg.temperature)
    alpha = float(cfg.alpha or 0.0)
    scores, cache_info = soft_targets(teacher, temperature, data, spec, x_tr, transfer_info, hashes, cache_dir,
                                      "cpu", cfg.train.eval_batch_size, progress)
    q = trees.target_distribution(scores.numpy(), temperature, alpha, y_tr)  # (N, C)
    seed = cfg.train.seed
    t_fit = time.time()
    est = trees.fit_student(cfg.model, cfg.model_args, x_tr, q, seed)
    fit_seconds = time.time() - t_fit
    twin_x, twin_y = (x_tr, y_tr) if y_tr is not None else (data.x_train, data.y_train)
    t_twin = time.time()
    twin = trees.fit_twin(cfg.model, cfg.model_args, twin_x, twin_y, seed)
    twin_seconds = time.time() - t_twin

    c = data.num_classes
    p_test = trees.predict_proba(est, data.x_test, c)  # (N, C)
    onnx_bytes = trees.to_onnx(est, tuple(data.input_shape), c)
    ort_test = trees.onnx_proba(onnx_bytes, data.x_test)
    parity = float(np.abs(ort_test.astype(np.float64) - p_test).max())
    if parity > PARITY_TOL:  # the exported file must answer what was fitted, or it is not the student
        warnings.warn(f"ONNX Runtime differs from scikit-learn by {parity:.3g} (> {PARITY_TOL:g}) on the test set; "
                      "kdens deploy --target onnx will fail its parity check", UserWarning, stacklevel=2)

    metrics = _metrics(est, twin, teacher, data, cfg, p_test, twin_x, fit_seconds, twin_seconds, len(x_tr),
                       cache_info, parity)
    atomic_write_bytes(run_dir / MODEL_FILE, onnx_bytes)
    names = [f"x{i}" for i in range(int(np.prod(data.input_shape)))]
    atomic_write_text(run_dir / RULES_FILE, trees.rules_text(est, names))
    atomic_save_npy(run_dir / REFERENCE_FILE, p_test)
    atomic_write_json(run_dir / "model.json", model_json(cfg, data))
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "history.json", [])
    inputs = {str(p / MANIFEST): sha256_file(p / MANIFEST) for p in teacher_paths}
    extra = {"data": data.describe(), "teacher": teacher.describe(), "teacher_manifest_hashes": hashes,
             "transfer": transfer_info, "soft_targets": cache_info, "world_size": 1, "resumed_from_epoch": None,
             "target_distribution": ("tree: squared error on q = alpha*onehot(y) + (1-alpha)*softmax(s/T)"
                                     if cfg.model == "tree" else
                                     "gbt: log-loss on rows (x, c) weighted q_c >= 1e-3, q = alpha*onehot(y) + "
                                     "(1-alpha)*softmax(s/T)"),
             **notes}
    write_manifest(run_dir, stage="student", config=to_dict(cfg), inputs=inputs, data_fingerprint=data.fingerprint,
                   seed=seed, wall_seconds=round(time.time() - t0, 3), metrics=metrics, extra=extra)
    return run_dir


def model_json(cfg: DistillConfig, data: Dataset) -> dict:
    """What the folder's model is: kind, settings, input shape and the file that holds it."""
    import skl2onnx
    import sklearn

    return {"name": cfg.model, "kwargs": dict(cfg.model_args), "num_classes": data.num_classes,
            "input_shape": list(data.input_shape), "format": "onnx", "file": MODEL_FILE, "input": "x",
            "output": "probabilities", "reference": REFERENCE_FILE,
            "versions": {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__}}


def _scores_metrics(proba_test: np.ndarray, proba_val: np.ndarray | None, data: Dataset) -> dict:
    test = trees.log_scores(proba_test)
    out = {"test_accuracy": M.accuracy(test, data.y_test), "test_errors": M.errors(test, data.y_test),
           "test_nll": M.nll(test, data.y_test), "test_ece": M.ece(test, data.y_test)}
    if proba_val is not None and len(data.y_val):
        val = trees.log_scores(proba_val)
        out.update(val_accuracy=M.accuracy(val, data.y_val), val_nll=M.nll(val, data.y_val))
    else:
        out.update(val_accuracy=float("nan"), val_nll=float("nan"))
    return out


def _metrics(est, twin, teacher, data: Dataset, cfg: DistillConfig, p_test: np.ndarray, twin_x: np.ndarray,
             fit_seconds: float, twin_seconds: float, n_transfer: int, cache_info: dict, parity: float) -> dict:
    """A network student's metrics (same keys), the tree's size, and its hard-label twin."""
    c = data.num_classes
    p_val = trees.predict_proba(est, data.x_val, c) if len(data.y_val) else None
    metrics = _scores_metrics(p_test, p_val, data)
    metrics.update(trees.size(est, c), train_seconds=round(fit_seconds, 3), best_epoch=None, epochs_run=0,
                   stopped_early=False, train_examples=int(n_transfer), method=cfg.method,
                   method_args=dict(cfg.method_args), hint=[], temperature=cfg.temperature, alpha=cfg.alpha,
                   loss=cfg.method, transfer=cfg.transfer, model=cfg.model, model_args=dict(cfg.model_args),
                   onnx_parity_max_abs_diff=parity)
    t_test = teacher_log_probs(teacher, data.x_test, cfg.train.eval_batch_size).numpy()  # (N, C)
    metrics.update(teacher_agreement=M.agreement(trees.log_scores(p_test), t_test),
                   teacher_test_accuracy=M.accuracy(t_test, data.y_test),
                   teacher_test_errors=M.errors(t_test, data.y_test))
    twin_test = trees.log_scores(trees.predict_proba(twin, data.x_test, c))
    b, t, s = M.errors(twin_test, data.y_test), metrics["teacher_test_errors"], metrics["test_errors"]
    metrics["hard_label_twin"] = {"test_errors": b, "test_accuracy": M.accuracy(twin_test, data.y_test),
                                  **trees.size(twin, c), "train_examples": int(len(twin_x)),
                                  "train_seconds": round(twin_seconds, 3)}
    metrics["baseline_test_errors"] = b
    # undefined unless the teacher beats the twin by more than the split's noise (kdens.metrics.gap_recovered)
    metrics["gap_recovered"], why = M.gap_recovered(b, t, s)
    if why:
        metrics["gap_recovered_note"] = why
    metrics["soft_targets"] = {k: cache_info[k] for k in ("online", "reused", "build_seconds")}
    return metrics


def test_log_probs(run_dir: Path, x: np.ndarray) -> np.ndarray:
    """Log-probabilities (N, C) of a finished tree student folder, from its ONNX file in ONNX Runtime."""
    return trees.log_scores(trees.onnx_proba(Path(run_dir) / MODEL_FILE, x))


def evaluate(run_dir: Path, manifest: dict) -> dict:
    """``kdens evaluate`` of a tree student: its ONNX file on the data its manifest names."""
    data = run_data(manifest)
    val = trees.onnx_proba(Path(run_dir) / MODEL_FILE, data.x_val) if len(data.y_val) else None
    out = _scores_metrics(trees.onnx_proba(Path(run_dir) / MODEL_FILE, data.x_test), val, data)
    return {"stage": manifest["stage"], "run": str(run_dir), "model": read_json(Path(run_dir) / "model.json")["name"],
            **out}
