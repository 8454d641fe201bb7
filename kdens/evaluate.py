"""``kdens evaluate``: test metrics of any finished run folder, by its stage."""

from __future__ import annotations

from pathlib import Path

from kdens.artifacts import read_manifest
from kdens.data import load_dataset
from kdens.errors import ArtifactError
from kdens.generalist import evaluate_model
from kdens.models import load_model

# stage -> evaluator(run_dir, manifest) -> dict; later stages register theirs here via cli wiring
EVALUATORS: dict = {}


def dataset_for_run(manifest: dict):
    """The dataset a run was trained on, checked against the fingerprint in its manifest."""
    cfg = manifest["config"]
    data = load_dataset(cfg["data"], val_fraction=cfg.get("val_fraction", 0.1),
                        split_seed=cfg.get("split_seed", 0))
    if data.fingerprint != manifest.get("data_fingerprint"):
        raise ArtifactError(
            f"the data behind {cfg['data']!r} changed since this run was made "
            f"(fingerprint {data.fingerprint[:12]} != {str(manifest.get('data_fingerprint'))[:12]}); retrain"
        )
    return data


def _evaluate_single(run_dir: Path, manifest: dict) -> dict:
    data = dataset_for_run(manifest)
    model, spec = load_model(run_dir)
    return {"stage": manifest["stage"], "run": str(run_dir), "model": spec["name"],
            **evaluate_model(model, data)}


EVALUATORS["generalist"] = _evaluate_single
EVALUATORS["student"] = _evaluate_single


def _evaluate_specialists(run_dir: Path, manifest: dict) -> dict:
    from specialists.stage import evaluate_specialists  # imported when asked for: the spine stays light

    return evaluate_specialists(run_dir, manifest)


def _evaluate_specialist(run_dir: Path, manifest: dict) -> dict:
    from specialists.stage import evaluate_specialist

    return evaluate_specialist(run_dir, manifest)


EVALUATORS["specialists"] = _evaluate_specialists  # generalist + specialists, combined
EVALUATORS["specialist"] = _evaluate_specialist  # one specialist folder (spec-NN): its |S| + 1-way task


def evaluate_run(run_dir: Path) -> dict:
    manifest = read_manifest(run_dir)
    stage = manifest.get("stage")
    if stage not in EVALUATORS:
        raise ArtifactError(f"{run_dir}: cannot evaluate a '{stage}' stage; valid: {', '.join(EVALUATORS)}")
    return EVALUATORS[stage](Path(run_dir), manifest)
