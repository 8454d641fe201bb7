"""``dist``: DIST -- Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.

Matches relations instead of exact probabilities, with Pearson correlation as the match.
With ``Y_s = softmax(z_s / tau)`` and ``Y_t = softmax(s_t / tau)`` (B, C):

* inter-class relation, per example: ``L_inter = 1 - mean_b rho(Y_s[b, :], Y_t[b, :])``
* intra-class relation, per class:  ``L_intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])``

``L = ce_weight * CE(y, softmax(z_s)) + tau^2 * (beta * L_inter + gamma * L_intra)``

``rho(u, v) = cos(u - mean u, v - mean v)``, the cosine as ``torch.nn.functional.cosine_similarity``
computes it (eps = 1e-8, as the authors' and torchdistill's code). Defaults are the paper's
ImageNet setting, beta = gamma = tau = 1 with CE weight 1 (CIFAR-100 used beta = gamma = 2).
The intra-class term correlates across the batch: it needs batches of at least 2 examples.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from distill.methods.base import (TEMPERATURE_HELP, Method, Param, check_logits, hard_term,
                                  work_dtype)

EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N, K), (N, K) -> (N,)."""
    return F.cosine_similarity(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True), dim=1, eps=eps)


def dist_terms(student_logits: Tensor, teacher_scores: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(L_inter, L_intra) at temperature tau, not scaled by tau^2."""
    dtype = work_dtype(student_logits)
    ys = F.softmax(student_logits.to(dtype) / temperature, dim=1)  # (B, C)
    yt = F.softmax(teacher_scores.to(dtype) / temperature, dim=1)  # (B, C)
    inter = 1.0 - pearson_rows(ys, yt).mean()
    intra = 1.0 - pearson_rows(ys.t(), yt.t()).mean()  # (C, B): one correlation per class
    return inter, intra


def dist_loss(student_logits: Tensor, teacher_scores: Tensor, beta: float, gamma: float,
              temperature: float) -> Tensor:
    """``tau^2 * (beta * L_inter + gamma * L_intra)`` (no cross-entropy)."""
    inter, intra = dist_terms(student_logits, teacher_scores, temperature)
    return temperature**2 * (beta * inter + gamma * intra)


class DIST(Method):
    """Huang et al. 2022: Pearson correlation between student and teacher, across classes and across the batch."""

    name = "dist"
    paper = "Huang, You, Wang, Qian & Xu 2022, Knowledge Distillation from A Stronger Teacher (NeurIPS)"
    params: ClassVar[dict[str, Param]] = {
        "temperature": Param(1.0, TEMPERATURE_HELP + " (the paper's tau)", low=0.0, low_open=True),
        "beta": Param(1.0, "weight of the inter-class (per example) relation", low=0.0),
        "gamma": Param(1.0, "weight of the intra-class (per class, across the batch) relation", low=0.0),
        "ce_weight": Param(1.0, "weight of the hard-label cross-entropy", low=0.0),
    }

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        check_logits(student_logits, teacher_scores, y, self.name)
        a = self.args
        out = hard_term(student_logits, y, a["ce_weight"], self.name)
        return out + dist_loss(student_logits, teacher_scores, a["beta"], a["gamma"], a["temperature"])
