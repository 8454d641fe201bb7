"""Write small stand-ins for a user's own data, for the README's "Your own data and teacher" commands.

    python examples/make_own_data.py own-data

makes ``own-data/photos/<class>/*.png`` (colour 16x16 images of three shapes, slightly
noisy and shifted) and ``own-data/sensors.csv`` (five sensor readings in their natural units
and a text label). Seeded: the same files every time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("ring", "bar", "cross")


def _shape(kind: str, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[:16, :16]
    dy, dx = rng.integers(-2, 3, 2)
    cy, cx = 7.5 + dy, 7.5 + dx
    if kind == "ring":
        r = np.hypot(y - cy, x - cx)
        mask = (r > 3) & (r < 6)
    elif kind == "bar":
        mask = np.abs(y - cy) < 2
    else:
        mask = (np.abs(y - cy) < 1.5) | (np.abs(x - cx) < 1.5)
    colour = rng.uniform(0.4, 1.0, 3)
    img = mask[..., None] * colour + rng.normal(0, 0.08, (16, 16, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def photos(root: Path, per_class: int, rng: np.random.Generator) -> None:
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_shape(kind, rng)).save(root / kind / f"{i:03d}.png")


def sensors(path: Path, n: int, rng: np.random.Generator) -> None:
    state = rng.integers(0, 3, n)
    temp = 20 + 15 * state + rng.normal(0, 10, n)             # degrees C
    pressure = 101_000 - 900 * state + rng.normal(0, 900, n)  # Pa
    vibration = 0.002 * (1 + state) + rng.normal(0, 0.0008, n)  # g
    humidity = rng.uniform(20, 80, n)                         # %, uninformative
    current = 3 + 0.5 * (state == 2) + rng.normal(0, 0.3, n)  # A
    names = np.array(["idle", "running", "overheating"])[state]
    lines = ["temperature,pressure,vibration,humidity,current,state"]
    lines += [f"{a:.2f},{b:.1f},{c:.5f},{d:.1f},{e:.3f},{s}"
              for a, b, c, d, e, s in zip(temp, pressure, vibration, humidity, current, names)]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", default=Path("own-data"), help="folder to write into [own-data]")
    p.add_argument("--per-class", type=int, default=120)
    p.add_argument("--rows", type=int, default=1500)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    photos(a.out / "photos", a.per_class, rng)
    sensors(a.out / "sensors.csv", a.rows, rng)
    print(f"wrote {a.out / 'photos'} ({len(SHAPES)} classes x {a.per_class} images) and {a.out / 'sensors.csv'}")


if __name__ == "__main__":
    main()
