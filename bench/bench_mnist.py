"""Hinton, Vinyals & Dean (2015), section 3, on real MNIST (issue 13), through the kdens CLI.

Every number is one `kdens` command (printed in the log and in the .json); finished runs are
reused, so an interrupted benchmark resumes where it stopped. Parts (``--parts``):

* ``table``: the teacher (1200-1200, dropout 0.5, input dropout 0.2, jitter +-2 px, 60 epochs),
  the 800-800 on hard labels (30 epochs) and the 800-800 distilled at T = 20, alpha 0.1;
* ``consistent``: the 800-800 distilled with the teacher online on the student's own jittered
  views for 60 epochs ("consistent and patient" teaching, Beyer et al. 2022);
* ``mixup``: the consistent student with mixup blends of its views (``--augment mixup``, lambda
  uniform), the teacher scoring each blend ("function matching", Beyer et al. 2022);
* ``control``: the same student on hard labels with the same jitter and epochs (how much of the
  consistent student's gain is the jitter alone);
* ``jteacher``: the consistent student taught by the control (an 800-800 on hard labels with
  jitter, 60 epochs), which beat the paper's teacher recipe here; the gap is then this teacher's
  (student seed = seed + 10, so it does not start from its teacher's initial weights);
* ``bteacher``: a better teacher of the paper's size (1200-1200 with jitter +-2 px and no dropout,
  60 epochs) and the 800-800 distilled from it consistently, with and without mixup blends;
* ``three``: 3% of the training set (class-stratified, the same images for both): hard labels
  vs soft targets vs soft targets with consistent teaching; the all-data hard-label student of
  ``table`` is the reference;
* ``temperature``: 300-unit and 30-unit students across T (seed 0 unless --seeds says more);
* ``omit``: class 3 left out of the transfer set, and a transfer set of only 7s and 8s, each with
  its output bias fitted on a 10% validation split (kdens' fitted shift beside the paper's 3.5).

All runs train on all 60,000 training images (``--val-fraction 0``; no early stopping) with no
weight decay, except the ``omit`` part, whose bias fit needs a validation split.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mnist.py --parts table,consistent,three --seeds 0,1,2
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_mnist.py --parts bteacher,temperature,omit --seeds 0,1,2
    .venv/bin/python bench/bench_mnist.py --summary-only     # the tables from finished runs

Two processes can run side by side (say one per core): a run being trained by one is locked
(``<run>.lock`` with its pid) and the other waits for it instead of training it twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import kdens_child  # noqa: E402
COMMON = ["--data", "mnist", "--val-fraction", "0", "--weight-decay", "0"]
TEACHER = ["--model", "mlp", "--model-arg", "hidden=1200,1200", "--model-arg", "dropout=0.5", "--model-arg",
           "input_dropout=0.2", "--jitter", "2", "--epochs", "60"]
MLP800 = ["--model", "mlp", "--model-arg", "hidden=800,800"]
KD20 = ["--temperature", "20", "--alpha", "0.1"]
TEMPERATURES = ("2.5", "4", "8", "20")
PARTS = ("table", "consistent", "mixup", "control", "jteacher", "bteacher", "three", "temperature", "omit")
# the teacher recipe the control pointed to: the paper's size, its jitter, no dropout (which left the
# paper's recipe under-trained at 60 epochs)
BTEACHER = ["--model", "mlp", "--model-arg", "hidden=1200,1200", "--jitter", "2", "--epochs", "60"]


def plan(runs: Path, part: str, s: int) -> list[tuple[str, list[str]]]:
    """(run folder name, kdens arguments) of one part and seed, in the order they must run."""
    t, hard = str(runs / f"teacher-s{s}"), str(runs / f"hard-s{s}")
    seed = ["--seed", str(s)]
    table = [(f"teacher-s{s}", ["train-generalist", *COMMON, *TEACHER, *seed]),
             (f"hard-s{s}", ["train-generalist", *COMMON, *MLP800, "--epochs", "30", *seed])]
    if part == "table":
        return [*table, (f"kd-T20-s{s}", ["distill", "--teacher", t, *COMMON, *MLP800, *KD20, "--epochs", "30", *seed,
                                          "--baseline", hard])]
    if part == "consistent":
        return [*table, (f"kd-cons-s{s}", ["distill", "--teacher", t, *COMMON, *MLP800, *KD20, "--jitter", "2",
                                           "--epochs", "60", *seed, "--baseline", hard])]
    if part == "mixup":  # function matching: the teacher scores mixup blends of the jittered views
        return [*table, (f"kd-mix-s{s}", ["distill", "--teacher", t, *COMMON, *MLP800, *KD20, "--jitter", "2",
                                          "--augment", "mixup", "--epochs", "60", *seed, "--baseline", hard])]
    if part == "jteacher":  # the control as the teacher: the same consistent recipe from a better teacher
        jt = str(runs / f"hard-jit-s{s}")
        return [(f"hard-jit-s{s}", ["train-generalist", *COMMON, *MLP800, "--jitter", "2", "--epochs", "60", *seed]),
                *table[1:],
                # seed + 10: the student must not start from its same-architecture teacher's initial weights
                (f"kd-cons-jt-s{s}", ["distill", "--teacher", jt, *COMMON, *MLP800, *KD20, "--jitter", "2",
                                      "--epochs", "60", "--seed", str(s + 10), "--baseline", hard])]
    if part == "bteacher":
        bt = str(runs / f"bteacher-s{s}")
        cons = ["distill", "--teacher", bt, *COMMON, *MLP800, *KD20, "--jitter", "2", "--epochs", "60", *seed,
                "--baseline", hard]
        return [(f"bteacher-s{s}", ["train-generalist", *COMMON, *BTEACHER, *seed]), table[1],
                (f"kd-mix-bt-s{s}", [*cons, "--augment", "mixup"]), (f"kd-cons-bt-s{s}", cons)]
    if part == "control":
        return [(f"hard-jit-s{s}", ["train-generalist", *COMMON, *MLP800, "--jitter", "2", "--epochs", "60", *seed])]
    if part == "three":
        h3 = str(runs / f"hard3-s{s}")
        three = ["--epochs", "300", *seed]  # 1,800 images: many short epochs (540,000 examples in all)
        return [*table,
                (f"hard3-s{s}", ["train-generalist", *COMMON, *MLP800, "--train-fraction", "0.03", *three]),
                (f"kd3-s{s}", ["distill", "--teacher", t, *COMMON, *MLP800, *KD20, "--transfer", "fraction=0.03",
                               *three, "--baseline", h3]),
                (f"kd3-cons-s{s}", ["distill", "--teacher", t, *COMMON, *MLP800, *KD20, "--transfer",
                                    "fraction=0.03", "--jitter", "2", *three, "--baseline", h3]),
                # its control: the same 3% on hard labels with the same jitter
                (f"hard3-jit-s{s}", ["train-generalist", *COMMON, *MLP800, "--train-fraction", "0.03", "--jitter",
                                     "2", *three])]
    if part == "temperature":
        out = table[:1]
        for units in (300, 30):
            arch = ["--model", "mlp", "--model-arg", f"hidden={units},{units}"]
            h = f"hard{units}-s{s}"
            out.append((h, ["train-generalist", *COMMON, *arch, "--epochs", "30", *seed]))
            out += [(f"kd{units}-T{T}-s{s}", ["distill", "--teacher", t, *COMMON, *arch, "--temperature", T,
                                              "--alpha", "0.1", "--epochs", "30", *seed, "--baseline",
                                              str(runs / h)]) for T in TEMPERATURES]
        return out
    if part == "omit":
        val = ["--data", "mnist", "--val-fraction", "0.1", "--weight-decay", "0"]
        return [table[0]] + [(f"{name}-s{s}", ["distill", "--teacher", t, *val, *MLP800, *KD20, "--transfer", spec,
                                               "--fix-bias", "--epochs", "30", *seed])
                             for name, spec in (("omit3", "omit=3"), ("only78", "omit=0,1,2,3,4,5,6,9"))]
    raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(runs: Path, name: str) -> Path | None:
    """Take ``<name>.lock`` (holding our pid), or wait while a live process holds it.

    Returns the lock to release, or None when the run finished while we waited. A lock left by
    a dead process is taken over (``--resume`` continues its checkpoint).
    """
    lock = runs / f"{name}.lock"
    said = False
    while True:
        if (runs / name / "manifest.json").exists():
            return None
        mine = runs / f".{name}.{os.getpid()}"
        mine.write_text(str(os.getpid()))
        try:
            os.link(mine, lock)  # atomic, and the lock never exists without its pid
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                if not said:
                    print(f"waiting for {name} (pid {pid} is training it)", flush=True)
                    said = True
                time.sleep(30)
            else:
                lock.unlink(missing_ok=True)
            continue
        finally:
            mine.unlink(missing_ok=True)
        return lock


def run(runs: Path, name: str, args: list[str], log: Path) -> None:
    """Train one run folder unless it is finished (--resume picks up an interrupted one)."""
    out = runs / name
    lock = _claim(runs, name)
    if lock is None:
        return
    try:
        _train(out, args, log)
    finally:
        lock.unlink(missing_ok=True)


def _train(out: Path, args: list[str], log: Path) -> None:
    full = [*args, "--quiet", "--resume", "--out", str(out)]
    print("$ kdens " + " ".join(full), flush=True)
    rc = kdens_child.run(full, log)
    if rc:
        raise SystemExit(f"failed (exit {rc}): kdens {' '.join(full)}; see {log}")


def metrics(runs: Path, name: str) -> dict | None:
    p = runs / name / "metrics.json"
    if not p.exists():
        return None
    m = json.loads(p.read_text())
    m["wall_seconds"] = json.loads((runs / name / "manifest.json").read_text()).get("wall_seconds")
    return m


def share(b: float, t: float, s: float) -> float | None:
    return None if b == t else (b - s) / (b - t)


def _fmt_errs(vals: list) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "-"
    mean = f" (mean {statistics.mean(got):.1f})" if len(got) > 1 else ""
    return " / ".join("-" if v is None else str(v) for v in vals) + mean


def _fmt_share(vals: list) -> str:
    got = [v for v in vals if v is not None]
    if not got:
        return "-"
    body = " / ".join("-" if v is None else f"{100 * v:.0f}%" for v in vals)
    if len(got) < 2:
        return body
    sd = statistics.stdev(got)
    return f"{body} (mean **{100 * statistics.mean(got):.0f}%** ± {100 * sd / math.sqrt(len(got)):.0f} s.e.)"


def summary(runs: Path, seeds: list[int]) -> tuple[list[str], dict]:
    """Markdown tables and their data from whatever runs have finished."""
    def col(name: str, key: str = "test_errors") -> list:
        return [(metrics(runs, f"{name}-s{s}") or {}).get(key) for s in seeds]

    teacher, hard, kd, cons, hjit = (col(n) for n in ("teacher", "hard", "kd-T20", "kd-cons", "hard-jit"))
    mixd = col("kd-mix")
    jtd = col("kd-cons-jt")
    bt, cbt, mbt = col("bteacher"), col("kd-cons-bt"), col("kd-mix-bt")
    h3, kd3, kd3c, h3j = col("hard3"), col("kd3"), col("kd3-cons"), col("hard3-jit")

    def shares(base, top, stud):
        return [None if None in (b, t, x) else share(b, t, x) for b, t, x in zip(base, top, stud)]

    data = {"seeds": seeds, "teacher": teacher, "hard": hard, "kd_T20": kd, "kd_consistent": cons,
            "hard_jitter": hjit, "kd_mixup": mixd, "share_kd_mixup": shares(hard, teacher, mixd),
            "bteacher": bt, "kd_consistent_bteacher": cbt, "kd_mixup_bteacher": mbt,
            "share_kd_consistent_bteacher": shares(hard, bt, cbt), "share_kd_mixup_bteacher": shares(hard, bt, mbt),
            "kd_consistent_jitter_teacher": jtd, "share_kd_consistent_jitter_teacher": shares(hard, hjit, jtd), "hard_3pct": h3, "kd_3pct": kd3, "kd_3pct_consistent": kd3c,
            "share_kd_T20": shares(hard, teacher, kd), "share_kd_consistent": shares(hard, teacher, cons),
            "share_3pct": shares(h3, hard, kd3), "share_3pct_consistent": shares(h3, hard, kd3c),
            "hard_3pct_jitter": h3j, "share_3pct_hard_jitter": shares(h3, hard, h3j)}
    lines = [f"Seeds {', '.join(map(str, seeds))}; test errors of 10,000.", "",
             "| model | kdens: test errors per seed | the paper |", "|---|---|---|",
             f"| teacher 1200-1200, dropout, jitter +-2 px, 60 epochs | {_fmt_errs(teacher)} | 67 |",
             f"| 800-800 on hard labels, 30 epochs (the baseline) | {_fmt_errs(hard)} | 146 |",
             f"| 800-800 distilled at T = 20, alpha 0.1, 30 epochs | {_fmt_errs(kd)} | 74 |",
             f"| share of the teacher-baseline gap recovered | {_fmt_share(data['share_kd_T20'])} | 91% |",
             f"| 800-800 distilled, teacher online on the student's jittered views, 60 epochs | {_fmt_errs(cons)} | - |",
             f"| its share of the gap | {_fmt_share(data['share_kd_consistent'])} | - |",
             f"| the same with mixup blends, the teacher scoring each blend | {_fmt_errs(mixd)} | - |",
             f"| its share of the gap | {_fmt_share(data['share_kd_mixup'])} | - |",
             f"| control: 800-800 on hard labels, jitter +-2 px, 60 epochs | {_fmt_errs(hjit)} | - |",
             f"| 800-800 distilled consistently from the control as teacher | {_fmt_errs(jtd)} | - |",
             f"| its share of the gap between the control and the baseline | "
             f"{_fmt_share(data['share_kd_consistent_jitter_teacher'])} | - |",
             f"| teacher 1200-1200, jitter +-2 px, no dropout, 60 epochs | {_fmt_errs(bt)} | - |",
             f"| 800-800 distilled consistently from it | {_fmt_errs(cbt)} | - |",
             f"| its share of the gap between this teacher and the baseline | "
             f"{_fmt_share(data['share_kd_consistent_bteacher'])} | - |",
             f"| the same with mixup blends | {_fmt_errs(mbt)} | - |",
             f"| its share of the gap | {_fmt_share(data['share_kd_mixup_bteacher'])} | - |",
             "", "| 3% of the training set (1,800 images) | test errors per seed | share of the gap to all-data hard |",
             "|---|---|---|",
             f"| hard labels | {_fmt_errs(h3)} | 0% by definition |",
             f"| soft targets, T = 20 | {_fmt_errs(kd3)} | {_fmt_share(data['share_3pct'])} |",
             (f"| soft targets, teacher online on jittered views | {_fmt_errs(kd3c)} | "
             f"{_fmt_share(data['share_3pct_consistent'])} |"),
             f"| control: hard labels with the same jitter | {_fmt_errs(h3j)} | {_fmt_share(data['share_3pct_hard_jitter'])} |",
             f"| all 60,000 images, hard labels (the reference) | {_fmt_errs(hard)} | 100% by definition |"]
    temp = {}
    for units in (300, 30):
        row = {T: col(f"kd{units}-T{T}") for T in TEMPERATURES}
        base = col(f"hard{units}")
        if any(v is not None for v in base) or any(any(v is not None for v in r) for r in row.values()):
            temp[units] = {"hard": base, **row}
    if temp:
        lines += ["", "| student | hard labels | " + " | ".join(f"T = {T}" for T in TEMPERATURES) + " |",
                  "|---|---|" + "---|" * len(TEMPERATURES)]
        for units, r in temp.items():
            lines.append(f"| {units}-{units} | {_fmt_errs(r['hard'])} | "
                         + " | ".join(_fmt_errs(r[T]) for T in TEMPERATURES) + " |")
    data["temperature"] = temp
    om = {}
    for name in ("omit3", "only78"):
        ms = [metrics(runs, f"{name}-s{s}") for s in seeds]
        if any(ms):
            om[name] = [None if m is None else {k: m.get(k) for k in (
                "test_errors_before_bias_fix", "omitted_test_errors_before_bias_fix", "bias_shift",
                "test_errors", "omitted_test_errors", "omitted_test_examples")} for m in ms]
    if om:
        lines += ["", ("| transfer set | test errors before the bias fix (on the omitted classes) | fitted bias shift | "
                  "after (on the omitted classes) | the paper |"), "|---|---|---|---|---|"]
        paper = {"omit3": "206 (133 of 1,010 threes); shift 3.5: 109 (14)", "only78": "47.3% error; 13.2% after"}
        for name, ms in om.items():
            def cell(before: bool, ms: list = ms) -> str:
                k, ko = (("test_errors_before_bias_fix", "omitted_test_errors_before_bias_fix") if before
                         else ("test_errors", "omitted_test_errors"))
                return " / ".join("-" if m is None else f"{m[k]} ({m[ko]} of {m['omitted_test_examples']})"
                                  for m in ms)
            shifts = " / ".join("-" if m is None else f"{m['bias_shift']:.2f}" for m in ms)
            label = "class 3 omitted" if name == "omit3" else "only 7s and 8s"
            lines.append(f"| {label} | {cell(True)} | {shifts} | {cell(False)} | {paper[name]} |")
    data["omit"] = om
    return lines, data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/mnist"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/mnist")
    ap.add_argument("--parts", default="table,consistent,three", help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--summary-only", action="store_true", help="print the tables of finished runs; train nothing")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    a.runs.mkdir(parents=True, exist_ok=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    log = a.out.with_suffix(".log")
    if not a.summary_only:
        for s in seeds:
            for part in a.parts.split(","):
                for name, args in plan(a.runs, part.strip(), s):
                    run(a.runs, name, args, log)
    found = {p.name.rsplit("-s", 1)[1] for p in a.runs.glob("teacher-s*") if p.is_dir()}
    all_seeds = sorted({int(x) for x in found if x.isdigit()} | set(seeds))
    lines, data = summary(a.runs, all_seeds)
    data["commands"] = {part: [["kdens", *args, "--out", str(a.runs / name)] for name, args in plan(a.runs, part, 0)]
                        for part in PARTS}
    a.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
