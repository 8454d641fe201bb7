"""``tfkd-virtual``: teacher-free KD with a designed teacher -- Yuan, Tay, Li, Wang & Feng, "Revisiting
Knowledge Distillation via Label Smoothing Regularization", CVPR 2020 (Tf-KD_reg).

The teacher is a designed distribution, no network: probability ``a`` on the true class and
``(1 - a) / (C - 1)`` on every other (``p^d``), softened at temperature T. As in the authors'
released code (``loss_kd_regularization``), the softening treats ``p^d`` as logits and the
student is not softened:

``u = softmax(p^d / T)``,  ``L = (1 - alpha) * CE(y, softmax(z_s)) + alpha * KL(u || softmax(z_s))``

(the paper writes the second term D_KL(p^d_T, p_T); the released code, which produced its
numbers, is the formula above). The KL is summed over classes and averaged over the batch;
the code's element-mean times its multiplier (100 for ResNet-18 on CIFAR-100's C = 100) is
the same. Defaults: a = 0.9 (the paper: "a >= 0.9"; the code fixes 0.99), T = 20 and
alpha = 0.1 (the released ResNet-18 setting). Needs labels, not ``--teacher``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.methods.base import Method, Param, check_logits, cross_entropy, need_labels, work_dtype


def virtual_teacher(y: Tensor, num_classes: int, a: float, temperature: float, dtype: torch.dtype) -> Tensor:
    """``softmax(p^d / T)`` for labels y: (B,) -> (B, C) probabilities."""
    pd = torch.full((len(y), num_classes), (1.0 - a) / (num_classes - 1), dtype=dtype, device=y.device)  # (B, C)
    pd.scatter_(1, y.long()[:, None], a)
    return F.softmax(pd / temperature, dim=1)  # (B, C)


def tfkd_virtual_loss(student_logits: Tensor, y: Tensor, a: float, temperature: float) -> Tensor:
    """``KL(softmax(p^d / T) || softmax(z_s))``, summed over classes, mean over the batch."""
    dtype = work_dtype(student_logits)
    u = virtual_teacher(y, student_logits.shape[1], a, temperature, dtype)  # (B, C)
    log_q = F.log_softmax(student_logits.to(dtype), dim=1)  # (B, C)
    return F.kl_div(log_q, u, reduction="batchmean")


class TfKDVirtual(Method):
    """Yuan et al. 2020: a designed teacher distribution in place of a network."""

    name = "tfkd-virtual"
    paper = "Yuan, Tay, Li, Wang & Feng 2020, Revisiting Knowledge Distillation via Label Smoothing Regularization"
    teacher = "none"
    params: ClassVar[dict[str, Param]] = {
        "temperature": Param(20.0, "softening temperature of the designed teacher", low=0.0, low_open=True),
        "alpha": Param(0.1, "weight of the designed-teacher KL (the paper's alpha); cross-entropy gets 1 - alpha",
                       low=0.0, high=1.0),
        "a": Param(0.9, "probability of the true class in the designed teacher", low=0.0, high=1.0,
                   high_open=True),
    }

    def needs_labels(self) -> bool:
        return True  # the designed teacher is built from the true class

    def loss(self, student_logits: Tensor, teacher_scores: Tensor | None, y: Tensor | None) -> Tensor:
        y = need_labels(y, self.name, "the designed teacher puts probability a on the true class")
        check_logits(student_logits, None, y, self.name)
        a = self.args
        out = student_logits.new_zeros((), dtype=work_dtype(student_logits))
        if a["alpha"] < 1:
            out = out + (1.0 - a["alpha"]) * cross_entropy(student_logits, y)
        if a["alpha"] > 0:
            out = out + a["alpha"] * tfkd_virtual_loss(student_logits, y, a["a"], a["temperature"])
        return out
