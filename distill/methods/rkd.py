"""``rkd``: relational KD -- Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

Transfers the structure of a batch in feature space rather than each example's output. For
the features t_i (teacher) and s_i (student) of a batch at a hint point (flattened):

* distance-wise: ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu``, mu the mean distance over the pairs
  i != j of the batch; ``L_D = mean_{i,j} huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))``
* angle-wise: ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>``, ``e_ij = (t_i - t_j) / ||t_i - t_j||``;
  ``L_A = mean_{i,j,k} huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))``

with ``huber`` the smooth L1 loss (delta 1) averaged over all (i, j) / (i, j, k) entries, as
the authors' code (and torchdistill's RKDLoss); the diagonal terms are 0 on both sides.
For features wider than the batch the angles come from the Gram matrix (``angles``): the
same numbers in N^3 instead of N^3 * D operations.

``L = ce_weight * CE(y, softmax(z_s)) + sum_hints (distance_weight * L_D + angle_weight * L_A)``

Defaults: lambda_D = 25, lambda_A = 50 (the paper's weights), applied to the last hidden
layer (the paper's classification experiments use the penultimate layer). Distances and
angles need no equal widths: teacher and student may differ. The angle term holds B^3
numbers (2M for a batch of 128), which makes rkd the slowest method per epoch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.methods.base import Param, hard_term
from distill.methods.features import FeatureBatch, FeatureMethod, flat


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between the rows of e (N, D) -> (N, N), exactly 0 on the diagonal."""
    sq = e.pow(2).sum(dim=1)  # (N,)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()  # (N, N)
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def rkd_distance(student: Tensor, teacher: Tensor) -> Tensor:
    """L_D for features (N, D_s) and (N, D_t)."""
    with torch.no_grad():
        td = pairwise_distances(teacher)  # (N, N)
        td = td / td[td > 0].mean()
    d = pairwise_distances(student)  # (N, N)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, td.to(d.dtype), reduction="mean")


def angles(e: Tensor, eps: float = 1e-12) -> Tensor:
    """``<e_ij, e_kj>`` for every anchor j and pair (i, k), flattened: (N, D) -> (N * N * N,), index [j, i, k].

    ``e_ij = (e_i - e_j) / max(||e_i - e_j||, eps)`` (``F.normalize``'s rule; 0 where i = j), computed
    the cheaper of two equal ways: from the N x N x D differences when D <= N (the authors' code),
    else from the Gram matrix (``angles_from_gram``), N^3 instead of N^3 * D operations.
    """
    if e.shape[1] <= e.shape[0]:
        diff = e[None, :, :] - e[:, None, :]  # (N, N, D): diff[j, i] = e_i - e_j
        unit = F.normalize(diff, p=2, dim=2, eps=eps)  # (N, N, D)
        return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)  # (N * N * N,)
    return angles_from_gram(e, eps)


def angles_from_gram(e: Tensor, eps: float = 1e-12) -> Tensor:
    """``angles`` from G = e e^T: ``(e_i - e_j) . (e_k - e_j) = G_ik - G_ij - G_kj + G_jj`` over the two norms.

    G and the subtraction are float64 (it cancels large terms); the N^3 products are in the
    working dtype of ``e``.
    """
    dtype = torch.promote_types(e.dtype, torch.float32)
    e64 = e.double()
    g = e64 @ e64.t()  # (N, N)
    g = (g + g.t()) / 2  # exactly symmetric, so the i = j and k = j terms cancel exactly
    sq = g.diagonal()  # (N,)
    # max(||e_i - e_j||, eps) as sqrt(max(d^2, eps^2)): the clamp before the root keeps the diagonal's gradient 0
    inv = 1.0 / (sq[:, None] + sq[None, :] - 2 * g).clamp(min=eps * eps).sqrt()  # (N, N): 1/||e_i - e_j||
    off = 1.0 - torch.eye(len(e), dtype=g.dtype, device=g.device)  # (N, N): 0 where i = j
    a = (inv * off).to(dtype)  # (j, i)
    num = (g[None, :, :] - g.t()[:, :, None] - g[:, None, :] + sq[:, None, None]).to(dtype)  # (j, i, k)
    return (num * a[:, :, None] * a[:, None, :]).reshape(-1)


def rkd_angle(student: Tensor, teacher: Tensor) -> Tensor:
    """L_A for features (N, D_s) and (N, D_t)."""
    with torch.no_grad():
        ta = angles(teacher)
    sa = angles(student)
    return F.smooth_l1_loss(sa, ta.to(sa.dtype), reduction="mean")


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float, angle_weight: float) -> Tensor:
    """``distance_weight * L_D + angle_weight * L_A`` for one hint point (features flattened)."""
    s, t = flat(student), flat(teacher).detach()
    out = s.new_zeros(())
    if distance_weight > 0:
        out = out + distance_weight * rkd_distance(s, t)
    if angle_weight > 0:
        out = out + angle_weight * rkd_angle(s, t)
    return out


class RKD(FeatureMethod):
    """Park et al. 2019: distance- and angle-wise relations among the batch's features."""

    name = "rkd"
    paper = "Park, Kim, Lu & Cho 2019, Relational Knowledge Distillation (CVPR)"
    params: ClassVar[dict[str, Param]] = {
        "distance_weight": Param(25.0, "weight of the distance-wise term (lambda_D)", low=0.0),
        "angle_weight": Param(50.0, "weight of the angle-wise term (lambda_A)", low=0.0),
        "ce_weight": Param(1.0, "weight of the hard-label cross-entropy", low=0.0),
    }

    def feature_loss(self, phase: str, batch: FeatureBatch, adapters: nn.ModuleList) -> Tensor:
        a = self.args
        zs = batch.student_logits
        out = hard_term(zs, batch.y, a["ce_weight"], self.name)
        for s, t in zip(batch.student, batch.teacher):
            out = out + rkd_loss(s, t, a["distance_weight"], a["angle_weight"])
        return out
