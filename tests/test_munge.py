"""MUNGE pseudo-data: its per-attribute law, its neighbours, and a student distilled on it alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from distill.munge import munge, nearest_neighbours
from distill.transfer import parse_transfer
from kdens.app.cli import cli
from kdens.errors import ConfigError


def test_neighbours_are_the_nearest_other_row():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (nearest_neighbours(x, batch=7) == d.argmin(1)).all()


def test_neighbours_of_features_in_natural_units_are_found_on_standardized_values():
    # column 0 is noise in pascals (sd 1e5), column 1 the signal in metres (sd 1): raw distances see
    # only the pascals; divided by each column's std both count, as for kdens' feature models
    rng = np.random.default_rng(2)
    x = np.stack([rng.normal(0, 1e5, 200), rng.normal(0, 1, 200)], 1).astype(np.float32)
    std = x.std(0)
    z = x / std
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    want = d.argmin(1)
    assert (nearest_neighbours(x, std=std) == want).all()
    assert (nearest_neighbours(x) != want).mean() > 0.3  # the raw metric picks other neighbours
    # p = 1 and a tiny spread: every pseudo-example sits on its standardized neighbour, in raw units
    out = munge(x, len(x), p=1.0, s=1e9, seed=0, std=std)
    assert np.allclose(out, x[want], rtol=1e-5, atol=1e-3)


def test_swap_probability_and_spread_follow_the_law():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2000, 4)) * [1.0, 10.0, 0.1, 3.0]).astype(np.float32)
    p, s = 0.3, 2.0
    out = munge(x, len(x), p=p, s=s, seed=3)  # one pass: row i comes from example i
    nb = x[nearest_neighbours(x)]
    sd = np.abs(x - nb) / s
    changed = out != x
    assert abs(changed.mean() - p) < 0.015  # each attribute changes with probability p
    z = (out - nb)[changed] / sd[changed]  # a changed value ~ N(neighbour's value, |e - e'| / s)
    assert abs(z.mean()) < 0.05 and abs(z.var() - 1.0) < 0.08
    again = munge(x, 4500, p=p, s=s, seed=3)
    assert again.shape == (4500, 4) and (again[:2000] == out).all()  # seeded; passes repeat with fresh draws
    assert (again[2000:4000] != out).any()


def test_images_keep_their_shape_and_bad_specs_are_refused():
    x = np.random.default_rng(0).random((30, 1, 8, 8), dtype=np.float32)
    assert munge(x, 45, seed=0).shape == (45, 1, 8, 8)
    spec = parse_transfer("munge=100,p=0.25,s=1.5")
    assert (spec.kind, spec.count, spec.p, spec.s, spec.labeled) == ("munge", 100, 0.25, 1.5, False)
    assert str(parse_transfer(str(spec))) == str(spec)  # canonical, stable for cache keys
    for bad, why in (("munge=0", "N > 0"), ("munge=-5", "N > 0"), ("munge=10,p=2", "0 < p <= 1"),
                     ("munge=10,q=1", "not q"), ("munge=x", "munge takes N")):
        with pytest.raises(ConfigError, match=why):
            parse_transfer(bad)


def test_a_student_learns_from_munge_pseudo_data_alone(tmp_path):
    r = CliRunner().invoke(cli, ["train-generalist", "--data", "digits", "--model", "mlp", "--model-arg", "hidden=64",
                                 "--epochs", "20", "--quiet", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(tmp_path / "t"), "--model", "mlp", "--model-arg",
                                 "hidden=32", "--transfer", "munge=3000,p=0.5,s=1", "--alpha", "0", "--epochs", "20",
                                 "--quiet", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["transfer"] == {"spec": "munge=3000,p=0.5,s=1.0", "examples": 3000, "labeled": False,
                                    "neighbours": "raw"}  # digits lie in [0, 1]: no per-pixel scale
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.8 and m["teacher_agreement"] > 0.8  # never saw a training image as such
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(tmp_path / "t"), "--model", "mlp",
                                 "--transfer", "munge=0", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "N > 0" in r.output and not (tmp_path / "bad").exists()
