"""Users' own data: CSV files, image folders, and labels of any values.

Each loader returns raw arrays ``{x_train, y_train, x_test, y_test}`` plus class names, for
:func:`kdens.data.load_dataset` to split, check and fingerprint like every other dataset:

- **CSV** (``train.csv`` split by a seeded, stratified test fraction, or ``train.csv,test.csv``):
  a header row, numeric feature columns, and a label column (``--label-column``, default the
  last one). Features come back as ``(N, D)`` float32 in their natural range.
- **Image folders**: ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``, or one
  ``DIR/<class>/*`` tree split by the same seeded, stratified test fraction. PNG, JPEG and BMP
  are decoded with Pillow; grey images stay one channel, colour ones three (RGB); all images
  must share one size unless ``--image-size H,W`` resizes them. Images come back as uint8
  ``(N, C, H, W)``, decoded one by one into a preallocated array; a split larger than
  :data:`IN_MEMORY_BYTES` is decoded once into a cached .npy file and comes back memory-mapped.

Labels of any values (integers, strings) map to 0..C-1 in sorted order, and the original
values become the class names. What cannot be taken is refused by name: a non-numeric
feature column, an unreadable image, fractional labels, a single class, a test class never
seen in training.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np

from kdens.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IN_MEMORY_BYTES = 1 << 30
"""Decoded image splits up to this size are kept in memory; larger ones are decoded once into
``$KDENS_DATA/decoded/`` and read memory-mapped, batch by batch (``kdens.mapped``)."""


def map_labels(y_train: np.ndarray, y_test: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels of any values -> int64 0..C-1 (sorted order) and the class names they had.

    Raises:
        DataError: fractional float labels, one class only, or a test label never seen in training.
    """
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    for split, y in (("train", y_train), ("test", y_test)):
        if y.ndim != 1:
            raise DataError(f"{source}: {split} labels must be one value per example, got shape {y.shape}")
        if np.issubdtype(y.dtype, np.floating):
            if not np.isfinite(y).all() or not (y == np.round(y)).all():
                bad = y[~np.isfinite(y) | (y != np.round(y))].tolist()[0]
                raise DataError(f"{source}: {split} label {bad!r} is not a class: labels must be integers or "
                                "names, not fractions (for regression targets kdens has no loss)")
    if np.issubdtype(y_train.dtype, np.floating):
        y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)
    if y_train.dtype.kind in "US" or y_test.dtype.kind in "US" or y_train.dtype == object:
        y_train, y_test = y_train.astype(str), y_test.astype(str)
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise DataError(f"{source}: the training split has a single class ({classes.tolist()[0]!r} only); a classifier "
                        "needs at least two")
    unseen = sorted(set(np.unique(y_test).tolist()) - set(classes.tolist()))
    if unseen:
        raise DataError(f"{source}: test label(s) {', '.join(map(repr, unseen[:5]))} never occur in training; "
                        "every test class needs training examples")
    names = [str(c) for c in classes.tolist()]
    return (np.searchsorted(classes, y_train).astype(np.int64), np.searchsorted(classes, y_test).astype(np.int64),
            names)


def split_by_fraction(y: np.ndarray, test_fraction: float, seed: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a seeded, class-stratified test share of every class."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction {test_fraction} must be in (0, 1), e.g. 0.2")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = int(round(test_fraction * len(idx)))
        if n == 0 or n == len(idx):
            raise DataError(f"{source}: class {c!r} has {len(idx)} example(s); --test-fraction {test_fraction} "
                            "leaves none for training or none for testing; add examples or pass a test file")
        test.append(rng.choice(idx, size=n, replace=False))
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


# ---------------------------------------------------------------- CSV

def _read_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(features (N, D) float32, labels as text, the label column's name) of one CSV file."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as CSV text ({e})") from None
    rows = [r for r in rows if r and any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    label = header[-1] if label_column is None else label_column
    if label not in header:
        raise DataError(f"{path}: --label-column {label!r} is not a column; columns: {', '.join(header)}")
    li = header.index(label)
    body = rows[1:]
    for n, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {n} has {len(r)} fields, the header {len(header)}")
    features = [j for j in range(len(header)) if j != li]
    if not features:
        raise DataError(f"{path}: no feature columns besides the label column {label!r}")
    x = np.empty((len(body), len(features)), np.float32)
    for k, j in enumerate(features):
        col = [r[j].strip() for r in body]
        try:
            x[:, k] = np.asarray(col, dtype=np.float64)
        except ValueError:
            bad = next(v for v in col if not _is_number(v))
            raise DataError(f"{path}: column {header[j]!r} is not numeric (value {bad!r}); encode it as numbers "
                            f"or drop it (the label column is {label!r}; choose another with --label-column)") from None
    if not np.isfinite(x).all():
        r, c = np.argwhere(~np.isfinite(x))[0]
        raise DataError(f"{path}: column {header[features[c]]!r} holds NaN or inf (line {r + 2}); fill or drop it")
    return x, np.asarray([r[li].strip() for r in body]), label


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _numeric_labels(y: np.ndarray) -> np.ndarray:
    """Text labels that are all numbers become numbers (so 1..10 sort as numbers, not as text)."""
    try:
        values = y.astype(np.float64)
    except ValueError:
        return y
    return values


def load_csv(spec: str, *, label_column: str | None, test_fraction: float, seed: int) -> dict:
    """``train.csv`` (split by ``test_fraction``) or ``train.csv,test.csv`` -> raw arrays and class names."""
    parts = [Path(p.strip()).expanduser() for p in str(spec).split(",")]
    for p in parts:
        if not p.is_file():
            raise DataError(f"--data {spec!r}: {p} does not exist")
    x, y, label = _read_csv(parts[0], label_column)
    if len(parts) == 2:
        xt, yt, _ = _read_csv(parts[1], label)
        if xt.shape[1] != x.shape[1]:
            raise DataError(f"--data {spec!r}: {parts[1]} has {xt.shape[1]} feature columns, {parts[0]} "
                            f"{x.shape[1]}; they must match")
    elif len(parts) == 1:
        yn = _numeric_labels(y)
        tr, te = split_by_fraction(yn, test_fraction, seed, str(parts[0]))
        x, xt, y, yt = x[tr], x[te], y[tr], y[te]
    else:
        raise DataError(f"--data {spec!r}: give one CSV (split by --test-fraction) or train.csv,test.csv")
    y_train, y_test, names = map_labels(_numeric_labels(y), _numeric_labels(yt), str(parts[0]))
    return {"x_train": x, "y_train": y_train, "x_test": xt, "y_test": y_test, "class_names": names}


# ---------------------------------------------------------------- image folders

def is_image_folder(path: Path) -> bool:
    """A folder of class sub-folders holding images (directly, or under train/ and test/)."""
    path = Path(path)
    roots = [path / "train"] if (path / "train").is_dir() else [path]
    for root in roots:
        for sub in root.iterdir():
            if sub.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir()):
                return True
    return False


def _images_of(root: Path) -> list[tuple[Path, str]]:
    files = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files += [(f, sub.name) for f in sorted(sub.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders <class>/")
    return files


def _decode_one(path: Path, size: tuple[int, int] | None, channels: int) -> np.ndarray:
    """One image -> uint8 (C, H, W) in ``channels`` (resized to ``size`` if given)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read this image ({e}); fix or remove it") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode(files: list[tuple[Path, str]], size: tuple[int, int] | None, channels: int,
            cache: Path | None = None) -> np.ndarray:
    """Decode images to uint8 (N, C, H, W); one size for all (resized to ``size`` if given).

    Each image is written into its row of one preallocated array as it is decoded, never
    gathered in a list first: in memory when the array is at most :data:`IN_MEMORY_BYTES`,
    else into ``cache`` (an .npy file, written under a temporary name and moved into place
    when complete), which is returned memory-mapped.
    """
    first = _decode_one(files[0][0], size, channels)
    shape = (len(files), *first.shape)
    if cache is not None and cache.is_file():
        out = np.load(cache, mmap_mode="r")
        if out.shape == shape and out.dtype == np.uint8:
            return out
    big = cache is not None and int(np.prod(shape)) > IN_MEMORY_BYTES
    if big:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    else:
        out = np.empty(shape, np.uint8)
    try:
        for i, (path, _) in enumerate(files):
            a = first if i == 0 else _decode_one(path, size, channels)
            if a.shape != first.shape:
                raise DataError(f"{path} is {a.shape[2]}x{a.shape[1]} but {files[0][0]} is "
                                f"{first.shape[2]}x{first.shape[1]}; pass --image-size H,W to resize them all")
            out[i] = a
        if big:
            out.flush()
            del out  # close the map before the file moves
            os.replace(tmp, cache)
    except BaseException:
        if big:
            tmp.unlink(missing_ok=True)
        raise
    return np.load(cache, mmap_mode="r") if big else out


def decoded_cache(files: list[tuple[Path, str]], size: tuple[int, int] | None, channels: int) -> Path:
    """Where a large image folder's decoded split is kept: ``$KDENS_DATA/decoded/<key>.npy``, the key
    naming every file (path, size, modification time), the size asked for and the channels."""
    from kdens.datasets import data_root

    h = hashlib.sha256(repr((size, channels)).encode())
    for path, label in files:
        st = path.stat()
        h.update(f"{path.resolve()}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return data_root() / "decoded" / f"{h.hexdigest()}.npy"


def _channels(files: list[tuple[Path, str]]) -> int:
    """1 when every image is grey, else 3: a folder mixing both is read as colour."""
    from PIL import Image

    for path, _ in files:
        try:
            with Image.open(path) as im:
                if im.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
        except OSError:
            continue  # named when decoded
    return 1


def load_image_folder(path: Path, *, image_size: tuple[int, int] | None, test_fraction: float, seed: int) -> dict:
    """An image folder -> raw uint8 arrays (N, C, H, W) and class names (the sub-folders' names)."""
    path = Path(path)
    if (path / "train").is_dir():
        if not (path / "test").is_dir():
            raise DataError(f"{path} has train/ but no test/; add test/<class>/ images or put the classes "
                            "directly under it to split them by --test-fraction")
        train, test = _images_of(path / "train"), _images_of(path / "test")
    else:
        files = _images_of(path)
        labels = np.asarray([c for _, c in files])
        tr, te = split_by_fraction(labels, test_fraction, seed, str(path))
        train, test = [files[i] for i in tr], [files[i] for i in te]
    channels = _channels(train + test)
    x_train = _decode(train, image_size, channels, decoded_cache(train, image_size, channels))
    x_test = _decode(test, image_size, channels, decoded_cache(test, image_size, channels))
    if x_test.shape[1:] != x_train.shape[1:]:
        raise DataError(f"{path}: test images are {x_test.shape[1:]} but training images {x_train.shape[1:]}; "
                        "pass --image-size H,W")
    y_train, y_test, names = map_labels(np.asarray([c for _, c in train]), np.asarray([c for _, c in test]),
                                        str(path))
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "class_names": names}


def parse_image_size(value) -> tuple[int, int] | None:
    """``"H,W"`` (or ``[H, W]``) -> (H, W); None stays None."""
    if value in (None, ""):
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        h, w = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise DataError(f"--image-size {value!r} must be H,W in pixels, e.g. 32,32") from None
    if h < 1 or w < 1:
        raise DataError(f"--image-size {value!r} must be positive, e.g. 32,32")
    return h, w
