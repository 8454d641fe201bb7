"""Specialists' class clustering (Hinton et al. 2015, section 5.2): the estimator, its stability, --groups."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from kdens.errors import ConfigError
from specialists.cluster import ConfusionClusterer, parse_groups
from specialists.plot import class_order, save_covariance_heatmap

# ---------------------------------------------------------------- clustering


def _planted_predictions(blocks, num_classes, n=3000, seed=0, lone=()):
    """Softmax-like predictions whose confusions stay inside each block.

    Each example's true class is drawn uniformly; its probability mass is spread over
    the true class's block (Dirichlet), plus a little uniform noise. Classes in
    ``lone`` are always predicted confidently (they belong to no block).
    """
    rng = np.random.default_rng(seed)
    block_of = {c: b for b in blocks for c in b}
    p = np.full((n, num_classes), 0.01 / num_classes)
    y = rng.integers(0, num_classes, n)
    for i, c in enumerate(y):
        if c in lone:
            p[i, c] += 0.99
        else:
            b = block_of[c]
            w = rng.dirichlet(np.ones(len(b)))
            w = 0.5 * w + 0.5 * (np.arange(len(b)) == b.index(c))  # mostly right, confused within b
            p[i, b] += 0.99 * w
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("affinity", ["normalized", "correlation", "covariance"])
@pytest.mark.parametrize("algorithm", ["kmeans", "minibatch"])
def test_clusterer_finds_planted_blocks(affinity, algorithm):
    blocks = [[0, 4, 7], [1, 2, 8], [3, 5, 6]]
    P = _planted_predictions(blocks, 9)
    est = ConfusionClusterer(n_clusters=3, affinity=affinity, algorithm=algorithm).fit(P)
    assert est.groups_ == sorted(sorted(b) for b in blocks)
    assert est.labels_.shape == (9,)
    np.testing.assert_allclose(est.covariance_, np.cov(P, rowvar=False))


def test_singletons_get_no_specialist():
    blocks = [[0, 3, 5], [1, 4, 6]]
    P = _planted_predictions(blocks, 7, lone=(2,))
    est = ConfusionClusterer(n_clusters=3, algorithm="kmeans").fit(P)
    assert est.groups_ == [[0, 3, 5], [1, 4, 6]]
    assert est.all_groups_ == [[0, 3, 5], [1, 4, 6], [2]]
    assert ConfusionClusterer(n_clusters=1).fit(P).groups_ == []  # one group of all classes


def test_affinities_are_what_they_say():
    P = _planted_predictions([[0, 1], [2, 3]], 4, n=500)
    norm = ConfusionClusterer(n_clusters=2, affinity="normalized").fit(P).affinity_
    np.testing.assert_allclose(np.linalg.norm(norm, axis=0), 1.0)
    corr = ConfusionClusterer(n_clusters=2, affinity="correlation").fit(P).affinity_
    np.testing.assert_allclose(corr, np.corrcoef(P, rowvar=False), atol=1e-12)


def test_estimator_contract():
    params = dict(n_clusters=2, affinity="correlation", algorithm="kmeans", random_state=7, n_init=3)
    est = ConfusionClusterer(**params)
    assert est.get_params() == params
    fresh = clone(est)
    assert fresh.get_params() == params
    assert not [k for k in vars(fresh) if k.endswith("_")]  # nothing learned before fit
    P = _planted_predictions([[0, 1], [2, 3]], 4, n=400)
    assert est.fit(P) is est
    assert not [k for k in vars(fresh) if k.endswith("_")]  # cloning shared no state
    again = ConfusionClusterer(**params).fit(P)
    np.testing.assert_array_equal(est.labels_, again.labels_)  # seeded
    # invalid parameters are accepted by __init__ and rejected by fit, as scikit-learn does
    for bad, match in (
        (dict(n_clusters=0), r"\[1, 4\]"),
        (dict(n_clusters=5), r"\[1, 4\]"),
        (dict(n_clusters=2.5), "integer"),
        (dict(affinity="cosine"), "covariance, normalized, correlation"),
        (dict(algorithm="spectral"), "kmeans, minibatch"),
    ):
        with pytest.raises(ConfigError, match=match):
            ConfusionClusterer(**bad).fit(P)


def _ari(a, b) -> float:
    """Adjusted Rand index from its definition (Hubert & Arabie 1985), independent of scikit-learn."""
    from math import comb

    pairs = lambda counts: sum(comb(int(n), 2) for n in counts)  # noqa: E731
    table = np.array([[np.sum((a == i) & (b == j)) for j in np.unique(b)] for i in np.unique(a)])
    index, rows, cols, total = pairs(table.ravel()), pairs(table.sum(1)), pairs(table.sum(0)), comb(len(a), 2)
    expected = rows * cols / total
    return (index - expected) / ((rows + cols) / 2 - expected)


def test_seed_stability():
    from specialists.cluster import seed_stability

    blocks = [[0, 4, 7], [1, 2, 8], [3, 5, 6]]
    planted = _planted_predictions(blocks, 9)
    st = seed_stability(ConfusionClusterer(n_clusters=3), planted)
    assert st == {"seeds": list(range(10)), "mean_pairwise_ari": 1.0, "min_pairwise_ari": 1.0,
                  "distinct_partitions": 1, "share_like_first": 1.0}
    # structureless predictions: seeds disagree; the number is the mean ARI over every pair of seeds
    noise = np.random.default_rng(3).dirichlet(np.ones(12), 60)
    est = ConfusionClusterer(n_clusters=4, algorithm="minibatch", n_init=1, random_state=5)
    st = seed_stability(est, noise, n_seeds=6)
    labels = [clone(est).set_params(random_state=s).fit(noise).labels_ for s in range(5, 11)]
    pairs = [_ari(labels[i], labels[j]) for i in range(6) for j in range(i + 1, 6)]
    assert st["seeds"] == list(range(5, 11)) and st["mean_pairwise_ari"] == pytest.approx(np.mean(pairs))
    assert st["min_pairwise_ari"] == pytest.approx(min(pairs)) and st["mean_pairwise_ari"] < 0.9
    assert st["distinct_partitions"] > 1 and est.random_state == 5 and not hasattr(est, "labels_")
    with pytest.raises(ConfigError, match="n_seeds"):
        seed_stability(est, noise, n_seeds=1)


def test_default_is_lloyd_with_restarts():
    est = ConfusionClusterer()
    assert (est.algorithm, est.n_init) == ("kmeans", 100)
    # on planted blocks with confusions, every seed finds them (the previous default, online k-means, not always)
    blocks = [list(range(i, 40, 8)) for i in range(8)]  # 8 blocks of 5 among 40 classes
    P = _planted_predictions(blocks, 40, n=4000, seed=1)
    found = [ConfusionClusterer(n_clusters=8, random_state=s).fit(P).groups_ for s in range(5)]
    assert all(f == sorted(blocks) for f in found)


def test_parse_groups():
    assert parse_groups("5,7,9; 6,4,2,0", 10) == [[0, 2, 4, 6], [5, 7, 9]]
    for spec, match in (
        ("0,2;2,3", "class 2 is in group #1 and group #2"),
        ("0,10", "out of range"),
        ("0,-1", "out of range"),
        ("0,0,1", "repeated"),
        ("3", "at least 2"),
        ("0,1,2", "all 3 classes"),
        ("0,x", "not an integer"),
        ("0,1;", "empty group"),
        ("", "no class groups"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_groups(spec, 3 if spec == "0,1,2" else 10)


def test_heatmap_is_written_atomically(tmp_path):
    assert class_order(6, [[4, 1], [0, 5]]) == [4, 1, 0, 5, 2, 3]
    cov = np.cov(_planted_predictions([[0, 1], [2, 3]], 5, n=300, lone=(4,)), rowvar=False)
    path = save_covariance_heatmap(cov, [[0, 1], [2, 3]], list("abcde"), tmp_path / "sub" / "cov.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["cov.png"]  # no temporary file left
    with pytest.raises(ConfigError, match="class names"):
        save_covariance_heatmap(cov, [], list("ab"), tmp_path / "x.png")
