"""Datasets: scikit-learn's digits (embedded), MNIST and Fashion-MNIST (fetched once, verified and
cached by :mod:`kdens.datasets`), MNIST-format IDX folders, .npz files.

Every dataset comes back as a :class:`Dataset` of float32 inputs, images (N, C, H, W) or
feature vectors (N, D), and int64 labels 0..C-1, with a seeded, stratified validation split
carved from the training set, the per-channel or per-feature normalization the models apply
(when the inputs need one), and a fingerprint (sha256 of the arrays and the split) that goes
into manifests. Users' CSV files and image folders are read by :mod:`kdens.loaders`.
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
from kdens.mapped import float_chunks, hash_array, is_npy_folder, load_npy_folder, mapped_input, moments

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
NAMED_CLASSES = {"mnist": [str(i) for i in range(10)], "fashion-mnist": FASHION_MNIST_CLASSES}
"""Class names of the datasets kdens.datasets fetches by name."""
DATA_SPECS_HELP = (
    "'digits', 'mnist', 'fashion-mnist' (fetched once into $KDENS_DATA, default ~/.cache/kdens), "
    "a folder of MNIST-format IDX files, an image folder (DIR/<class>/*.png, or DIR/train/ and DIR/test/), "
    "an .npz with x_train, y_train, x_test, y_test (or a folder of those four as .npy files, read memory-mapped), "
    "or a CSV (train.csv or train.csv,test.csv)"
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
    layout: str = "nchw"
    """How the user's arrays were laid out: nchw, nhwc (images; stored here as NCHW) or features."""
    normalization: dict | None = None
    """Per-channel (images) or per-feature mean and std of the training split, applied inside every
    model built on this data (``kdens.models.build_model(input_norm=...)``); None: inputs are used
    as they are (uint8 images scaled to [0, 1], or floats already in [0, 1])."""
    raw_input: dict | None = None
    """How the user's arrays looked (shape, layout, dtype, range; :func:`kdens.raw_input.describe`):
    what exported artifacts take."""
    train_rows: np.ndarray | None = None
    """Where each ``x_train`` row sits in the training set as loaded, before the validation split
    (so precomputed teacher scores in that order can be matched to it); None: in order."""
    val_rows: np.ndarray | None = None
    """The same for ``x_val``."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

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
            "layout": self.layout,
            "normalization": self.normalization,
            "raw_input": self.raw_input,
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
        if y.ndim != 1:
            raise DataError(f"{path}: y_{split} must hold one label per example, got shape {y.shape}")
        if x.ndim not in (2, 3, 4):
            raise DataError(f"{path}: x_{split} must be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C), "
                            f"got {x.shape}")
    return arrays


# ---------------------------------------------------------------- normalisation and splits


LAYOUTS = ("auto", "nchw", "nhwc", "features")


def resolve_layout(shape: tuple[int, ...], layout: str, source: str) -> str:
    """The layout of arrays of ``shape`` (N, ...): the one given, or, for ``auto``, the only reading.

    ``auto`` decides only when the shape is unambiguous: 2-D arrays are feature vectors, 3-D
    ones grey images (N, H, W); a 4-D array is NHWC when its last axis is 1, 3 or 4 and smaller
    than both image axes, NCHW when its second axis is; anything else stops, naming the shape.
    """
    if layout not in LAYOUTS:
        raise DataError(f"--layout {layout!r} unknown; valid: {', '.join(LAYOUTS)}")
    nd = len(shape)
    if layout == "features":
        if nd != 2:
            raise DataError(f"{source}: --layout features needs (N, D) arrays, got {shape}")
        return layout
    if layout in ("nchw", "nhwc"):
        if nd != 4:
            raise DataError(f"{source}: --layout {layout} needs 4-D arrays, got {shape}")
        return layout
    if nd == 2:
        return "features"
    if nd == 3:
        return "nchw"  # (N, H, W): one grey channel, added below
    nhwc = shape[3] in (1, 3, 4) and shape[3] < min(shape[1], shape[2])
    nchw = shape[1] in (1, 3, 4) and shape[1] < min(shape[2], shape[3])
    if nhwc != nchw:
        return "nhwc" if nhwc else "nchw"
    raise DataError(f"{source}: cannot tell the layout of arrays shaped {shape}: pass --layout nchw "
                    "(N, C, H, W) or --layout nhwc (N, H, W, C)")


def _to_model_input(x: np.ndarray, layout: str, source: str) -> np.ndarray:
    """The user's array in ``layout`` -> float32 features (N, D) or images (N, C, H, W).

    uint8 images are scaled to [0, 1]; other values are kept as they are (a run whose inputs
    are not in [0, 1] standardises them inside its models, see :func:`normalization`).
    """
    if layout == "features":
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{source}: features must be numbers, got {x.dtype}")
        out = x.astype(np.float32)
    else:
        if x.ndim == 3:
            x = x[:, None]
        elif layout == "nhwc":
            x = x.transpose(0, 3, 1, 2)
        out = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{source}: the inputs contain NaN or inf; fill or drop those examples")
    return np.ascontiguousarray(out)


def normalization(x_train: np.ndarray, layout: str) -> dict | None:
    """Mean and std of the training split per feature or per channel, when inputs need them.

    Features always do (their natural ranges differ); images only when they are not uint8 or
    [0, 1] floats. A constant feature or channel gets std 1 (it then only shifts).
    """
    axes = (0,) if layout == "features" else (0, 2, 3)
    # one pass, chunk by chunk (in memory too: the float64 temporaries stay small), cut at the
    # same rows whether the split is in memory or memory-mapped, so both get the same numbers
    mean, std, lo, hi, _ = moments(float_chunks(x_train), axes)
    if layout != "features" and lo >= 0.0 and hi <= 1.0:
        return None
    std[std < 1e-12] = 1.0
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "over": "train split",
            "per": "feature" if layout == "features" else "channel"}


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
        a = arrays[k]
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        hash_array(h, a)  # in chunks: the same digest as the whole array's bytes, without a copy of it
    h.update(repr(sorted(split.items())).encode())
    return h.hexdigest()


def _build(name: str, raw: dict[str, np.ndarray], class_names: list[str] | None,
           source: str, val_fraction: float, split_seed: int, layout: str = "auto",
           channel_order: str | None = None) -> Dataset:
    from kdens.loaders import map_labels
    from kdens.raw_input import describe

    raw = {k: raw[k] for k in IDX_FILES}
    for split in ("train", "test"):
        if len(raw[f"y_{split}"]) == 0:
            raise DataError(f"{source}: the {split} split is empty")
        if len(raw[f"x_{split}"]) != len(raw[f"y_{split}"]):
            raise DataError(f"{source}: x_{split} has {len(raw[f'x_{split}'])} rows but y_{split} "
                            f"{len(raw[f'y_{split}'])} labels")
    if raw["x_train"].shape[1:] != raw["x_test"].shape[1:]:
        raise DataError(f"{source}: training examples are shaped {raw['x_train'].shape[1:]} but test examples "
                        f"{raw['x_test'].shape[1:]}; they must match (same size, same channels)")
    if class_names is None:  # labels of any values -> 0..C-1, their values kept as names
        y_train, y_test, class_names = map_labels(raw["y_train"], raw["y_test"], source)
    else:
        y_train, y_test = raw["y_train"].astype(np.int64), raw["y_test"].astype(np.int64)
        for split, y in (("train", y_train), ("test", y_test)):
            if y.min() < 0 or y.max() >= len(class_names):
                raise DataError(f"{source}: label {int(y.max())} in the {split} split is out of range "
                                f"for {len(class_names)} classes (0..{len(class_names) - 1})")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1)")
    layout = resolve_layout(raw["x_train"].shape, layout, source)
    split = {"val_fraction": val_fraction, "split_seed": split_seed}
    if layout not in ("nchw",):  # a new reading of the same arrays is a different dataset
        split["layout"] = layout
    fingerprint = _fingerprint(raw, split)
    # memory maps (an .npy folder, a large image folder's decoded cache) stay on disk, read per batch
    x_train, x_test = (mapped_input(raw[k], layout, source) if isinstance(raw[k], np.memmap)
                       else _to_model_input(raw[k], layout, source) for k in ("x_train", "x_test"))
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
        class_names=list(class_names),
        fingerprint=fingerprint,
        split=split,
        layout=layout,
        normalization=normalization(x_train[tr_idx], layout),
        raw_input=describe(raw["x_train"], layout, channel_order),
        train_rows=tr_idx, val_rows=val_idx,
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


def load_dataset(spec: str, *, val_fraction: float = 0.1, split_seed: int = 0, layout: str = "auto",
                 label_column: str | None = None, test_fraction: float = 0.2, image_size=None) -> Dataset:
    """Load a dataset by spec: 'digits', 'mnist', 'fashion-mnist', an IDX folder, an image folder,
    an .npz file, or a CSV file (``train.csv`` or ``train.csv,test.csv``).

    Args:
        spec: what to load (see ``DATA_SPECS_HELP``).
        val_fraction: share of the training set held out, stratified, for validation.
        split_seed: seed of that split and of a test split carved by ``test_fraction``; fixed
            across stages so every stage sees the same examples (never the run's training seed).
        layout: auto, nchw, nhwc or features (see :func:`resolve_layout`).
        label_column: a CSV's label column (default: the last one).
        test_fraction: the test share carved, stratified, from a CSV or image folder without a
            test split of its own.
        image_size: ``"H,W"``: resize an image folder's images to this size.
    """
    from kdens import loaders

    spec = str(spec)
    if spec == "digits":
        return _build("digits", _digits_raw(), [str(i) for i in range(10)], "digits", val_fraction, split_seed,
                      layout)
    if spec in NAMED_CLASSES:  # a named dataset wins over a folder of the same name: pass ./mnist for that
        raws = datasets.fetch(spec)
        where = str(Path(raws[IDX_FILES["x_train"]][1]).parent)
        return _build(spec, idx_arrays(raws, where), NAMED_CLASSES[spec], where, val_fraction, split_seed, layout)
    first = Path(spec.split(",")[0].strip()).expanduser()
    if first.suffix.lower() == ".csv":
        raw = loaders.load_csv(spec, label_column=label_column, test_fraction=test_fraction, seed=split_seed)
        return _build(first.stem, raw, raw["class_names"], spec, val_fraction, split_seed,
                      "features" if layout == "auto" else layout)
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / stem).exists() or (path / f"{stem}.gz").exists() for stem in IDX_FILES.values()):
            return _build(path.name, load_idx_folder(path), None, str(path), val_fraction, split_seed, layout)
        if is_npy_folder(path):
            return _build(path.name, load_npy_folder(path), None, str(path), val_fraction, split_seed, layout)
        if loaders.is_image_folder(path):
            raw = loaders.load_image_folder(path, image_size=loaders.parse_image_size(image_size),
                                            test_fraction=test_fraction, seed=split_seed)
            return _build(path.name, raw, raw["class_names"], str(path), val_fraction, split_seed, layout,
                          channel_order="RGB")  # Pillow decodes colour images to RGB
        raise DataError(f"--data {spec!r}: a folder, but neither MNIST-format IDX files, x_train.npy (an .npy "
                        "folder) nor an image folder (DIR/<class>/*.png or DIR/train/<class>/* and DIR/test/<class>/*)")
    if path.suffix == ".npz" and path.is_file():
        return _build(path.stem, _load_npz(path), None, str(path), val_fraction, split_seed, layout)
    if not path.exists():
        raise DataError(f"--data {spec!r}: no such dataset, folder or file; use {DATA_SPECS_HELP}")
    raise DataError(f"--data {spec!r}: unsupported file type; use {DATA_SPECS_HELP}")


def resolve_spec(spec: str) -> str:
    """A data spec with its file or folder paths made absolute (named datasets stay names), so a
    run folder's manifest finds its data from any working directory."""
    spec = str(spec)
    if spec == "digits" or spec in NAMED_CLASSES:
        return spec
    parts = [p.strip() for p in spec.split(",")]
    if not all(Path(p).expanduser().exists() for p in parts):
        return spec  # not a path (or missing): load_dataset names it
    return ",".join(str(Path(p).expanduser().resolve()) for p in parts)


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
            x = np.asarray(z[key])
            return _to_model_input(x, resolve_layout(x.shape, "auto", str(path)), str(path))
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    arr = parse_idx(raw, str(path))
    if arr.ndim != 3:
        raise DataError(f"{path}: expected an IDX images file (rank 3), got rank {arr.ndim}")
    return _to_model_input(arr, "nchw", str(path))
