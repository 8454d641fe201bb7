"""What the experiment report reads: ``pipeline.json``, each stage's folder, and test-set scores.

An experiment folder (``runs/<exp>``) is written by ``kdens run``: ``pipeline.json`` lists
the stages with their status, time and folder, and each folder is an ordinary stage run
folder. :class:`Experiment` reads them once; :func:`test_scores` recomputes a model's or
teacher's scores on its test split for the confusion matrices.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdens.artifacts import MANIFEST, read_json
from kdens.errors import ArtifactError
from kdens.runs import data_config, run_data

PIPELINE = "pipeline.json"
# a stage whose folder the report may read: finished now, reused, or kept after a failed gate
USABLE = ("done", "reused", "gate-failed")
TEACHER_KINDS = ("generalist", "ensemble", "specialists")


def maybe_json(path: Path) -> Any:
    """The JSON at ``path``, or None when the file is absent or unreadable (a report never dies on one)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class StageView:
    """One entry of ``pipeline.json`` with what its folder holds."""

    entry: dict
    path: Path
    manifest: dict | None
    metrics: dict | None

    @property
    def name(self) -> str:
        return str(self.entry.get("name"))

    @property
    def kind(self) -> str:
        return str(self.entry.get("kind"))

    @property
    def status(self) -> str:
        return str(self.entry.get("status"))

    @property
    def usable(self) -> bool:
        """Whether the folder holds this pipeline's finished output (not a stale or partial one)."""
        return self.status in USABLE and (self.manifest is not None or self.kind == "bench")

    def file(self, name: str) -> Any:
        """A JSON file under the stage's folder (``name`` may hold a sub-folder), or None."""
        return maybe_json(self.path / name)


@dataclass
class Experiment:
    """``pipeline.json`` and a :class:`StageView` per stage, in pipeline order."""

    root: Path
    pipeline: dict
    stages: list[StageView]

    @classmethod
    def load(cls, exp_dir: Path) -> Experiment:
        root = Path(exp_dir)
        if not (root / PIPELINE).exists():
            raise ArtifactError(f"{root} has no {PIPELINE}: it is not an experiment folder written by "
                                f"`kdens run`; run the pipeline first (kdens run CONFIG.toml)")
        pipeline = read_json(root / PIPELINE)
        if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages"), list):
            raise ArtifactError(f"{root / PIPELINE} has no 'stages' list; rerun `kdens run` to rewrite it")
        views = []
        for entry in pipeline["stages"]:
            path = root / str(entry.get("dir", entry.get("name", "")))
            views.append(StageView(entry, path, maybe_json(path / MANIFEST), maybe_json(path / "metrics.json")))
        return cls(root, pipeline, views)

    def by_kind(self, *kinds: str, usable: bool = True) -> list[StageView]:
        return [s for s in self.stages if s.kind in kinds and (s.usable or not usable)]

    def get(self, name: str | None) -> StageView | None:
        return next((s for s in self.stages if s.name == name), None) if name else None


def total_params(stage: StageView) -> int | None:
    """Parameters behind a stage's predictions: its model's, all members', or generalist + specialists'."""
    m = stage.metrics or {}
    if stage.kind != "specialists":
        return m.get("params")
    own = sum(e.get("params") or 0 for e in m.get("specialists", []))
    try:
        from specialists.teacher import resolve_generalist  # the spine imports later stages lazily

        gen = maybe_json(resolve_generalist(stage.path, stage.manifest or {}) / "metrics.json") or {}
    except ArtifactError:
        return None
    return own + gen["params"] if isinstance(gen.get("params"), int) else None


# ---------------------------------------------------------------- formatting

def num(v: Any) -> float | None:
    """``v`` as a finite float, else None (missing, NaN, not a number)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def pct(v: Any, digits: int = 2) -> str:
    v = num(v)
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def fmt(v: Any, spec: str = ".4g") -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    v2 = num(v)
    return "-" if v2 is None else format(v2, spec)


def count(v: Any) -> str:
    """Integers with thousands separators (parameters, examples)."""
    return f"{int(v):,}" if num(v) is not None else "-"


def duration(seconds: Any) -> str:
    s = num(seconds)
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _is_table(v: Any) -> bool:
    """A TOML table or array of tables (written under a header, not as ``key = value``).

    A small flat dict (``model_args = { hidden = [32] }``) stays inline, as people write it.
    """
    if isinstance(v, dict):
        flat = all(x is not None and not isinstance(x, dict) and not _is_table(x) for x in v.values())
        return not (v and flat and len(str(v)) <= 60)
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(config: dict) -> str:
    """A parsed TOML document written back as TOML (tables for dicts; None, which TOML lacks, as a comment)."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(str(v), ensure_ascii=False)

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)  # TOML's bare keys

    def table(d: dict, prefix: str) -> None:
        def is_table(v: Any) -> bool:  # the file's own top-level tables keep their headers
            return _is_table(v) or (not prefix and isinstance(v, dict))

        for k, v in d.items():
            if v is None:
                lines.append(f"# {key(k)} unset")
            elif not is_table(v):
                lines.append(f"{key(k)} = {value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{key(k)}" if prefix else key(k)
            if isinstance(v, dict) and is_table(v):
                if not v or any(not _is_table(x) for x in v.values()):  # a header only over sub-tables is noise
                    lines.extend(["", f"[{name}]"])
                table(v, name)
            elif isinstance(v, list) and is_table(v):
                for item in v:
                    lines.extend(["", f"[[{name}]]"])
                    table(item, name)

    table(config or {}, "")
    return "\n".join(lines).strip() + "\n"


# ---------------------------------------------------------------- test-set scores

class DataCache:
    """Datasets rebuilt from manifests, once per (data spec, split, fingerprint)."""

    def __init__(self):
        self._cache: dict[str, Any] = {}

    def for_manifest(self, manifest: dict):
        key = json.dumps([data_config(manifest), manifest.get("data_fingerprint")], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = run_data(manifest)
        return self._cache[key]


def test_scores(stage: StageView, data) -> np.ndarray:
    """Scores (N, C) of a stage's model on ``data``'s test split: log-probabilities or logits.

    Teachers (generalist, ensemble, generalist + specialists) answer through
    ``distill.teachers.load_teacher``, exactly what a student was distilled from;
    students and hard-label baselines are single models (``load_model`` + ``predict_logits``).
    """
    if stage.kind in TEACHER_KINDS:
        from distill.teachers import load_teacher, teacher_log_probs  # the spine imports later stages lazily

        return teacher_log_probs(load_teacher(stage.path), data.x_test).numpy()
    from distill.trees_stage import is_tree_run, test_log_probs

    if is_tree_run(stage.path):  # a tree student answers through its ONNX file
        return test_log_probs(stage.path, data.x_test)
    from kdens.models import load_model
    from kdens.train import predict_logits

    model, _ = load_model(stage.path)
    return predict_logits(model, data.x_test).numpy()
