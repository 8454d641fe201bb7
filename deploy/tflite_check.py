"""Cross-check ``.tflite`` files in tflite-runtime 2.14, the interpreter many devices still ship.

tflite-runtime 2.14 needs numpy<2 while kdens runs on numpy 2, so it lives in its own venv
(``.venv-tflite``, ~110 MB, created once with ``python -m venv`` + pip). The check runs
``deploy/edge_runner.py`` there in a subprocess (``python -I``: no PYTHONPATH leaking the
main venv's numpy) on the real test inputs, and compares its logits with PyTorch and with
ai_edge_litert. It catches files that load in LiteRT but not in older runtimes (op
versions), and old kernels that compute differently. If the venv cannot be created the
result says "not checked: <reason>" instead of failing the deploy.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kdens.errors import KdensError

TFLITE_RUNTIME_REQ = ("tflite-runtime==2.14.0", "numpy<2")
RUNNER = Path(__file__).with_name("edge_runner.py")
_PROBE = "import numpy, tflite_runtime.interpreter; assert int(numpy.__version__.split('.')[0]) < 2"


def _venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _works(py: Path) -> bool:
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-I", "-c", _PROBE], capture_output=True, timeout=120)
    return r.returncode == 0


def ensure_tflite_runtime_venv(path: str | Path = ".venv-tflite") -> Path:
    """Create (once) a venv with tflite-runtime 2.14 and numpy<2; return its python.

    Idempotent and safe against concurrent callers (a file lock beside the venv). A venv
    that exists but cannot import tflite_runtime is repaired by re-running pip.

    Raises:
        KdensError: venv creation or ``pip install`` failed; the message holds pip's output.
    """
    path = Path(path).absolute()
    py = _venv_python(path)
    if _works(py):
        return py
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same venv
        if _works(py):
            return py
        if not py.exists():
            shutil.rmtree(path, ignore_errors=True)
            r = subprocess.run([sys.executable, "-m", "venv", str(path)], capture_output=True, text=True)
            if r.returncode != 0:
                raise KdensError(f"could not create the tflite-runtime venv at {path}: "
                                 f"{(r.stderr or r.stdout).strip()[-800:]}")
        r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                            *TFLITE_RUNTIME_REQ], capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not _works(py):
            raise KdensError(
                f"pip could not install {' '.join(TFLITE_RUNTIME_REQ)} into {path} (tflite-runtime 2.14 has "
                f"wheels for CPython 3.8-3.11 on Linux x86_64/aarch64 only): "
                f"{(r.stderr or r.stdout).strip()[-800:] or 'installed, but the import still fails'}")
    return py


def check_in_tflite_runtime(tflite_path: str | Path, x: np.ndarray, expected_logits: np.ndarray, *,
                            venv: str | Path = ".venv-tflite", expected_runtime: np.ndarray | None = None,
                            latency_threads: tuple[int, ...] | None = None, min_seconds: float = 0.2,
                            timeout: float = 900) -> dict:
    """Run ``tflite_path`` on ``x`` in tflite-runtime 2.14 and compare its logits.

    Args:
        tflite_path: The file to check.
        x: Float inputs (N, 1, H, W); int8-input files get them quantized by the runner.
        expected_logits: PyTorch logits (N, C).
        venv: Where the tflite-runtime venv lives (created on first use).
        expected_runtime: Optional host-runtime logits; adds ``*_host_runtime`` fields.
        latency_threads: If given, also time every signature at these thread counts.
        min_seconds: Timed seconds per latency measurement.
        timeout: Seconds before the subprocess is killed.

    Returns:
        ``{"loads": bool|None, "agreement", "max_abs_diff", "error", "runtime", ...}``;
        ``loads`` is None (and ``error`` starts with "not checked:") when the venv is missing.
    """
    try:
        py = ensure_tflite_runtime_venv(venv)
    except (KdensError, OSError, subprocess.SubprocessError) as e:
        return {"loads": None, "agreement": None, "max_abs_diff": None, "error": f"not checked: {e}"}
    with tempfile.TemporaryDirectory(prefix="kdens-tflrt-") as tmp:
        tmp = Path(tmp)
        runner = shutil.copy(RUNNER, tmp / RUNNER.name)  # run it alone, away from deploy/'s modules
        np.save(tmp / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
        np.save(tmp / "expected.npy", np.asarray(expected_logits, dtype=np.float32))
        cmd = [str(py), "-I", str(runner), "--model", str(Path(tflite_path).absolute()),
               "--x", str(tmp / "x.npy"), "--expected", str(tmp / "expected.npy"),
               "--runtime", "tflite_runtime", "--out", str(tmp / "out.json")]
        if expected_runtime is not None:
            np.save(tmp / "expected_runtime.npy", np.asarray(expected_runtime, dtype=np.float32))
            cmd += ["--expected-runtime", str(tmp / "expected_runtime.npy")]
        cmd += (["--threads", ",".join(map(str, latency_threads)), "--min-seconds", str(min_seconds)]
                if latency_threads else ["--no-latency"])
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"loads": False, "agreement": None, "max_abs_diff": None,
                    "error": f"tflite-runtime did not finish within {timeout:.0f} s"}
        if not (tmp / "out.json").exists():
            return {"loads": False, "agreement": None, "max_abs_diff": None,
                    "error": f"runner crashed (exit {r.returncode}): {r.stderr.strip()[-800:]}"}
        res = json.loads((tmp / "out.json").read_text())["results"][0]
    res.pop("file", None)
    res.pop("name", None)
    return res
