"""``dkd``: decoupled knowledge distillation -- Zhao, Cui, Song, Qiu & Liang, CVPR 2022.

The KD loss splits into a target-class part (TCKD) and a non-target part (NCKD), which DKD
weighs separately. With p = softmax(z / T) and t the true class:

* binary distributions ``b = [p_t, 1 - p_t]``: ``TCKD = KL(b^teacher || b^student)``;
* the distribution over the non-target classes ``p^_k = p_k / (1 - p_t)``, k != t
  (``softmax`` of the non-target logits): ``NCKD = KL(p^teacher || p^student)``;

``L = ce_weight * CE(y, softmax(z_s)) + w(epoch) * T^2 * (alpha * TCKD + beta * NCKD)``

each KL summed over its classes and averaged over the batch, ``w(epoch) = min((epoch + 1) /
warmup, 1)`` the linear warmup of the authors' code (mdistiller, 1-based epochs there).
Defaults are the paper's CIFAR-100 setting: alpha = 1, beta = 8, T = 4, CE weight 1,
warmup 20 epochs (of 240; ImageNet used beta = 0.5 and a 1-epoch warmup). With alpha =
beta = 1 and no warmup, ``T^2 * (TCKD + (1 - p_t^teacher) * NCKD)`` is exactly KD's soft
term (the paper's Eq. 1); DKD drops the ``(1 - p_t^teacher)`` factor and reweighs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.methods.base import (TEMPERATURE_HELP, Method, Param, check_logits, cross_entropy, need_labels,
                                  work_dtype)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_k p (log p - log q) per row; entries with p = 0 contribute 0 (log-probabilities of -inf
    become the most negative finite number, so 0 * (finite) = 0 where 0 * (-inf) would be NaN)."""
    floor = torch.finfo(log_p.dtype).min
    terms = log_p.exp() * (log_p.clamp_min(floor) - log_q.clamp_min(floor))  # (B, K)
    return terms.sum(dim=1)  # (B,)


def dkd_terms(student_logits: Tensor, teacher_scores: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) at temperature T, each a KL averaged over the batch, not scaled by T^2.

    Args:
        student_logits: z_s, (B, C).
        teacher_scores: teacher logits or log-probabilities, (B, C).
        y: true classes, (B,).
        temperature: T > 0.
    """
    dtype = work_dtype(student_logits)
    gt = F.one_hot(y.long(), student_logits.shape[1]).bool()  # (B, C)
    outs = []
    for z in (teacher_scores.to(dtype), student_logits.to(dtype)):
        log_p = F.log_softmax(z / temperature, dim=1)  # (B, C)
        log_pt = log_p.gather(1, y.long()[:, None])  # (B, 1): log p_t
        log_rest = torch.logsumexp(log_p.masked_fill(gt, float("-inf")), dim=1, keepdim=True)  # (B, 1): log(1 - p_t)
        binary = torch.cat([log_pt, log_rest], dim=1)  # (B, 2)
        non_target = F.log_softmax((z / temperature).masked_fill(gt, float("-inf")), dim=1)  # (B, C), -inf at t
        outs.append((binary, non_target))
    (bt, nt), (bs, ns) = outs
    tckd = _kl_rows(bt, bs).mean()
    nckd = _kl_rows(nt, ns).mean()  # the target column has p = 0: it contributes 0
    return tckd, nckd


def dkd_loss(student_logits: Tensor, teacher_scores: Tensor, y: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """``T^2 * (alpha * TCKD + beta * NCKD)`` (no cross-entropy, no warmup)."""
    tckd, nckd = dkd_terms(student_logits, teacher_scores, y, temperature)
    return temperature**2 * (alpha * tckd + beta * nckd)


class DKD(Method):
    """Zhao et al. 2022: target and non-target parts of the KD loss, weighted apart, with a warmup."""

    name = "dkd"
    paper = "Zhao, Cui, Song, Qiu & Liang 2022, Decoupled Knowledge Distillation (CVPR)"
    params: ClassVar[dict[str, Param]] = {
        "temperature": Param(4.0, TEMPERATURE_HELP, low=0.0, low_open=True),
        "alpha": Param(1.0, "weight of the target-class term TCKD", low=0.0),
        "beta": Param(8.0, "weight of the non-target term NCKD", low=0.0),
        "ce_weight": Param(1.0, "weight of the hard-label cross-entropy", low=0.0),
        "warmup": Param(20, "epochs over which the DKD weight rises linearly to 1 (0: none)", kind=int, low=0),
    }

    def needs_labels(self) -> bool:
        return True  # the target / non-target split is by the true class

    def warmup_factor(self) -> float:
        """``min((epoch + 1) / warmup, 1)``; 1 outside training (no epoch set) or without warmup."""
        w = self.args["warmup"]
        if w == 0 or self.epoch is None:
            return 1.0
        return min((self.epoch + 1) / w, 1.0)

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        y = need_labels(y, self.name, "the target/non-target split uses the true class")
        check_logits(student_logits, teacher_scores, y, self.name)
        a = self.args
        out = student_logits.new_zeros((), dtype=work_dtype(student_logits))
        if a["ce_weight"] > 0:
            out = out + a["ce_weight"] * cross_entropy(student_logits, y)
        return out + self.warmup_factor() * dkd_loss(student_logits, teacher_scores, y, a["alpha"], a["beta"],
                                                     a["temperature"])
