"""``tfkd-self``: teacher-free KD by self-training -- Yuan, Tay, Li, Wang & Feng, "Revisiting Knowledge
Distillation via Label Smoothing Regularization", CVPR 2020 (Tf-KD_self).

A network is first trained normally; that pretrained copy then teaches a fresh network of
the same architecture with the KD loss (the paper's convention: alpha weights the soft term):

``L = (1 - alpha) * CE(y, softmax(z_s)) + alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``

which is ``kd`` with kdens' hard-label weight ``1 - alpha``. Give the pretrained network's run
folder as ``--teacher``; the student's architecture defaults to the teacher's. Defaults are
the authors' released ResNet-18 CIFAR-100 self-training setting (alpha = 0.95, T = 6). Their
code takes an element-mean KL times a per-network multiplier (1 to 50); kdens keeps the
batch-mean KL of ``kd`` (summed over classes), which a multiplier equal to C reproduces.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from distill.losses import kd_loss
from distill.methods.base import TEMPERATURE_HELP, Method, Param


class TfKDSelf(Method):
    """Yuan et al. 2020: the pretrained student as its own teacher."""

    name = "tfkd-self"
    paper = "Yuan, Tay, Li, Wang & Feng 2020, Revisiting Knowledge Distillation via Label Smoothing Regularization"
    teacher = "model"
    params: ClassVar[dict[str, Param]] = {
        "temperature": Param(6.0, TEMPERATURE_HELP, low=0.0, low_open=True),
        "alpha": Param(0.95, "weight of the soft term (the paper's alpha); cross-entropy gets 1 - alpha",
                       low=0.0, high=1.0),
    }

    def needs_labels(self) -> bool:
        return self.args["alpha"] < 1

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        return kd_loss(student_logits, teacher_scores, y, self.args["temperature"], 1.0 - self.args["alpha"])
