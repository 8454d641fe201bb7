"""``fitnets``: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.

Two stages, as the paper prescribes:

1. **Hints** (``hint_epochs``): the student up to its guided layer v_g, plus a regressor r per
   hint, learns to predict the teacher's hint layer u_h:
   ``L_HT = mean_{b,k} (u_h(x)[b,k] - r(v_g(x))[b,k])^2`` summed over the hints. The paper
   writes ``1/2 ||u_h - r(v_g)||^2`` per example; the mean over the D hint units is that times
   2/D, a constant that only rescales the step (and what torchdistill's MSELoss computes),
   chosen so the step size does not grow with the hint layer's width.
2. **KD** (``--epochs``): the whole student with the paper's KD loss
   ``L = ce_weight * CE(y, softmax(z_s)) + lambda(epoch) * KL(softmax(z_t/tau) || softmax(z_s/tau))``
   with lambda annealed linearly from ``lambda_start`` to ``lambda_end`` over the stage (the
   authors' code: KDCost with lambda_teach 4 decayed linearly to 1, temperature 3; their
   cross-entropy H(P_T, P_S) is this KL plus the teacher's entropy, a constant; no tau^2).

The regressor is a convolution when both points are maps and the student's is at least as
large (kernel ``H_s - H_t + 1`` by ``W_s - W_t + 1``, no padding, as the paper), else a linear
map of the flattened guided layer. Regressors are trained in stage 1 only and are never part
of the saved student. ``hint_epochs`` defaults to a quarter of ``--epochs`` (at least 1): the
paper trains stage 1 to convergence on its own schedule.
"""

from __future__ import annotations

from typing import ClassVar

import math

import torch
from torch import Tensor, nn

from distill.methods.base import (TEMPERATURE_HELP, Param, Phase, hard_term, kl_at)
from distill.methods.features import FeatureBatch, FeatureMethod, first_phase_epochs, flat


def regressor(student_shape: tuple, teacher_shape: tuple) -> nn.Module:
    """r mapping the guided layer (shape without batch) onto the hint layer's shape."""
    if len(student_shape) == 3 and len(teacher_shape) == 3 and all(
            s >= t for s, t in zip(student_shape[1:], teacher_shape[1:])):
        kh, kw = student_shape[1] - teacher_shape[1] + 1, student_shape[2] - teacher_shape[2] + 1
        return nn.Conv2d(student_shape[0], teacher_shape[0], (kh, kw))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(student_shape), math.prod(teacher_shape)))


def hint_loss(teacher_hint: Tensor, regressed: Tensor) -> Tensor:
    """``mean_{b,k} (u_h - r(v_g))^2`` over the flattened units: (B, ...) x (B, ...) -> scalar."""
    return (flat(teacher_hint) - flat(regressed)).pow(2).mean()


def annealed(start: float, end: float, epoch: int | None, epochs: int | None) -> float:
    """Linear from ``start`` (first epoch) to ``end`` (last epoch); ``start`` outside training."""
    if epoch is None or not epochs or epochs <= 1:
        return float(start)
    return float(start + (end - start) * min(epoch, epochs - 1) / (epochs - 1))


class FitNets(FeatureMethod):
    """Romero et al. 2015: hint training through regressors, then KD with an annealed weight."""

    name = "fitnets"
    paper = "Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, FitNets: Hints for Thin Deep Nets (ICLR)"
    params: ClassVar[dict[str, Param]] = {
        "hint_epochs": Param(None, "epochs of the hint stage (default: a quarter of --epochs, at least 1)",
                             kind=int, low=1),
        "temperature": Param(3.0, TEMPERATURE_HELP + " in the KD stage", low=0.0, low_open=True),
        "lambda_start": Param(4.0, "weight of the KD term in the first KD epoch", low=0.0),
        "lambda_end": Param(1.0, "weight of the KD term in the last KD epoch", low=0.0),
        "ce_weight": Param(1.0, "weight of the hard-label cross-entropy in the KD stage", low=0.0),
    }

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("hints", first_phase_epochs(self.args["hint_epochs"], epochs), validate=False),
                Phase("kd", epochs)]

    def adapters(self, teacher_shapes: list[tuple], student_shapes: list[tuple]) -> nn.ModuleList:
        return nn.ModuleList(regressor(s, t) for t, s in zip(teacher_shapes, student_shapes))

    def kd_weight(self) -> float:
        a = self.args
        return annealed(a["lambda_start"], a["lambda_end"], self.epoch, self.epochs)

    def feature_loss(self, phase: str, batch: FeatureBatch, adapters: nn.ModuleList) -> Tensor:
        if phase == "hints":
            return sum(hint_loss(u, r(v)) for u, v, r in zip(batch.teacher, batch.student, adapters))
        a = self.args
        zs = batch.student_logits
        out = hard_term(zs, batch.y, a["ce_weight"], self.name)
        with torch.no_grad():
            zt = batch.teacher_logits.detach()
        return out + self.kd_weight() * kl_at(zs, zt, a["temperature"])
