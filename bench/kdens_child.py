"""One ``kdens`` command in a child process, the way the benchmarks run every step.

The child gets one thread unless ``OMP_NUM_THREADS`` says otherwise (two torch threads under
load are pathological on the 2-core development machine) and this checkout on its path; its
output is appended to a log after the command line, so a benchmark's log holds every command
it ran and what each printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    """The child's environment: one thread unless set, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT), **extra}


def run(args: list[str], log: Path) -> int:
    """Run ``kdens ARGS``, appending the command and its output to ``log``; the exit code."""
    cmd = [sys.executable, "-m", "kdens", *args]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), check=False).returncode


def step(args: list[str], log: Path, threads: int | None = None) -> str:
    """Run ``kdens ARGS`` unless its ``--out`` folder is finished: 'ok', 'reused' or the error's last line.

    An ``--out`` folder without a manifest is an interrupted run: it gets ``--resume``, so a
    benchmark stopped mid-training continues from its last epoch checkpoint.

    The output is captured and appended in one write after the child ends, so steps run in
    parallel threads do not interleave in the log; a failure's last line goes into the
    benchmark's table instead of stopping it. ``threads`` sets the child's ``OMP_NUM_THREADS``
    (default: as for every child, one unless the environment says otherwise).
    """
    out = Path(args[args.index("--out") + 1])
    if (out / "manifest.json").exists():
        return "reused"
    if out.is_dir() and "--resume" not in args:
        args = [*args, "--resume"]
    extra = {"OMP_NUM_THREADS": str(threads)} if threads is not None else {}
    r = subprocess.run([sys.executable, "-m", "kdens", *args], capture_output=True, text=True,
                       env=_env(TQDM_DISABLE="1", **extra), check=False)
    with open(log, "a") as f:
        f.write("$ kdens " + " ".join(args) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return "ok"
