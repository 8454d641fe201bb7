"""Docs that run: extract the commands README.md, docs/*.md and examples/ show, check them, run them.

What a command is, per source:

- README.md and docs/*.md: every line of a ```bash block (a trailing ``\\`` joins the next
  line; comment lines are skipped). ``make ...`` lines are listed but never run: make targets
  create a venv and install packages (``make demo`` is ``kdens run examples/digits.toml``,
  which runs here; ``make test`` is this suite).
- docs/cli.md, generated from ``--help``: the lines of its ```text blocks that start with
  ``kdens <command>`` (the help texts' examples).
- examples/*.toml: the indented ``#   kdens ...`` lines of the header comment, and ``kdens run`` on the
  file if the header does not say it; examples/*.py: run as a script (it must at least import).
- A ```toml block becomes a file, named by the next command's ``--config FILE``, written just
  before that command runs.

How they run (``run_steps``): one document at a time, top to bottom, in a fresh folder that
holds a copy of examples/ (README's commands assume the repository root), through ``bash``
with ``kdens``, ``python`` and ``python3`` on PATH meaning this checkout and this interpreter,
``OMP_NUM_THREADS=1`` and ``KDENS_EPOCHS_CAP=1`` (the one override for what is too long for
CI: every training run stops after one epoch; the docs are never edited to run faster). Each
command must exit 0 (``EXPECT`` lists the exceptions, with why), print no carriage return
(progress in a log is plain lines) and no TensorFlow Lite INFO line.

Tiers: ``cheap`` (``make test``) runs the commands on the embedded digits data, except
``SLOW`` ones; ``full`` (``make test-all``) runs everything, the Fashion-MNIST commands when
the Debian dataset is installed. A command reading a folder that a skipped command makes is
skipped too, with that reason. Nothing is skipped without a reason listed here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if p.is_file())
EPOCHS_CAP = "1"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

SLOW = [
    ("python bench/many_class.py", "generates 25,000 images, then runs a whole pipeline (about 2 minutes)"),
    ("kdens run ", "a whole pipeline (tens of seconds on digits, hours uncapped on Fashion-MNIST); make test "
                   "runs examples/digits.toml in tests/test_pipeline.py::test_the_readme_main_job"),
]
"""(substring, reason): commands the cheap tier leaves to the full one."""
SKIPS = [
    ("docs/cli.md", "--import pi-results.json",
     "needs pi-results.json from edge_runner.py on a device; README.md runs that chain end to end"),
    ("docs/cli.md", "kdens import-model ",
     "needs an ONNX file made outside kdens (examples/export_teacher.py); README.md runs that chain end to end"),
]
"""(document, substring, reason): commands no tier runs."""
EXPECT = [
    ("--max-latency-ms 0.5", {0, 1}, "a 0.5 ms latency budget: on a busy machine it may be missed, which is "
                                     "exit 1 by design (the artifact is kept)"),
]
"""(substring, accepted exit codes, why): commands whose exit code is not always 0."""
RUN_MAKERS = ("train-generalist", "train-ensemble", "train-specialists", "distill", "import-model")
"""Commands whose --out is a run folder that must be new in its document."""


@dataclass
class Step:
    """One command (or a toml block to save) from one document, in document order."""

    source: str
    """Where it came from: 'README.md:42'."""
    text: str
    """The command line as bash runs it, or the toml block's content."""
    kind: str = "command"
    """'command', 'toml' or 'make' (listed, never run)."""
    config_name: str | None = None
    """For a toml block: the file name the next ``--config`` gives it."""


@dataclass
class Outcome:
    step: Step
    status: str
    """'ran', 'skipped' or 'written'."""
    detail: str = ""
    seconds: float = 0.0
    made: list[str] = field(default_factory=list)


def _fences(path: Path):
    """(language, first line number, lines) of each fenced block in a Markdown file."""
    lang, start, body = None, 0, []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip() or "text", i + 1, []
            else:
                yield lang, start, body
                lang = None
        elif lang is not None:
            body.append(line)


def _joined(lines: list[str], start: int):
    """(line number, logical line) with trailing-backslash continuations joined."""
    buf, first = "", start
    for i, line in enumerate(lines, start):
        if not buf:
            first = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1].rstrip() + " "
            continue
        yield first, (buf + line.strip()).strip()
        buf = ""


def extract_markdown(path: Path) -> list[Step]:
    name = path.relative_to(REPO).as_posix()
    steps: list[Step] = []
    for lang, start, body in _fences(path):
        if lang == "bash":
            for n, line in _joined(body, start):
                if line and not line.startswith("#"):
                    steps.append(Step(f"{name}:{n}", line, "make" if line.startswith("make ") else "command"))
        elif lang == "toml":
            steps.append(Step(f"{name}:{start}", "\n".join(body) + "\n", "toml"))
        elif lang == "text" and name == "docs/cli.md":
            for n, line in _joined([ln.strip() for ln in body], start):
                if re.match(r"kdens [a-z]", line):
                    steps.append(Step(f"{name}:{n}", line))
    _name_toml_blocks(steps)
    return steps


def _name_toml_blocks(steps: list[Step]) -> None:
    for i, step in enumerate(steps):
        if step.kind == "toml":
            after = [s for s in steps[i + 1:] if s.kind == "command" and "--config" in s.text]
            if after:
                args = shlex.split(after[0].text, comments=True)
                step.config_name = args[args.index("--config") + 1]


def extract_example(path: Path) -> list[Step]:
    name = path.relative_to(REPO).as_posix()
    if path.suffix == ".py":
        return [Step(name, f"python {name}")]
    steps = [Step(f"{name}:{n}", m.group(1).strip()) for n, line in enumerate(path.read_text().splitlines(), 1)
             if (m := re.match(r"#\s{2,}(kdens .*)", line))]  # indented: a command, not prose
    if not any(re.match(rf"kdens run {re.escape(name)}(\s|$)", s.text) for s in steps):
        steps.insert(0, Step(name, f"kdens run {name}"))
    return steps


def documents() -> dict[str, list[Step]]:
    """Every document's steps, keyed by its path in the repository."""
    out = {p.relative_to(REPO).as_posix(): extract_markdown(p) for p in DOCS}
    out.update({p.relative_to(REPO).as_posix(): extract_example(p) for p in EXAMPLES})
    return out


# ---------------------------------------------------------------- what a command reads and makes

def _kdens_args(text: str) -> list[str] | None:
    """The arguments after ``kdens`` of a plain kdens command (no shell operators), else None."""
    if not text.startswith("kdens ") or re.search(r"&&|\|\||[|;]", text):
        return None
    return shlex.split(text, comments=True)[1:]


def _opt(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def _positional(args: list[str]) -> list[str]:
    out, i = [], 1
    while i < len(args):
        if args[i].startswith("--"):
            i += 1 if args[i] in ("--dry-run", "--quiet", "--force", "--resume", "--fix-bias", "--no-measure") else 2
            continue
        out.append(args[i])
        i += 1
    return out


def reads_and_makes(text: str) -> tuple[list[str], list[str]]:
    """(run folders a command reads, run folders it makes); paths as written (relative)."""
    args = _kdens_args(text)
    if not args:
        return [], []
    cmd, reads, makes = args[0], [], []
    for opt in ("--teacher", "--generalist", "--baseline"):
        if _opt(args, opt):
            reads += _opt(args, opt).split(",")
    if cmd in RUN_MAKERS and _opt(args, "--out"):
        makes.append(_opt(args, "--out"))
    elif cmd == "deploy":
        reads.append(_opt(args, "--model"))
        precision = _opt(args, "--precision") or {"none": "float", None: "float"}.get(_opt(args, "--quantize"),
                                                                                      _opt(args, "--quantize"))
        makes.append(f"{_opt(args, '--out')}/{_opt(args, '--target')}-{precision}")
    elif cmd in ("evaluate", "bench", "report"):
        reads += _positional(args)[:1]
    elif cmd == "run":
        makes.append(_opt(args, "--out") or _pipeline_out(_positional(args)[0]))
    return [r for r in reads if r], makes


def _pipeline_out(config: str) -> str:
    import tomllib

    path = REPO / config
    doc = tomllib.loads(path.read_text()) if path.exists() else {}
    return str(doc.get("out") or f"runs/{doc.get('name') or Path(config).stem}")


def _under(path: str, folders) -> bool:
    """Whether ``path`` is one of ``folders``, inside one, or holds one (a deploy folder holds its targets)."""
    return any(path == f or path.startswith(f.rstrip("/") + "/") or f.startswith(path.rstrip("/") + "/")
               for f in folders)


# ---------------------------------------------------------------- running

def skip_reason(doc: str, step: Step, tier: str, skipped_made: dict[str, str]) -> str | None:
    """Why ``step`` does not run in ``tier`` (None: it runs)."""
    if step.kind == "make":
        return "make targets are not run (they build a venv); what they run is run here"
    for d, sub, reason in SKIPS:
        if d == doc and sub in step.text:
            return reason
    reads, _ = reads_and_makes(step.text)
    for r in reads:
        for folder, reason in skipped_made.items():
            if _under(r, [folder]):
                return f"reads {r}, made by a skipped command: {reason.split(': ', 1)[-1]}" \
                    if reason.startswith("reads ") else f"reads {r}, made by a skipped command: {reason}"
    if needs_mnist(step.text):
        if tier == "cheap":
            return "MNIST: make test-all runs it"
        if not _mnist_cached():
            return "needs MNIST in the cache (make bench places it offline: bench/place_mnist.py)"
    if needs_fashion_mnist(step.text):
        if tier == "cheap":
            return "Fashion-MNIST: make test-all runs it"
        if not FASHION_MNIST.is_dir():
            return f"needs Fashion-MNIST ({FASHION_MNIST}: apt-get install dataset-fashion-mnist)"
        if "--target fpga" in step.text and not (shutil.which("g++") and _has("hls4ml")):
            return "the fpga target needs g++ and hls4ml"
    if tier == "cheap":
        for sub, reason in SLOW:
            if step.text.startswith(sub):
                return reason
    return None


def needs_mnist(text: str) -> bool:
    """Whether a command uses MNIST (downloaded once; no network in CI): by name or through its example."""
    return bool(re.search(r"--data mnist\b|hinton-mnist|runs/mnist\b|data = \"mnist\"", text))


def _mnist_cached() -> bool:
    import os

    root = Path(os.environ.get("KDENS_DATA") or Path.home() / ".cache" / "kdens") / "mnist"
    return (root / "train-images-idx3-ubyte").exists() or (root / "train-images-idx3-ubyte.gz").exists()


def needs_fashion_mnist(text: str) -> bool:
    """Whether a command uses Fashion-MNIST: by name, through the runs/fm and runs/fashion-mnist folders,
    or through README's bundle of runs/fm/deploy (edge.tar.gz) and its device results (pi-results.json)."""
    return bool(re.search(r"fashion-mnist|runs/fm\b|runs/fashion-mnist|edge\.tar\.gz|pi-results\.json", text))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def workspace(folder: Path) -> dict[str, str]:
    """Make ``folder`` a fresh place to follow the docs; returns the environment to run them with."""
    shutil.copytree(REPO / "examples", folder / "examples")
    (folder / "bench").mkdir()
    shutil.copy(REPO / "bench" / "many_class.py", folder / "bench")  # the README's data generator for a pipeline
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    # scripts, not symlinks: a symlinked venv python would not find its venv (pyvenv.cfg)
    for name, run in (("kdens", "-m kdens "), ("python", ""), ("python3", "")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" {run}"$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "KDENS_EPOCHS_CAP")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", KDENS_EPOCHS_CAP=EPOCHS_CAP)
    return env


def run_steps(doc: str, steps: list[Step], folder: Path, tier: str, timeout: float = 3600) -> list[Outcome]:
    """Run ``steps`` in order in ``folder``; raises AssertionError at the first command that fails."""
    import time

    env = workspace(folder)
    outcomes: list[Outcome] = []
    skipped_made: dict[str, str] = {}
    for i, step in enumerate(steps):
        if step.kind == "toml":
            if step.config_name:
                (folder / step.config_name).write_text(step.text)
            outcomes.append(Outcome(step, "written", step.config_name or "(no --config names it)"))
            continue
        if step.config_name is None and "--config" in step.text:
            block = next((s for s in steps[:i] if s.kind == "toml" and s.config_name in step.text), None)
            step.config_name = block.config_name if block else None
        reason = skip_reason(doc, step, tier, skipped_made)
        if reason:
            for made in reads_and_makes(step.text)[1] + _files_made(step.text):
                skipped_made[made] = reason
            outcomes.append(Outcome(step, "skipped", reason))
            continue
        t0 = time.time()
        r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step.text], cwd=folder, env=env,
                           capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
        expected = next((codes for sub, codes, _ in EXPECT if sub in step.text), {0})
        tail = "\n".join(out.splitlines()[-25:])
        assert r.returncode in expected, (f"{step.source}: `{step.text}` exited {r.returncode} (expected "
                                          f"{sorted(expected)}) in {folder}\n{tail}")
        assert "\r" not in out, f"{step.source}: `{step.text}` printed carriage returns (progress bars in a log)"
        assert "INFO: Created TensorFlow Lite" not in out, f"{step.source}: TensorFlow Lite INFO lines\n{tail}"
        outcomes.append(Outcome(step, "ran", f"exit {r.returncode}", round(time.time() - t0, 1)))
    return outcomes


def _files_made(text: str) -> list[str]:
    """Files (not run folders) a command makes that later commands read: bundles and device results."""
    found = re.findall(r"--bundle (\S+\.tar\.gz)|--out \.\./(\S+\.json)", text)
    return [a or b for a, b in found]
