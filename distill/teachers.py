"""Teachers: every kind of run folder answers log-probabilities at T = 1.

``load_teacher`` turns ``--teacher`` into one object with the interface every stage
shares (CONTEXT: "Teacher interface"): ``teacher(x) -> (B, C)`` log-probabilities
under inference mode on its device, plus ``num_classes``, ``input_shape``,
``class_names``, ``manifest_hashes``, ``stage``, ``data_config`` and ``describe()``.

* a ``generalist`` or ``student`` run: one model, ``log_softmax(z)``;
* an ``ensemble`` run: ``ensembles.teacher.load_teacher``;
* a ``specialists`` run: ``specialists.teacher.load_teacher``;
* several run folders, comma-separated: an ad-hoc ensemble whose distribution is the
  arithmetic mean of the members' probabilities (Hinton et al. 2015, section 3);
* a ``generations`` run (``kdens distill --generations N``): the ad-hoc ensemble of its
  generations' students (one student when N = 1);
* a ``.npy`` / ``.npz`` file of precomputed scores (``distill.scores.ScoresTeacher``): rows of
  the training set, not a function of inputs.

Soft targets at a temperature T (the one extension of that interface). The loss
softens whatever scores it gets as ``softmax(s / T)``. For one model that is right when
``s`` is its log-probabilities at T = 1: ``softmax(log_softmax(z) / T) = softmax(z / T)``.
For an arithmetic mixture it is not: softening the T = 1 mixture gives
``(mean_k p_k)^(1/T)`` renormalized, not the paper's ``mean_k softmax(z_k / T)``. So a
teacher may define

* ``soft_scores(x, T) -> (B, C)``: scores ``s`` with ``softmax(s / T)`` equal to its soft
  targets at T; the loss stays ``log_softmax(s / T)`` for every teacher;
* ``soft_scores_depend_on_temperature: bool``: whether ``s`` changes with T.

The rule by kind: one model, ``s = log_softmax(z)`` (T-free); a geometric ensemble,
``softmax(mean_k log_softmax(z_k / T)) = softmax(mean_k z_k / T)``, so
``s = log_softmax(mean_k z_k)`` (T-free); an arithmetic ensemble (ad-hoc lists here,
``ensembles.teacher`` runs), ``s = T * log(mean_k softmax(s_k / T))`` with ``s_k`` each
member's own soft scores (T-dependent); a specialists teacher, its combined ``log q``
(T-free). A teacher without ``soft_scores`` is treated as T-free log-probabilities
(``__call__``). The distillation stage asks ``soft_scores_fn`` for its targets, in the
soft-target cache and online under jitter, and puts T into the cache key only when the
scores depend on it, so single-model and geometric caches serve every T. Metrics
(teacher accuracy, agreement) always use ``__call__``, the T = 1 log-probabilities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from distill.scores import ScoresTeacher, is_scores_file
from kdens.artifacts import MANIFEST, read_manifest, sha256_file
from kdens.errors import ArtifactError, ConfigError
from kdens.models import load_model
from kdens.runs import data_config
from kdens.train import batches

# describe() keys that say where a teacher lives, not what it answers: left out of the
# soft-target cache key so that a moved run folder or another device still hits the cache
_LOCATION_KEYS = ("path", "paths", "run", "runs", "run_dir", "device")


class Teacher(Protocol):
    """What the distillation stage needs from a teacher."""

    num_classes: int
    input_shape: tuple
    class_names: list
    manifest_hashes: list
    stage: str
    data_config: dict

    def __call__(self, x: Tensor) -> Tensor: ...

    def describe(self) -> dict: ...


def soft_scores_fn(teacher: Teacher, temperature: float) -> Callable[[Tensor], Tensor]:
    """``x -> s`` (B, C) with ``softmax(s / T)`` = the teacher's soft targets at ``temperature``.

    Uses the teacher's ``soft_scores`` when it has one, else its T = 1 log-probabilities
    (which the loss softens correctly for any single distribution); see the module docstring.
    """
    soft = getattr(teacher, "soft_scores", None)
    if soft is None:
        return teacher
    t = float(temperature)
    return lambda x: soft(x, t)


def soft_scores_depend_on_temperature(teacher: Teacher) -> bool:
    """Whether the teacher's soft scores change with T (then T belongs in the cache key)."""
    return hasattr(teacher, "soft_scores") and bool(getattr(teacher, "soft_scores_depend_on_temperature", False))


class ModelTeacher:
    """A single trained model (a generalist or a student) answering ``log_softmax(z)``."""

    # softmax(log_softmax(z) / T) = softmax(z / T): the T = 1 answer serves every T
    soft_scores_depend_on_temperature = False

    def __init__(self, run_dir: Path, device: str | torch.device = "cpu"):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir, ("generalist", "student"))
        self.device = torch.device(device)
        self.model, spec = load_model(run_dir, self.device)
        self.run_dir = run_dir
        self.stage = manifest["stage"]
        self.num_classes = int(spec["num_classes"])
        self.input_shape = tuple(spec["input_shape"])
        self.class_names = list(manifest.get("data", {}).get("class_names")
                                or [str(c) for c in range(self.num_classes)])
        self.manifest_hashes = [sha256_file(run_dir / MANIFEST)]
        self.data_config = data_config(manifest)
        self.data_fingerprint = manifest.get("data_fingerprint")
        self._spec = spec
        self.spec = spec
        """model.json: the architecture (name, kwargs), which a student may copy."""

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        z = self.model(x.to(self.device, non_blocking=True))  # (B, C)
        return torch.log_softmax(z.float(), dim=1)  # (B, C)

    def soft_scores(self, x: Tensor, temperature: float) -> Tensor:
        """The log-probabilities at T = 1 for every T (the loss divides them by T)."""
        return self(x)  # (B, C)

    def describe(self) -> dict:
        return {"stage": self.stage, "run": str(self.run_dir), "model": self._spec["name"],
                "model_args": self._spec["kwargs"], "params": self._spec.get("params")}


class AdhocEnsembleTeacher:
    """Several teachers listed together: arithmetic mean of their probabilities.

    ``log p = logsumexp_k log p_k - log K`` (``ensembles.combine.combine_log_probs``
    with the members' log-probabilities as logits: ``log_softmax`` leaves them as
    they are, so the arithmetic method averages the members' own distributions).
    Soft targets at T are the mean of the members' own soft targets at T,
    ``mean_k softmax(s_k / T)``, which depends on T.
    """

    soft_scores_depend_on_temperature = True

    def __init__(self, members: Sequence[Teacher], specs: Sequence[str]):
        if len(members) < 2:
            raise ConfigError("an ad-hoc ensemble needs at least two run folders, comma-separated")
        first = members[0]
        for spec, m in zip(specs[1:], members[1:]):
            if m.num_classes != first.num_classes or tuple(m.input_shape) != tuple(first.input_shape):
                raise ConfigError(
                    f"--teacher {spec} predicts {m.num_classes} classes from inputs {tuple(m.input_shape)}, "
                    f"but {specs[0]} predicts {first.num_classes} from {tuple(first.input_shape)}; "
                    "list teachers trained on the same kind of data"
                )
        self.members = list(members)
        self.specs = list(specs)
        self.stage = "adhoc-ensemble"
        self.num_classes = first.num_classes
        self.input_shape = tuple(first.input_shape)
        self.class_names = list(first.class_names)
        self.manifest_hashes = [h for m in members for h in m.manifest_hashes]
        self.data_config = dict(first.data_config)
        fps = {getattr(m, "data_fingerprint", None) for m in members}
        self.data_fingerprint = fps.pop() if len(fps) == 1 else None

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        from ensembles.combine import combine_log_probs

        log_p = torch.stack([m(x).float().to(x.device) for m in self.members])  # (K, B, C)
        return combine_log_probs(log_p, "arithmetic", 1.0)  # (B, C)

    @torch.inference_mode()
    def soft_scores(self, x: Tensor, temperature: float) -> Tensor:
        """``s = T * log(mean_k softmax(s_k / T))``, so that ``softmax(s / T)`` is the mixture at T."""
        from ensembles.combine import combine_log_probs

        s_k = torch.stack([soft_scores_fn(m, temperature)(x).float().to(x.device) for m in self.members])  # (K, B, C)
        return temperature * combine_log_probs(s_k, "arithmetic", temperature)  # (B, C)

    def describe(self) -> dict:
        return {"stage": self.stage, "combine": "arithmetic",
                "members": [m.describe() for m in self.members]}


def _load_one(run_dir: Path, device: str | torch.device) -> Teacher:
    manifest = read_manifest(run_dir, ("generalist", "student", "ensemble", "specialists", "generations"))
    stage = manifest["stage"]
    if stage in ("generalist", "student"):
        return ModelTeacher(run_dir, device)
    if stage == "generations":  # born-again generations: the ensemble of their students
        names = manifest.get("generations") or []
        if not names:
            raise ArtifactError(f"{run_dir}/manifest.json lists no generations; rerun kdens distill --generations")
        return load_teacher([run_dir / n for n in names], device)
    # later-built teacher kinds live in their own packages; import only when asked for
    try:
        if stage == "ensemble":
            from ensembles.teacher import load_teacher as load
        else:
            from specialists.teacher import load_teacher as load
    except ImportError as e:
        raise ArtifactError(f"{run_dir} holds a '{stage}' run, but its teacher loader is missing ({e})") from None
    teacher = load(run_dir, device=device)
    if not hasattr(teacher, "data_fingerprint"):
        teacher.data_fingerprint = manifest.get("data_fingerprint")
    return teacher


def split_teacher_spec(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """``--teacher`` value -> run folders: one path, ``a,b,c``, or a list."""
    if isinstance(spec, (str, Path)):
        parts = [p.strip() for p in str(spec).split(",")]
    else:
        parts = [str(p).strip() for p in spec]
    if not parts or any(not p for p in parts):
        raise ConfigError(f"--teacher {spec!r}: give a run folder, or several separated by commas (no empty ones)")
    if len(set(parts)) != len(parts):
        raise ConfigError(f"--teacher {spec!r} lists the same run twice")
    return [Path(p) for p in parts]


def load_teacher(spec: str | Path | Sequence[str | Path], device: str | torch.device = "cpu") -> Teacher:
    """Load the teacher named by ``--teacher``, dispatching on each manifest's stage.

    Args:
        spec: a run folder, several joined by commas (an ad-hoc ensemble), a list, or a file of
            precomputed scores (``.npy`` / ``.npz``, :mod:`distill.scores`).
        device: where the teacher computes.

    Raises:
        ArtifactError: a folder is missing, unfinished or holds a stage that cannot teach.
        ConfigError: an empty or repeated entry, or members that disagree on the classes.
    """
    paths = split_teacher_spec(spec)
    if any(is_scores_file(p) for p in paths):
        if len(paths) > 1:
            raise ConfigError(f"--teacher {spec}: precomputed scores ({', '.join(str(p) for p in paths if is_scores_file(p))}) "
                              "teach alone; give the scores file, or run folders to combine")
        return ScoresTeacher(paths[0])
    members = [_load_one(p, device) for p in paths]
    if len(members) == 1:
        return members[0]
    return AdhocEnsembleTeacher(members, [str(p) for p in paths])


def cache_options(teacher: Teacher) -> dict:
    """What changes a teacher's answers beyond its manifests, for the soft-target cache key."""
    opts = getattr(teacher, "cache_options", None)
    if isinstance(opts, dict):
        return opts

    def strip(d):
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k not in _LOCATION_KEYS}
        if isinstance(d, (list, tuple)):
            return [strip(v) for v in d]
        return d

    return strip(teacher.describe())


@torch.inference_mode()
def teacher_log_probs(teacher: Teacher, x, batch_size: int = 2048) -> Tensor:
    """The teacher's log-probabilities (N, C) on ``x``, batched, as float32 on the CPU."""
    out = [teacher(xb).float().cpu() for xb in batches(x, batch_size)]
    return torch.cat(out) if out else torch.empty(0, teacher.num_classes)
