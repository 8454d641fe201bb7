"""``lskd``: logit-standardized KD -- Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024.

Each row of logits is z-scored before the softmax, so the student matches the teacher's
logit *relations* and not their range: ``Z(z) = (z - mean_k z) / (std_k z + eps)`` (std with
Bessel's correction, eps = 1e-7, as the authors' code), then KD at the base temperature T:

``L = ce_weight * CE(y, softmax(z_s)) + kd_weight * T^2 * KL(softmax(Z(s_t)/T) || softmax(Z(z_s)/T))``

Defaults are the authors' CIFAR-100 command line (``--logit-stand --base-temp 2 --kd-weight 9``
on mdistiller's KD, whose CE weight is 0.1). The z-score ignores a per-row constant, so
cached teacher log-probabilities give the same loss as the teacher's logits; a teacher
that gives some class probability exactly 0 (log-probability -inf) has no z-score and is refused.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from distill.methods.base import Method, Param, check_logits, hard_term, kl_at, work_dtype
from kdens.errors import ModelError

EPS = 1e-7


def standardize(z: Tensor, eps: float = EPS) -> Tensor:
    """Row-wise z-score ``(z - mean) / (std + eps)``, std with Bessel's correction: (B, C) -> (B, C)."""
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def lskd_loss(student_logits: Tensor, teacher_scores: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(Z(s_t)/T) || softmax(Z(z_s)/T))`` (no cross-entropy, no weight)."""
    dtype = work_dtype(student_logits)
    st = teacher_scores.to(dtype)
    if not bool(torch.isfinite(st).all()):
        raise ModelError("--method lskd z-scores the teacher's logits, but this teacher gives some classes "
                         "probability 0 (log-probability -inf); use --method kd or dkd with this teacher")
    return temperature**2 * kl_at(standardize(student_logits.to(dtype)), standardize(st), temperature)


class LSKD(Method):
    """Sun et al. 2024: KD on z-scored logits at a base temperature."""

    name = "lskd"
    paper = "Sun, Ren, Li, Wang & Cao 2024, Logit Standardization in Knowledge Distillation (CVPR)"
    params: ClassVar[dict[str, Param]] = {
        "temperature": Param(2.0, "base temperature, applied to the z-scored logits", low=0.0, low_open=True),
        "kd_weight": Param(9.0, "weight of the standardized KD term", low=0.0),
        "ce_weight": Param(0.1, "weight of the hard-label cross-entropy", low=0.0),
    }

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        check_logits(student_logits, teacher_scores, y, self.name)
        a = self.args
        out = hard_term(student_logits, y, a["ce_weight"], self.name)
        return out + a["kd_weight"] * lskd_loss(student_logits, teacher_scores, a["temperature"])
