"""Solvers for the generalist + specialists combination (see :mod:`specialists.combine`).

Both maximise, row by row, the concave

    F(q) = sum_k a_k log q_k + sum_m b_m log R_m(q),   R_m(q) = sum_{j not in S_m} q_j,

over the simplex (a: (N, C), b: (N, M), zero for inactive specialists). At the optimum
dF/dq_k = lam_total := sum a + sum b for every k.

``solve_em``: the EM / minorise-maximise fixed point
    q_k <- (a_k + q_k sum_{m: k not in S_m} b_m / R_m) / lam_total.
Jensen's inequality makes F non-decreasing; iterates stay on the simplex; fixed points
with q > 0 are the stationary points, hence (concavity) the optimum. Any groups.

``solve_block``: disjoint groups only. Every term depends on q through the block masses
Q_m = q(S_m) (active m) and Q_U of the classes outside all active groups, so within a
block q_k ∝ a_k. With A_B the block sums of a, stationarity in the block masses reads
A_m/Q_m - b_m/(1 - Q_m) = lam and A_U/Q_U = lam for one scalar lam, and each Q_m(lam)
is the root in (0, 1) of a quadratic, decreasing in lam. So only the 1-D equation
sum_B Q_B(lam) = 1 is left. Cases:

* one active specialist: explicit, Q_m = A_m / lam_total, Q_U = (A_U + b_m) / lam_total.
* lam > 0 (classes outside the active groups exist, or the masses at lam = 0 sum past
  1): Newton on x = 1/lam from the left. Every Q_m is concave increasing in x (inverse
  of a convex increasing function) and Q_U = A_U x is linear, so Newton never
  overshoots and converges monotonically; the first step from x = 0 is the start.
* lam <= 0 (active groups cover every class and sum_m A_m/(A_m + b_m) <= 1): the same
  on x = -1/lam, where every Q_m is convex decreasing.
* Poles. A block with b_m << A_m saturates (Q_m -> 1) once lam < A_m, and its dustbin
  mass then behaves like b_m / (A_m - lam); for lam < 0 a block with A_m << b_m
  behaves like A_m / (b_m + lam). When the root lies past such a pole, Newton on x
  crawls (each step only doubles the distance to the pole) and tiny masses lose their
  relative precision. Those rows use lam = ±P sigmoid(-v), anchored at the pole P, so
  that |lam| and the distance to the pole, P sigmoid(v), are both exact, and solve
  log(sum of the small masses) = log(1 - Q of the dominant block), nearly linear in v,
  by Newton safeguarded with a bracket (bisection when a step leaves it).

The residual sum_B Q_B - 1 is evaluated as (all but the largest mass) - (1 - largest),
with 1 - Q from its own stable root, so small masses keep their relative precision.
Stopping: a row stops when its Newton step predicts that no q_k moves by more than
tol * q_k (hence by less than tol; concavity/convexity makes the prediction a bound in
the x-iterations), or when rounding has taken over (the residual flips sign, or the
step no longer changes the iterate). Converged rows leave the working set.
"""

from __future__ import annotations

import math

import torch


def root(lam: torch.Tensor, big_a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The root Q in (0, 1) of A/Q - b/(1 - Q) = lam, to full relative precision.

    It is the smaller root of lam Q^2 - (lam + A + b) Q + A = 0; each branch adds only
    non-negative terms, so nothing cancels for either sign of lam.
    """
    s = big_a + b
    root_d = torch.sqrt((lam - big_a + b) ** 2 + 4 * big_a * b)
    pos = lam + s >= 0
    den = torch.where(pos, lam + s + root_d, 1.0)
    far = torch.where(pos, -2.0, -2 * lam)  # lam < -s < 0 on this branch
    return torch.where(pos, 2 * big_a / den, (root_d - lam - s) / far)


def _small_root(c, u, w):
    """Positive root of w z^2 + (u + c) z - c = 0 for w >= 0, u + c >= 0: 2c / ((u+c) + sqrt(...)).

    With (c, u, w) = (b, A - lam, lam) it is a dominant block's dustbin mass 1 - Q for
    lam > 0; with (A, b + lam, -lam) a block's mass Q for lam < 0. Given u exactly, it
    is exact however close lam is to the pole.
    """
    t = u + c
    return 2 * c / (t + torch.sqrt(t * t + 4 * w * c))


def solve_em(
    a: torch.Tensor, b: torch.Tensor, g_mat: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """EM fixed point in class space, any groups.

    Args:
        a: (N, C) generalist plus in-group specialist probabilities, floored > 0.
        b: (N, M) dustbin probabilities, 0 for inactive specialists.
        g_mat: (C, M) group membership, 1.0 where class k is in S_m.
        tol: stop when no q_k moves by more than this.
        max_iter: iteration cap.

    Returns:
        (log q (N, C), iterations).
    """
    outside = 1.0 - g_mat  # (C, M): 1 where class k is not in S_m
    lam = (a.sum(1) + b.sum(1)).unsqueeze(1)  # (N, 1) = 1 + #active; keeps q on the simplex
    q = a / a.sum(1, keepdim=True)  # (N, C)
    it = 0
    for it in range(1, max_iter + 1):
        r = q @ outside  # (N, M) = R_m(q)
        share = (b / r) @ outside.T  # (N, C) = sum_{m: k not in S_m} b_m / R_m
        q_new = (a + q * share) / lam  # (N, C)
        delta = (q_new - q).abs().max()
        q = q_new
        if delta < tol:
            break
    return q.log(), it


def solve_block(
    a: torch.Tensor, b: torch.Tensor, g_mat: torch.Tensor, active: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """Block reduction plus a 1-D root in lam, disjoint groups only.

    Args as for :func:`solve_em`, plus active: (N, M) bool. Returns (log q (N, C), the
    iterations of the slowest row; 0 when no row has two active specialists).
    """
    n_act = active.sum(1)  # (N,)
    # group of each class, M for none; a padded column of False marks "no active group"
    group_of = torch.full((g_mat.shape[0],), g_mat.shape[1], dtype=torch.long, device=a.device)
    for m in range(g_mat.shape[1]):
        group_of[g_mat[:, m] > 0] = m
    in_active = torch.cat([active, active.new_zeros(len(active), 1)], 1)[:, group_of]  # (N, C)
    b_sum = b.sum(1)  # (N,)
    # without specialists lam_total is exactly 1, so that q is p_g to the last bit
    lam_total = torch.where(n_act > 0, a.sum(1) + b_sum, 1.0)  # (N,)
    a_rest = torch.where(in_active, 0.0, a).sum(1)  # (N,) = A_U > 0 when at most one group is active
    # at most one active specialist: explicit, Q_m = A_m / lam_total and Q_U =
    # (A_U + b_m) / lam_total, i.e. log q_k = log a_k - log lam_total (+ log((A_U + b_m)/A_U) on U)
    lift = torch.log1p(b_sum / a_rest)  # (N,)
    log_q = a.log() - lam_total.log().unsqueeze(1) + torch.where(in_active, 0.0, lift.unsqueeze(1))
    multi = (n_act >= 2).nonzero().squeeze(1)  # (N_multi,) rows that need the 1-D solve
    if multi.numel() == 0:
        return log_q, 0
    sub, it = _solve_multi(
        a[multi], b[multi], g_mat, active[multi], in_active[multi], a_rest[multi], group_of, tol, max_iter
    )
    log_q[multi] = sub
    return log_q, it


def _take(rows: dict, keep) -> dict:
    return {k: v[keep] for k, v in rows.items()}


def _masses(rows: dict, lam, u=None):
    """Block masses q and 1 - q (N, M) at lam (N,); u (N,) = exact |lam - pole| for anchored rows."""
    lam2 = lam.unsqueeze(1)  # (N, 1)
    act, a_blk, b_blk = rows["active"], rows["a_blk"], rows["b_blk"]
    q = torch.where(act, root(lam2, a_blk, b_blk), 0.0)  # (N, M)
    r = root(-lam2, b_blk, a_blk)  # (N, M) = 1 - q without cancellation
    if u is not None:
        u2, neg2 = u.unsqueeze(1), rows["neg"].unsqueeze(1)
        # lam > 0: the dominant block's dustbin b*/(A* - lam)-like mass; lam < 0: the
        # minor blocks' A_m/(b_m + lam)-like masses, both from the exact distance u
        r_dom = _small_root(rows["b_s"].unsqueeze(1), u2, lam2.abs())  # (N, 1)
        q_min = _small_root(a_blk, (b_blk - rows["pole"].unsqueeze(1)) + u2, lam2.abs())  # (N, M)
        fix_dom = ~neg2 & rows["is_star"]
        fix_min = neg2 & rows["minor"]
        r = torch.where(fix_dom, r_dom, torch.where(fix_min, 1 - q_min, r))
        q = torch.where(fix_dom, 1 - r_dom, torch.where(fix_min, q_min, q))
    return q, r


def _slopes(rows, q, r):
    """-dQ/dlam for every active block, (N, M)."""
    den = rows["a_blk"] * r * r + rows["b_blk"] * q * q
    return torch.where(rows["active"], (q * r) ** 2 / den, 0.0)


def _newton_x(rows, x, tol, max_iter):
    """Newton on x = sign/lam from the left; returns final x (N,) and iterations used."""
    out = x.clone()
    work = torch.arange(x.shape[0], device=x.device)
    prev = torch.zeros_like(x)  # residual of the previous step
    it = 0
    for it in range(1, max_iter + 1):
        if work.numel() == 0:
            return out, it - 1
        sign, lin = rows["sign"], rows["lin"]
        lam = sign / x  # (n,)
        q, r = _masses(rows, lam)
        # sum of masses - 1, as (all but the largest) - (1 - largest), so that small
        # masses keep their relative precision when one block holds almost all
        top = q.argmax(1, keepdim=True)  # (n, 1)
        resid = q.scatter(1, top, 0.0).sum(1) + lin / lam - r.gather(1, top).squeeze(1)  # (n,)
        dq = _slopes(rows, q, r) * (sign * lam * lam).unsqueeze(1)  # (n, M) dQ/dx
        slope = dq.sum(1) + lin  # dQ_U/dx = A_U
        step = -resid / torch.where(slope == 0, 1.0, slope)
        # Concave (lam > 0) or convex (lam < 0) masses and no overshoot: no mass moves by
        # more than its linear prediction. Stop when that is <= tol times the mass.
        ok = (dq.abs() * step.abs().unsqueeze(1) <= tol * q).all(1) & ((lin == 0) | (step.abs() <= tol * x))
        # one-sided Newton never flips the residual's sign in exact arithmetic: a flip,
        # or a step below x's resolution, means rounding has taken over
        floor = (resid * prev < 0) | (x + step == x)
        x_new = torch.where(floor, x, x + step)
        # a root at x = inf (lam = 0 exactly) would make the step infinite: stay finite
        fine = torch.isfinite(x_new) & (x_new > 0)
        x_new = torch.where(fine, x_new, x)
        out[work] = x_new
        keep = ~(ok | floor | ~fine)
        work, x, prev, rows = work[keep], x_new[keep], resid[keep], _take(rows, keep)
    return out, it


def _newton_v(rows, v, tol, max_iter, v_lim):
    """Bracketed Newton on v, lam = sign * pole * sigmoid(-v); returns final v (N,), iterations."""
    out = v.clone()
    work = torch.arange(v.shape[0], device=v.device)
    lo = torch.full_like(v, -math.inf)  # psi(lo) < 0 < psi(hi)
    hi = torch.full_like(v, math.inf)
    fi = torch.finfo(v.dtype)
    it = 0
    for it in range(1, max_iter + 1):
        if work.numel() == 0:
            return out, it - 1
        sign, pole, lin, is_star = rows["sign"], rows["pole"], rows["lin"], rows["is_star"]
        sv = torch.sigmoid(v)
        lam = sign * pole * torch.sigmoid(-v)  # (n,)
        q, r = _masses(rows, lam, pole * sv)
        dq = _slopes(rows, q, r) * (lam * sv).unsqueeze(1)  # (n, M) dQ/dv, dlam/dv = -lam sigmoid(v)
        q_rest = lin / lam
        small = torch.where(is_star, 0.0, q).sum(1) + q_rest  # (n,) all but the dominant block
        r_s = torch.where(is_star, r, 0.0).sum(1)  # (n,) the dominant block's 1 - Q
        # psi = log(small) - log(1 - Q*), oriented to increase with v
        psi = sign * (small.log() - r_s.log())
        dpsi = sign * (
            (torch.where(is_star, 0.0, dq).sum(1) + q_rest * sv) / small
            + torch.where(is_star, dq, 0.0).sum(1) / r_s
        )
        good = torch.isfinite(dpsi) & (dpsi > 0)
        step = -psi / torch.where(good, dpsi, 1.0)
        # the step's predicted change of every log-mass, |dlog Q/dv| * |step|, must be <= tol
        sens = (dq.abs() / q.clamp_min(fi.tiny)).amax(1).clamp_min(1.0)
        ok = good & (step.abs() * sens <= tol)
        lo = torch.where(psi < 0, v, lo)
        hi = torch.where(psi > 0, v, hi)
        v_new = v + step.clamp(-8.0, 8.0)  # a flat stretch of psi must not fling v away
        bad = ~good | ~(v_new > lo) | ~(v_new < hi)
        mid = torch.where(torch.isinf(lo), hi - 8, torch.where(torch.isinf(hi), lo + 8, (lo + hi) / 2))
        # a converged row takes its last Newton step, never a bisection
        v_new = torch.where(bad & ~ok, mid, v_new).clamp(-v_lim, v_lim)
        ok = ok | (v_new == v)  # bracket or step below v's resolution
        out[work] = v_new
        keep = ~ok
        work, v, lo, hi, rows = work[keep], v_new[keep], lo[keep], hi[keep], _take(rows, keep)
    return out, it


def _solve_multi(a, b, g_mat, active, in_active, a_rest, group_of, tol, max_iter):
    """Rows with >= 2 active specialists: returns log q (N, C) and iterations.

    in_active (N, C): class lies in an active group; a_rest (N,) = A_U, 0 when the
    active groups cover every class; group_of (C,): each class's group, M for none.
    """
    n, c = a.shape
    m_count = g_mat.shape[1]
    fi = torch.finfo(a.dtype)
    act = active.to(a.dtype)  # (N, M)
    n_act = act.sum(1)  # (N,)
    # inactive groups get a dummy well-posed block (A = b = 1) and are masked out
    a_blk = torch.where(active, a @ g_mat, 1.0)  # (N, M)
    b_blk = torch.where(active, b, 1.0)  # (N, M)

    sat = torch.where(active, a_blk / (a_blk + b_blk), -1.0)  # (N, M) Q_m at lam = 0
    star = sat.argmax(1, keepdim=True)  # (N, 1) the block that can dominate
    is_star = torch.zeros_like(active).scatter(1, star, True) & active  # (N, M)
    minor = active & ~is_star  # (N, M)
    a_s, b_s = a_blk.gather(1, star).squeeze(1), b_blk.gather(1, star).squeeze(1)  # (N,)
    # lam <= 0 iff nothing lies outside the active groups and the masses at lam = 0 sum
    # to <= 1; compared as (minor masses) <= 1 - Q*(0) = b*/(A* + b*) so that rounding
    # a Q*(0) near 1 cannot flip the decision
    neg = (a_rest == 0) & (torch.where(minor, sat, 0.0).sum(1) <= b_s / (a_s + b_s))
    sign = torch.where(neg, -1.0, 1.0).to(a.dtype)  # (N,)

    # Poles (module docstring). lam > 0: the dominant block's, at lam = A*. lam <= 0: the
    # minor blocks' at -lam = b_m, the nearest being min b_m. A row is anchored when
    # the pole is sharp and the root lies beyond it (sum of masses < 1 at the pole).
    b_minor = torch.where(minor, b_blk, math.inf)  # (N, M)
    b_min, near = b_minor.min(1)  # (N,)
    b_min = b_min.clamp_max(fi.max)
    a_near = a_blk.gather(1, near.unsqueeze(1)).squeeze(1)
    pole = torch.where(neg, b_min, a_s)  # (N,) |lam| at the pole
    lam_p = (sign * pole).unsqueeze(1)  # (N, 1)
    q_p = torch.where(
        neg.unsqueeze(1), _small_root(a_blk, b_blk - pole.unsqueeze(1), pole.unsqueeze(1)), root(lam_p, a_blk, b_blk)
    )
    q_p = torch.where(minor, q_p, 0.0)  # (N, M) minor masses at the pole
    r_p = torch.where(neg, root(pole, b_s, a_s), _small_root(b_s, 0.0, a_s))  # (N,) 1 - Q* at the pole
    beyond = torch.where(neg, 1.0, -1.0) * (q_p.sum(1) + a_rest / pole - r_p) > 0
    sharp = torch.where(neg, a_near < 0.01 * b_min, b_s < 0.01 * a_s)
    anch = beyond & sharp  # (N,)
    lin = torch.where(neg, 0.0, a_rest)  # (N,) Q_U = A_U / lam
    rows = {
        "active": active, "a_blk": a_blk, "b_blk": b_blk, "is_star": is_star, "minor": minor,
        "b_s": b_s, "neg": neg, "sign": sign, "pole": pole, "lin": lin,
    }  # per-row data the Newton loops carry (and shrink as rows converge)

    # starting points. x: Newton's first step from x = 0, where Q_m ~ A_m x (lam > 0)
    # or 1 - Q_m ~ b_m x (lam < 0). v: where the idealised small masses balance the
    # dominant dustbin: A_other / lam = b* / (A* - lam), or A_near / (b_min + lam) = 1 - Q*.
    v_lim = math.log(1 / fi.tiny) - 2
    x0 = torch.where(neg, (n_act - 1) / (b_blk * act).sum(1), 1.0 / ((a_blk * act).sum(1) + lin))
    frac = (a_near / r_p / b_min).clamp(fi.tiny, 0.5)  # (b_min + lam) / b_min
    v0 = torch.where(neg, frac.log() - (1 - frac).log(), (b_s / ((a_blk * minor).sum(1) + a_rest)).log())
    v0 = v0.clamp(-v_lim, v_lim)

    ix, iv = (~anch).nonzero().squeeze(1), anch.nonzero().squeeze(1)
    x, it_x = _newton_x(_take(rows, ix), x0[ix], tol, max_iter)
    v, it_v = _newton_v(_take(rows, iv), v0[iv], tol, max_iter, v_lim)
    lam_x, lam_v = sign[ix] / x, sign[iv] * pole[iv] * torch.sigmoid(-v)
    lam = torch.empty_like(a_rest)
    lam[ix], lam[iv] = lam_x, lam_v
    q = torch.empty_like(a_blk)
    q[ix] = _masses(_take(rows, ix), lam_x)[0]
    q[iv] = _masses(_take(rows, iv), lam_v, pole[iv] * torch.sigmoid(v))[0]
    q_rest = lin / lam  # (N,)
    total = q.sum(1) + q_rest  # (N,) = 1 at the root; renormalise the rounding
    log_ratio = torch.cat(
        [
            torch.log(torch.where(active, q, 1.0)) - torch.log(a_blk),
            torch.where(a_rest > 0, -lam.abs().log(), 0.0).unsqueeze(1),  # log(Q_U / A_U)
        ],
        1,
    ) - torch.log(total).unsqueeze(1)  # (N, M + 1)
    blk = torch.where(in_active, group_of.expand(n, c), m_count)  # (N, C)
    return a.log() + log_ratio.gather(1, blk), max(it_x, it_v)
