"""What every distillation method shares: typed arguments with the paper's defaults and one interface.

A method is a class with

* ``name``, ``paper`` and ``params`` (``Param`` per ``--method-arg``, default from the paper);
* ``teacher``: which teachers it accepts -- ``"any"`` (every teacher kind answers
  log-probabilities, and the method reads only those), ``"model"`` (a single network whose
  modules it can read or whose architecture it copies) or ``"none"`` (no teacher at all);
* ``features``: whether it reads hidden layers (``--hint``) and so runs the teacher online.

Logit methods implement ``loss(student_logits, teacher_scores, y)``: student logits z_s
(B, C), the teacher's scores s_t (B, C) as the soft-target cache holds them (logits or
log-probabilities: every method here is invariant to a per-row constant in s_t, so both
give the same loss), labels (B,) or None. Feature methods (``distill.methods.features``)
implement ``phases`` and ``feature_loss`` instead.

Losses are computed in at least float32 (half inputs upcast), float64 stays float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdens.errors import ConfigError, ModelError


@dataclass(frozen=True)
class Param:
    """One ``--method-arg``: its paper default, its type and its valid range."""

    default: Any
    """Value when not given; None only where ``help`` says what None means."""
    help: str
    """One line for docs/methods.md and error messages."""
    kind: type = float
    """float, int or bool."""
    low: float | None = None
    """Smallest valid value (inclusive unless ``low_open``)."""
    high: float | None = None
    """Largest valid value (inclusive unless ``high_open``)."""
    low_open: bool = False
    high_open: bool = False

    def range_text(self) -> str:
        if self.kind is bool:
            return "true or false"
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        what = "an integer" if self.kind is int else "a number"
        return f"{what} {' and '.join(t for t in (lo, hi) if t)}".strip()

    def coerce(self, method: str, key: str, value: Any) -> Any:
        """``value`` as this parameter's type, or a ConfigError naming the value and the valid range."""
        if value is None and self.default is None:
            return None
        bad = ConfigError(f"--method {method}: --method-arg {key}={value!r} must be {self.range_text()} "
                          f"({self.help}; default {self.default})")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise bad
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            value = int(value)
        else:
            value = float(value)
        if not math.isfinite(value):
            raise bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad
        return value


TEMPERATURE_HELP = "softening temperature of the teacher's and student's distributions"


@dataclass(frozen=True)
class Phase:
    """One stretch of training with one loss (FitNets and FSP train in two)."""

    name: str
    epochs: int
    validate: bool = True
    """Early stopping and best-epoch selection on validation cross-entropy (off while only
    hidden layers are fitted: the output layer is not trained then)."""
    needs_teacher: bool = True


class Method:
    """Base class: argument handling; subclasses add the loss (see the module docstring)."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    teacher: ClassVar[str] = "any"
    features: ClassVar[bool] = False
    params: ClassVar[dict[str, Param]] = {}

    def __init__(self, args: dict | None = None):
        self.args = self.resolve(args)
        self.epoch: int | None = None
        self.epochs: int | None = None

    @classmethod
    def resolve(cls, args: dict | None) -> dict:
        """``args`` with defaults filled in and every value checked; unknown keys are an error."""
        args = {str(k).replace("-", "_"): v for k, v in (args or {}).items()}
        unknown = sorted(set(args) - set(cls.params))
        if unknown:
            valid = ", ".join(f"{k}={p.default}" for k, p in cls.params.items()) or "none"
            raise ConfigError(f"--method {cls.name}: unknown --method-arg {', '.join(unknown)}; "
                              f"valid (with defaults): {valid}")
        return {k: p.coerce(cls.name, k, args.get(k, p.default)) for k, p in cls.params.items()}

    @property
    def temperature(self) -> float | None:
        """The T at which the teacher's scores are softened (picks an ensemble's soft scores)."""
        t = self.args.get("temperature")
        return None if t is None else float(t)

    def needs_labels(self) -> bool:
        """Whether the loss reads the labels (an unlabeled transfer set is then refused)."""
        return float(self.args.get("ce_weight", 0.0)) > 0

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """The 0-based epoch about to run, of ``epochs`` (warmups and annealed weights follow it)."""
        self.epoch, self.epochs = int(epoch), int(epochs)

    def loss(self, student_logits: Tensor, teacher_scores: Tensor | None, y: Tensor | None) -> Tensor:
        raise NotImplementedError(f"--method {self.name} has no logit loss")

    def describe(self) -> dict:
        return {"method": self.name, "method_args": dict(self.args)}


# ---------------------------------------------------------------- shared pieces

def work_dtype(t: Tensor) -> torch.dtype:
    """float32 at least: half precision loses the small differences between softened distributions."""
    return torch.promote_types(t.dtype, torch.float32)


def check_logits(student_logits: Tensor, teacher_scores: Tensor | None, y: Tensor | None, method: str) -> None:
    """Shapes of the logit-method inputs: (B, C), (B, C), (B,)."""
    if student_logits.ndim != 2:
        raise ModelError(f"--method {method}: student logits must have shape (batch, classes), "
                         f"got {tuple(student_logits.shape)}")
    if teacher_scores is not None and teacher_scores.shape != student_logits.shape:
        raise ModelError(f"--method {method}: student logits {tuple(student_logits.shape)} and teacher scores "
                         f"{tuple(teacher_scores.shape)} differ in shape; build the student with as many "
                         "classes as the teacher predicts")
    if y is not None and tuple(y.shape) != (student_logits.shape[0],):
        raise ModelError(f"--method {method}: labels must have shape ({student_logits.shape[0]},), "
                         f"got {tuple(y.shape)}")


def need_labels(y: Tensor | None, method: str, what: str) -> Tensor:
    if y is None:
        raise ConfigError(f"--method {method} needs labels ({what}), but this transfer set has none; "
                          "use a labeled --transfer (train, val, fraction=F, omit=...)")
    return y.long()


def cross_entropy(student_logits: Tensor, y: Tensor) -> Tensor:
    """CE(y, softmax(z_s)), mean over the batch, in the working dtype."""
    return F.cross_entropy(student_logits.to(work_dtype(student_logits)), y.long())


def hard_term(student_logits: Tensor, y: Tensor | None, ce_weight: float, method: str) -> Tensor:
    """``ce_weight * CE(y, softmax(z_s))`` (a zero of the working dtype when the weight is 0).

    The hard-label term methods add beside their own loss; it needs labels only when weighted.
    """
    out = student_logits.new_zeros((), dtype=work_dtype(student_logits))
    if ce_weight > 0:
        y = need_labels(y, method, f"ce_weight={ce_weight}; --method-arg ce_weight=0 drops it")
        out = out + ce_weight * cross_entropy(student_logits, y)
    return out


def kl_at(student_logits: Tensor, teacher_scores: Tensor, temperature: float) -> Tensor:
    """KL(softmax(s_t / T) || softmax(z_s / T)), summed over classes, mean over the batch (no T^2).

    Classes the teacher gives probability 0 (log-probability -inf) contribute 0.
    """
    dtype = work_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)  # (B, C)
    log_p = F.log_softmax(teacher_scores.to(dtype) / temperature, dim=1).clamp_min(torch.finfo(dtype).min)  # (B, C)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
