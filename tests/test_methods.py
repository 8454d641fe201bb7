"""Tests for distill/methods: golden values from an independent numpy implementation
(tests/fixtures/make_methods_golden.py), float64 gradient checks, the T^2 scaling, schedules,
argument checking and the registry's errors."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.losses import kd_loss, soft_kl
from distill.methods import METHODS, FeatureBatch, make_method, method_class
from distill.methods.dist import dist_loss, dist_terms
from distill.methods.dkd import dkd_loss, dkd_terms
from distill.methods.features import fsp_matrix
from distill.methods.fitnets import hint_loss
from distill.methods.fsp import fsp_loss
from distill.methods.lskd import lskd_loss
from distill.methods.rkd import rkd_angle, rkd_distance
from distill.methods.tfkd_virtual import tfkd_virtual_loss
from kdens.errors import ConfigError, ModelError

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "methods_golden.json").read_text())


def _t(key, dtype=torch.float64):
    return torch.tensor(GOLDEN[key], dtype=dtype)


ZS, ZT, Y = _t("student_logits"), _t("teacher_logits"), torch.tensor(GOLDEN["y"])
LOG_PT = torch.log_softmax(ZT, 1)  # what the soft-target cache holds for a single model


# ---------------------------------------------------------------- golden values

@pytest.mark.parametrize("case", GOLDEN["dkd"], ids=lambda c: f"T{c['temperature']}")
def test_dkd_golden(case):
    for scores in (ZT, LOG_PT):  # teacher logits and cached log-probabilities give the same terms
        tckd, nckd = dkd_terms(ZS, scores, Y, case["temperature"])
        assert tckd.item() == pytest.approx(case["tckd"], rel=1e-10)
        assert nckd.item() == pytest.approx(case["nckd"], rel=1e-10)
    t = case["temperature"]
    m = make_method("dkd", {"temperature": t, "alpha": 0.5, "beta": 3.0, "ce_weight": 0.7, "warmup": 0})
    want = 0.7 * GOLDEN["cross_entropy"] + t * t * (0.5 * case["tckd"] + 3.0 * case["nckd"])
    assert m.loss(ZS, LOG_PT, Y).item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("case", GOLDEN["dist"], ids=lambda c: f"tau{c['temperature']}")
def test_dist_golden(case):
    inter, intra = dist_terms(ZS, LOG_PT, case["temperature"])
    assert inter.item() == pytest.approx(case["inter"], rel=1e-10)
    assert intra.item() == pytest.approx(case["intra"], rel=1e-10)
    t = case["temperature"]
    m = make_method("dist", {"temperature": t, "beta": 2.0, "gamma": 0.5})
    want = GOLDEN["cross_entropy"] + t * t * (2.0 * case["inter"] + 0.5 * case["intra"])
    assert m.loss(ZS, ZT, Y).item() == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("case", GOLDEN["lskd"], ids=lambda c: f"T{c['temperature']}")
def test_lskd_golden(case):
    assert lskd_loss(ZS, ZT, case["temperature"]).item() == pytest.approx(case["loss"], rel=1e-9)
    assert lskd_loss(ZS, LOG_PT, case["temperature"]).item() == pytest.approx(case["loss"], rel=1e-9)
    m = make_method("lskd", {"temperature": case["temperature"]})  # ce 0.1, kd 9 by default
    assert m.loss(ZS, LOG_PT, Y).item() == pytest.approx(0.1 * GOLDEN["cross_entropy"] + 9 * case["loss"],
                                                         rel=1e-9)


@pytest.mark.parametrize("case", GOLDEN["tfkd_virtual"], ids=lambda c: f"a{c['a']}-T{c['temperature']}")
def test_tfkd_virtual_golden(case):
    assert tfkd_virtual_loss(ZS, Y, case["a"], case["temperature"]).item() == pytest.approx(case["kl"], rel=1e-10)
    m = make_method("tfkd-virtual", {"a": case["a"], "temperature": case["temperature"], "alpha": 0.3})
    assert m.loss(ZS, None, Y).item() == pytest.approx(0.7 * GOLDEN["cross_entropy"] + 0.3 * case["kl"], rel=1e-10)


def test_tfkd_self_is_kd_with_the_papers_weights_golden():
    m = make_method("tfkd-self")  # alpha 0.95 on the soft term, T = 6
    want = 0.05 * GOLDEN["cross_entropy"] + 0.95 * 36 * GOLDEN["kl_T6"]
    assert m.loss(ZS, LOG_PT, Y).item() == pytest.approx(want, rel=1e-10)


def test_fitnets_golden_hint_and_annealed_kd_stage():
    h = GOLDEN["hint"]
    u, rv = torch.tensor(h["teacher"], dtype=torch.float64), torch.tensor(h["regressed"], dtype=torch.float64)
    assert hint_loss(u, rv).item() == pytest.approx(h["loss"], rel=1e-12)
    m = make_method("fitnets")
    m.set_phase("kd")
    m.set_epoch(1, 4)  # lambda: 4 -> 1 linearly over 4 epochs: 4, 3, 2, 1
    batch = FeatureBatch(torch.zeros(6, 1), ZS, ZT, Y, [], [])
    want = GOLDEN["cross_entropy"] + 3.0 * GOLDEN["kl_T3"]
    assert m.feature_loss("kd", batch, torch.nn.ModuleList()).item() == pytest.approx(want, rel=1e-10)
    assert [make_method("fitnets").args["lambda_start"], m.kd_weight()] == [4.0, 3.0]
    m.set_epoch(3, 4)
    assert m.kd_weight() == 1.0


def test_fsp_golden_matrices_pooling_and_flattening():
    g = GOLDEN["fsp"]
    x, mt, ms, vt, vs = (torch.tensor(g[k], dtype=torch.float64)
                         for k in ("input", "teacher_map", "student_map", "teacher_vector", "student_vector"))
    # a 4x4 input meets a 2x2 map: the input is max-pooled to 2x2
    np.testing.assert_allclose(fsp_matrix(x, mt).numpy(), g["matrix_input_map"], rtol=1e-12)
    # a map meets a vector: the map is flattened, every pixel a channel
    np.testing.assert_allclose(fsp_matrix(mt, vt).numpy(), g["matrix_map_vector"], rtol=1e-12)
    assert fsp_loss([x, mt, vt], [x, ms, vs]).item() == pytest.approx(g["loss"], rel=1e-10)


def test_rkd_golden_against_explicit_differences():
    s, t = _t("student_features"), _t("teacher_features")  # widths 5 and 4: no adapter needed
    assert rkd_distance(s, t).item() == pytest.approx(GOLDEN["rkd"]["distance"], rel=1e-10)
    assert rkd_angle(s, t).item() == pytest.approx(GOLDEN["rkd"]["angle"], rel=1e-9)
    m = make_method("rkd")
    batch = FeatureBatch(torch.zeros(6, 1), ZS, None, Y, [s], [t])
    want = GOLDEN["cross_entropy"] + 25 * GOLDEN["rkd"]["distance"] + 50 * GOLDEN["rkd"]["angle"]
    assert m.feature_loss("main", batch, torch.nn.ModuleList()).item() == pytest.approx(want, rel=1e-9)


def test_float32_matches_float64_golden():
    zs, zt = ZS.float(), LOG_PT.float()
    for name in ("dkd", "dist", "lskd", "tfkd-self", "tfkd-virtual"):
        a = make_method(name).loss(zs, zt, Y)
        b = make_method(name).loss(ZS, LOG_PT, Y)
        assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-5), name


# ---------------------------------------------------------------- identities from the papers

def test_dkd_with_unit_weights_reassembles_kd():
    """Zhao et al. Eq. 1: KL = TCKD + (1 - p_t^teacher) * NCKD, per example."""
    for T in (1.0, 3.5):
        for b in range(len(Y)):
            zs, zt, y = ZS[b: b + 1], ZT[b: b + 1], Y[b: b + 1]
            tckd, nckd = dkd_terms(zs, zt, y, T)
            pt = torch.softmax(zt / T, 1)[0, y].item()
            assert (tckd + (1 - pt) * nckd).item() == pytest.approx(soft_kl(zs, zt, T).item(), rel=1e-10)


def test_lskd_ignores_logit_scale_and_shift():
    base = lskd_loss(ZS, ZT, 2.0).item()
    assert lskd_loss(3.0 * ZS + 7.0, ZT, 2.0).item() == pytest.approx(base, rel=1e-6)
    assert lskd_loss(ZS, 0.2 * ZT - 1.0, 2.0).item() == pytest.approx(base, rel=1e-6)
    assert abs(kd_loss(3.0 * ZS, ZT, None, 2.0, 0.0).item() - kd_loss(ZS, ZT, None, 2.0, 0.0).item()) > 0.1


def test_dist_is_zero_for_a_perfect_student_and_needs_no_labels():
    m = make_method("dist", {"ce_weight": 0.0})
    assert m.loss(ZT.clone(), ZT, None).item() == pytest.approx(0.0, abs=1e-12)
    assert m.loss(ZS, ZT, None).item() > 0.1


# ---------------------------------------------------------------- gradients

def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t[:4, :5].clone().requires_grad_(True)


@pytest.mark.parametrize("name", ["dkd", "dist", "lskd", "tfkd-self", "tfkd-virtual"])
def test_logit_losses_gradcheck(name):
    zs, zt, y = _leaf(ZS), LOG_PT[:4, :5].clone(), Y[:4] % 5
    m = make_method(name)
    assert torch.autograd.gradcheck(lambda z: m.loss(z, zt, y), (zs,))


def test_rkd_angles_from_the_gram_matrix_equal_the_explicit_differences():
    from distill.methods.rkd import angles, angles_from_gram

    torch.manual_seed(1)
    for n, d in ((7, 3), (5, 12)):  # narrower and wider than the batch: both paths of angles()
        e = torch.randn(n, d, dtype=torch.float64) * 3 + 5  # offset: the Gram path must cancel large terms
        diff = e[None] - e[:, None]
        unit = F.normalize(diff, p=2, dim=2)
        want = torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)
        torch.testing.assert_close(angles_from_gram(e), want, rtol=0, atol=1e-12)
        torch.testing.assert_close(angles(e), want, rtol=0, atol=1e-12)
        s = e.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x, w=want: F.smooth_l1_loss(angles_from_gram(x), w.flip(0)), (s,))


def _angle_loss_by_autograd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    from distill.methods.rkd import angles, angles_from_gram

    return F.smooth_l1_loss(angles_from_gram(s), angles(t).detach())


def test_rkd_angle_hand_gradient_equals_autograd():
    torch.manual_seed(2)
    for n, ds, dt in ((7, 12, 5), (6, 3, 4), (9, 20, 30)):
        s = (torch.randn(n, ds, dtype=torch.float64) * 3 + 5).requires_grad_(True)  # offset: centring must cancel it
        t = torch.randn(n, dt, dtype=torch.float64) * 4
        want = _angle_loss_by_autograd(s, t)
        (g_want,) = torch.autograd.grad(want, s)
        got = rkd_angle(s, t)
        (g_got,) = torch.autograd.grad(got, s)
        assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-15)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-15)


def test_rkd_angle_float32_batch_of_128_matches_float64():
    torch.manual_seed(3)
    s = torch.relu(torch.randn(128, 80)) + 10  # ReLU-like features far from the origin
    t = torch.relu(torch.randn(128, 120))
    s64 = s.double().requires_grad_(True)
    want = _angle_loss_by_autograd(s64, t.double())
    (g_want,) = torch.autograd.grad(want, s64)
    s32 = s.clone().requires_grad_(True)
    got = rkd_angle(s32, t)
    (g_got,) = torch.autograd.grad(got, s32)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-4)
    assert ((g_got.double() - g_want).abs().max() / g_want.abs().max()).item() < 1e-4


def test_rkd_angle_duplicate_features_give_a_bounded_gradient():
    """Two equal rows (two identical images, or two all-zero ReLU layers): same loss, no 1/eps blow-up."""
    torch.manual_seed(4)
    s = torch.randn(6, 8, dtype=torch.float64)
    s[3] = s[1]
    t = torch.randn(6, 4, dtype=torch.float64)
    t[2] = t[0]
    s.requires_grad_(True)
    got = rkd_angle(s, t)
    (g,) = torch.autograd.grad(got, s)
    assert got.item() == pytest.approx(_angle_loss_by_autograd(s, t).item(), rel=1e-12)
    assert torch.isfinite(g).all() and g.abs().max().item() < 1.0


def test_feature_losses_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda e: rkd_distance(e, t), (s,))
    assert torch.autograd.gradcheck(lambda e: rkd_angle(e, t), (s,))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    m = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    mt = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    vt = torch.randn(3, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fsp_loss([x, mt, vt], [x, a, b]), (m, v))
    r = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: hint_loss(torch.ones(4, 6, dtype=torch.float64), a), (r,))


def _grad_norm(fn, zs) -> float:
    zs = zs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(zs), zs)
    return g.norm().item()


def test_t_squared_keeps_the_soft_gradient_scale():
    rng = np.random.default_rng(0)
    zs = torch.tensor(rng.normal(0, 1, (16, 10)))
    zt = torch.tensor(rng.normal(0, 1, (16, 10)))
    y = torch.tensor(rng.integers(0, 10, 16))
    temps = (5.0, 10.0, 20.0, 40.0)
    fns = {"dkd": lambda T: (lambda z: dkd_loss(z, zt, y, 1.0, 8.0, T)),
           "lskd": lambda T: (lambda z: lskd_loss(z, zt, T)),
           "tfkd-self": lambda T: (lambda z: make_method("tfkd-self", {"temperature": T, "alpha": 1.0}).loss(z, zt, y))}
    for name, fn in fns.items():
        scaled = np.array([_grad_norm(fn(T), zs) for T in temps])
        assert scaled.max() / scaled.min() < 1.1, (name, scaled)
    # and without the T^2 (DKD's terms alone) each doubling of T divides the gradient by about 4
    raw = np.array([_grad_norm(lambda z, T=T: sum(dkd_terms(z, zt, y, T)), zs) for T in temps])
    assert np.all(np.abs(raw[:-1] / raw[1:] - 4.0) < 0.3), raw
    # DIST's tau^2 multiplies terms that do not vanish with tau (Pearson correlation ignores scale)
    inter = np.array([dist_terms(zs, zt, T)[0].item() for T in (20.0, 40.0)])
    assert dist_loss(zs, zt, 1.0, 0.0, 40.0).item() == pytest.approx(1600 * inter[1], rel=1e-12)
    assert inter[0] == pytest.approx(inter[1], rel=0.01)


# ---------------------------------------------------------------- schedules and arguments

def test_dkd_warmup_is_linear_and_survives_resume():
    m = make_method("dkd", {"warmup": 4})
    assert m.warmup_factor() == 1.0  # no epoch set: outside training
    got = []
    for e in range(6):
        m.set_epoch(e, 6)
        got.append(m.warmup_factor())
    assert got == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    m.set_epoch(0, 6)
    ce = F.cross_entropy(ZS, Y).item()
    assert m.loss(ZS, ZT, Y).item() == pytest.approx(ce + 0.25 * dkd_loss(ZS, ZT, Y, 1.0, 8.0, 4.0).item())


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert list(METHODS) == ["kd", "soft", "logits", "fitnets", "fsp", "rkd", "dkd", "dist", "lskd", "tfkd-self",
                             "tfkd-virtual"]
    with pytest.raises(ConfigError, match="unknown --method 'crd'; valid methods: kd, soft, logits, fitnets, fsp, "
                                          "rkd, dkd, dist, lskd, tfkd-self, tfkd-virtual"):
        method_class("crd")
    for name, cls in METHODS.items():  # the formula and the paper are in each module's docstring
        doc = importlib.import_module(cls.__module__).__doc__
        assert cls.name == name and re.search(r"\bL(_\w+)? = ", doc), name
        assert cls.paper.split(",")[0].split()[0] in doc and re.search(r"(19|20)\d\d", doc), name


def test_papers_defaults():
    a = {n: make_method(n).args for n in METHODS}
    assert (a["dkd"]["alpha"], a["dkd"]["beta"], a["dkd"]["temperature"], a["dkd"]["warmup"]) == (1.0, 8.0, 4.0, 20)
    assert (a["dist"]["beta"], a["dist"]["gamma"], a["dist"]["temperature"]) == (1.0, 1.0, 1.0)
    assert (a["lskd"]["temperature"], a["lskd"]["kd_weight"], a["lskd"]["ce_weight"]) == (2.0, 9.0, 0.1)
    assert (a["rkd"]["distance_weight"], a["rkd"]["angle_weight"]) == (25.0, 50.0)
    assert (a["tfkd-virtual"]["a"], a["tfkd-virtual"]["temperature"]) == (0.9, 20.0)
    assert (a["fitnets"]["temperature"], a["fitnets"]["lambda_start"], a["fitnets"]["lambda_end"]) == (3.0, 4.0, 1.0)
    assert [p.name for p in make_method("fitnets").phases(8)] == ["hints", "kd"]
    assert [p.epochs for p in make_method("fsp").phases(8)] == [2, 8]
    assert [p.epochs for p in make_method("fsp", {"fsp_epochs": 5}).phases(1)] == [5, 1]


@pytest.mark.parametrize("name,args,message", [
    ("dkd", {"gamma": 1}, "unknown --method-arg gamma; valid \\(with defaults\\): temperature=4.0, alpha=1.0, beta=8.0"),
    ("dkd", {"beta": -1}, "--method-arg beta=-1 must be a number >= 0"),
    ("dkd", {"warmup": 2.5}, "warmup=2.5 must be an integer >= 0"),
    ("dist", {"temperature": 0}, "temperature=0 must be a number > 0"),
    ("tfkd-virtual", {"a": 1.0}, "a=1.0 must be a number >= 0 and < 1"),
    ("rkd", {"angle_weight": "lots"}, "angle_weight='lots'"),
])
def test_bad_method_args_name_the_value(name, args, message):
    with pytest.raises(ConfigError, match=message):
        make_method(name, args)


def test_label_and_shape_errors():
    with pytest.raises(ConfigError, match="--method dkd needs labels"):
        make_method("dkd").loss(ZS, ZT, None)
    with pytest.raises(ConfigError, match="ce_weight=0 drops it"):
        make_method("dist").loss(ZS, ZT, None)
    with pytest.raises(ModelError, match="differ in shape"):
        make_method("lskd").loss(ZS, ZT[:, :3], Y)
    with pytest.raises(ModelError, match="probability 0"):
        make_method("lskd").loss(ZS, torch.full_like(ZT, float("-inf")), Y)
