"""What a distillation run settles before its first write: whether the method accepts the teacher,
the student's architecture when ``--model`` is not given, and what an unlabeled transfer set allows.

Every refusal is one ConfigError line naming the value, why, and what works instead.
"""

from __future__ import annotations

import dataclasses
import warnings

from distill.config import DistillConfig
from distill.methods import LOSS_ALIASES, Method, make_method
from distill.teachers import ModelTeacher, Teacher
from distill.transfer import TransferSpec
from kdens.errors import ConfigError
from kdens.imported import is_onnx_spec

SINGLE_MODEL = "a generalist or student run folder (one network)"


def _kind(teacher: Teacher) -> str:
    stage = getattr(teacher, "stage", "?")
    if stage == "adhoc-ensemble":
        return f"an ad-hoc ensemble of {len(getattr(teacher, 'members', []))} runs"
    if stage == "ensemble":
        return "an ensemble run"
    if stage == "specialists":
        return "a generalist+specialists run"
    if stage == "scores":
        return "a file of precomputed scores"
    return f"a {stage} run"


def check_teacher(method: Method, teacher: Teacher | None, spec: str | None, world: int = 1) -> None:
    """Refuse a teacher the method is not defined for (see docs/methods.md, "Teachers")."""
    if method.teacher == "none":
        if teacher is not None:
            warnings.warn(f"--method {method.name} trains from a designed teacher: --teacher {spec} is used only "
                          "for its data settings and the comparison metrics", UserWarning, stacklevel=3)
        return
    if teacher is None:
        raise ConfigError(f"--method {method.name} needs --teacher")
    if method.teacher == "model" and not isinstance(teacher, ModelTeacher):
        if method.features:
            why = "reads the teacher's hidden layers by module name"
            instead = "use one member's folder, or a logit method (kd, dkd, dist, lskd) with this teacher"
        else:
            why = "distills a network from its own pretrained copy"
            instead = "use --method kd (any teacher) with this teacher"
        raise ConfigError(f"--method {method.name} {why}, so --teacher must be {SINGLE_MODEL}; {spec} is "
                          f"{_kind(teacher)}, which has no single set of modules; {instead}")
    if method.features and isinstance(teacher, ModelTeacher) and is_onnx_spec(teacher.spec):
        raise ConfigError(f"--method {method.name} reads the teacher's hidden layers by module name, but --teacher "
                          f"{spec} is an imported ONNX model run by ONNX Runtime, which has no modules to hook; use a "
                          "logit method (kd, dkd, dist, lskd), or import the PyTorch model (kdens import-model --model "
                          "pkg.module:factory --weights FILE)")
    if method.features and world > 1:
        raise ConfigError(f"--method {method.name} reads the teacher's hidden layers with hooks in one process; "
                          "run it without torchrun (logit methods train under DDP)")


def resolve_model(cfg: DistillConfig, teacher: Teacher | None) -> DistillConfig:
    """Fill an unset ``--model`` with the teacher's architecture (a single-model teacher only).

    ``--model-arg`` values given without ``--model`` override the teacher's arguments. For
    ``tfkd-self`` a student of another architecture than its teacher is allowed, with a warning.
    """
    if cfg.model is None:
        if isinstance(teacher, ModelTeacher) and is_onnx_spec(teacher.spec):
            raise ConfigError(f"--model is required: --teacher {cfg.teacher} is an imported ONNX model, whose "
                              "architecture kdens cannot rebuild or train; give the student's --model (mlp, cnn, "
                              "lenet5, mobilenet or package.module:factory)")
        if not isinstance(teacher, ModelTeacher):
            what = "there is no teacher" if teacher is None else f"--teacher {cfg.teacher} is {_kind(teacher)}"
            raise ConfigError(f"--model is required: the student's architecture defaults to the teacher's only for "
                              f"{SINGLE_MODEL}, and {what}; give --model mlp, cnn, lenet5 or package.module:factory")
        spec = teacher.spec
        return dataclasses.replace(cfg, model=spec["name"], model_args={**spec["kwargs"], **cfg.model_args})
    if cfg.method == "tfkd-self" and isinstance(teacher, ModelTeacher):
        spec = teacher.spec
        if (cfg.model, cfg.model_args) != (spec["name"], spec["kwargs"]):
            warnings.warn(f"--method tfkd-self: the student ({cfg.model} {cfg.model_args}) is not the teacher's "
                          f"architecture ({spec['name']} {spec['kwargs']}); Yuan et al. train a network from its "
                          "own pretrained copy (leave --model unset to copy it)", UserWarning, stacklevel=3)
    return cfg


def unlabeled(cfg: DistillConfig, method: Method, spec: TransferSpec, notes: dict) -> tuple[DistillConfig, Method]:
    """An unlabeled transfer set: kd / logits drop their hard term (warning); a method that needs labels is refused."""
    if cfg.method in LOSS_ALIASES and cfg.alpha:
        warnings.warn(f"--transfer {spec} has no labels: --alpha {cfg.alpha} forced to 0 (soft targets only)",
                      UserWarning, stacklevel=3)
        args = {**cfg.method_args, "alpha": 0.0}
        cfg = dataclasses.replace(cfg, alpha=0.0, method_args=args)
        notes["alpha_forced_zero"] = True
        return cfg, make_method(cfg.method, args)
    if method.needs_labels():
        hint = ("; --method-arg ce_weight=0 drops its cross-entropy" if "ce_weight" in method.params
                and method.name not in ("dkd", "fsp") else "")
        raise ConfigError(f"--method {method.name} needs labels, but --transfer {spec} has none{hint}; "
                          "or use --method soft")
    return cfg, method
