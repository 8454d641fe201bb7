"""Cross-check ``.tflite`` files in tflite-runtime 2.14, the interpreter many devices still ship.

tflite-runtime 2.14 needs numpy<2 while kdens runs on numpy 2, so it lives in its own venv
(~110 MB), which ``make setup`` creates (``INSTALL_COMMAND`` below); kdens never installs
anything while a command runs. The check runs ``deploy/edge_runner.py`` there in a
subprocess (``python -I``: no PYTHONPATH leaking the main venv's numpy) on the real test
inputs, and compares its logits with PyTorch and with ai_edge_litert. It catches files that
load in LiteRT but not in older runtimes (op versions), and old kernels that compute
differently (docs/toolchain.md, "TFLite").

Where the venv lives: ``--tflite-runtime-venv PATH`` or ``$KDENS_TFLITE_RUNTIME_VENV`` (asked
for explicitly: a missing venv is an error naming the install command), else
``~/.cache/kdens/venv-tflite-runtime`` (absent: the check says "not checked" and why).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from kdens.errors import ConfigError

TFLITE_RUNTIME_REQ = ("tflite-runtime==2.14.0", "numpy<2")
DEFAULT_VENV = Path.home() / ".cache" / "kdens" / "venv-tflite-runtime"
RUNNER = Path(__file__).with_name("edge_runner.py")
_PROBE = "import numpy, tflite_runtime.interpreter; assert int(numpy.__version__.split('.')[0]) < 2"


def install_command(venv: Path) -> str:
    """The shell command that makes the cross-check venv (what ``make setup`` runs)."""
    req = " ".join(f"'{r}'" if "<" in r else r for r in TFLITE_RUNTIME_REQ)
    return f"python3 -m venv {venv} && {venv}/bin/python -m pip install {req}"


def _venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _works(py: Path) -> bool:
    if not py.exists():
        return False
    r = subprocess.run([str(py), "-I", "-c", _PROBE], capture_output=True, timeout=120)
    return r.returncode == 0


def find_tflite_runtime(venv: str | None) -> tuple[Path | None, str]:
    """(the venv's python, "") when the cross-check can run, else (None, why not).

    Args:
        venv: ``None`` for the default place (``$KDENS_TFLITE_RUNTIME_VENV``, else
            ``~/.cache/kdens/venv-tflite-runtime``), ``"none"`` to skip the check, or a path.

    Raises:
        ConfigError: a venv named explicitly (flag or environment) is missing or broken.
    """
    if venv is not None and str(venv).lower() == "none":
        return None, "disabled (--tflite-runtime-venv none)"
    named = venv or os.environ.get("KDENS_TFLITE_RUNTIME_VENV")
    path = Path(named or DEFAULT_VENV).expanduser().absolute()
    if _works(_venv_python(path)):
        return _venv_python(path), ""
    why = f"no working tflite-runtime 2.14 venv at {path}; `make setup` makes it, or: {install_command(path)}"
    if named:
        raise ConfigError(f"--tflite-runtime-venv {named}: {why} (or pass --tflite-runtime-venv none to skip the check)")
    return None, why


def check_in_tflite_runtime(tflite_path: str | Path, x: np.ndarray, expected_logits: np.ndarray, *,
                            python: Path, expected_runtime: np.ndarray | None = None,
                            latency_threads: tuple[int, ...] | None = None, min_seconds: float = 0.2,
                            timeout: float = 900) -> dict:
    """Run ``tflite_path`` on ``x`` in tflite-runtime 2.14 and compare its logits.

    Args:
        tflite_path: The file to check.
        x: Inputs as the file takes them (float32, or the user's raw uint8); int8-input files get
            float inputs quantized by the runner.
        expected_logits: PyTorch logits (N, C).
        python: The cross-check venv's python (from ``find_tflite_runtime``).
        expected_runtime: Optional host-runtime logits; adds ``*_host_runtime`` fields.
        latency_threads: If given, also time every signature at these thread counts.
        min_seconds: Timed seconds per latency measurement.
        timeout: Seconds before the subprocess is killed.

    Returns:
        ``{"loads": bool, "agreement", "max_abs_diff", "error", "runtime", ...}``.
    """
    py = python
    with tempfile.TemporaryDirectory(prefix="kdens-tflrt-") as tmp:
        tmp = Path(tmp)
        runner = shutil.copy(RUNNER, tmp / RUNNER.name)  # run it alone, away from deploy/'s modules
        np.save(tmp / "x.npy", np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32))
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
