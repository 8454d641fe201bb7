"""A synthetic colour-image set stored the way photos usually are: uint8 NHWC RGB (issue 12).

Eight classes of shapes, each symmetric left-right (so ``--augment flip`` keeps the label):
filled square, hollow square, disc, ring, plus, X, upward triangle, diamond. Every image is
``--size`` x ``--size`` (default 16) RGB:

* a background of a random colour with a random linear gradient;
* one shape of random radius (size/4.5 .. size/2.5) at a random centre (it may be cut by the
  border), in a random colour at least 0.45 (of 1) away from the background in RGB distance,
  with soft (anti-aliased) edges;
* a small distractor blob of another random colour somewhere else, in 30% of the images;
* Gaussian pixel noise (sigma ``--noise``, default 0.05), clipped, rounded to uint8.

The .npz holds ``x_train`` (N, H, W, 3) uint8, ``y_train`` (N,) int64, ``x_test``, ``y_test``
and ``class_names``: what ``kdens ... --data FILE.npz`` reads (the layout is found to be
NHWC).

    python bench/colour_shapes.py --out runs/colour/data.npz --train 4000 --test 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASS_NAMES = ["square", "frame", "disc", "ring", "plus", "x", "triangle", "diamond"]


def _shape(k: int, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Coverage in [0, 1] of shape ``k`` of radius ``r`` at offsets (dy, dx) from its centre."""
    soft = lambda d: np.clip(0.5 - d, 0.0, 1.0)  # noqa: E731  signed distance (px) -> coverage
    ay, ax = np.abs(dy), np.abs(dx)
    w = max(1.0, r / 3)  # stroke width
    if k == 0:
        return soft(np.maximum(ay, ax) - r)
    if k == 1:
        return soft(np.abs(np.maximum(ay, ax) - r + w / 2) - w / 2)
    if k == 2:
        return soft(np.hypot(dy, dx) - r)
    if k == 3:
        return soft(np.abs(np.hypot(dy, dx) - r + w / 2) - w / 2)
    if k == 4:
        return np.maximum(soft(np.maximum(ay - w / 2, ax - r)), soft(np.maximum(ax - w / 2, ay - r)))
    if k == 5:
        u, v = np.abs(dy + dx) / np.sqrt(2), np.abs(dy - dx) / np.sqrt(2)
        return np.maximum(soft(np.maximum(u - w / 2, v - r)), soft(np.maximum(v - w / 2, u - r)))
    if k == 6:  # apex up: inside when below the two slanted edges and above the base
        edge = (dy + r) * 0.5 - ax  # half-width grows by 1/2 px per row
        return soft(np.maximum(np.maximum(-edge, dy - r * 0.8), -dy - r))
    return soft((ay + ax) - r * 1.2)


def make(n: int, size: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, size, size, 3) uint8 and their labels (n,) int64."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASS_NAMES), n)
    r_, c_ = np.mgrid[0:size, 0:size].astype(np.float64)
    x = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        bg = rng.uniform(0, 1, 3)
        g = rng.normal(0, 0.15, (2, 3))  # gradient per colour channel, over the image
        img = bg + (r_[..., None] / size - 0.5) * g[0] + (c_[..., None] / size - 0.5) * g[1]
        if rng.random() < 0.3:  # a distractor blob that is not any class's shape
            cy, cx = rng.uniform(0, size, 2)
            blob = np.clip(1.5 - np.hypot(r_ - cy, c_ - cx), 0, 1)[..., None]
            img = img * (1 - blob) + rng.uniform(0, 1, 3) * blob
        while True:
            fg = rng.uniform(0, 1, 3)
            if np.linalg.norm(fg - bg) >= 0.45:
                break
        rad = rng.uniform(size / 4.5, size / 2.5)
        cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
        cover = _shape(int(y[i]), r_ - cy, c_ - cx, rad)[..., None]
        x[i] = img * (1 - cover) + fg * cover
    x += rng.normal(0, noise, x.shape)
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8), y.astype(np.int64)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    x_train, y_train = make(a.train, a.size, a.seed, a.noise)
    x_test, y_test = make(a.test, a.size, a.seed + 1_000_003, a.noise)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                        class_names=np.array(CLASS_NAMES))
    print(f"{a.out}: {len(y_train)} train / {len(y_test)} test, {a.size}x{a.size} RGB uint8 NHWC")


if __name__ == "__main__":
    main()
