"""Data bigger than memory: ``.npy`` folders opened as read-only memory maps, read batch by batch.

A folder ``DIR`` holding ``x_train.npy``, ``y_train.npy``, ``x_test.npy`` and ``y_test.npy``
is opened with ``np.load(mmap_mode="r")``: the inputs stay on disk and only the labels
(one integer per example) are read into memory. :class:`MappedRows` stands where the
in-memory float32 arrays stand in a :class:`kdens.data.Dataset`: it knows its shape,
slicing or indexing it by rows gives another view (nothing is read), and a batch is read
when something asks for its values (``take``, ``np.asarray``) — rows in sorted order, then
converted exactly as the in-memory path converts whole arrays (NHWC to NCHW, uint8 / 255),
so both paths train the same model from the same seed.

Pages read through a memory map stay in the process's resident set until the map is
closed, and the kernel maps whole folios around each touched row, so an epoch of random
batches read through the map would bring the whole file in. Batches are therefore read
with positional reads of the file (sorted rows, one read per run of consecutive rows), and
the streaming passes with plain reads: both go through the page cache, which the kernel
reclaims, and the resident set stays at about one batch however large the file is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from kdens.errors import DataError

NPY_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy")
CHUNK_BYTES = 16 << 20
"""Bytes per chunk of the streaming passes (fingerprint, statistics, finite checks)."""


class _Source:
    """One ``.npy`` file: its memory map (shape, dtype, where the data starts) and a descriptor
    that batches are read through."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        self.row_bytes = int(np.prod(self.array.shape[1:], dtype=np.int64)) * self.array.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def rows(self, sorted_idx: np.ndarray) -> np.ndarray:
        """The rows ``sorted_idx`` (ascending), read with one positional read per run of consecutive rows.

        Reading through the map would be simpler, but every page a map has touched stays in
        the resident set until the map closes, and the kernel maps whole folios around each
        touched row: an epoch of random batches would bring the whole file in.
        """
        out = np.empty((len(sorted_idx), *self.array.shape[1:]), self.array.dtype)
        if not len(sorted_idx):
            return out
        buf = memoryview(out.reshape(-1).view(np.uint8))
        cuts = np.flatnonzero(np.diff(sorted_idx) != 1) + 1  # runs of consecutive rows
        for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(sorted_idx)]])):
            lo, hi = int(a) * self.row_bytes, int(b) * self.row_bytes
            pos = self.array.offset + int(sorted_idx[a]) * self.row_bytes
            while lo < hi:
                got = os.preadv(self._fd, [buf[lo:hi]], pos)
                if got <= 0:
                    raise DataError(f"{self.path}: the file ended early (truncated while in use?)")
                lo, pos = lo + got, pos + got
        return out


class MappedRows:
    """Rows of a memory-mapped array as the models see them: float32 (N, D) or (N, C, H, W).

    Args:
        source: the open ``.npy`` file.
        layout: ``features``, ``nchw`` or ``nhwc`` (see :func:`kdens.data.resolve_layout`).
        index: the source rows this view holds, in order (None: all of them).
    """

    def __init__(self, source: _Source, layout: str, index: np.ndarray | None = None):
        self._source = source
        self.layout = layout
        self.index = np.arange(len(source.array), dtype=np.int64) if index is None else index
        raw = source.array.shape
        if layout == "features":
            row = raw[1:]
        elif len(raw) == 3:
            row = (1, *raw[1:])
        elif layout == "nhwc":
            row = (raw[3], raw[1], raw[2])
        else:
            row = raw[1:]
        self.shape = (len(self.index), *(int(s) for s in row))
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)

    @property
    def raw(self) -> np.ndarray:
        """The memory-mapped array as stored (all rows, the user's layout and dtype)."""
        return self._source.array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.take(np.asarray([key]))[0]
        if isinstance(key, slice):
            return MappedRows(self._source, self.layout, self.index[key])
        key = np.asarray(key.cpu() if hasattr(key, "cpu") else key)
        if key.ndim == 1 and (key.dtype == bool or np.issubdtype(key.dtype, np.integer)):
            return MappedRows(self._source, self.layout, self.index[key])
        raise TypeError(f"MappedRows takes rows only (an int, a slice or a 1-D index array), not {key!r}")

    def take(self, idx) -> np.ndarray:
        """The values of rows ``idx`` of this view, float32, in the order given."""
        idx = np.asarray(idx.cpu() if hasattr(idx, "cpu") else idx, dtype=np.int64)
        rows = self.index[idx]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self.shape[1:]), np.float32)
        out[order] = self._convert(self._source.rows(rows[order]))  # sorted reads walk the file forwards
        return out

    def chunks(self, chunk_bytes: int = CHUNK_BYTES):
        """The view's values in consecutive float32 chunks of about ``chunk_bytes``."""
        for i in range(0, len(self), _float_rows(self.shape, chunk_bytes)):
            yield self.take(np.arange(i, min(i + _float_rows(self.shape, chunk_bytes), len(self))))

    def __array__(self, dtype=None, copy=None):
        # everything at once: correct, but the whole view in memory; the training loop and
        # the soft-target cache never ask for it (they read batches)
        out = np.concatenate(list(self.chunks())) if len(self) else np.empty(self.shape, np.float32)
        return out if dtype is None else out.astype(dtype)

    def _convert(self, x: np.ndarray) -> np.ndarray:
        # the same operations as kdens.data's whole-array conversion, so values match bit for bit
        if self.layout != "features":
            if x.ndim == 3:
                x = x[:, None]
            elif self.layout == "nhwc":
                x = x.transpose(0, 3, 1, 2)
            out = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        else:
            out = x.astype(np.float32)
        return np.ascontiguousarray(out)


def _float_rows(shape: tuple[int, ...], chunk_bytes: int) -> int:
    """Rows of float32 ``shape[1:]`` in a chunk of about ``chunk_bytes``."""
    return max(1, chunk_bytes // max(1, 4 * int(np.prod(shape[1:], dtype=np.int64))))


def float_chunks(x, chunk_bytes: int = CHUNK_BYTES):
    """Model inputs (float32, in memory or :class:`MappedRows`) in consecutive row chunks, cut at the
    same rows either way, so statistics over them are the same numbers whichever way the data came."""
    if isinstance(x, MappedRows):
        yield from x.chunks(chunk_bytes)
        return
    step = _float_rows(x.shape, chunk_bytes)
    for i in range(0, len(x), step):
        yield x[i:i + step]


def is_npy_folder(path: Path) -> bool:
    return (Path(path) / "x_train.npy").is_file()


def load_npy_folder(path: Path) -> dict:
    """``DIR/{x_train,y_train,x_test,y_test}.npy`` -> inputs as read-only memory maps, labels in memory."""
    path = Path(path)
    missing = [f for f in NPY_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path}: an .npy folder needs {', '.join(NPY_FILES)}; missing {', '.join(missing)}")
    out = {}
    for name in NPY_FILES:
        key = name[:-4]
        try:
            a = np.load(path / name, mmap_mode="r" if key.startswith("x") else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path / name}: not a readable .npy array ({e}); save it with numpy.save") from None
        if key.startswith("x"):
            if not a.flags.c_contiguous:  # read by rows: a Fortran-order file has no rows on disk
                raise DataError(f"{path / name} is stored in Fortran order; save it with "
                                "numpy.save(path, numpy.ascontiguousarray(x))")
            if a.ndim not in (2, 3, 4):
                raise DataError(f"{path / name} must be (N, D), (N, H, W), (N, C, H, W) or (N, H, W, C), "
                                f"got {a.shape}")
            if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
                raise DataError(f"{path / name}: inputs must be numbers, got {a.dtype}")
        out[key] = a
    for split in ("train", "test"):
        x, y = out[f"x_{split}"], out[f"y_{split}"]
        if y.ndim != 1:
            raise DataError(f"{path}: y_{split}.npy must hold one label per example, got shape {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split}.npy has {len(x)} rows but y_{split}.npy {len(y)}")
    return out


def mapped_input(raw: np.memmap, layout: str, source: str) -> MappedRows:
    """The model's view of a memory-mapped input array, checked for NaN and inf in one streaming pass."""
    rows = MappedRows(_Source(Path(raw.filename)), layout)
    if np.issubdtype(raw.dtype, np.floating):
        for chunk in row_chunks(raw):
            if not np.isfinite(chunk).all():
                raise DataError(f"{source}: the inputs contain NaN or inf; fill or drop those examples")
    return rows


def row_chunks(a: np.ndarray, chunk_bytes: int = CHUNK_BYTES):
    """``a`` in consecutive row chunks of about ``chunk_bytes``.

    A memory map is read with plain file reads, not through the map: pages read through a
    map stay in the resident set while it is open, file reads only pass through the page cache.
    """
    row = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.itemsize)
    step = max(1, chunk_bytes // row)
    if isinstance(a, np.memmap) and a.filename is not None:
        with open(a.filename, "rb") as f:
            for i in range(0, len(a), step):
                k = min(step, len(a) - i)
                f.seek(a.offset + i * row)
                buf = f.read(k * row)
                yield np.frombuffer(buf, a.dtype).reshape(k, *a.shape[1:])
        return
    for i in range(0, len(a), step):
        yield a[i:i + step]


def hash_array(h: "hashlib._Hash", a: np.ndarray) -> None:
    """Feed ``a``'s C-order bytes to ``h`` chunk by chunk: the digest equals hashing ``a.tobytes()``."""
    for chunk in row_chunks(a):
        h.update(np.ascontiguousarray(chunk).tobytes())


def moments(chunks, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, float, float, int]:
    """(mean, std, min, max, count) over ``axes`` of arrays arriving in chunks, in float64.

    Chunks are combined with Chan et al.'s pairwise update of the sum of squared deviations;
    one chunk gives exactly numpy's ``mean`` and ``std`` (the same operations in the same order).
    """
    n, mean, m2 = 0, None, None
    lo, hi = 0.0, 0.0  # numpy's min/max(initial=0.0), as kdens.data compares them
    for x in chunks:
        k = int(np.prod([x.shape[a] for a in axes]))
        if k == 0:
            continue
        lo, hi = min(lo, float(x.min(initial=0.0))), max(hi, float(x.max(initial=0.0)))
        mu = x.mean(axis=axes, dtype=np.float64)
        shape = [1] * x.ndim
        for a in range(x.ndim):
            if a not in axes:
                shape[a] = x.shape[a]
        d = x - mu.reshape(shape)
        s = np.sum(np.multiply(d, d, out=d), axis=axes)  # squared in place, as numpy's std does
        if mean is None:
            n, mean, m2 = k, mu, s
        else:
            delta = mu - mean
            total = n + k
            mean = mean + delta * (k / total)
            m2 = m2 + s + delta * delta * (n * k / total)
            n = total
    if mean is None:
        return np.zeros(0), np.zeros(0), lo, hi, 0
    return mean, np.sqrt(m2 / n), lo, hi, n
