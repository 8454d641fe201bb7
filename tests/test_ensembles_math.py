"""Ensemble combination: arithmetic / geometric means of member softmaxes at temperature T."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from ensembles.combine import combine_log_probs, ensemble_metrics, member_disagreement
from kdens import metrics
from kdens.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small tensor ops: on a busy 2-core box, 2 intra-op threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(k=3, n=50, c=6, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, c, generator=g, dtype=torch.float64) * scale


@pytest.mark.parametrize("method", ["arithmetic", "geometric"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_identical_members_give_that_member(method, temperature):
    z = _logits(k=1)[0]
    stacked = torch.stack([z, z, z, z])
    out = combine_log_probs(stacked, method, temperature)
    torch.testing.assert_close(out, torch.log_softmax(z / temperature, 1), rtol=0, atol=1e-12)


def test_arithmetic_is_mean_of_probabilities():
    p1 = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64)
    p2 = torch.tensor([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], dtype=torch.float64)
    z = torch.stack([p1.log() + 3.0, p2.log() - 1.0])  # logits up to a per-row shift
    out = combine_log_probs(z, "arithmetic").exp()
    torch.testing.assert_close(out, (p1 + p2) / 2, rtol=0, atol=1e-12)


def test_geometric_renormalizes_the_product_of_experts():
    z = _logits(k=3, seed=1)
    out = combine_log_probs(z, "geometric", 2.0)
    p = torch.softmax(z / 2.0, dim=2)  # (K, N, C)
    naive = p.prod(0) ** (1 / 3)
    assert (naive.sum(1) < 1 - 1e-6).all()  # the raw geometric mean is not a distribution
    torch.testing.assert_close(out.exp(), naive / naive.sum(1, keepdim=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(z.shape[1], dtype=z.dtype), rtol=0, atol=1e-12)
    # the product of experts of softmaxes is the softmax of the mean logit
    torch.testing.assert_close(out, torch.log_softmax(z.mean(0) / 2.0, 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["arithmetic", "geometric"])
def test_higher_temperature_softens(method):
    z = _logits(seed=2)

    def entropy(lp):
        return -(lp.exp() * lp).sum(1)

    h = [entropy(combine_log_probs(z, method, t)) for t in (0.5, 1.0, 3.0, 20.0)]
    for lo, hi in pairwise(h):
        assert (hi > lo).all()
    assert torch.allclose(h[-1], torch.full_like(h[-1], math.log(z.shape[2])), atol=0.05)


def test_arithmetic_is_stable_for_huge_logits():
    z = torch.tensor([[[1e4, 0.0, -1e4]], [[-1e4, 1e4, 0.0]]], dtype=torch.float32)
    out = combine_log_probs(z, "arithmetic")
    assert torch.isfinite(out[:, :2]).all()
    torch.testing.assert_close(out[0, :2].exp(), torch.tensor([0.5, 0.5]), rtol=0, atol=1e-6)


def test_bad_method_temperature_and_shape_are_config_errors():
    z = _logits()
    with pytest.raises(ConfigError, match="arithmetic, geometric"):
        combine_log_probs(z, "harmonic")
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature"):
            combine_log_probs(z, "arithmetic", t)
    with pytest.raises(ConfigError, match="shape"):
        combine_log_probs(z[0], "arithmetic")


def test_member_disagreement_counts_pairs():
    # top-1 classes of three members on four examples
    tops = np.array([[0, 1, 2, 0], [0, 1, 1, 1], [2, 1, 2, 0]])
    z = torch.nn.functional.one_hot(torch.as_tensor(tops), 3).double() * 5  # (K, N, C)
    # pairs: (0,1) differ on 2 of 4, (0,2) on 1, (1,2) on 3 -> mean 6/12
    assert member_disagreement(z) == pytest.approx(0.5)
    assert member_disagreement(z[:1]) == 0.0
    assert member_disagreement(torch.stack([z[0], z[0]])) == 0.0


def test_ensemble_metrics_match_kdens_metrics():
    z = _logits(k=4, n=200, c=5, seed=3)
    y = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(3))
    out = ensemble_metrics(z, y, "geometric", 2.0)
    assert out["num_members"] == 4 and len(out["members"]) == 4
    comb = combine_log_probs(z, "geometric", 2.0).numpy()
    assert out["ensemble"]["accuracy"] == metrics.accuracy(comb, y.numpy())
    assert out["ensemble"]["errors"] == metrics.errors(comb, y.numpy())
    assert out["ensemble"]["nll"] == pytest.approx(metrics.nll(comb, y.numpy()))
    assert out["ensemble"]["ece"] == pytest.approx(metrics.ece(comb, y.numpy()))
    member1 = torch.log_softmax(z[1] / 2.0, 1).numpy()
    assert out["members"][1]["nll"] == pytest.approx(metrics.nll(member1, y.numpy()))
    accs = [m["accuracy"] for m in out["members"]]
    assert out["best_member_accuracy"] == max(accs)
    assert out["mean_member_accuracy"] == pytest.approx(np.mean(accs))
    assert out["disagreement"] == member_disagreement(z)
    with pytest.raises(ConfigError, match="labels"):
        ensemble_metrics(z, y[:10])
