"""Tests for distill/losses.py (kd, soft, logits): golden numbers, the T^2 gradient scale, the high-T limit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import kd_loss, logit_matching_loss, soft_kl, soft_loss
from distill.methods import make_method
from kdens.errors import ConfigError, ModelError


def make_loss(name: str, temperature=1.0, alpha=0.0):
    """The registry's loss for kd / soft / logits with kdens' --temperature and --alpha."""
    return make_method(name, {"temperature": temperature, "alpha": alpha}).loss

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "losses_golden.json").read_text())


def _golden_inputs(dtype: torch.dtype):
    zs = torch.tensor(GOLDEN["student_logits"], dtype=dtype)
    teachers = {
        "logits": torch.tensor(GOLDEN["teacher_logits"], dtype=dtype),
        "log_probs": torch.tensor(GOLDEN["teacher_log_probs"], dtype=dtype),
    }
    y = torch.tensor(GOLDEN["y"], dtype=torch.long)
    return zs, teachers, y


def _case_id(c: dict) -> str:
    return f"T{c['temperature']}-a{c['alpha']}-{c['teacher']}"


@pytest.mark.parametrize("case", GOLDEN["kd_cases"], ids=_case_id)
def test_kd_loss_golden_float64(case):
    zs, teachers, y = _golden_inputs(torch.float64)
    got = kd_loss(zs, teachers[case["teacher"]], y, case["temperature"], case["alpha"])
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(case["kd"], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("case", GOLDEN["kd_cases"][::5], ids=_case_id)
def test_kd_loss_golden_float32_and_make_loss(case):
    zs, teachers, y = _golden_inputs(torch.float32)
    fn = make_loss("kd", case["temperature"], case["alpha"])
    got = fn(zs, teachers[case["teacher"]], y)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(case["kd"], rel=1e-5, abs=1e-6)


def test_logit_matching_golden():
    zs, teachers, _ = _golden_inputs(torch.float64)
    assert logit_matching_loss(zs, teachers["logits"]).item() == pytest.approx(
        GOLDEN["logit_matching"], rel=1e-12
    )
    # log-probabilities differ from logits by a per-row constant: same loss
    assert logit_matching_loss(zs, teachers["log_probs"]).item() == pytest.approx(
        GOLDEN["logit_matching_log_probs"], rel=1e-12
    )
    assert GOLDEN["logit_matching"] == pytest.approx(GOLDEN["logit_matching_log_probs"], rel=1e-9)


def test_teacher_logits_and_log_probs_give_same_kd():
    zs, teachers, y = _golden_inputs(torch.float64)
    for T in (0.5, 3.0, 17.0):
        a = kd_loss(zs, teachers["logits"], y, T, 0.2)
        b = kd_loss(zs, teachers["log_probs"], y, T, 0.2)
        assert a.item() == pytest.approx(b.item(), rel=1e-10)


def _zero_meaned(rng: np.random.Generator, b: int, c: int, scale: float) -> torch.Tensor:
    z = rng.normal(0.0, scale, (b, c))
    return torch.tensor(z - z.mean(1, keepdims=True), dtype=torch.float64)


def _soft_grad_norm(zs: torch.Tensor, zt: torch.Tensor, T: float, scaled: bool) -> float:
    zs = zs.clone().requires_grad_(True)
    loss = kd_loss(zs, zt, None, T, 0.0) if scaled else soft_kl(zs, zt, T)
    (g,) = torch.autograd.grad(loss, zs)
    return g.norm().item()


def test_t_squared_keeps_soft_gradient_scale_constant():
    rng = np.random.default_rng(0)
    zs, zt = _zero_meaned(rng, 16, 10, 1.0), _zero_meaned(rng, 16, 10, 1.0)
    temps = (5.0, 10.0, 20.0, 40.0)
    scaled = np.array([_soft_grad_norm(zs, zt, T, True) for T in temps])
    unscaled = np.array([_soft_grad_norm(zs, zt, T, False) for T in temps])
    # with T^2: roughly constant (the limit is ||zs - zt|| / (C * B))
    assert scaled.max() / scaled.min() < 1.05
    limit = ((zs - zt).norm() / (10 * 16)).item()
    assert scaled[-1] == pytest.approx(limit, rel=0.01)
    # without T^2: each doubling of T divides the gradient by about 4
    ratios = unscaled[:-1] / unscaled[1:]
    assert np.all(np.abs(ratios - 4.0) < 0.2), ratios


def test_high_temperature_limit_is_logit_matching():
    rng = np.random.default_rng(1)
    zs, zt = _zero_meaned(rng, 8, 6, 1.5), _zero_meaned(rng, 8, 6, 1.5)
    target = logit_matching_loss(zs, zt).item()
    # the limit holds for non-zero-meaned inputs too: softmax and logit matching both
    # ignore per-row constants
    shifted = zt + torch.arange(8, dtype=torch.float64)[:, None] * 3.0
    temps = np.array([10.0, 100.0, 1000.0, 10000.0])
    got = np.array([kd_loss(zs, shifted, None, T, 0.0).item() for T in temps])
    errs = np.abs(got - target) / target
    assert errs[-1] < 1e-4
    # the next term of the expansion is O(1/T): the relative error falls tenfold per decade
    assert np.all(np.abs(np.log10(errs[:-1] / errs[1:]) - 1.0) < 0.1), errs
    # and not trivially: at T = 1 the two losses differ
    assert abs(kd_loss(zs, zt, None, 1.0, 0.0).item() - target) / target > 0.05


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_loss_minimal_at_teacher_logits(T):
    rng = np.random.default_rng(2)
    zt = torch.tensor(rng.normal(0, 3, (5, 8)), dtype=torch.float32)
    zs = zt.clone().requires_grad_(True)
    loss = kd_loss(zs, zt, None, T, 0.0)
    (g,) = torch.autograd.grad(loss, zs)
    assert loss.item() == 0.0
    assert g.abs().max().item() < 1e-7
    # adding a per-row constant changes nothing (softmax invariance)
    same = kd_loss(zt + 5.0, zt, None, T, 0.0)
    assert same.item() == pytest.approx(0.0, abs=1e-5)
    # any non-constant perturbation increases it
    for k in range(20):
        d = torch.tensor(rng.normal(0, 0.1, (5, 8)), dtype=torch.float32)
        assert kd_loss(zt + d, zt, None, T, 0.0).item() > 1e-6


def test_alpha_one_is_cross_entropy():
    rng = np.random.default_rng(3)
    zs = rng.normal(0, 2, (9, 4))
    y = rng.integers(0, 4, 9)
    zt = torch.tensor(rng.normal(0, 2, (9, 4)))
    # independent reference: -log softmax at the label, averaged
    m = zs.max(1, keepdims=True)
    ref = float(-(zs - m - np.log(np.exp(zs - m).sum(1, keepdims=True)))[np.arange(9), y].mean())
    for T in (1.0, 7.0):
        got = kd_loss(torch.tensor(zs), zt, torch.tensor(y), T, 1.0).item()
        assert got == pytest.approx(ref, rel=1e-12)
    got = make_loss("logits", 3.0, 1.0)(torch.tensor(zs), zt, torch.tensor(y)).item()
    assert got == pytest.approx(ref)


def test_alpha_mixes_linearly():
    rng = np.random.default_rng(4)
    zs = torch.tensor(rng.normal(0, 2, (7, 5)))
    zt = torch.tensor(rng.normal(0, 2, (7, 5)))
    y = torch.tensor(rng.integers(0, 5, 7))
    hard = kd_loss(zs, zt, y, 3.0, 1.0)
    soft = kd_loss(zs, zt, y, 3.0, 0.0)
    mixed = kd_loss(zs, zt, y, 3.0, 0.25).item()
    assert mixed == pytest.approx(0.25 * hard.item() + 0.75 * soft.item())
    assert soft_loss(zs, zt, y, 3.0).item() == pytest.approx(soft.item())
    lm = make_loss("logits", 1.0, 0.4)(zs, zt, y).item()
    assert lm == pytest.approx(0.4 * hard.item() + 0.6 * logit_matching_loss(zs, zt).item())


def test_zero_probability_teacher_classes_are_finite():
    zs = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], requires_grad=True)
    log_p = torch.tensor([[0.0, float("-inf"), float("-inf")], [-0.5, -1.0, float("-inf")]])
    loss = kd_loss(zs, log_p, None, 2.0, 0.0)
    (g,) = torch.autograd.grad(loss, zs)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    # row 0: KL(onehot(0) || q) = -log q_0 at T = 2, times T^2
    q0 = F.log_softmax(zs.detach()[0] / 2.0, dim=0)[0]
    p1 = F.softmax(log_p[1, :2] / 2.0, dim=0)
    q1 = F.log_softmax(zs.detach()[1] / 2.0, dim=0)[:2]
    ref = 4.0 * (-q0 + (p1 * (p1.log() - q1)).sum()) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_half_precision_inputs_are_upcast():
    rng = np.random.default_rng(5)
    zs = torch.tensor(rng.normal(0, 1, (4, 6)), dtype=torch.float32)
    zt = torch.tensor(rng.normal(0, 1, (4, 6)), dtype=torch.float32)
    ref = kd_loss(zs, zt, None, 8.0, 0.0)
    got = kd_loss(zs.bfloat16(), zt.bfloat16(), None, 8.0, 0.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=0.05)


def test_registry_and_factory():
    from distill.methods import LOSS_ALIASES, METHODS

    assert set(LOSS_ALIASES) == {"kd", "soft", "logits"} and set(LOSS_ALIASES) <= set(METHODS)
    with pytest.raises(ConfigError, match="valid methods: kd, soft, logits, fitnets"):
        make_loss("mse", 2.0, 0.0)
    zs = torch.zeros(2, 3)
    zt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    got = make_loss("soft", 2.0)(zs, zt, None).item()
    assert got == pytest.approx(kd_loss(zs, zt, None, 2.0, 0.0).item())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "hot"])
def test_bad_temperature(bad):
    with pytest.raises(ConfigError, match="temperature=.* must be a number > 0"):
        make_loss("kd", bad, 0.5)
    with pytest.raises(ConfigError, match="--temperature"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), None, bad, 0.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "x"])
def test_bad_alpha(bad):
    with pytest.raises(ConfigError, match="alpha=.* must be a number >= 0 and <= 1"):
        make_loss("kd", 2.0, bad)


def test_missing_labels_need_alpha_zero():
    with pytest.raises(ConfigError, match="--alpha 0.5"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, 2.0, 0.5)
    with pytest.raises(ConfigError, match="--alpha"):
        make_loss("logits", 2.0, 0.5)(torch.zeros(2, 3), torch.zeros(2, 3), None)
    with pytest.raises(ConfigError, match="--alpha must be 0"):
        make_loss("soft", 2.0, 0.3)


def test_shape_mismatch():
    with pytest.raises(ModelError, match="differ in shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), None, 2.0, 0.0)
    with pytest.raises(ModelError, match="labels"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), 2.0, 0.5)
    with pytest.raises(ModelError):
        logit_matching_loss(torch.zeros(2, 3), torch.zeros(3, 3))
