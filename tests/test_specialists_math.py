"""Specialists' pure cores: the §5 combination, dustbin correction, breakdown (clustering: test_specialists_cluster.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from kdens.errors import ConfigError
from specialists.combine import (
    active_specialists,
    combine,
    dustbin_correction,
    kkt_residual,
    objective,
    oversampling_factor,
)
from specialists.evaluate import breakdown

GROUPS = [[0, 2, 4, 6], [5, 7, 9], [1, 3, 8]]  # Fashion-MNIST's tops, footwear, the rest


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small tensor ops: on a busy 2-core box, 2 intra-op threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- the combination


def _problem(n=40, c=10, groups=GROUPS, seed=0, scale=2.0, p_active=0.6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    p_g = torch.softmax(torch.randn(n, c, generator=g, dtype=dtype) * scale, 1)
    specs = [torch.softmax(torch.randn(n, len(s) + 1, generator=g, dtype=dtype) * scale, 1) for s in groups]
    active = torch.rand(n, len(groups), generator=g) < p_active
    return p_g, specs, active


def _scipy_solve(p_g, specs, groups, active):
    """Minimise the §5 objective for one example over softmax logits with L-BFGS."""
    c = len(p_g)
    act = [m for m in range(len(groups)) if active[m]]

    def fun(theta):
        log_q = theta - np.logaddexp.reduce(theta)
        q = np.exp(log_q)
        val = float(np.sum(p_g * (np.log(p_g) - log_q)))
        grad_q = -p_g / q
        for m in act:
            s, p_m = groups[m], specs[m]
            out = np.setdiff1d(np.arange(c), s)
            r = q[out].sum()
            val += float(np.sum(p_m[:-1] * (np.log(p_m[:-1]) - log_q[s])) + p_m[-1] * (np.log(p_m[-1]) - np.log(r)))
            grad_q[s] -= p_m[:-1] / q[s]
            grad_q[out] -= p_m[-1] / r
        return val, q * (grad_q - q @ grad_q)  # chain rule through the softmax

    res = minimize(fun, np.log(p_g), jac=True, method="L-BFGS-B", options=dict(ftol=1e-15, gtol=1e-13, maxiter=5000))
    return res.x - np.logaddexp.reduce(res.x), res.fun


@pytest.mark.parametrize(("seed", "solver"), [(0, "block"), (1, "block"), (2, "block"), (3, "em")])
def test_combination_matches_scipy(seed, solver):
    p_g, specs, active = _problem(n=10, seed=seed)
    log_q, _ = combine(p_g, specs, GROUPS, active, solver=solver, tol=1e-10)
    ours = objective(log_q, p_g, specs, GROUPS, active)
    for i in range(len(p_g)):
        ref_log_q, ref_obj = _scipy_solve(p_g[i].numpy(), [s[i].numpy() for s in specs], GROUPS, active[i].numpy())
        assert ours[i].item() <= ref_obj + 1e-10
        assert ours[i].item() == pytest.approx(ref_obj, abs=1e-9)
        np.testing.assert_allclose(log_q[i].exp().numpy(), np.exp(ref_log_q), atol=1e-5)


def test_solution_beats_perturbed_points():
    p_g, specs, active = _problem(n=30, seed=4)
    log_q, _ = combine(p_g, specs, GROUPS, active)
    best = objective(log_q, p_g, specs, GROUPS, active)
    g = torch.Generator().manual_seed(4)
    for eps in (1e-4, 1e-2, 0.3):
        other = torch.log_softmax(log_q + eps * torch.randn(log_q.shape, generator=g, dtype=log_q.dtype), 1)
        assert (objective(other, p_g, specs, GROUPS, active) >= best - 1e-12).all()


@pytest.mark.parametrize("scale", [2.0, 30.0])
@pytest.mark.parametrize("p_active", [0.5, 1.0])
def test_stationarity_holds_to_relative_precision(scale, p_active):
    """dF/dq_k = 1 + #active for every k, including classes with q_k ~ 1e-30.

    Scale 30 gives confident, conflicting generalists and specialists: the cases where
    a plain Newton iteration crawls towards a pole and loses tiny probabilities.
    """
    p_g, specs, active = _problem(n=1500, seed=5, scale=scale, p_active=p_active)
    log_q, n_iter = combine(p_g, specs, GROUPS, active)
    assert n_iter < 50
    q = log_q.exp()
    a = p_g.clone()
    lam = 1 + active.sum(1, keepdim=True).double()
    grad = torch.zeros_like(q)
    for m, (s, p_m) in enumerate(zip(GROUPS, specs)):
        on = active[:, m : m + 1]
        out = [k for k in range(10) if k not in s]
        a[:, s] += torch.where(on, p_m[:, :-1], 0.0)
        grad[:, out] += torch.where(on, p_m[:, -1:] / q[:, out].sum(1, keepdim=True), 0.0)
    grad += a / q
    rel = (grad / lam - 1).abs()  # (N, C)
    assert rel.max() < 1e-8
    assert kkt_residual(log_q, p_g, specs, GROUPS, active).max() < 1e-10


def test_no_active_specialist_returns_generalist_exactly():
    p_g, specs, _ = _problem(seed=6)
    none = torch.zeros(len(p_g), 3, dtype=torch.bool)
    for solver in ("block", "em"):
        log_q, _ = combine(p_g, specs, GROUPS, none, solver=solver)
        assert torch.equal(log_q, p_g.log())


def test_agreeing_specialist_returns_generalist():
    p_g, _, _ = _problem(seed=7)
    specs = [torch.cat([p_g[:, s], 1 - p_g[:, s].sum(1, keepdim=True)], 1) for s in GROUPS]
    for act in (torch.tensor([True, False, False]), torch.tensor([True, True, True])):
        active = act.expand(len(p_g), 3)
        log_q, _ = combine(p_g, specs, GROUPS, active)
        torch.testing.assert_close(log_q.exp(), p_g, rtol=0, atol=1e-12)


def test_one_active_specialist_closed_form():
    """With one active group S the optimum is q_S = (p_g + p_m)_S / 2 and q_U ∝ p_g on U."""
    p_g, specs, _ = _problem(seed=8)
    active = torch.tensor([False, True, False]).expand(len(p_g), 3)
    log_q, _ = combine(p_g, specs, GROUPS, active)
    s, rest = GROUPS[1], [0, 1, 2, 3, 4, 6, 8]
    q = log_q.exp()
    torch.testing.assert_close(q[:, s], (p_g[:, s] + specs[1][:, :-1]) / 2, rtol=0, atol=1e-14)
    mass_u = (p_g[:, rest].sum(1, keepdim=True) + specs[1][:, -1:]) / 2
    torch.testing.assert_close(q[:, rest], mass_u * p_g[:, rest] / p_g[:, rest].sum(1, keepdim=True))


def test_float32_agrees_with_float64_and_stays_float32():
    p_g, specs, active = _problem(n=500, seed=9, scale=4.0)
    log_q64, _ = combine(p_g, specs, GROUPS, active)
    log_q32, _ = combine(p_g.float(), [s.float() for s in specs], GROUPS, active)
    assert log_q32.dtype == torch.float32
    torch.testing.assert_close(log_q32.double().exp(), log_q64.exp(), rtol=0, atol=1e-5)


def test_active_groups_covering_every_class():
    """All groups active and covering all classes: the multiplier can be negative."""
    groups = [[0, 1], [2, 3, 4], [5]]
    p_g, specs, _ = _problem(n=300, c=6, groups=groups, seed=10, scale=6.0)
    active = torch.ones(300, 3, dtype=torch.bool)
    log_q, _ = combine(p_g, specs, groups, active)
    ref, _ = combine(p_g, specs, groups, active, solver="em", tol=1e-14, max_iter=200_000)
    torch.testing.assert_close(log_q.exp(), ref.exp(), rtol=0, atol=1e-9)
    assert kkt_residual(log_q, p_g, specs, groups, active).max() < 1e-12


def test_overlapping_groups_use_em():
    groups = [[0, 1, 2], [2, 3]]
    p_g, specs, active = _problem(n=50, c=6, groups=groups, seed=11)
    log_q, _ = combine(p_g, specs, groups, active, tol=1e-12)
    assert kkt_residual(log_q, p_g, specs, groups, active).max() < 1e-10
    with pytest.raises(ConfigError, match="disjoint"):
        combine(p_g, specs, groups, active, solver="block")


def test_em_is_monotone():
    p_g, specs, active = _problem(n=50, seed=12, scale=4.0)
    prev = None
    for it in (1, 2, 4, 8, 16, 32):
        log_q, _ = combine(p_g, specs, GROUPS, active, solver="em", tol=1e-300, max_iter=it)
        obj = objective(log_q, p_g, specs, GROUPS, active)
        if prev is not None:
            assert (obj <= prev + 1e-14).all()
        prev = obj


def test_combine_validates_inputs():
    p_g, specs, active = _problem(seed=13)
    with pytest.raises(ConfigError, match="dustbin"):
        combine(p_g, [specs[0][:, :-1], *specs[1:]], GROUPS, active)
    with pytest.raises(ConfigError, match="fewer than all"):
        combine(p_g, specs, [list(range(10)), *GROUPS[1:]], active)
    with pytest.raises(ConfigError, match="float32 or float64"):
        combine(p_g.half(), specs, GROUPS, active)
    with pytest.raises(ConfigError, match="auto, block, em"):
        combine(p_g, specs, GROUPS, active, solver="lbfgs")
    with pytest.raises(ConfigError, match=r"\(N, M\)"):
        combine(p_g, specs, GROUPS, active[:, :2])


def test_active_specialists_matches_a_loop():
    p_g, _, _ = _problem(n=200, seed=14)
    for top_n in (1, 2, 3):
        got = active_specialists(p_g, GROUPS, top_n)
        top = p_g.topk(top_n, 1).indices.tolist()
        want = [[any(k in g for k in row) for g in GROUPS] for row in top]
        assert got.tolist() == want
    assert (active_specialists(p_g, GROUPS, 1).sum(1) == 1).all()  # groups cover every class
    with pytest.raises(ConfigError, match="top_n"):
        active_specialists(p_g, GROUPS, 0)


# ---------------------------------------------------------------- dustbin correction


def test_oversampling_factor_is_an_odds_ratio():
    assert oversampling_factor(0.8, 0.5) == pytest.approx(4.0)
    assert oversampling_factor(0.5, 0.5) == pytest.approx(1.0)
    assert oversampling_factor(0.9, 0.75) == pytest.approx(9 / 3)
    with pytest.raises(ConfigError, match="frac_rest_true"):
        oversampling_factor(1.0)


def test_dustbin_correction_recovers_true_posteriors():
    """Gaussian classes on a line; the specialist for {0, 1} is Bayes-optimal on its
    half-group / half-rest training mix. After the correction its probabilities are the
    true posteriors folded onto {0, 1, dustbin}; before it, and with the naive ratio of
    fractions, they are not."""
    means, sd = torch.tensor([-2.0, -1.0, 0.5, 2.0], dtype=torch.float64), 1.0
    prior = torch.tensor([0.15, 0.05, 0.5, 0.3], dtype=torch.float64)  # the rest is 80%
    group, rest = [0, 1], [2, 3]
    f, t = 0.8, 0.5
    train_prior = torch.cat([prior[group] / (1 - f) * (1 - t), prior[rest] / f * t])
    x = torch.linspace(-5, 5, 201, dtype=torch.float64).unsqueeze(1)
    log_lik = -0.5 * ((x - means) / sd) ** 2  # (N, 4), shared constants dropped

    def folded(log_joint):  # (N, 4) -> (N, 3) logits over group classes + dustbin
        return torch.cat([log_joint[:, group], torch.logsumexp(log_joint[:, rest], 1, keepdim=True)], 1)

    spec_logits = folded(log_lik + train_prior.log())  # Bayes-optimal on the training mix
    truth = torch.log_softmax(folded(log_lik + prior.log()), 1)
    fixed = torch.log_softmax(dustbin_correction(spec_logits, oversampling_factor(f, t)), 1)
    torch.testing.assert_close(fixed, truth, rtol=0, atol=1e-12)
    assert (torch.log_softmax(spec_logits, 1) - truth).abs().max() > 0.5
    naive = torch.log_softmax(dustbin_correction(spec_logits, f / t), 1)
    assert (naive - truth).abs().max() > 0.5

    # and calibration on samples from the true mix: the mean dustbin probability
    # matches the fraction of rest examples only after the correction
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(prior, 20000, replacement=True, generator=g)
    xs = (means[y] + sd * torch.randn(20000, generator=g, dtype=torch.float64)).unsqueeze(1)
    logits = folded(-0.5 * ((xs - means) / sd) ** 2 + train_prior.log())
    frac_rest = (y >= 2).double().mean()
    corrected = torch.softmax(dustbin_correction(logits, oversampling_factor(f, t)), 1)[:, -1].mean()
    assert abs(corrected - frac_rest) < 0.01
    assert abs(torch.softmax(logits, 1)[:, -1].mean() - frac_rest) > 0.05
    assert torch.equal(logits, folded(-0.5 * ((xs - means) / sd) ** 2 + train_prior.log()))  # input untouched


# ---------------------------------------------------------------- breakdown


def test_breakdown_counts():
    groups = [[0, 1], [2, 3]]
    y = np.array([0, 1, 2, 3, 4, 0])
    active = np.array([[1, 0], [1, 1], [0, 0], [0, 1], [1, 0], [0, 1]], dtype=bool)
    gen = np.eye(5)[[1, 1, 2, 0, 4, 0]]  # right on examples 1, 2, 4, 5
    comb = np.eye(5)[[0, 1, 2, 3, 4, 2]]  # right on 0, 1, 2, 3, 4
    out = breakdown(gen, comb, y, groups, active)
    assert out["overall"] == dict(
        count=6, generalist_correct=4, combined_correct=5, delta_correct=1,
        generalist_accuracy=4 / 6, combined_accuracy=5 / 6, relative_improvement=0.25,
    )
    assert out["any_active"]["count"] == 5
    # covering the true class: ex0 (group 0 active, y=0) 1; ex1 (both active, y=1) 1;
    # ex2 0; ex3 (group 1 active, y=3) 1; ex4 (y=4 in no group) 0; ex5 (group 1, y=0) 0
    by = {d["n_covering"]: d for d in out["by_covering"]}
    assert sorted(by) == [0, 1]
    assert (by[0]["count"], by[0]["generalist_correct"], by[0]["combined_correct"]) == (3, 3, 2)
    assert (by[1]["count"], by[1]["generalist_correct"], by[1]["combined_correct"]) == (3, 1, 3)
    assert by[1]["relative_improvement"] == 2.0
    assert sum(d["count"] for d in out["by_covering"]) == 6
    g0, g1 = out["per_group"]
    assert (g0["group"], g0["count"], g0["generalist_correct"], g0["combined_correct"]) == ([0, 1], 3, 2, 2)
    assert (g1["group"], g1["count"], g1["generalist_correct"], g1["combined_correct"]) == ([2, 3], 2, 1, 2)


def test_breakdown_on_a_real_combination_is_consistent():
    p_g, specs, _ = _problem(n=400, seed=15)
    active = active_specialists(p_g, GROUPS, 2)
    log_q, _ = combine(p_g, specs, GROUPS, active)
    y = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(15))
    out = breakdown(p_g.log(), log_q, y, GROUPS, active)
    assert sum(d["count"] for d in out["by_covering"]) == 400
    assert sum(d["combined_correct"] for d in out["by_covering"]) == out["overall"]["combined_correct"]
    assert sum(d["count"] for d in out["per_group"]) == 400  # the groups partition the classes
    assert out["overall"]["combined_correct"] == int((log_q.argmax(1) == y).sum())
