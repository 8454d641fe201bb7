"""``kdens run``: every stage of a pipeline file, in order, reusing what is already done.

Each stage gets a key: the sha256 of its kind, its resolved config and the sha256 of the
manifests of the stages it reads. ``pipeline.json`` in the experiment folder records,
per stage, the key it last ran with and the sha256 of the manifest it produced. A stage
is *reused* when its manifest is there, unchanged, and was made with today's key; a
changed config changes the key, and a redone stage writes a new manifest, which changes
the keys of everything downstream, so invalidation follows the data. ``--from STAGE``
forces a redo from that stage on. A stage interrupted mid-way (its key recorded as
running, no manifest yet) is continued with the stage's own ``resume``.

Stages are run through the one table of kinds, ``kdens.app.stages.STAGES``; every kind
honours ``run(cfg, run_dir, *, resume, force, progress)``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from kdens.app.plan import Plan, Stage
from kdens.app.stages import STAGES
from kdens.artifacts import MANIFEST, atomic_write_json, read_json, sha256_file, to_json
from kdens.errors import GateFailed, KdensError, TrainingFailed

STATE = "pipeline.json"


@dataclass
class Decision:
    """What ``kdens run`` does with one stage: reuse it, run it fresh, or continue it."""

    action: str
    """'reuse', 'run' or 'resume'."""
    why: str
    """One phrase for the log: 'unchanged', 'config changed', 'forced by --from', ..."""


@dataclass
class Outcome:
    """The result of ``run_pipeline``: per-stage records and whether a deploy gate failed."""

    exp_dir: Path
    records: list[dict] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)
    report: Path | None = None


def product(plan: Plan, stage: Stage) -> Path:
    """The file whose presence says the stage finished: its manifest, written last."""
    return plan.exp_dir / stage.dir / MANIFEST


# Settings that say where or how fast a stage runs, not what it makes: left out of keys so
# that an experiment moved to another machine (another device, another core count, another
# home folder for the tflite-runtime venv, another memory budget for cached teacher features)
# reuses what it finished.
_PLACE_KEYS = {"device", "tflite_runtime_venv", "feature_cache_mb"}


def normalize(value, root: Path | None):
    """``value`` (a config as plain data) with paths inside ``root`` written ``<exp>/...``
    and the place-only settings dropped."""
    if isinstance(value, dict):  # keys too: external inputs are keyed by their folder
        return {normalize(k, root): normalize(v, root) for k, v in value.items() if k not in _PLACE_KEYS}
    if isinstance(value, (list, tuple)):
        return [normalize(v, root) for v in value]
    if isinstance(value, str) and root is not None:
        return ",".join(_relative(p, root) for p in value.split(","))  # teacher = "a,b": several folders
    return value


def _relative(text: str, root: Path) -> str:
    path = Path(text)
    if not text or not (path.is_absolute() or str(root) in text):
        return text
    try:
        return str(Path("<exp>") / path.resolve().relative_to(root.resolve()))
    except ValueError:
        return text


def stage_key(stage: Stage, upstream: dict[str, str | None], root: Path | None = None) -> str:
    """sha256 of what determines a stage's output: kind, config, and its inputs' manifests.

    Paths inside the experiment folder count relative to ``root``, so a moved (or
    ``--out``-renamed) experiment is still recognised as finished.
    """
    doc = {"kind": stage.kind, "config": normalize(stage.config_dict(), root),
           "inputs": normalize(upstream, root)}
    return hashlib.sha256(to_json(doc).encode()).hexdigest()


def _external_inputs(stage: Stage) -> dict[str, str | None]:
    """Inputs from outside the pipeline, by their sha256: teacher run folders (their manifest), files of
    precomputed scores, and the file an imported generalist comes from (a changed file is imported again)."""
    teacher = getattr(stage.config, "teacher", None) if stage.kind == "student" else None
    out = {}
    for part in str(teacher or "").split(","):
        path = Path(part) / MANIFEST
        if part and path.exists():
            out[part] = sha256_file(path)
        elif part and Path(part).is_file():
            out[part] = sha256_file(Path(part))
    if stage.kind == "generalist":
        for part in (getattr(stage.config, "onnx", None), getattr(stage.config, "weights", None)):
            if part and Path(part).is_file():
                out[part] = sha256_file(Path(part))
    return out


def decide(plan: Plan, stage: Stage, key: str, previous: dict | None, forced: bool) -> Decision:
    """Reuse, run or resume ``stage`` (pure apart from looking at its files)."""
    done = product(plan, stage)
    if forced:
        return Decision("run", "forced by --from")
    if previous is None:
        return Decision("run", "new")
    if previous.get("key") != key:
        return Decision("run", "config or inputs changed")
    if done.exists():
        if previous.get("manifest_sha256") in (None, sha256_file(done)):
            return Decision("reuse", "unchanged")
        return Decision("run", f"{done.name} changed outside kdens run")
    # same settings, no product: continue from whatever the stage left (epoch checkpoints,
    # finished ensemble members or specialists); a stage with nothing to continue starts fresh
    return Decision("resume", "interrupted" if previous.get("status") == "running" else "unfinished")


def run_pipeline(plan: Plan, *, from_stage: str | None = None, progress: bool = True, dry_run: bool = False,
                 log: Callable[[str], None] = print) -> Outcome:
    """Run (or reuse) every stage of ``plan``; write ``pipeline.json`` after each and the report at the end.

    Raises:
        KdensError: a stage failed on bad input or data; earlier stages stay as they are and
            ``pipeline.json`` records the failure.
        TrainingFailed: a stage trained but learned nothing usable; the same record, and the
            advice says which key of the pipeline file to change.
        GateFailed: a deploy budget or check failed (after every stage and the report ran).
    """
    exp = plan.exp_dir
    start = plan.start_index(from_stage) if from_stage else len(plan.stages)
    state = _load_state(exp)
    previous = {r["name"]: r for r in state.get("stages", [])}
    out = Outcome(exp)
    t0 = time.time()
    doc = {"name": plan.name, "config_file": plan.config_file, "config": plan.doc,
           "started": datetime.now().isoformat(timespec="seconds"), "finished": None, "wall_seconds": None,
           "stages": out.records}
    shas: dict[str, str | None] = {}
    for i, stage in enumerate(plan.stages):
        upstream = {n: shas.get(n) for n in stage.needs} | _external_inputs(stage)
        key = stage_key(stage, upstream, exp)
        prev = previous.get(stage.name)
        decision = decide(plan, stage, key, prev, forced=i >= start)
        if dry_run and decision.action != "reuse":
            # downstream keys depend on manifests not written yet: they will run too
            shas[stage.name] = f"pending:{stage.name}"
        record = {"name": stage.name, "kind": stage.kind, "dir": stage.dir, **stage.info, "key": key,
                  "status": "pending", "seconds": 0.0, "manifest_sha256": None, "error": None}
        out.records.append(record)
        label = f"[{i + 1}/{len(plan.stages)}] {stage.name}"
        if decision.action == "reuse":
            record.update(status="reused", manifest_sha256=prev.get("manifest_sha256"),
                          verdict=prev.get("verdict"), error=prev.get("error"))
            shas[stage.name] = sha256_file(product(plan, stage))
            log(f"{label}: reused ({decision.why})")
            if prev.get("verdict") == "fail":
                out.gate_failures.append(f"{stage.name}: {prev.get('error')}")
            continue
        log(f"{label}: {'would ' if dry_run else ''}{decision.action} ({decision.why}) -> {exp / stage.dir}")
        if dry_run:
            continue
        record["status"] = "running"
        _save(exp, doc)
        t = time.time()
        try:
            STAGES[stage.kind].run(stage.config, exp / stage.dir, resume=decision.action == "resume",
                                   force=decision.action == "run", progress=progress)
        except GateFailed as e:
            record.update(status="gate-failed", verdict="fail", error=str(e))
            out.gate_failures.append(f"{stage.name}: {e}")
        except KdensError as e:
            failed = isinstance(e, TrainingFailed)
            text = training_advice(plan, stage, e) if failed else str(e)
            record.update(status="failed", error=text, seconds=round(time.time() - t, 3))
            doc["finished"] = datetime.now().isoformat(timespec="seconds")
            _save(exp, doc)
            if failed:  # exit 1, like a gate: the input was fine, the training was not
                raise TrainingFailed(e.who, e.what, e.changes, e.why, e.alternatives, text=text) from None
            raise KdensError(f"stage {stage.name} failed: {e}") from None
        else:
            record.update(status="done", verdict="pass" if stage.kind == "deploy" else None)
        record["seconds"] = round(time.time() - t, 3)
        record["manifest_sha256"] = shas[stage.name] = sha256_file(product(plan, stage))
        log(f"{label}: {record['status']} in {record['seconds']:.1f} s{_summary(plan, stage)}")
        _save(exp, doc)
    if dry_run:
        return out
    doc.update(finished=datetime.now().isoformat(timespec="seconds"), wall_seconds=round(time.time() - t0, 3))
    _save(exp, doc)
    from kdens.app.report import write_report

    out.report = write_report(exp, html=plan.html)
    log(f"report: {out.report}" + (f" and {out.report.with_suffix('.html')}" if plan.html else ""))
    from kdens.app.report_summary import terminal_lines

    for line in terminal_lines(exp):
        log(line)
    if out.gate_failures:
        raise GateFailed("; ".join(out.gate_failures))
    return out


def training_advice(plan: Plan, stage: Stage, e: TrainingFailed) -> str:
    """``e`` rendered for a pipeline: settings as keys of the stage's table in the pipeline file,
    and the rerun that ``kdens run`` has (a changed key redoes the stage; no ``--force`` here)."""
    config_file = getattr(plan, "config_file", None) or "the pipeline file"
    table = _table_of(plan, stage)
    return e.message(setting=lambda k, v: f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v:g}"
                     if isinstance(v, float) else f"{k} = {v}",
                     where=f"in {table} of {config_file}", who=f"stage {stage.name}",
                     rerun=f"then rerun `kdens run {config_file}`: a changed setting redoes this stage and "
                           f"everything after it (`--from {stage.name}` redoes it without a change)")


def _table_of(plan: Plan, stage: Stage) -> str:
    """The pipeline file's table that holds ``stage``'s training settings."""
    if stage.kind not in ("student", "baseline"):
        return f"[{stage.kind}]"
    base = stage.info.get("student") if stage.kind == "baseline" else stage.name
    for table in plan.doc.get("distill") or []:  # a temperature list makes <name>-T<t> students
        name = str(table.get("name", ""))
        if name and (base == name or str(base).startswith(f"{name}-T")):
            return f'the [[distill]] table with name = "{name}"'
    return "its [[distill]] table"


def _load_state(exp: Path) -> dict:
    path = exp / STATE
    if not path.exists():
        return {}
    try:
        return read_json(path)
    except KdensError:
        return {}  # a damaged state file only costs a rerun, never a wrong reuse


def _save(exp: Path, doc: dict) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    atomic_write_json(exp / STATE, doc)


def _summary(plan: Plan, stage: Stage) -> str:
    folder = plan.exp_dir / stage.dir
    path = folder / ("report.json" if stage.kind == "deploy" else "metrics.json")
    if not path.exists():
        return ""
    m = read_json(path)
    shown = [f"{k}={m[k]:.4f}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in STAGES[stage.kind].summary
             if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)]
    return ("  " + "  ".join(shown)) if shown else ""
