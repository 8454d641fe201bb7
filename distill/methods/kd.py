"""``kd`` and ``soft``: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

``kd``:   ``L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(softmax(s_t/T) || softmax(z_s/T))``
``soft``: the same with ``alpha = 0`` (soft targets only; needs no labels).

The T^2 keeps the soft term's gradient scale independent of T (section 2.1 of the paper).
Defaults are kdens' own (T = 4, alpha = 0.1: the paper gives no single setting; its MNIST
runs used T up to 20). The formulas live in ``distill.losses`` (``kd_loss``), which the
soft-target tests check against golden values.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from distill.losses import kd_loss
from distill.methods.base import TEMPERATURE_HELP, Method, Param
from kdens.errors import ConfigError

_T = Param(4.0, TEMPERATURE_HELP, low=0.0, low_open=True)


class KD(Method):
    """Hinton et al. 2015: hard cross-entropy plus the T^2-scaled KL to the softened teacher."""

    name = "kd"
    paper = "Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network"
    params: ClassVar[dict[str, Param]] = {"temperature": _T,
              "alpha": Param(0.1, "weight of the hard-label cross-entropy; the soft term gets 1 - alpha",
                             low=0.0, high=1.0)}

    def needs_labels(self) -> bool:
        return self.args["alpha"] > 0

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        return kd_loss(student_logits, teacher_scores, y, self.args["temperature"], self.args["alpha"])


class Soft(KD):
    """Soft targets only: ``T^2 * KL(softmax(s_t/T) || softmax(z_s/T))`` (``kd`` with alpha = 0)."""

    name = "soft"
    params: ClassVar[dict[str, Param]] = {"temperature": _T,
              "alpha": Param(0.0, "must be 0: soft has no hard-label term", low=0.0, high=1.0)}

    @classmethod
    def resolve(cls, args: dict | None) -> dict:
        out = super().resolve(args)
        if out["alpha"] != 0:
            raise ConfigError(f"--loss soft has no hard-label term, so --alpha must be 0 (got {out['alpha']}); "
                              "use --loss kd to mix in cross-entropy")
        return out

    def needs_labels(self) -> bool:
        return False

    def loss(self, student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> Tensor:
        return kd_loss(student_logits, teacher_scores, None, self.args["temperature"], 0.0)
