"""Datasets: scikit-learn's digits (embedded), MNIST and Fashion-MNIST (fetched once, verified and
cached by :mod:`kdens.datasets`), MNIST-format IDX folders, .npz files.

Every dataset comes back as a :class:`Dataset` of float32 images (N, 1, H, W) in [0, 1]
and int64 labels, with a seeded, stratified validation split carved from the training
set and a fingerprint (sha256 of the arrays and the split) that goes into manifests.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdens import datasets
from kdens.datasets import IDX_FILES
from kdens.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
NAMED_CLASSES = {"mnist": [str(i) for i in range(10)], "fashion-mnist": FASHION_MNIST_CLASSES}
"""Class names of the datasets kdens.datasets fetches by name."""
DATA_SPECS_HELP = (
    "'digits', 'mnist', 'fashion-mnist' (fetched once into $KDENS_DATA, default ~/.cache/kdens), "
    "a folder of MNIST-format IDX files, or an .npz with x_train, y_train, x_test, y_test"
)


@dataclass(frozen=True)
class Dataset:
    """Train / validation / test arrays plus what is known about the classes."""

    name: str
    x_train: np.ndarray  # (N, 1, H, W) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int64
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    fingerprint: str
    split: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "fingerprint": self.fingerprint,
            "split": self.split,
        }


# ---------------------------------------------------------------- IDX parsing

_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse one IDX file (the MNIST format), checking magic, dims and byte count."""
    if len(raw) < 4:
        raise DataError(f"{source}: {len(raw)} bytes is too short to be an IDX file")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{source}: bad IDX magic {raw[:4].hex()} (expected 0000 then type and rank); "
            "is this an MNIST-format file?"
        )
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{source}: IDX element type 0x{raw[2]:02x} unsupported (only 0x08 unsigned byte)")
    ndim = raw[3]
    if ndim not in (1, 3):
        raise DataError(f"{source}: IDX rank {ndim} unsupported (labels have rank 1, images rank 3)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{source}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{source}: IDX file {what}: dims {dims} need {expected} bytes, file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _read_maybe_gz(folder: Path, stem: str) -> tuple[bytes, str]:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.exists():
            try:
                data = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
            except (OSError, EOFError) as e:
                raise DataError(f"{p}: cannot decompress ({e}); the file is corrupt, re-fetch it") from None
            return data, str(p)
    raise DataError(f"{folder} has no {stem} (or {stem}.gz); an IDX folder needs {', '.join(IDX_FILES.values())}")


def load_idx_folder(folder: Path) -> dict[str, np.ndarray]:
    """Read the four MNIST-format files of ``folder`` and check they fit together."""
    return idx_arrays({stem: _read_maybe_gz(folder, stem) for stem in IDX_FILES.values()}, str(folder))


def idx_arrays(raws: Mapping[str, tuple[bytes, str]], where: str) -> dict[str, np.ndarray]:
    """Parse the four IDX files (stem -> (bytes, source)) and check they fit together.

    Shared by IDX folders and named datasets, whose bytes come from kdens.datasets already
    verified (reading them a second time from disk would only double the I/O).
    """
    arrays = {}
    for key, stem in IDX_FILES.items():
        raw, src = raws[stem]
        arr = parse_idx(raw, src)
        want = 3 if key.startswith("x") else 1
        if arr.ndim != want:
            raise DataError(f"{src}: expected rank {want} for {key}, got shape {arr.shape}")
        arrays[key] = arr
    for split in ("train", "test"):
        nx, ny = len(arrays[f"x_{split}"]), len(arrays[f"y_{split}"])
        if nx != ny:
            raise DataError(f"{where}: {split} has {nx} images but {ny} labels")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{where}: train images are {arrays['x_train'].shape[1:]} but test images "
            f"{arrays['x_test'].shape[1:]}"
        )
    return arrays


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in IDX_FILES if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (has {', '.join(z.files) or 'nothing'})")
            arrays = {k: np.asarray(z[k]) for k in IDX_FILES}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} rows but y_{split} {len(y)}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} must be a 1-D integer array, got {y.dtype} {y.shape}")
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{path}: x_{split} must be (N, D), (N, H, W) or (N, C, H, W), got {x.shape}")
    return arrays


# ---------------------------------------------------------------- normalisation and splits


def _to_images(x: np.ndarray, source: str) -> np.ndarray:
    """(N, H, W) / (N, C, H, W) / (N, D) → float32 (N, C, H, W) in [0, 1]."""
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"{source}: float pixel values span [{lo:.3g}, {hi:.3g}]; scale them to [0, 1] "
                "(or store uint8 0–255)"
            )
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise DataError(f"{source}: flat rows of {x.shape[1]} values are not a square image")
        x = x.reshape(len(x), 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    if not np.isfinite(x).all():
        raise DataError(f"{source}: images contain NaN or inf")
    return np.ascontiguousarray(x)


def stratified_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified ``fraction`` of ``y`` (>= 1 per class)."""
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction {fraction} must be in (0, 1]")
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(idx))))
        keep.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def _fingerprint(arrays: dict[str, np.ndarray], split: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    h.update(repr(sorted(split.items())).encode())
    return h.hexdigest()


def _build(name: str, raw: dict[str, np.ndarray], class_names: list[str] | None,
           source: str, val_fraction: float, split_seed: int) -> Dataset:
    y_train = raw["y_train"].astype(np.int64)
    y_test = raw["y_test"].astype(np.int64)
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) == 0:
            raise DataError(f"{source}: the {split} split is empty")
        if y.min() < 0:
            raise DataError(f"{source}: negative label {int(y.min())} in the {split} split")
    num_classes = len(class_names) if class_names else int(y_train.max()) + 1
    for split, y in (("train", y_train), ("test", y_test)):
        if y.max() >= num_classes:
            raise DataError(
                f"{source}: label {int(y.max())} in the {split} split is out of range "
                f"for {num_classes} classes (0..{num_classes - 1})"
            )
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1)")
    split = {"val_fraction": val_fraction, "split_seed": split_seed}
    fingerprint = _fingerprint(raw, split)
    x_train = _to_images(raw["x_train"], source)
    x_test = _to_images(raw["x_test"], source)
    if val_fraction > 0:
        val_idx = stratified_subset(y_train, val_fraction, split_seed)
        mask = np.ones(len(y_train), bool)
        mask[val_idx] = False
        tr_idx = np.flatnonzero(mask)
    else:
        val_idx, tr_idx = np.array([], np.int64), np.arange(len(y_train))
    return Dataset(
        name=name,
        x_train=x_train[tr_idx], y_train=y_train[tr_idx],
        x_val=x_train[val_idx], y_val=y_train[val_idx],
        x_test=x_test, y_test=y_test,
        class_names=class_names or [str(c) for c in range(num_classes)],
        fingerprint=fingerprint,
        split=split,
    )


def _digits_raw() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # (1797, 8, 8), pixel values 0..16
    y = d.target.astype(np.int64)
    # digits ships no test split: hold out a fixed, stratified 20% (seed 0, never the run seed)
    test_idx = stratified_subset(y, 0.2, seed=0)
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return {"x_train": x[mask], "y_train": y[mask], "x_test": x[test_idx], "y_test": y[test_idx]}


def load_dataset(spec: str, *, val_fraction: float = 0.1, split_seed: int = 0) -> Dataset:
    """Load a dataset by spec: 'digits', 'mnist', 'fashion-mnist', an IDX folder or an .npz file.

    Args:
        spec: what to load (see ``DATA_SPECS_HELP``).
        val_fraction: share of the training set held out, stratified, for validation.
        split_seed: seed of that split; fixed across stages so every stage sees the same
            validation examples (never the run's training seed).
    """
    spec = str(spec)
    if spec == "digits":
        return _build("digits", _digits_raw(), [str(i) for i in range(10)], "digits", val_fraction, split_seed)
    if spec in NAMED_CLASSES:  # a named dataset wins over a folder of the same name: pass ./mnist for that
        raws = datasets.fetch(spec)
        where = str(Path(raws[IDX_FILES["x_train"]][1]).parent)
        return _build(spec, idx_arrays(raws, where), NAMED_CLASSES[spec], where, val_fraction, split_seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _build(path.name, load_idx_folder(path), None, str(path), val_fraction, split_seed)
    if path.suffix == ".npz" and path.is_file():
        return _build(path.stem, _load_npz(path), None, str(path), val_fraction, split_seed)
    if not path.exists():
        raise DataError(f"--data {spec!r}: no such dataset, folder or file; use {DATA_SPECS_HELP}")
    raise DataError(f"--data {spec!r}: unsupported file type; use {DATA_SPECS_HELP}")


def load_unlabeled(path: Path) -> np.ndarray:
    """Images from an .npz with ``x`` (or ``x_train``) or an IDX images file: float32 (N,1,H,W)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"unlabeled set {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            key = "x" if "x" in z.files else "x_train" if "x_train" in z.files else None
            if key is None:
                raise DataError(f"{path} has no 'x' (or 'x_train') array; it has {', '.join(z.files)}")
            return _to_images(np.asarray(z[key]), str(path))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    arr = parse_idx(raw, str(path))
    if arr.ndim != 3:
        raise DataError(f"{path}: expected an IDX images file (rank 3), got rank {arr.ndim}")
    return _to_images(arr, str(path))
