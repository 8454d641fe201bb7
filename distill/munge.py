"""MUNGE pseudo-data (Buciluǎ, Caruana & Niculescu-Mizil 2006, "Model compression").

A transfer set for when the training data cannot be shared in quantity: pseudo-examples
near the training examples, labelled afterwards by the teacher's soft targets. For each
training example e, find its nearest neighbour e' (Euclidean, over all attributes: features,
or pixels of an image); then, attribute by attribute, with probability ``p`` replace
``e_a`` by a draw from a normal centred on the neighbour's value ``e'_a`` with standard
deviation ``|e_a - e'_a| / s``. One pass over the training split yields one pseudo-example
per training example; passes repeat (with fresh draws) until ``n`` are made.

The paper's pass also moves ``e'`` towards ``e`` in the same step; this one changes ``e``
only, so every pseudo-example has exactly the per-attribute law above (the swap
probability and the spread are what the tests check) and a pass is one vectorised step.

Distances are measured on standardized attributes when the data has per-attribute scales
(``std``: features in natural units, where a column in pascals would otherwise choose every
neighbour alone); the draws stay in the data's own units, and since the spread is a difference
of one attribute's values, it is the same law in either unit.
"""

from __future__ import annotations

import numpy as np

from kdens.errors import ConfigError, DataError


def nearest_neighbours(x: np.ndarray, batch: int = 1024, std: np.ndarray | None = None) -> np.ndarray:
    """Index of each row's nearest other row (Euclidean, over ``x / std`` when ``std`` is given),
    in batches to bound memory. ``std`` broadcasts against one example (per feature, or (C, 1, 1)
    per channel)."""
    flat = (x if std is None else x / np.asarray(std, np.float32)).reshape(len(x), -1).astype(np.float32)
    sq = (flat * flat).sum(1)
    out = np.empty(len(flat), np.int64)
    for i in range(0, len(flat), batch):
        d = sq[i:i + batch, None] - 2.0 * flat[i:i + batch] @ flat.T + sq[None, :]  # (b, N)
        d[np.arange(len(d)), np.arange(i, i + len(d))] = np.inf  # not itself
        out[i:i + batch] = d.argmin(1)
    return out


def munge(x: np.ndarray, n: int, p: float = 0.5, s: float = 1.0, seed: int = 0,
          std: np.ndarray | None = None) -> np.ndarray:
    """``n`` MUNGE pseudo-examples shaped like ``x`` (float32), seeded.

    Args:
        x: training inputs (N, ...) with N >= 2; every attribute is treated as continuous.
        n: how many pseudo-examples to make (> 0).
        p: probability of changing each attribute, in (0, 1].
        s: spread divisor > 0: a changed attribute is drawn with sd ``|e_a - e'_a| / s``.
        seed: seeds the draws.
        std: per-attribute (or per-channel, shaped (C, 1, 1)) scale the neighbour search divides
            by; None measures raw distances (images in [0, 1]).
    """
    if n <= 0:
        raise ConfigError(f"--transfer munge={n}: the number of pseudo-examples must be > 0, e.g. munge=20000")
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"--transfer munge: p={p} must lie in (0, 1], e.g. p=0.5")
    if not s > 0:
        raise ConfigError(f"--transfer munge: s={s} must be > 0, e.g. s=1")
    if len(x) < 2:
        raise DataError(f"--transfer munge needs at least 2 training examples to find neighbours, got {len(x)}")
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1).astype(np.float32)
    nn_idx = nearest_neighbours(x.astype(np.float32), std=std)
    nb = flat[nn_idx]  # (N, D) each example's neighbour
    sd = np.abs(flat - nb) / s  # (N, D)
    out = []
    made = 0
    while made < n:
        change = rng.random(flat.shape) < p  # (N, D)
        draw = nb + sd * rng.standard_normal(flat.shape, dtype=np.float32)
        out.append(np.where(change, draw, flat).astype(np.float32))
        made += len(flat)
    return np.concatenate(out)[:n].reshape(n, *x.shape[1:])
