"""Tests for distill/transfer.py: spec parsing, stratified subsets, omitted classes, bias fit."""

from __future__ import annotations

import numpy as np
import pytest

from distill.transfer import (
    TransferSpec,
    fit_bias_shift,
    omit_classes,
    parse_transfer,
    stratified_fraction,
)
from kdens.errors import ConfigError, DataError


# ------------------------------------------------------------------ parse_transfer


def test_parse_valid_forms():
    assert parse_transfer("train") == TransferSpec(kind="train")
    assert parse_transfer(" val ") == TransferSpec(kind="val")
    assert parse_transfer("fraction=0.03") == TransferSpec(kind="fraction", fraction=0.03)
    assert parse_transfer("fraction=1") == TransferSpec(kind="fraction", fraction=1.0)
    assert parse_transfer("omit=3") == TransferSpec(kind="omit", classes=(3,))
    assert parse_transfer("omit=7, 1,3,1").classes == (1, 3, 7)
    u = parse_transfer("unlabeled=data/extra.npz")
    assert u.kind == "unlabeled" and u.path == "data/extra.npz" and not u.labeled
    assert parse_transfer("train").labeled


def test_canonical_string_round_trips():
    for spec in ("train", "val", "fraction=0.25", "omit=1,3,7", "unlabeled=/x/y.npz"):
        assert str(parse_transfer(spec)) == spec
        assert parse_transfer(str(parse_transfer(spec))) == parse_transfer(spec)
    assert str(parse_transfer("omit=3,1")) == "omit=1,3"


@pytest.mark.parametrize(
    "spec",
    ["", "test", "fraction", "fraction=0", "fraction=1.5", "fraction=-0.1", "fraction=abc",
     "fraction=nan", "omit=", "omit=a", "omit=1,,2", "omit=-1", "unlabeled=", "subset=3"],
)
def test_parse_invalid_lists_valid_forms(spec):
    with pytest.raises(ConfigError) as e:
        parse_transfer(spec)
    msg = str(e.value)
    for form in ("--transfer", "train | val", "fraction=F", "omit=C1,C2", "unlabeled=PATH"):
        assert form in msg


# ------------------------------------------------------------------ stratified_fraction


def _labels(counts: list[int], seed: int = 0) -> np.ndarray:
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    return np.random.default_rng(seed).permutation(y)


def test_stratified_proportions():
    counts = [200, 100, 50, 7, 1]
    y = _labels(counts)
    idx = stratified_fraction(y, 0.1, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, unique
    got = np.bincount(y[idx], minlength=5)
    # round(0.1 * n_c), at least 1 for every present class
    assert got.tolist() == [20, 10, 5, 1, 1]


def test_stratified_is_the_generalists_train_fraction_subset():
    # one definition of "a stratified fraction": transfer fraction=F and --train-fraction F agree
    from kdens.data import stratified_subset

    y = _labels([5, 15, 40])
    for f, seed in ((0.5, 1), (0.03, 0), (0.37, 9)):
        np.testing.assert_array_equal(stratified_fraction(y, f, seed), stratified_subset(y, f, seed))
    # Python rounding of 0.5 * n_c: 2.5 -> 2, 7.5 -> 8, 20 -> 20
    assert np.bincount(y[stratified_fraction(y, 0.5, seed=1)]).tolist() == [2, 8, 20]
    y = _labels([5, 15])
    assert stratified_fraction(y, 1.0, seed=1).tolist() == list(range(20))


def test_stratified_deterministic_and_seeded():
    y = _labels([300, 300, 300])
    a = stratified_fraction(y, 0.2, seed=5)
    b = stratified_fraction(y, 0.2, seed=5)
    c = stratified_fraction(y, 0.2, seed=6)
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) == 180
    assert not np.array_equal(a, c)
    assert np.bincount(y[c]).tolist() == [60, 60, 60]


def test_stratified_absent_classes_and_bad_args():
    y = np.array([0, 0, 2, 2, 2, 2], dtype=np.int64)  # class 1 absent
    idx = stratified_fraction(y, 0.5, seed=0)
    assert sorted(set(y[idx].tolist())) == [0, 2] and len(idx) == 3
    with pytest.raises(ConfigError, match="0 < F <= 1"):
        stratified_fraction(y, 0.0, seed=0)
    with pytest.raises(DataError):
        stratified_fraction(y.astype(np.float32), 0.5, seed=0)


# ------------------------------------------------------------------ omit_classes


def test_omit_removes_exactly_those_classes():
    y = _labels([10, 11, 12, 13, 14])
    idx = omit_classes(y, [3, 1], num_classes=5)
    expected = np.flatnonzero((y != 1) & (y != 3))
    np.testing.assert_array_equal(idx, expected)
    assert set(y[idx].tolist()) == {0, 2, 4}
    assert len(idx) == 10 + 12 + 14


def test_omit_validates():
    y = _labels([3, 3])
    with pytest.raises(ConfigError, match=r"outside \[0, 2\)"):
        omit_classes(y, [2], num_classes=2)
    with pytest.raises(ConfigError, match="at least one"):
        omit_classes(y, [], num_classes=2)
    with pytest.raises(ConfigError, match="no examples"):
        omit_classes(y, [0, 1], num_classes=2)


# ------------------------------------------------------------------ fit_bias_shift


def _calibrated(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.5, (n, c))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) > rng.random((n, 1))).argmax(1).astype(np.int64)
    return z, y


def _shifted_accuracy(z, y, classes, s):
    z = z.copy()
    z[:, classes] += s
    return (z.argmax(1) == y).mean()


@pytest.mark.parametrize("criterion", ["accuracy", "nll"])
def test_fit_bias_shift_recovers_planted_bias(criterion):
    z, y = _calibrated(3000, 10, seed=0)
    lowered = z.copy()
    lowered[:, 3] -= 3.5  # the student never saw a 3: its bias for 3 is too low
    shift, info = fit_bias_shift(lowered, y, [3], criterion=criterion)
    assert abs(shift - 3.5) < 0.4, shift
    assert info["shift"] == shift and info["criterion"] == criterion
    assert info["accuracy_after"] > info["accuracy_before"] + 0.02
    assert info["nll_after"] < info["nll_before"]
    assert info["recall_after"][3] > info["recall_before"][3] + 0.3
    # the NLL optimum of a calibrated model is the planted bias (MLE), up to sampling noise
    assert abs(info["nll_optimal_shift"] - 3.5) < 0.2
    # the reported numbers are those of the shifted logits
    assert info["accuracy_after"] == pytest.approx(_shifted_accuracy(lowered, y, [3], shift))


def test_fit_bias_shift_accuracy_matches_brute_force_grid():
    z, y = _calibrated(800, 6, seed=1)
    z[:, [1, 4]] -= 2.0
    shift, info = fit_bias_shift(z, y, [4, 1])
    grid = np.linspace(-6.0, 10.0, 3201)
    best_grid = max(_shifted_accuracy(z, y, [1, 4], s) for s in grid)
    # the exact sweep is at least as good as a fine grid, and never worse
    assert info["accuracy_after"] >= best_grid
    assert info["accuracy_after"] == pytest.approx(_shifted_accuracy(z, y, [1, 4], shift))
    assert set(info["recall_after"]) == {1, 4}


def _nll(z, y, classes, s):
    w = z.copy()
    w[:, classes] += s
    m = w.max(1, keepdims=True)
    lp = w - m - np.log(np.exp(w - m).sum(1, keepdims=True))
    return -lp[np.arange(len(y)), y].mean()


def test_fit_bias_shift_ties_broken_by_nll():
    # seed chosen so that the NLL optimum lies strictly inside an interval of best accuracy
    z, y = _calibrated(300, 5, seed=5)
    z[:, 2] -= 2.5
    shift, info = fit_bias_shift(z, y, [2])
    assert info["nll_after"] == pytest.approx(_nll(z, y, [2], shift), rel=1e-10)
    grid = np.linspace(-3.0, 9.0, 2401)
    ties = [s for s in grid if _shifted_accuracy(z, y, [2], s) == info["accuracy_after"]]
    assert ties  # the grid does meet the best-accuracy set
    assert info["nll_after"] <= min(_nll(z, y, [2], s) for s in ties) + 1e-12


def test_fit_bias_shift_nll_criterion_minimizes_nll():
    z, y = _calibrated(500, 5, seed=2)
    z[:, 0] -= 1.0
    shift, info = fit_bias_shift(z, y, [0], criterion="nll")

    def nll(s):
        return _nll(z, y, [0], s)

    assert nll(shift) == pytest.approx(info["nll_after"], rel=1e-10)
    assert nll(shift) <= min(nll(shift - 1e-3), nll(shift + 1e-3))


def test_fit_bias_shift_needs_both_kinds_of_examples():
    z, y = _calibrated(100, 4, seed=3)
    with pytest.raises(DataError, match="omitted"):
        fit_bias_shift(z[y != 2], y[y != 2], [2])
    with pytest.raises(ConfigError):
        fit_bias_shift(z, y, [4])
    with pytest.raises(ConfigError):
        fit_bias_shift(z, y, [0], criterion="f1")
    with pytest.raises(DataError):
        fit_bias_shift(z[:10], y, [0])
