"""Run folders: atomic writes, manifests, and checks that an earlier stage finished.

A stage writes its files first and ``manifest.json`` last, so a folder without a
manifest is an unfinished stage. The manifest records the sha256 of every file the stage
wrote beside it (``outputs``), and ``read_manifest`` checks them before anything is loaded,
so a truncated or edited file is refused by name instead of being used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdens.errors import ArtifactError

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
"""Mode of files written here: what open() would give (mkstemp's 0600 would hide run folders from others)."""


def _atomic_write(path: Path, write_fn) -> Path:
    """Write via a temp file in the same folder, then ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj))


def atomic_save_npy(path: Path, arr: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, arr)
    return atomic_write_bytes(path, buf.getvalue())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); delete it and rerun the stage") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files beside a manifest that are not the stage's product: epoch checkpoints (removed once
# finished), the lock a resuming stage takes, and what a report caches in a stage folder.
_NOT_OUTPUTS = {MANIFEST, "checkpoint.pt"}


def output_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every file a stage wrote in ``run_dir`` (top level; sub-runs have their own manifests)."""
    run_dir = Path(run_dir)
    return {p.name: sha256_file(p) for p in sorted(run_dir.iterdir())
            if p.is_file() and p.name not in _NOT_OUTPUTS and not p.name.startswith(".")}


def verify_outputs(run_dir: Path, manifest: dict) -> None:
    """Raise naming the first file that is missing or differs from the hash its manifest records."""
    run_dir = Path(run_dir)
    for name, digest in (manifest.get("outputs") or {}).items():
        path = run_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing but {run_dir / MANIFEST} lists it; the run folder is "
                                "damaged: rerun the stage that made it (with --force)")
        if sha256_file(path) != digest:
            raise ArtifactError(f"{path} differs from the sha256 {run_dir / MANIFEST} records (truncated or "
                                "edited after the run); rerun the stage that made it (with --force)")


def _versions() -> dict[str, str]:
    import torch

    from kdens import __version__

    return {
        "kdens": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def write_manifest(
    run_dir: Path,
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str] | None = None,
    data_fingerprint: str | None = None,
    seed: int | None = None,
    wall_seconds: float | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``manifest.json`` — call it last: its presence marks the stage finished."""
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "config": config,
        "inputs": inputs or {},
        "data_fingerprint": data_fingerprint,
        "seed": seed,
        "wall_seconds": wall_seconds,
        "metrics": metrics or {},
    }
    if extra:
        manifest.update(extra)
    manifest["outputs"] = output_hashes(run_dir)
    return atomic_write_json(Path(run_dir) / MANIFEST, manifest)


# The command that makes each stage's folder, for error messages.
MAKE_COMMANDS = {
    "generalist": "kdens train-generalist --data SPEC --model NAME --out {dir}",
    "ensemble": "kdens train-ensemble --data SPEC --model NAME --members K --out {dir}",
    "specialists": "kdens train-specialists --generalist RUN --clusters K --out {dir}",
    "student": "kdens distill --teacher RUN --data SPEC --model NAME --out {dir}",
}


def read_manifest(run_dir: Path, expect_stage: str | tuple[str, ...] | None = None, *,
                  verify: bool = True) -> dict:
    """Read a finished stage's manifest, or explain what is missing and how to make it.

    With ``verify`` (the default) every file the manifest lists is checked against its
    sha256 first: a damaged folder is bad input, refused before anything is loaded from it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"run folder {run_dir} does not exist; {_hint(expect_stage, run_dir)}")
    path = run_dir / MANIFEST
    if not path.exists():
        raise ArtifactError(
            f"{run_dir} has no {MANIFEST}: the stage that writes it did not finish; "
            f"rerun it (it resumes): {_hint(expect_stage, run_dir)}"
        )
    manifest = read_json(path)
    stages = (expect_stage,) if isinstance(expect_stage, str) else expect_stage
    if stages and manifest.get("stage") not in stages:
        raise ArtifactError(
            f"{run_dir} holds a '{manifest.get('stage')}' stage, expected {' or '.join(stages)}"
        )
    if verify:
        verify_outputs(run_dir, manifest)
    return manifest


def require_files(run_dir: Path, files: list[str], stage: str | None = None) -> None:
    """Raise naming every missing file and the command that makes them."""
    missing = [f for f in files if not (Path(run_dir) / f).exists()]
    if missing:
        raise ArtifactError(
            f"{run_dir} is missing {', '.join(missing)}; {_hint(stage, Path(run_dir))}"
        )


def _hint(stage, run_dir: Path) -> str:
    stages = (stage,) if isinstance(stage, str) else (stage or ())
    cmds = [MAKE_COMMANDS[s].format(dir=run_dir) for s in stages if s in MAKE_COMMANDS]
    return "make it with: " + " | ".join(cmds) if cmds else "check the path"
