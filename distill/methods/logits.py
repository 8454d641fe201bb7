"""``logits``: Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?" -- logit matching.

``L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * mean_b (1 / (2C)) * sum_k (zbar_s - zbar_t)^2``
with ``zbar = z - mean_k z`` per row (``distill.losses.logit_matching_loss``): the high-T
limit of the soft term, so ``soft`` at a high T and ``logits`` share a learning rate.
The paper regresses on the teacher's logits alone (alpha = 0); kdens' default mixes in a
little cross-entropy like ``kd`` (alpha = 0.1). ``temperature`` plays no role in the loss;
it only picks an arithmetic ensemble's soft scores, as for ``kd``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from distill.losses import logit_matching_loss
from distill.methods.base import Method, Param, check_logits, cross_entropy, work_dtype
from kdens.errors import ConfigError


class Logits(Method):
    """Ba & Caruana 2014: squared error between zero-meaned logits, optionally plus cross-entropy."""

    name = "logits"
    paper = "Ba & Caruana 2014, Do Deep Nets Really Need to be Deep?"
    params: ClassVar[dict[str, Param]] = {"temperature": Param(4.0, "unused by the loss; picks an arithmetic ensemble's soft scores",
                                   low=0.0, low_open=True),
              "alpha": Param(0.1, "weight of the hard-label cross-entropy; logit matching gets 1 - alpha",
                             low=0.0, high=1.0)}

    def needs_labels(self) -> bool:
        return self.args["alpha"] > 0

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        alpha = self.args["alpha"]
        if y is None and alpha > 0:
            raise ConfigError(f"--alpha {alpha} weights a hard-label loss, but this transfer set has no "
                              "labels; use --alpha 0 with an unlabeled transfer set")
        out = student_logits.new_zeros((), dtype=work_dtype(student_logits))
        if alpha > 0:
            check_logits(student_logits, teacher_scores, y, self.name)
            out = out + alpha * cross_entropy(student_logits, y)
        if alpha < 1:
            out = out + (1.0 - alpha) * logit_matching_loss(student_logits, teacher_scores)
        return out
