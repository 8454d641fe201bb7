"""A synthetic many-class image set where specialists have something to specialise on (issue 17).

Hinton et al. (2015, section 5) gave specialists to a generalist with 15,000 classes, whose
fine distinctions compete for its capacity. Fashion-MNIST's 10 classes leave nothing to
specialise on, so this generator makes 100 classes of 16x16 grey images that have that
structure:

* **10 coarse shapes** (easy): outlines drawn around the border -- square, ring, diamond,
  horizontal bars, vertical bars, corner brackets, a Gamma, diagonal corner strokes, a
  dashed square, a double square -- at 1 px width, intensity 0.6-1.0. None of them touches
  the central 6x6 pixels.
* **10 fine centre patterns per shape** (subtle): a 4x4 binary pattern in the centre at
  intensity 0.5-0.8. Each shape has its **own** 10 patterns (drawn once from
  ``PATTERN_SEED``; any two of a shape differ in at least ``MIN_HAMMING`` = 4 of 16 pixels),
  so a network that tells all 100 classes apart needs 100 pattern detectors, while a
  specialist for one shape needs only its 10.
* **±1 px shifts** of the whole image (shape and pattern together, zero fill), and
  Gaussian pixel **noise** (sigma ``--noise``, default 0.15), clipped to [0, 1], stored as uint8.

Class ``y = 10 * shape + pattern``; the true groups are the shapes, ``{10 s .. 10 s + 9}``,
written to the .npz as ``groups`` (a string in ``--groups`` syntax) beside the arrays kdens
reads (``x_train`` (N, 16, 16) uint8, ``y_train`` (N,) int64, ``x_test``, ``y_test``). The
class patterns depend only on ``PATTERN_SEED``; ``--seed`` draws the examples, so the train
and test splits (and an unlabeled transfer set, ``--unlabeled N``) come from one distribution.

    python bench/many_class.py --out data/many-class.npz                     # 20,000 / 5,000
    python bench/many_class.py --out data/many-class-unlabeled.npz --unlabeled 40000 --seed 7
    kdens train-generalist --data data/many-class.npz --model mlp --model-arg hidden=32 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SIZE = 16
SHAPES = 10
PATTERNS = 10  # per shape
PATTERN_SEED = 17  # fixes the classes themselves; --seed only draws examples
MIN_HAMMING = 4
CENTRE = slice(6, 10)  # the 4x4 pattern's rows and columns
SHAPE_NAMES = ["square", "ring", "diamond", "hbars", "vbars", "corners", "gamma", "diagonals", "dashed", "double"]


def shape_masks() -> np.ndarray:
    """The 10 coarse outlines, (10, 16, 16) bool; none touches rows/cols 5..10."""
    r, c = np.mgrid[0:SIZE, 0:SIZE]
    dy, dx = r - 7.5, c - 7.5
    cheb, manh, rad = np.maximum(abs(dy), abs(dx)), abs(dy) + abs(dx), np.hypot(dy, dx)
    border = cheb == 5.5  # square outline through rows/cols 2 and 13
    masks = [
        border,
        (rad >= 5.6) & (rad < 6.6),
        (manh >= 8.5) & (manh < 9.6),
        ((r == 2) | (r == 13)) & (c >= 2) & (c <= 13),
        ((c == 2) | (c == 13)) & (r >= 2) & (r <= 13),
        border & ((abs(dy) >= 3.5) & (abs(dx) >= 3.5)),
        ((r == 2) & (c >= 2) & (c <= 13)) | ((c == 2) & (r >= 2) & (r <= 13)),
        (abs(abs(dy) - abs(dx)) < 0.6) & (cheb >= 3.4) & (cheb <= 6.6),
        border & (((r + c) % 3) != 0),
        border | (cheb == 6.5),
    ]
    out = np.stack(masks)
    assert not out[:, 5:11, 5:11].any(), "a shape touches the centre"
    return out


def class_patterns(seed: int = PATTERN_SEED) -> np.ndarray:
    """(10 shapes, 10 patterns, 4, 4) bool: each shape's own patterns, pairwise Hamming >= MIN_HAMMING."""
    rng = np.random.default_rng(seed)
    out = np.zeros((SHAPES, PATTERNS, 4, 4), bool)
    for s in range(SHAPES):
        chosen: list[np.ndarray] = []
        while len(chosen) < PATTERNS:
            p = rng.random(16) < 0.5
            if 5 <= p.sum() <= 11 and all((p != q).sum() >= MIN_HAMMING for q in chosen):
                chosen.append(p)
        out[s] = np.stack(chosen).reshape(PATTERNS, 4, 4)
    return out


def make(n: int, seed: int, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples, classes uniform: (x (n, 16, 16) uint8, y (n,) int64)."""
    rng = np.random.default_rng(seed)
    masks, pats = shape_masks(), class_patterns()
    y = rng.integers(0, SHAPES * PATTERNS, n)
    s, p = y // PATTERNS, y % PATTERNS
    img = masks[s] * rng.uniform(0.6, 1.0, (n, 1, 1))  # (n, 16, 16)
    img[:, CENTRE, CENTRE] = pats[s, p] * rng.uniform(0.5, 0.8, (n, 1, 1))
    shift = rng.integers(-1, 2, (n, 2))
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)))
    rows = np.arange(SIZE)[None, :] + 1 - shift[:, :1]  # (n, 16)
    cols = np.arange(SIZE)[None, :] + 1 - shift[:, 1:]
    img = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    img = np.clip(img + rng.normal(0.0, noise, img.shape), 0.0, 1.0)
    return np.round(img * 255).astype(np.uint8), y.astype(np.int64)


def true_groups() -> str:
    """The shapes as ``--groups`` text: "0,...,9;10,...,19;..."."""
    return ";".join(",".join(str(PATTERNS * s + k) for k in range(PATTERNS)) for s in range(SHAPES))


def write(out: Path, n_train: int, n_test: int, seed: int, noise: float) -> Path:
    x_train, y_train = make(n_train, seed, noise)
    x_test, y_test = make(n_test, seed + 1_000_003, noise)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                        groups=np.array(true_groups()), noise=np.array(noise), seed=np.array(seed))
    return out


def write_unlabeled(out: Path, n: int, seed: int, noise: float) -> Path:
    """Extra inputs without labels for ``kdens distill --transfer unlabeled=PATH`` (key ``x``)."""
    x, _ = make(n, seed, noise)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, x=x)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the .npz to write")
    ap.add_argument("--train", type=int, default=20_000, help="training examples [20000]")
    ap.add_argument("--test", type=int, default=5_000, help="test examples [5000]")
    ap.add_argument("--noise", type=float, default=0.15, help="Gaussian pixel noise sigma [0.15]")
    ap.add_argument("--seed", type=int, default=0, help="draws the examples (not the classes) [0]")
    ap.add_argument("--unlabeled", type=int, default=0, metavar="N",
                    help="write N unlabeled inputs (key x) instead of a labelled set")
    args = ap.parse_args(argv)
    if args.unlabeled:
        print(write_unlabeled(args.out, args.unlabeled, args.seed, args.noise))
    else:
        print(write(args.out, args.train, args.test, args.seed, args.noise))


if __name__ == "__main__":
    main()
