"""Born-again generations (Furlanello, Lipton, Tschannen, Itti & Anandkumar, "Born-Again Neural
Networks", ICML 2018): ``kdens distill --generations N``.

Generation 1 is distilled from ``--teacher``; generation k + 1 from generation k, with the
same method and recipe. The student's architecture is ``--model`` when given, else the
teacher's (every generation then has the architecture of the original single-model teacher).
Generation k trains with seed ``--seed + k - 1``: a fresh initialisation each time, as the
paper's generations are. Each ``OUT/gen-KK`` is an ordinary student run folder (manifest
included); ``OUT/metrics.json`` and ``OUT/manifest.json`` (stage ``generations``, written
last) report every generation and the ensemble of the generations -- the arithmetic mean of
their probabilities, the paper's BAN ensemble -- which is itself a teacher: ``--teacher OUT``
or ``--teacher OUT/gen-01,OUT/gen-02,...``.

The headline metrics (``test_errors``, ``gap_recovered``, ...) are the last generation's,
with the gap measured against the original teacher; the soft-target cache of every
generation sits in one folder beside ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from distill.config import DistillConfig
from distill.teachers import load_teacher, teacher_log_probs
from kdens import metrics as M
from kdens.artifacts import (MANIFEST, atomic_write_json, read_json, read_manifest, sha256_file, to_json,
                             write_manifest)
from kdens.config import to_dict
from kdens.errors import ArtifactError
from kdens.evaluate import evaluate_model
from kdens.models import load_model
from kdens.runs import data_config, prepare_run_dir, run_data, sub_run_plan
from kdens.train import distributed

RunOne = Callable[[DistillConfig, Path, bool, bool, bool], Path]
"""``(cfg, run_dir, resume, force, progress) -> run_dir``: one student (``distill.stage``)."""

_HEADLINE = ("test_accuracy", "test_errors", "test_nll", "val_accuracy", "val_nll", "params", "method", "method_args",
             "hint", "temperature", "alpha", "loss", "transfer", "baseline_test_errors")


def generation_name(k: int) -> str:
    return f"gen-{k:02d}"


def generation_config(cfg: DistillConfig, k: int, teacher: str, cache_dir: str) -> DistillConfig:
    """Generation k's own config: its teacher, seed ``seed + k - 1``, the shared cache, no further generations."""
    train = dataclasses.replace(cfg.train, seed=cfg.train.seed + k - 1)
    return dataclasses.replace(cfg, teacher=teacher, generations=None, cache_dir=cache_dir, train=train)


def _matches(recorded: dict, cfg: DistillConfig) -> bool:
    """Whether a finished generation was made with ``cfg``: every setting ``cfg`` fixes is as recorded
    (settings left to defaults, like data, were resolved by that run; the device never counts)."""
    want = json.loads(to_json(to_dict(cfg)))
    for key, value in want.items():
        if key in ("cache_dir", "feature_cache_mb") or value is None:  # where and how fast, not what
            continue
        if key == "train":
            got = {k: v for k, v in (recorded.get("train") or {}).items() if k != "device"}
            if {k: v for k, v in value.items() if k != "device"} != got:
                return False
        elif key == "model_args" and cfg.model is None:
            continue  # copied from the teacher and merged: judged by the teacher and the weights
        elif recorded.get(key) != value:
            return False
    return True


def run_generations(cfg: DistillConfig, run_dir: Path, resume: bool, force: bool, progress: bool,
                    run_one: RunOne) -> Path:
    """Train ``cfg.generations`` students, each from the one before, and summarise them in ``run_dir``."""
    t0 = time.time()
    rank, _ = distributed()
    n = int(cfg.generations)
    if rank == 0:
        prepare_run_dir(run_dir, resume, force, "generations run")
    cache_dir = cfg.cache_dir or str(Path(run_dir).parent / "soft_targets")
    teacher, folders = cfg.teacher, []
    for k in range(1, n + 1):
        folder = run_dir / generation_name(k)
        gcfg = generation_config(cfg, k, teacher, cache_dir)
        manifest = folder / MANIFEST
        matches = _matches(read_json(manifest).get("config", {}), gcfg) if manifest.exists() else None
        if sub_run_plan(folder, "generation", matches, resume, force) == "train":
            run_one(gcfg, folder, resume, force or manifest.exists(), progress)
        folders.append(folder)
        teacher = str(folder)
    if rank != 0:
        return run_dir
    metrics = _summary(cfg, run_dir, folders)
    atomic_write_json(run_dir / "metrics.json", metrics)
    first = read_json(folders[0] / MANIFEST)
    inputs = {str(f / MANIFEST): sha256_file(f / MANIFEST) for f in folders}
    for part in str(cfg.teacher).split(","):
        inputs[str(Path(part) / MANIFEST)] = sha256_file(Path(part) / MANIFEST)
    write_manifest(run_dir, stage="generations", config=to_dict(cfg), inputs=inputs,
                   data_fingerprint=first.get("data_fingerprint"), seed=cfg.train.seed,
                   wall_seconds=round(time.time() - t0, 3), metrics=metrics,
                   extra={"generations": [f.name for f in folders], "data_config": data_config(first),
                          "data": first.get("data"), "teacher": first.get("teacher")})
    return run_dir


def _summary(cfg: DistillConfig, run_dir: Path, folders: list[Path]) -> dict:
    """Per generation, the ensemble of generations, and the last generation as the headline."""
    rows = []
    for k, folder in enumerate(folders, start=1):
        m = read_json(folder / "metrics.json")
        rows.append({"generation": k, "run": folder.name, "teacher": read_json(folder / MANIFEST)["config"]["teacher"],
                     **{key: m.get(key) for key in ("test_errors", "test_accuracy", "teacher_test_errors",
                                                     "teacher_agreement", "gap_recovered", "train_seconds",
                                                     "epochs_run")}})
    last = read_json(folders[-1] / "metrics.json")
    out = {key: last.get(key) for key in _HEADLINE if key in last}
    t0 = rows[0]["teacher_test_errors"]
    out.update(generations=rows, teacher_test_errors=t0,
               teacher_test_accuracy=read_json(folders[0] / "metrics.json").get("teacher_test_accuracy"),
               ensemble_teacher=",".join(str(f) for f in folders),
               train_seconds=round(sum(r["train_seconds"] or 0 for r in rows), 3))
    b = last.get("baseline_test_errors")
    if b is not None and t0 is not None:
        out["gap_recovered"], why = M.gap_recovered(b, t0, last["test_errors"])
        if why:
            out["gap_recovered_note"] = why
    if len(folders) > 1:
        data = run_data(read_json(folders[0] / MANIFEST))
        log_p = teacher_log_probs(load_teacher(folders), data.x_test).numpy()  # (N, C): mean of the probabilities
        ens = {"members": [f.name for f in folders], "combine": "arithmetic",
               "test_accuracy": M.accuracy(log_p, data.y_test), "test_errors": M.errors(log_p, data.y_test)}
        if b is not None and t0 is not None:
            ens["gap_recovered"] = M.gap_recovered(b, t0, ens["test_errors"])[0]
        out["ensemble"] = ens
    return out


def _check_generation_manifest(run_dir: Path, manifest: dict, name: str) -> None:
    """``name``'s manifest must be the one the summary was made from (``inputs`` records its sha256).

    Inputs are keyed by the path the run was given (relative or absolute), so they are matched by
    their last two parts; a renamed --out still finds them, an edited manifest does not.
    """
    path = run_dir / name / MANIFEST
    recorded = [d for k, d in (manifest.get("inputs") or {}).items() if Path(k).parts[-2:] == (name, MANIFEST)]
    if recorded and path.is_file() and sha256_file(path) not in recorded:
        raise ArtifactError(f"{path} differs from the sha256 {run_dir / MANIFEST} records for it (the generation "
                            "was retrained or edited after the summary); rerun kdens distill --generations "
                            "(with --force)")


def evaluate_generations(run_dir: Path, manifest: dict) -> dict:
    """``kdens evaluate`` of a generations folder: every generation and their ensemble, from the saved models.

    Each generation's manifest is checked against the summary's record of it and its files against
    their hashes (``read_manifest``) before its model is loaded; a damaged folder raises ArtifactError
    naming the file. The numbers are those ``metrics.json`` recorded, recomputed: each generation as
    ``kdens evaluate`` of a student, the ensemble as the arithmetic mean of the generations' probabilities.
    """
    run_dir = Path(run_dir)
    names = manifest.get("generations") or []
    if not names:
        raise ArtifactError(f"{run_dir / MANIFEST} lists no generations; rerun kdens distill --generations")
    recorded = read_json(run_dir / "metrics.json")
    summary = {r.get("run"): r for r in recorded.get("generations") or []}
    folders, rows, data = [run_dir / n for n in names], [], None
    for k, folder in enumerate(folders, start=1):
        _check_generation_manifest(run_dir, manifest, folder.name)
        m = read_manifest(folder, "student")
        model, spec = load_model(folder)
        data = data if data is not None else run_data(m)
        rows.append({"generation": k, "run": folder.name, "model": spec["name"], **evaluate_model(model, data),
                     "recorded_test_errors": summary.get(folder.name, {}).get("test_errors")})
    out = {"stage": "generations", "run": str(run_dir), "generations": rows}
    if len(folders) > 1:  # the summary's ensemble: the paper's BAN ensemble, a teacher of its own
        log_p = teacher_log_probs(load_teacher(folders), data.x_test).numpy()  # (N, C)
        out["ensemble"] = {"members": list(names), "combine": "arithmetic",
                           "test_accuracy": M.accuracy(log_p, data.y_test), "test_errors": M.errors(log_p, data.y_test),
                           "test_nll": M.nll(log_p, data.y_test),
                           "recorded_test_errors": (recorded.get("ensemble") or {}).get("test_errors")}
    return out


def evaluation_lines(result: dict) -> list[str]:
    """``kdens evaluate``'s lines for a generations folder: one per generation, then the ensemble."""
    def line(label: str, r: dict) -> str:
        text = f"{label}: test_accuracy={r['test_accuracy']:.4f}  test_errors={r['test_errors']}  " \
               f"test_nll={r['test_nll']:.4f}"
        rec = r.get("recorded_test_errors")
        # the summary's number is shown only where the saved models no longer give it
        return text + (f"  (metrics.json recorded test_errors={rec})" if rec is not None and rec != r["test_errors"]
                       else "")

    lines = [line(f"{result['run']}/{r['run']}", r) for r in result["generations"]]
    if "ensemble" in result:
        lines.append(line(f"ensemble of {len(result['ensemble']['members'])} generations", result["ensemble"]))
    return lines
