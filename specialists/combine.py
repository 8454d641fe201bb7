"""Combining a generalist with its active specialists (Hinton, Vinyals & Dean 2015, §5.4).

For one example, let p_g be the generalist's distribution over the C classes and, for
each active specialist m with class group S_m, p_m its distribution over S_m plus one
dustbin class for everything else. The paper's combined distribution q solves

    min_q  KL(p_g || q) + sum_{m active} KL(p_m || q_m)     over the simplex,

where q_m folds q onto S_m plus a dustbin: q_m = (q_k for k in S_m, sum_{j not in S_m} q_j).
Dropping constants this is the concave maximisation

    max_q  F(q) = sum_k a_k log q_k + sum_m b_m log R_m(q),   R_m(q) = sum_{j not in S_m} q_j,

with a_k = p_g,k + sum_{m active, k in S_m} p_m,k and b_m = p_m,dustbin. Stationarity on
the simplex reads dF/dq_k = a_k/q_k + sum_{m: k not in S_m} b_m/R_m = lam for all k;
multiplying by q_k and summing gives lam = sum a + sum b = 1 + #active.

The paper minimised this by gradient descent on logits. Here (see
:mod:`specialists.solver`) it is solved exactly: by the EM fixed point
q_k <- (a_k + q_k sum_{m: k not in S_m} b_m / R_m) / (1 + #active) (monotone in F, any
groups), or, for disjoint groups, by reducing it to one scalar equation per example
(closed form with one active specialist) solved by a globally convergent Newton
iteration. Default tolerance: no q_k may move by more than tol = 1e-6 at the last
iteration; the block solver also keeps small q_k to relative precision tol. Probabilities
are floored at the dtype's smallest normal number so an underflowed softmax cannot
create log 0. Everything is batched over examples (loops only over the M specialists),
runs on the inputs' device, and in their dtype (float32 or float64).
"""

from __future__ import annotations

import math

import torch

from kdens.errors import ConfigError
from specialists.solver import solve_block, solve_em

SOLVERS = ("auto", "block", "em")


def _prepare(p_g, spec_probs, groups, active):
    """Validate inputs; return a (N, C), b (N, M), membership G (C, M) and active (N, M) bool."""
    if not isinstance(p_g, torch.Tensor) or p_g.ndim != 2:
        raise ConfigError("p_g must be a (N, C) tensor of the generalist's probabilities")
    if p_g.dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"p_g has dtype {p_g.dtype}; cast the probabilities to float32 or float64")
    n, c = p_g.shape
    m_count = len(groups)
    if len(spec_probs) != m_count:
        raise ConfigError(f"{len(spec_probs)} specialist outputs for {m_count} groups; pass one per group")
    active = torch.as_tensor(active, device=p_g.device)
    if active.shape != (n, m_count):
        raise ConfigError(f"active has shape {tuple(active.shape)}, expected (N, M) = ({n}, {m_count})")
    active = active.bool()
    dt, dev = p_g.dtype, p_g.device
    tiny = torch.finfo(dt).tiny
    g_mat = torch.zeros(c, m_count, dtype=dt, device=dev)  # (C, M) membership
    a = p_g.clamp_min(tiny)  # (N, C)
    b = torch.zeros(n, m_count, dtype=dt, device=dev)  # (N, M) dustbin probs of active specialists
    for m, (g, p_m) in enumerate(zip(groups, spec_probs)):
        g = [int(k) for k in g]
        if not g or len(set(g)) != len(g) or min(g) < 0 or max(g) >= c or len(g) >= c:
            raise ConfigError(
                f"group {m} = {g} must be distinct class ids in [0, {c - 1}] and fewer than all {c} classes"
            )
        if tuple(p_m.shape) != (n, len(g) + 1):
            raise ConfigError(
                f"specialist {m} output has shape {tuple(p_m.shape)}, expected (N, |S_m| + 1) = "
                f"({n}, {len(g) + 1}): one column per class of group {g}, in that order, then the dustbin"
            )
        p_m = p_m.to(device=dev, dtype=dt)
        g_mat[g, m] = 1.0
        on = active[:, m : m + 1]  # (N, 1); where(), not a product, so inactive rows may hold NaN
        a.index_add_(1, torch.tensor(g, device=dev), torch.where(on, p_m[:, :-1], 0.0))
        b[:, m] = torch.where(on[:, 0], p_m[:, -1].clamp_min(tiny), 0.0)
    return a, b, g_mat, active


def combine(
    p_g: torch.Tensor,
    spec_probs: list[torch.Tensor],
    groups: list[list[int]],
    active: torch.Tensor,
    tol: float = 1e-6,
    max_iter: int | None = None,
    solver: str = "auto",
) -> tuple[torch.Tensor, int]:
    """The paper's combined distribution q = argmin KL(p_g||q) + sum_active KL(p_m||q_m).

    Args:
        p_g: generalist probabilities, shape (N, C), float32 or float64; q is computed
            in that dtype on that device.
        spec_probs: one tensor per group, shape (N, |S_m| + 1): column j is class
            ``groups[m][j]``, the last column the dustbin. Rows where the specialist
            is inactive are ignored.
        groups: the specialists' class groups.
        active: (N, M) bool, which specialists take part for each example.
        tol: stop when no q_k changes by more than this in an iteration (default
            1e-6); the block solver also requires small q_k to change by less than
            tol * q_k.
        max_iter: iteration cap; default 100 for ``"block"``, 10,000 for ``"em"``.
        solver: ``"block"`` (disjoint groups), ``"em"`` (any groups) or ``"auto"``
            (``"block"`` when the groups are disjoint).

    Returns:
        (log q of shape (N, C), the number of iterations the slowest example took).
        Rows with no active specialist are ``log p_g`` exactly.

    Raises:
        ConfigError: mismatched shapes, bad groups, unknown solver, bad tol.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ConfigError(f"tol must be > 0, got {tol!r}")
    a, b, g_mat, active = _prepare(p_g, spec_probs, groups, active)
    disjoint = bool((g_mat.sum(1) <= 1).all())
    if solver == "auto":
        solver = "block" if disjoint else "em"
    if solver == "block" and not disjoint:
        raise ConfigError("solver='block' needs disjoint groups; use solver='em' for overlapping ones")
    if max_iter is None:
        max_iter = 100 if solver == "block" else 10_000
    if p_g.shape[0] == 0:
        return p_g.log(), 0
    if solver == "block":
        return solve_block(a, b, g_mat, active, tol, max_iter)  # log p_g on rows without specialists
    log_q, it = solve_em(a, b, g_mat, tol, max_iter)
    none = ~active.any(1, keepdim=True)  # (N, 1)
    return torch.where(none, p_g.clamp_min(torch.finfo(p_g.dtype).tiny).log(), log_q), it


def active_specialists(p_g: torch.Tensor, groups: list[list[int]], top_n: int = 1) -> torch.Tensor:
    """Which specialists take part: those whose group meets the generalist's top-n classes.

    Args:
        p_g: generalist probabilities or logits, shape (N, C).
        groups: the specialists' class groups.
        top_n: how many of the generalist's most probable classes to look at.

    Returns:
        (N, M) bool.
    """
    n, c = p_g.shape
    if not (isinstance(top_n, int) and 1 <= top_n <= c):
        raise ConfigError(f"top_n must be an integer in [1, {c}], got {top_n!r}")
    top = torch.zeros(n, c, dtype=torch.bool, device=p_g.device)
    top.scatter_(1, p_g.topk(top_n, dim=1).indices, True)  # (N, C)
    member = torch.zeros(c, len(groups), dtype=torch.bool, device=p_g.device)
    for m, g in enumerate(groups):
        member[list(g), m] = True
    return (top.to(torch.float32) @ member.to(torch.float32)) > 0  # (N, M)


def _fold_log(log_q, g, outside):
    """log q_m: q's log-probs on S_m then log of the mass outside S_m, shape (N, |S_m| + 1)."""
    return torch.cat([log_q[:, g], torch.logsumexp(log_q[:, outside], 1, keepdim=True)], 1)


def _kl(p, log_q):
    return torch.where(p > 0, p * (p.clamp_min(torch.finfo(p.dtype).tiny).log() - log_q), 0.0).sum(1)


def objective(
    log_q: torch.Tensor,
    p_g: torch.Tensor,
    spec_probs: list[torch.Tensor],
    groups: list[list[int]],
    active: torch.Tensor,
) -> torch.Tensor:
    """The minimised objective KL(p_g || q) + sum_{m active} KL(p_m || q_m), shape (N,).

    Arguments as for :func:`combine`, plus ``log_q`` (N, C), the point to evaluate.
    """
    c = p_g.shape[1]
    total = _kl(p_g, log_q)  # (N,)
    for m, (g, p_m) in enumerate(zip(groups, spec_probs)):
        outside = [k for k in range(c) if k not in set(g)]
        kl = _kl(p_m.to(log_q.dtype), _fold_log(log_q, list(g), outside))
        total = total + torch.where(active[:, m], kl, 0.0)
    return total


def kkt_residual(
    log_q: torch.Tensor,
    p_g: torch.Tensor,
    spec_probs: list[torch.Tensor],
    groups: list[list[int]],
    active: torch.Tensor,
) -> torch.Tensor:
    """Stationarity residual max_k q_k |dF/dq_k - lam| / lam per example, shape (N,).

    lam = 1 + #active is the optimum's multiplier (see the module docstring); the
    residual equals max_k |EM(q)_k - q_k| and is zero exactly at the optimum (for
    q > 0, which the floor on p_g guarantees). Arguments as for :func:`objective`.
    """
    a, b, g_mat, active = _prepare(p_g, spec_probs, groups, active)
    q = log_q.exp()  # (N, C)
    outside = 1.0 - g_mat  # (C, M)
    lam = (a.sum(1) + b.sum(1)).unsqueeze(1)  # (N, 1)
    share = (b / (q @ outside)) @ outside.T  # (N, C)
    return ((a + q * share) / lam - q).abs().amax(1)


def oversampling_factor(frac_rest_true: float, frac_rest_train: float = 0.5) -> float:
    """Odds ratio by which a specialist's training batches under-represent its dustbin.

    ``(f / (1 - f)) / (t / (1 - t))`` with f the true fraction of examples outside the
    group and t their fraction in the training batches (0.5 for half-group batches).
    See :func:`dustbin_correction` for why it is the odds, not the fractions.
    """
    for name, v in (("frac_rest_true", frac_rest_true), ("frac_rest_train", frac_rest_train)):
        if not (isinstance(v, (int, float)) and 0 < v < 1):
            raise ConfigError(f"{name} must lie strictly between 0 and 1, got {v!r}")
    return (frac_rest_true / (1 - frac_rest_true)) / (frac_rest_train / (1 - frac_rest_train))


def dustbin_correction(logits_spec: torch.Tensor, oversampling_factor: float) -> torch.Tensor:
    """Raise the dustbin logit (last column) by log(oversampling_factor).

    Paper §5.2: a specialist's training data is enriched in examples of its group (half
    its batches); afterwards the bias is undone by adding to the dustbin logit the log
    of the factor by which the group was oversampled.

    Derivation (prior shift): training and true data share p(x | class) when in-group
    examples are drawn uniformly from the group and the rest uniformly from the
    others; only the priors differ. Bayes gives p(y|x) ∝ p_train(y|x) pi(y)/pi_train(y).
    Every in-group class has pi/pi_train = (1 - f)/(1 - t) and the dustbin has f/t
    (f, t: true and training fractions of the rest). Softmax ignores a common shift
    of all logits, so dividing out (1 - f)/(1 - t) leaves the in-group logits alone
    and adds log[(f/(1 - f)) / (t/(1 - t))] to the dustbin's — the odds ratio from
    :func:`oversampling_factor`. Example: the rest is 80% of the data but 50% of the
    batches: factor 4/1 = 4, not 0.8/0.5.

    Args:
        logits_spec: specialist logits, shape (N, |S_m| + 1), dustbin last.
        oversampling_factor: the odds ratio, > 0.

    Returns:
        Corrected logits, same shape; the input is not modified.
    """
    if not (isinstance(oversampling_factor, (int, float)) and oversampling_factor > 0):
        raise ConfigError(f"oversampling_factor must be > 0, got {oversampling_factor!r}")
    out = logits_spec.clone()
    out[..., -1] += math.log(oversampling_factor)
    return out
