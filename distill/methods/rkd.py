"""``rkd``: relational KD -- Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

Transfers the structure of a batch in feature space rather than each example's output. For
the features t_i (teacher) and s_i (student) of a batch at a hint point (flattened):

* distance-wise: ``psi_D(t_i, t_j) = ||t_i - t_j|| / mu``, mu the mean distance over the pairs
  i != j of the batch; ``L_D = mean_{i,j} huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))``
* angle-wise: ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>``, ``e_ij = (t_i - t_j) / ||t_i - t_j||``;
  ``L_A = mean_{i,j,k} huber(psi_A(s_i, s_j, s_k) - psi_A(t_i, t_j, t_k))``

with ``huber`` the smooth L1 loss (delta 1) averaged over all (i, j) / (i, j, k) entries, as
the authors' code (and torchdistill's RKDLoss); the diagonal terms are 0 on both sides.
The training loss builds the angles from the Gram matrix of the centred features (N^3
instead of N^3 * D operations, float32 without cancellation) and computes its gradient by
hand (``_AngleLoss``); ``angles`` is the readable definition it is tested against. Where two
features of a batch coincide (two identical images, two all-zero ReLU layers) the unit
vector between them is taken as 0 with a zero gradient: the authors' ``F.normalize`` gives
the same angles there, but a gradient of order 1/eps (1e12) that only a clip would hide.

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
from torch.autograd.function import once_differentiable

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


def _angle_parts(e: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c, G, live, a) in float64 for features e (N, D): c the centred rows, G = c c^T, a = 1/||e_i - e_j||.

    Centring first keeps G's entries the size of the distances, so the angles can then be
    built in float32 without the cancellation an offset would cause. ``live`` marks the
    pairs i != j further apart than eps; a is 0 elsewhere (no direction, no gradient).
    """
    c = e.detach().double()
    c = c - c.mean(dim=0)
    g = c @ c.t()
    g = (g + g.t()) / 2  # exactly symmetric, so the i = j and k = j terms cancel exactly
    sq = g.diagonal()
    d2 = sq[:, None] + sq[None, :] - 2 * g
    live = (d2 > eps * eps) & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    a = torch.where(live, d2.clamp(min=eps * eps).rsqrt(), torch.zeros_like(d2))
    return c, g, live, a


def _angle_cube(g: Tensor, a: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(num, angles), both (N, N, N) in dtype, index [j, i, k]: num = (e_i - e_j) . (e_k - e_j).

    Built in place (four passes over N^3 numbers for num, two for the angles): this is the
    bulk of rkd's cost per step.
    """
    gw, aw = g.to(dtype), a.to(dtype)
    num = gw[None, :, :] - gw[:, :, None]  # G_ik - G_ji
    num.sub_(gw[:, None, :]).add_(gw.diagonal()[:, None, None])  # - G_jk + G_jj
    ang = num * aw[:, :, None]
    ang.mul_(aw[:, None, :])
    return num, ang


class _AngleLoss(torch.autograd.Function):
    """``mean huber(angles(student) - target)`` with its gradient computed in the forward pass.

    Autograd through ``angles_from_gram`` keeps a dozen N^3 temporaries; this keeps two and
    derives the gradient by hand (checked against autograd in the tests), about 2x faster
    for a batch of 128 (``bench/bench_rkd.py``). Once differentiable: no second derivatives.
    """

    @staticmethod
    def forward(ctx, e: Tensor, target: Tensor, eps: float) -> Tensor:
        n, dtype = len(e), torch.promote_types(e.dtype, torch.float32)
        c, g, live, a = _angle_parts(e, eps)
        num, x = _angle_cube(g, a, dtype)
        x.sub_(target.view(n, n, n).to(dtype))  # x = S - T
        r = x.clamp(-1.0, 1.0)  # huber'(x)
        # huber(x) = m * (x - m / 2) with m = clamp(x, -1, 1): 0.5 x^2 inside, |x| - 0.5 outside
        loss = x.sub_(r, alpha=0.5).mul_(r).sum() / n**3  # sum(): cascade summation, exact enough over 16M terms
        del x
        # S_jik = num_jik a_ji a_jk; dL/dS = r / n^3 (the scale is applied at the end)
        aw = a.to(dtype)
        da = 2 * torch.einsum("jik,jk->ji", num.mul_(r), aw)  # dL/da_ji: i as either factor (S is symmetric in i, k)
        del num
        w_row = (aw * torch.einsum("jik,jk->ji", r, aw)).double()  # sum_k W_jik, W = r a_ji a_jk
        w_col = r.mul_(aw[:, :, None]).mul_(aw[:, None, :]).sum(0).double()  # sum_j W_jik
        del r
        # num_jik = G_ik - G_ji - G_jk + G_jj
        dg = w_col - 2 * w_row.t() + torch.diag(w_row.sum(1))
        # a_ji = d2_ji^(-1/2), d2_ji = G_jj + G_ii - 2 G_ji
        gd2 = torch.where(live, -0.5 * da.double() * a**3, torch.zeros_like(a))
        dg = dg - 2 * gd2 + torch.diag(gd2.sum(1) + gd2.sum(0))
        dc = (dg + dg.t()) @ c  # G = c c^T
        ctx.save_for_backward(((dc - dc.mean(dim=0)) / n**3).to(e.dtype))  # c = e - mean(e)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad_out * grad, None, None


def rkd_angle(student: Tensor, teacher: Tensor, eps: float = 1e-12) -> Tensor:
    """L_A for features (N, D_s) and (N, D_t): ``mean huber(angles(student) - angles(teacher))``."""
    with torch.no_grad():
        _, tg, _, ta = _angle_parts(teacher, eps)
        target = _angle_cube(tg, ta, torch.promote_types(student.dtype, torch.float32))[1]
    return _AngleLoss.apply(student, target, eps)


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
