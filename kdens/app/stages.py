"""The one table of stage kinds: kind -> config type, run, evaluate, command.

Every other part of the orchestration floor (the CLI, ``kdens run``'s plan and runner,
``kdens evaluate``) dispatches on a stage's kind through ``STAGES``; nothing else keeps a
table of kinds. Each stage's ``run`` honours one contract::

    run(cfg, run_dir, *, resume=False, force=False, progress=True) -> Path

it reads only folders that hold a manifest, writes its own folder and ``manifest.json`` last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import click

from deploy import bench_stage
from deploy import stage as deploy_stage
from deploy.bench_stage import BenchConfig
from deploy.config import DeployConfig
from distill import generations
from distill import stage as distill_stage
from distill import trees_stage
from distill.config import DistillConfig
from ensembles import stage as ensemble_stage
from ensembles.config import EnsembleConfig
from generalist import stage as generalist_stage
from generalist.imported import ImportConfig
from kdens.app.cli_deploy import bench_cmd, deploy_cmd
from kdens.app.cli_distill import distill_cmd
from kdens.app.cli_ensemble import train_ensemble
from kdens.app.cli_generalist import train_generalist
from kdens.app.cli_specialists import train_specialists
from kdens.artifacts import read_manifest
from kdens.config import GeneralistConfig
from kdens.errors import ArtifactError
from specialists import stage as specialists_stage
from specialists.config import SpecialistsConfig


@dataclass(frozen=True)
class StageKind:
    """What the orchestration needs to know about one kind of stage."""

    kind: str
    """The name in a pipeline plan and in the ``stage`` field of the manifests it writes."""
    config: type | None
    """Its typed config (None for sub-runs that only a parent stage makes)."""
    run: Callable[..., Path] | None
    """``run(cfg, run_dir, *, resume, force, progress) -> Path``."""
    evaluate: Callable[[Path, dict], dict] | None
    """``evaluate(run_dir, manifest) -> dict`` for ``kdens evaluate``; None: nothing to evaluate."""
    command: click.Command | None
    """Its ``kdens`` command."""
    summary: tuple[str, ...] = ()
    """Metrics shown on ``kdens run``'s line for the stage, when its folder has them."""
    lines: Callable[[dict], list[str]] | None = None
    """How ``kdens evaluate`` prints ``evaluate``'s result, one line per part; None: as JSON."""
    import_config: type | None = None
    """A second config its ``run`` takes: a model trained elsewhere, imported (``kdens import-model``)."""


_SINGLE = ("test_accuracy", "test_errors")
_GENERALIST = StageKind("generalist", GeneralistConfig, generalist_stage.run, generalist_stage.evaluate,
                        train_generalist, _SINGLE, import_config=ImportConfig)



def _evaluate_student(run_dir: Path, manifest: dict) -> dict:
    """A network student like a generalist; a tree student through its ONNX file."""
    if trees_stage.is_tree_run(run_dir):
        return trees_stage.evaluate(run_dir, manifest)
    return generalist_stage.evaluate(run_dir, manifest)


STAGES: dict[str, StageKind] = {
    "generalist": _GENERALIST,
    # a student's hard-label twin: a generalist run, kept apart for the report
    "baseline": replace(_GENERALIST, kind="baseline", command=None, import_config=None),
    "ensemble": StageKind("ensemble", EnsembleConfig, ensemble_stage.run, ensemble_stage.evaluate_ensemble,
                          train_ensemble, _SINGLE),
    "specialists": StageKind("specialists", SpecialistsConfig, specialists_stage.run,
                             specialists_stage.evaluate_specialists, train_specialists, ("combined_test_accuracy",)),
    # one spec-NN folder inside a specialists run: evaluated on its |S| + 1-way task
    "specialist": StageKind("specialist", None, None, specialists_stage.evaluate_specialist, None),
    "student": StageKind("student", DistillConfig, distill_stage.run, _evaluate_student, distill_cmd,
                         (*_SINGLE, "gap_recovered")),
    # the folder of `kdens distill --generations N`: gen-01..gen-N students and their ensemble
    "generations": StageKind("generations", None, None, generations.evaluate_generations, None,
                             lines=generations.evaluation_lines),
    "deploy": StageKind("deploy", DeployConfig, deploy_stage.run, None, deploy_cmd, ("accuracy",)),
    "bench": StageKind("bench", BenchConfig, bench_stage.run, None, bench_cmd),
}


def kind(name: str) -> StageKind:
    """The table's entry for ``name``; an unknown kind is an error listing the known ones."""
    if name not in STAGES:
        raise ArtifactError(f"unknown stage kind {name!r}; valid: {', '.join(STAGES)}")
    return STAGES[name]


def evaluate_run(run_dir: Path) -> dict:
    """``kdens evaluate``: test metrics of any finished run folder, by the stage that made it."""
    manifest = read_manifest(run_dir)
    stage = manifest.get("stage")
    entry: Any = STAGES.get(stage)
    if entry is None or entry.evaluate is None:
        valid = ", ".join(k for k, v in STAGES.items() if v.evaluate is not None)
        raise ArtifactError(f"{run_dir}: cannot evaluate a '{stage}' stage; valid: {valid}")
    return entry.evaluate(Path(run_dir), manifest)


def evaluation_lines(result: dict) -> list[str] | None:
    """``evaluate_run``'s result as lines for the terminal, where its kind prints lines (else None: JSON)."""
    entry = STAGES.get(result.get("stage"))
    return entry.lines(result) if entry is not None and entry.lines is not None else None
