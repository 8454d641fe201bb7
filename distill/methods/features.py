"""The interface of feature methods (``fitnets``, ``fsp``, ``rkd``): losses on hidden layers.

A feature method reads the teacher's and the student's activations at the ``--hint``
points (``distill.methods.hints``), so it needs a teacher that is one network (a generalist
or student run), run on every batch or once over the transfer set (``distill.feature_cache``).
It may train in several phases (``phases``), each with its own loss (``feature_loss``), and may
train adapters beside the student (``adapters``: FitNets' regressors) that are dropped before
the student is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.methods.base import Method, Phase


@dataclass
class FeatureBatch:
    """What a feature loss sees for one batch."""

    inputs: Tensor
    """The batch as both networks saw it (after jitter), (B, ...)."""
    student_logits: Tensor
    """z_s, (B, C)."""
    teacher_logits: Tensor | None
    """z_t, (B, C); None in a phase that does not run the teacher."""
    y: Tensor | None
    """Labels (B,) or None."""
    student: list[Tensor]
    """The student's activations at the hint points, one tensor (B, ...) per hint."""
    teacher: list[Tensor]
    """The teacher's activations at the hint points (no gradient), one per hint."""


class FeatureMethod(Method):
    """Base class of the methods that read hidden layers."""

    teacher = "model"
    features = True

    def phases(self, epochs: int) -> list[Phase]:
        """The training phases for ``--epochs`` = ``epochs`` (the last one is the student's run proper)."""
        return [Phase("main", epochs)]

    def check_shapes(self, hints: list, teacher_shapes: list[tuple], student_shapes: list[tuple],
                     input_shape: tuple) -> None:
        """Refuse hint points this method cannot compare (shapes without the batch dimension)."""

    def adapters(self, teacher_shapes: list[tuple], student_shapes: list[tuple]) -> nn.ModuleList:
        """Modules trained beside the student (not saved with it); one per hint or none."""
        return nn.ModuleList()

    def feature_loss(self, phase: str, batch: FeatureBatch, adapters: nn.ModuleList) -> Tensor:
        raise NotImplementedError

    def set_phase(self, phase: str) -> None:
        self.phase = phase


def first_phase_epochs(value: int | None, epochs: int) -> int:
    """A first phase's length: the value given, else a quarter of ``--epochs`` (at least 1)."""
    return int(value) if value is not None else max(1, math.ceil(epochs / 4))


def flat(t: Tensor) -> Tensor:
    """(B, ...) -> (B, D) in at least float32."""
    return t.flatten(1).to(torch.promote_types(t.dtype, torch.float32))


def as_map(t: Tensor) -> Tensor:
    """A feature as a (B, C, H, W) map: vectors (B, D) become (B, D, 1, 1), sequences (B, C, L) (B, C, L, 1)."""
    if t.ndim == 2:
        return t[:, :, None, None]
    if t.ndim == 3:
        return t[:, :, :, None]
    return t


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """Yim et al.'s FSP matrix ``G_ij = sum_{h,w} F1[i,h,w] * F2[j,h,w] / (H * W)``: (B, C1, C2).

    Maps of different spatial sizes are max-pooled to the smaller one (as torchdistill); a map
    that meets a vector (H = W = 1) is flattened to a vector (each pixel a channel), so an
    MLP's FSP relates every input pixel to every hidden unit.
    """
    a, b = as_map(first), as_map(second)
    vec_a, vec_b = a.shape[2:] == (1, 1), b.shape[2:] == (1, 1)
    if vec_a != vec_b:
        a = a if vec_a else a.flatten(1)[:, :, None, None]  # (B, C*H*W, 1, 1)
        b = b if vec_b else b.flatten(1)[:, :, None, None]
    h, w = min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3])
    if a.shape[2:] != (h, w):
        a = F.adaptive_max_pool2d(a, (h, w))
    if b.shape[2:] != (h, w):
        b = F.adaptive_max_pool2d(b, (h, w))
    a, b = a.flatten(2), b.flatten(2)  # (B, C1, HW), (B, C2, HW)
    return torch.matmul(a, b.transpose(1, 2)) / a.shape[2]  # (B, C1, C2)
