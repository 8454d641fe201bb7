"""``fsp``: flow of solution procedure -- Yim, Joo, Bae & Kim, "A Gift From Knowledge Distillation: Fast
Optimization, Network Minimization and Transfer Learning", CVPR 2017.

The FSP matrix of two feature maps F1 (C1 x H x W) and F2 (C2 x H x W) of one network,
``G_ij = sum_{h,w} F1[i,h,w] * F2[j,h,w] / (H * W)`` (``distill.methods.features.fsp_matrix``),
describes how the network gets from one layer to the next. The points are the network's
input followed by the hint points, ``[x, hint_1, ..., hint_k]``: each consecutive pair is one
section and gives one matrix (the default hint, the last hidden layer, makes one section from
the input to it). Two stages, as the paper:

1. **FSP** (``fsp_epochs``): ``L_FSP = sum_i mean_b (1 / C1_i) sum_{j,l} (G_i^T[b,j,l] - G_i^S[b,j,l])^2``.
   The paper sums the squares with equal weights lambda_i and leaves their scale free (this
   stage has no other term, so the scale only sets the step); kdens divides each section by
   the width C1 of its first point, which keeps the gradient reaching each unit of the
   section's output at the scale of a squared error whatever that width (the plain sum
   killed an 800-800 MLP's units at SGD lr 0.05 on digits; the mean over all entries barely
   moved them).
2. **Main task** (``--epochs``): cross-entropy on the labels from the FSP-trained weights.

The matrices are compared entry by entry, so the teacher's and the student's sections need
equal channel counts (the paper's students keep the teacher's widths and drop layers);
other hint points are refused. ``fsp_epochs`` defaults to a quarter of ``--epochs`` (at
least 1). torchdistill's FSPLoss sums the column norms of G^T - G^S instead of the squares;
bench/parity_torchdistill.py records both.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from distill.methods.base import Param, Phase, cross_entropy, need_labels
from distill.methods.features import FeatureBatch, FeatureMethod, first_phase_epochs, fsp_matrix
from kdens.errors import ConfigError


def fsp_loss(teacher_points: list[Tensor], student_points: list[Tensor]) -> Tensor:
    """``sum_i mean_b (1 / C1_i) sum_{j,l} (G_i^T - G_i^S)^2`` over consecutive pairs of the points."""
    total = None
    for i in range(len(teacher_points) - 1):
        gt = fsp_matrix(teacher_points[i], teacher_points[i + 1])  # (B, C1, C2)
        gs = fsp_matrix(student_points[i], student_points[i + 1])  # (B, C1, C2)
        term = (gs - gt.detach().to(gs.dtype)).pow(2).sum(dim=(1, 2)).mean() / gs.shape[1]
        total = term if total is None else total + term
    return total


class FSP(FeatureMethod):
    """Yim et al. 2017: match the FSP matrices of the teacher's sections, then train on the task."""

    name = "fsp"
    paper = "Yim, Joo, Bae & Kim 2017, A Gift From Knowledge Distillation (CVPR)"
    params: ClassVar[dict[str, Param]] = {
        "fsp_epochs": Param(None, "epochs of the FSP stage (default: a quarter of --epochs, at least 1)",
                            kind=int, low=1),
    }

    def needs_labels(self) -> bool:
        return True  # the second stage trains on the labels

    def phases(self, epochs: int) -> list[Phase]:
        return [Phase("fsp", first_phase_epochs(self.args["fsp_epochs"], epochs), validate=False),
                Phase("main", epochs, needs_teacher=False)]

    def check_shapes(self, hints: list, teacher_shapes: list[tuple], student_shapes: list[tuple],
                     input_shape: tuple) -> None:
        def sizes(shapes):
            points = [torch.zeros((1, *s)) for s in [tuple(input_shape), *shapes]]
            return [tuple(fsp_matrix(a, b).shape[1:]) for a, b in zip(points, points[1:])]

        for hint, gt, gs in zip(hints, sizes(teacher_shapes), sizes(student_shapes)):
            if gt != gs:
                raise ConfigError(
                    f"--method fsp: the section ending at --hint {hint} gives the teacher {gt[0]}x{gt[1]} FSP "
                    f"matrices and the student {gs[0]}x{gs[1]}; FSP compares them entry by entry, so the hinted "
                    "layers need equal widths (give --hint points of equal width, or use --method fitnets, "
                    "whose regressor bridges widths, or rkd)")

    def feature_loss(self, phase: str, batch: FeatureBatch, adapters: nn.ModuleList) -> Tensor:
        if phase == "fsp":
            return fsp_loss([batch.inputs, *batch.teacher], [batch.inputs, *batch.student])
        y = need_labels(batch.y, self.name, "its second stage trains on the labels")
        return cross_entropy(batch.student_logits, y)
