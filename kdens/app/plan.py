"""A pipeline file (TOML) turned into an ordered list of stages for ``kdens run``.

Pure: parsing and validation only, nothing is trained or written here. Every stage's
typed config is built (and so validated) before the first stage runs, so a typo in the
last table fails in a second, not after an hour of teacher training.

File shape (every table but ``[data]`` and one teacher is optional)::

    name = "digits"                  # experiment folder runs/<name> unless out = "..."
    [data]        data, val_fraction, split_seed          (shared by every stage)
    [generalist]  the keys of `kdens train-generalist`    (model, model_args, epochs, ...), or a
                  teacher trained elsewhere (`kdens import-model`): import_onnx = "FILE", or
                  import_model = "pkg.module:factory" with weights = "FILE" and model_args
                  (plus the data keys; training keys are refused)
    [ensemble]    the keys of `kdens train-ensemble`      (members, model, ...)
    [specialists] the keys of `kdens train-specialists`   (clusters, ...; uses [generalist])
    [[distill]]   the keys of `kdens distill` (method, method_args, hint, generations, ...),
                  plus name, baseline = true|false|"<an earlier [[distill]]'s name>"
                  (share that student's hard-label baseline), and
                  teacher = "generalist" | "ensemble" | "specialists" | a run folder
                  (several joined by commas) or a file of precomputed scores (.npy / .npz);
                  temperature may be a list: one student each;
                  without model, a student taught by [generalist] copies its architecture.
                  The baseline is the same student and recipe on hard labels; with
                  transfer = "fraction=F" it trains on the same fraction (train_fraction = F);
                  a tree student (model = "tree" | "gbt") fits its twin in its own run
    [deploy]      student, targets = ["onnx:int8", "tflite:int8", "fpga:ap_fixed<16,6>"],
                  and the flags of `kdens deploy` (max_accuracy_drop, batch_sizes, ...)
    [bench]       threads, batch_sizes                    (`kdens bench` over deploy/)
    [report]      html = true|false

Paths in the file (data, import_onnx, weights, a teacher run folder or scores file, transfer =
"unlabeled=PATH", tflite_runtime_venv, pythonpath) are relative to the file's folder, so a
pipeline runs the same from any working directory. The experiment folder (``out``, default
``runs/<name>``) is an output and stays relative to where ``kdens run`` is started.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdens.app.stages import STAGES
from kdens.config import build, load_toml, to_dict
from kdens.errors import ConfigError

TOP_KEYS = ("name", "out", "pythonpath", "data", "generalist", "ensemble", "specialists", "distill",
            "deploy", "bench", "report")
TEACHER_STAGES = ("generalist", "ensemble", "specialists")
IMPORT_KEYS = ("import_onnx", "import_model", "weights")
"""``[generalist]`` keys of its import form (``kdens import-model``)."""
_DATA_KEYS = ("data", "val_fraction", "split_seed")
_STUDENT_ONLY = ("teacher", "temperature", "alpha", "loss", "method", "method_args", "hint", "generations",
                 "transfer", "fix_bias", "baseline", "cache_dir", "feature_cache_mb", "data", "val_fraction",
                 "split_seed")
_DEPLOY_KEYS = ("quantize", "batch_sizes", "threads", "calib_size", "io", "max_latency_ms", "max_accuracy_drop",
                "seed", "tflite_runtime_venv", "min_agreement", "sweep")


@dataclass
class Stage:
    """One step of the pipeline: what it is, where it writes, what it needs."""

    name: str
    """Unique name: generalist, ensemble, specialists, baseline:<student>, <student>, deploy:<t>-<p>, bench."""
    kind: str
    """A kind of ``kdens.app.stages.STAGES`` (generalist, baseline, ensemble, ..., bench)."""
    dir: str
    """Its folder, relative to the experiment folder."""
    config: Any
    """The typed config the stage function takes (GeneralistConfig, DistillConfig, ...)."""
    needs: list[str] = field(default_factory=list)
    """Names of the stages whose outputs it reads (their manifests go into its key)."""
    info: dict = field(default_factory=dict)
    """What the report needs to know (teacher / baseline / student names, target, precision)."""

    def config_dict(self) -> dict:
        return to_dict(self.config)


@dataclass
class Plan:
    """The resolved pipeline: experiment folder, stages in run order, the parsed file."""

    name: str
    exp_dir: Path
    stages: list[Stage]
    doc: dict
    config_file: str | None = None
    html: bool = True

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def start_index(self, from_stage: str) -> int:
        """Index of the first stage redone by ``--from``: a stage name or a kind (distill = baseline/student)."""
        kinds = {"distill": ("baseline", "student")}.get(from_stage, (from_stage,))
        for i, s in enumerate(self.stages):
            if s.name == from_stage or s.kind in kinds:
                return i
        valid = sorted({s.name for s in self.stages} | {s.kind for s in self.stages}
                       | ({"distill"} if any(s.kind == "student" for s in self.stages) else set()))
        raise ConfigError(f"--from {from_stage!r} names no stage of this pipeline; valid: {', '.join(valid)}")


def load_plan(config_file: Path, *, out: Path | None = None) -> Plan:
    """Read a pipeline TOML file and resolve it (see the module docstring for its shape)."""
    config_file = Path(config_file)
    doc = load_toml(config_file)
    resolve_paths(doc, config_file.parent)
    _add_pythonpath(doc, config_file.parent)
    plan = build_plan(doc, name_default=config_file.stem, out=out)
    plan.config_file = str(config_file)
    return plan


def _path(value, base: Path):
    """A path written in the file, made absolute against its folder (absolute ones and ~ kept)."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _data_spec(value, base: Path):
    """A data spec's file or folder paths against ``base``; named datasets stay names."""
    from kdens.data import NAMED_CLASSES

    if not isinstance(value, str) or value == "digits" or value in NAMED_CLASSES:
        return value
    return ",".join(_path(p.strip(), base) for p in value.split(","))


def resolve_paths(doc: dict, base: Path) -> None:
    """Every input path in a parsed pipeline file made absolute against ``base`` (the file's folder), in place.

    Teacher names (generalist, ensemble, specialists) stay names; everything else in ``teacher`` is a
    run folder or a scores file. ``pythonpath`` is resolved by :func:`_add_pythonpath`, ``out`` stays
    as written (an output, relative to the working directory).
    """
    tables = [doc.get(k) for k in ("data", "generalist", "ensemble", "specialists", "deploy")]
    raw = doc.get("distill")
    tables += raw if isinstance(raw, list) else [raw]
    for table in (t for t in tables if isinstance(t, dict)):
        for key in list(table):
            norm = key.replace("-", "_")
            if norm == "data":
                table[key] = _data_spec(table[key], base)
            elif norm in ("import_onnx", "weights", "tflite_runtime_venv"):
                table[key] = _path(table[key], base)
            elif norm == "teacher" and isinstance(table[key], str):
                table[key] = ",".join(p if p in TEACHER_STAGES else _path(p, base)
                                      for p in (q.strip() for q in table[key].split(",")) if p)
            elif norm == "transfer" and isinstance(table[key], str) and table[key].startswith("unlabeled="):
                table[key] = "unlabeled=" + _path(table[key][len("unlabeled="):], base)


def _add_pythonpath(doc: dict, base: Path) -> None:
    """Let ``model = "pkg.mod:factory"`` find modules beside the config file (or in ``pythonpath``)."""
    import sys

    extra = doc.get("pythonpath", ["."])
    if isinstance(extra, str):
        extra = [extra]
    for p in extra:
        path = str((base / p).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)


def _table(doc: dict, key: str) -> dict | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table, got {value!r}")
    return dict(value)


def _data_layer(doc: dict) -> dict:
    data = _table(doc, "data") or {}
    unknown = sorted(set(data) - set(_DATA_KEYS) - {k.replace("_", "-") for k in _DATA_KEYS})
    if unknown:
        raise ConfigError(f"[data] has unknown key(s) {', '.join(unknown)}; valid: {', '.join(_DATA_KEYS)}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_plan(doc: dict, *, name_default: str = "experiment", out: Path | None = None) -> Plan:
    """Resolve a parsed pipeline document into stages; raises ConfigError naming the bad key."""
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"pipeline file: unknown key/table(s) {', '.join(unknown)}; valid: {', '.join(TOP_KEYS)}")
    name = str(doc.get("name") or name_default)
    exp_dir = Path(out or doc.get("out") or Path("runs") / name)
    data = _data_layer(doc)
    stages: list[Stage] = []

    def where(stage_dir: str) -> str:
        return str(exp_dir / stage_dir)

    gen = _table(doc, "generalist")
    if gen is not None:
        stages.append(Stage("generalist", "generalist", "generalist", _generalist(data, gen)))
    ens = _table(doc, "ensemble")
    if ens is not None:
        stages.append(Stage("ensemble", "ensemble", "ensemble", _build(STAGES["ensemble"].config, "ensemble", data, ens)))
    spec = _table(doc, "specialists")
    if spec is not None:
        if gen is None:
            raise ConfigError("[specialists] needs a [generalist] table: specialists start from its weights")
        if "generalist" in spec:
            raise ConfigError("[specialists] takes its generalist from the [generalist] table; remove 'generalist'")
        cfg = _build(STAGES["specialists"].config, "specialists", {}, {"generalist": where("generalist"), **spec})
        stages.append(Stage("specialists", "specialists", "specialists", cfg, needs=["generalist"]))
    teachers = [s.name for s in stages]
    if not teachers:
        raise ConfigError("pipeline file has no teacher: add a [generalist] or an [ensemble] table")
    students = _students(doc, data, stages, teachers, where)
    _deploy(doc, stages, students, where)
    report = _table(doc, "report") or {}
    if set(report) - {"html"}:
        raise ConfigError(f"[report] has unknown key(s) {sorted(set(report) - {'html'})}; valid: html")
    return Plan(name=name, exp_dir=exp_dir, stages=stages, doc=doc, html=bool(report.get("html", True)))


def _generalist(data: dict, table: dict):
    """``[generalist]``: a model to train (GeneralistConfig), or in its import form one trained elsewhere."""
    keys = {k.replace("-", "_") for k in table}
    if not keys & set(IMPORT_KEYS):
        return _build(STAGES["generalist"].config, "generalist", data, table)
    if "weights" in keys and "import_model" not in keys:
        raise ConfigError("[generalist] weights = ... goes with import_model = \"pkg.module:factory\" (the network "
                          "the weights are for); add it, or drop weights")
    if "model" in keys:
        raise ConfigError("[generalist] has both model (a network to train) and an import key; keep model and the "
                          "training keys to train one here, or import_onnx / import_model + weights to import one")
    valid = (*IMPORT_KEYS, "model_args", "data", "val_fraction", "split_seed", "layout", "label_column",
             "test_fraction", "image_size")
    unknown = sorted(k for k in table if k.replace("-", "_") not in valid)
    if unknown:
        raise ConfigError(f"[generalist] imports a trained model (import_onnx / import_model), so nothing is trained "
                          f"and {', '.join(unknown)} cannot be set; valid keys: {', '.join(valid)}")
    rename = {"import_onnx": "onnx", "import_model": "model"}
    layer = {rename.get(k.replace("-", "_"), k): v for k, v in table.items()}
    return _build(STAGES["generalist"].import_config, "generalist", data, layer)


def _build(cls, where: str, data: dict, table: dict):
    try:
        return build(cls, data, table)
    except ConfigError as e:
        raise ConfigError(f"[{where}] {e}") from None


def _students(doc: dict, data: dict, stages: list[Stage], teachers: list[str], where) -> list[str]:
    raw = doc.get("distill")
    if raw is None:
        return []
    tables = [raw] if isinstance(raw, dict) else raw
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("[distill] must be a table, or [[distill]] tables (one per student)")
    names: list[str] = []
    default_teacher = next(t for t in ("specialists", "ensemble", "generalist") if t in teachers)
    for i, table in enumerate(tables):
        table = {k.replace("-", "_"): v for k, v in table.items()}
        base = str(table.pop("name", "student" if len(tables) == 1 else f"student-{i + 1}"))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", base):
            raise ConfigError(f"[distill] name = {base!r}: use letters, digits, '_', '.' or '-' (it names a folder)")
        teacher = str(table.pop("teacher", default_teacher))
        want_baseline = table.pop("baseline", True)
        if not isinstance(want_baseline, (bool, str)):
            raise ConfigError(f"[distill] {base}: baseline = {want_baseline!r} must be true or false, or the "
                              "name of an earlier [[distill]] whose hard-label baseline to share")
        borrowed = None
        if isinstance(want_baseline, str):  # another student's baseline: e.g. a new recipe judged by the paper's
            borrowed = next((s for s in stages if s.kind == "baseline" and s.info.get("student") == want_baseline),
                            None)
            if borrowed is None:
                owners = sorted({s.info["student"] for s in stages if s.kind == "baseline"})
                raise ConfigError(f"[distill] {base}: baseline = {want_baseline!r} must be true or false, or the "
                                  f"name of an earlier [[distill]] that has a baseline ({', '.join(owners) or 'none yet'})")
        temps = table.pop("temperature", None)  # None: the method's own default
        multi = isinstance(temps, list)
        temps = temps if multi else [temps]
        if not temps:
            raise ConfigError(f"[distill] {base}: temperature = [] names no temperature")
        needs, teacher_path = _teacher(teacher, teachers, where, base)
        if "model" not in table and teacher == "generalist" and "generalist" in teachers:
            # born-again students and tfkd-self copy the teacher's architecture (and so does their baseline)
            gen = next(s for s in stages if s.name == "generalist").config
            if gen.model is None:  # an imported ONNX file: nothing kdens can build
                raise ConfigError(f"[distill] {base}: model is required: the [generalist] is an imported ONNX file, "
                                  "whose architecture kdens cannot rebuild or train; add model = \"mlp\", \"cnn\", "
                                  "\"mobilenet\", ... or \"pkg.module:factory\"")
            table["model"], table["model_args"] = gen.model, {**gen.model_args, **table.get("model_args", {})}
        baseline_name = baseline_dir = None
        probe = _build(STAGES["student"].config, f"distill {base}", {}, {**data, **table, "teacher": teacher_path})
        if borrowed is not None:
            if probe.twin_in_run:
                raise ConfigError(f"[distill] {base}: a tree student fits its own hard-label twin; drop baseline = "
                                  f"{want_baseline!r}")
            baseline_name, baseline_dir = borrowed.name, borrowed.dir
        elif want_baseline and not probe.twin_in_run:  # a tree student fits its hard-label twin itself
            hard = {k: v for k, v in table.items() if k not in _STUDENT_ONLY}
            if probe.transfer_spec.kind == "fraction":  # the twin sees the same examples, with hard labels
                hard["train_fraction"] = probe.transfer_spec.fraction
            cfg = _build(STAGES["baseline"].config, f"distill {base} (baseline)", data, hard)
            # students of one architecture and recipe (other teachers or T) share one baseline
            same = [s for s in stages if s.kind == "baseline" and s.config_dict() == to_dict(cfg)]
            if same:
                baseline_name, baseline_dir = same[0].name, same[0].dir
            else:
                baseline_name, baseline_dir = f"baseline:{base}", f"baselines/{base}"
                stages.append(Stage(baseline_name, "baseline", baseline_dir, cfg, info={"student": base}))
        for t in temps:
            name = f"{base}-T{t:g}" if multi else base
            _unique(name, stages)
            layer = {**data, **table, "teacher": teacher_path, "cache_dir": where("soft_targets")}
            if t is not None:
                layer["temperature"] = t
            if baseline_dir:
                layer["baseline"] = where(baseline_dir)
            cfg = _build(STAGES["student"].config, f"distill {name}", {}, layer)
            stages.append(Stage(name, "student", f"students/{name}", cfg,
                                needs=needs + ([baseline_name] if baseline_name else []),
                                info={"teacher": teacher, "baseline": baseline_name}))
            names.append(name)
    return names


def _teacher(teacher: str, teachers: list[str], where, student: str) -> tuple[list[str], str]:
    """(stages it needs, the run folder(s) the distill stage reads) for ``teacher = ...``."""
    needs, paths = [], []
    for part in [p.strip() for p in teacher.split(",") if p.strip()]:
        if part in teachers:
            needs.append(part)
            paths.append(where(part))
        elif part in TEACHER_STAGES:
            raise ConfigError(f"[distill] {student}: teacher = {part!r} but the file has no [{part}] table; "
                              f"teachers here: {', '.join(teachers)}")
        elif os.sep in part or Path(part).exists():
            paths.append(part)  # a run folder made outside this pipeline
        else:
            raise ConfigError(f"[distill] {student}: teacher = {part!r} is neither a stage "
                              f"({', '.join(teachers)}) nor a run folder")
    if not paths:
        raise ConfigError(f"[distill] {student}: teacher = {teacher!r} names no teacher")
    return needs, ",".join(paths)


def _unique(name: str, stages: list[Stage]) -> None:
    if any(s.name == name for s in stages):
        raise ConfigError(f"two stages are named {name!r}; give each [[distill]] its own name")


def _deploy(doc: dict, stages: list[Stage], students: list[str], where) -> None:
    table = _table(doc, "deploy")
    if table is None:
        if doc.get("bench") is not None:
            raise ConfigError("[bench] measures what [deploy] exported; add a [deploy] table")
        return
    table = {k.replace("-", "_"): v for k, v in table.items()}
    if not students:
        raise ConfigError("[deploy] needs a student: add a [[distill]] table")
    student = str(table.pop("student", students[0]))
    if student not in students:
        raise ConfigError(f"[deploy] student = {student!r} is not a student here; valid: {', '.join(students)}")
    model_dir = f"students/{student}"
    n_gen = getattr(next(s for s in stages if s.name == student).config, "generations", None)
    if n_gen:  # born-again generations: the last generation is the student that ships
        model_dir += f"/gen-{int(n_gen):02d}"
    targets = table.pop("targets", ["onnx:int8"])
    if isinstance(targets, str):
        targets = [targets]
    unknown = sorted(set(table) - set(_DEPLOY_KEYS))
    if unknown:
        raise ConfigError(f"[deploy] unknown key(s) {', '.join(unknown)}; valid: student, targets, "
                          f"{', '.join(_DEPLOY_KEYS)}")
    fpga_only = {k: table.pop(k) for k in ("min_agreement", "sweep") if k in table}
    for key in ("threads", "batch_sizes"):  # TOML users write 1 or [1, 32]; the options take "1,32"
        if key in table:
            table[key] = _ints_text(table[key])
    deploy_names = []
    for spec in targets:
        target, _, precision = str(spec).partition(":")
        opts = dict(table)
        fpga_precision = None
        if target == "fpga":
            fpga_precision = precision or None
        else:
            quantize = {"": "none", "float": "none"}.get(precision, precision)
            if quantize == "int8-int8io":
                quantize, opts["io"] = "int8", "int8"
            opts["quantize"] = quantize
        try:
            cfg = STAGES["deploy"].config(model=where(model_dir), target=target,
                                          precision=fpga_precision, opts=opts,
                                          **(fpga_only if target == "fpga" else {}))
        except (ConfigError, TypeError, ValueError) as e:
            raise ConfigError(f"[deploy] target {spec!r}: {e} "
                              "(targets look like 'onnx:int8', 'tflite:float', 'fpga:ap_fixed<16,6>')") from None
        name = f"deploy:{cfg.folder_name()}"
        _unique(name, stages)
        stages.append(Stage(name, "deploy", f"deploy/{cfg.folder_name()}", cfg, needs=[student],
                            info={"student": student, "target": target, "precision": cfg.precision_tag()}))
        deploy_names.append(name)
    bench = {k.replace("-", "_"): v for k, v in (_table(doc, "bench") or {}).items()}
    if set(bench) - {"threads", "batch_sizes"}:
        raise ConfigError(f"[bench] unknown key(s) {sorted(set(bench) - {'threads', 'batch_sizes'})}; "
                          "valid: threads, batch_sizes")
    stages.append(Stage("bench", "bench", "deploy", _build(STAGES["bench"].config, "bench", {}, bench),
                        needs=deploy_names))


def _ints_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
