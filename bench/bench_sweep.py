"""Grid of distillations through the real CLI: temperatures x teachers x students x seeds.

Covers issue #6's benchmark items 2-4: the temperature sweep for a large and a tiny
student (Hinton et al. 2015, section 3: T >= 8 works alike for a big student, 2.5-4 is
best for a tiny one), an ensemble vs its members vs the student distilled from it, and
students distilled from the generalist alone vs from generalist + specialists.

Every cell is a ``kdens distill`` run in ``<runs>/<teacher>-<student>-T<t>-s<seed>``;
each student x seed also gets a hard-label baseline ``<runs>/hard-<student>-s<seed>``
(``kdens train-generalist``, same epochs / batch / lr / grad clip), passed as
``--baseline`` so every student reports gap_recovered = (b - s) / (b - t). The grad clip
applies to every run for comparability: at T = 20 the unclipped student diverges here.
Jobs run as separate processes, ``--jobs`` at a time, each single-threaded; a finished
run folder (manifest.json) is reused, one whose config differs is reported stale.

    .venv/bin/python bench/bench_sweep.py --teacher cnn=runs/fm/cnn --student big=800,800 \
        --student tiny=30,30 --temperatures 1,2,2.5,4,8,20 --epochs 15 --grad-clip 5 \
        --runs runs/fm/sweep --out bench/results/sweep-temperature
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.teachers import load_teacher, soft_scores_depend_on_temperature
from kdens.artifacts import MANIFEST, atomic_write_json, atomic_write_text, sha256_file
from kdens.errors import KdensError

KDENS = [sys.executable, "-m", "kdens"]
REPO = Path(__file__).resolve().parents[1]
_LOG_LOCK = threading.Lock()


@dataclass
class Job:
    """One kdens process: its run folder, arguments and the jobs that must finish first."""

    name: str
    args: list[str]
    want: dict  # dotted manifest-config keys a reused run must match
    needs: list[str] = field(default_factory=list)
    teacher: str | None = None
    student: str = ""
    temperature: float | None = None
    seed: int = 0


def pairs(values: list[str], flag: str, example: str) -> dict[str, str]:
    """``NAME=VALUE`` flags -> dict; names become folder names, so keep them plain."""
    out = {}
    for v in values:
        name, sep, val = v.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name) or not val or name in out:
            sys.exit(f"{flag} {v!r}: give NAME=VALUE with a unique NAME of letters, digits or _ "
                     f"(e.g. {flag} {example})")
        out[name] = val
    return out


def plan(args: argparse.Namespace, teachers: dict[str, str], students: dict[str, str], temps: list[float], seeds: list[int],
         t_dependent: dict[str, bool]) -> list[Job]:
    """Baselines first, then one cache-building distillation per soft-target cache, then the rest.

    The first run for a cache key builds ``<runs>/soft_targets/<key>``; two processes
    building the same key at once would race, so every other run of that key waits for it.
    T is part of the key only for teachers whose soft scores depend on it (arithmetic
    ensembles), so a T sweep of a generalist builds its cache once.
    """
    runs = Path(args.runs)
    train = ["--epochs", str(args.epochs), "--grad-clip", str(args.grad_clip), "--quiet"]
    train += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    train += ["--lr", str(args.lr)] if args.lr else []
    want_train = {"train.epochs": args.epochs, "train.grad_clip": args.grad_clip, "data": args.data,
                  **({"train.batch_size": args.batch_size} if args.batch_size else {}),
                  **({"train.lr": args.lr} if args.lr else {})}
    base, dist = [], []
    for st, hidden in students.items():
        model = ["--data", args.data, "--model", "mlp", "--model-arg", f"hidden={hidden}", *train]
        want = {**want_train, "model_args.hidden": [int(h) for h in hidden.split(",")]}
        for s in seeds:
            b = f"hard-{st}-s{s}"
            base.append(Job(b, ["train-generalist", *model, "--seed", str(s), "--out", str(runs / b)],
                            {**want, "train.seed": s}, student=st, seed=s))
            for tl, tdir in teachers.items():
                for t in temps:
                    name = f"{tl}-{st}-T{t:g}-s{s}"
                    a = ["distill", "--teacher", tdir, *model, "--temperature", f"{t:g}", "--alpha",
                         f"{args.alpha:g}", "--seed", str(s), "--baseline", str(runs / b),
                         "--cache-dir", str(runs / "soft_targets"), "--out", str(runs / name)]
                    w = {**want, "train.seed": s, "temperature": t, "alpha": args.alpha, "teacher_sha": tdir}
                    dist.append(Job(name, a, w, [b], tl, st, t, s))
    # cheapest student builds each cache: the other runs of that key wait for it
    cost = {st: sum(int(h) for h in hid.split(",")) for st, hid in students.items()}
    builders: dict[tuple, Job] = {}
    for j in sorted(dist, key=lambda j: (cost[j.student], j.seed)):
        builders.setdefault((j.teacher, j.temperature if t_dependent[j.teacher] else None), j)
    first = list(builders.values())
    rest = [j for j in dist if j not in first]
    for j in rest:
        j.needs.append(builders[(j.teacher, j.temperature if t_dependent[j.teacher] else None)].name)
    return base + first + rest


def stale(run: Path, want: dict) -> str | None:
    """Why a finished run does not belong to this sweep (another config), or None."""
    m = json.loads((run / MANIFEST).read_text())
    for key, v in want.items():
        if key == "teacher_sha":  # the teacher is matched by its manifest's hash, not its path spelling
            if sha256_file(Path(v) / MANIFEST) not in m.get("inputs", {}).values():
                return f"stale: {run} was distilled from another teacher than {v}; delete it or pick another --runs"
            continue
        got = m.get("config", {})
        for k in key.split("."):
            got = got.get(k) if isinstance(got, dict) else None
        got = [got] if isinstance(v, list) and isinstance(got, int) else got  # hidden=30 is stored as 30
        if got != v:
            return f"stale: {run} has {key}={got}, this sweep asks {v}; delete it or pick another --runs"
    return None


def execute(job: Job, runs: Path, log: Path) -> dict:
    """Run one job (or reuse its finished folder); the failure's last line is kept as status."""
    run = runs / job.name
    if (run / MANIFEST).exists():
        why = stale(run, job.want)
        wall = json.loads((run / MANIFEST).read_text()).get("wall_seconds")
        return {"status": why or "reused", "seconds": wall, "reused": True}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.time()
    r = subprocess.run(KDENS + job.args, check=False, capture_output=True, text=True, env=env)
    seconds = round(time.time() - t0, 1)
    with _LOG_LOCK, open(log, "a") as f:
        f.write(f"$ kdens {shlex.join(job.args)}  # exit {r.returncode}, {seconds} s\n{r.stdout}{r.stderr}")
    status = "ok" if r.returncode == 0 else "failed: " + (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
    return {"status": status, "seconds": seconds, "reused": False}


def run_all(jobs: list[Job], runs: Path, n: int, log: Path) -> dict[str, dict]:
    """Run the jobs ``n`` at a time, each after the jobs it needs.

    ``jobs`` lists every job after those it needs and the pool takes them in order, so
    a job that waits only waits on jobs already running: no deadlock.
    """
    futures: dict[str, Future] = {}

    def task(job: Job) -> dict:
        for dep in job.needs:
            futures[dep].result()  # a failed dependency shows up in the dependent's own status
        return execute(job, runs, log)

    with ThreadPoolExecutor(n) as pool:
        for j in jobs:
            futures[j.name] = pool.submit(task, j)
    return {name: f.result() for name, f in futures.items()}


def run_metrics(run: Path, status: str) -> dict:
    """metrics.json of a run that finished and belongs to this sweep, else {}."""
    ok = status in ("ok", "reused") and (run / MANIFEST).exists()
    return json.loads((run / "metrics.json").read_text()) if ok else {}


def teacher_info(run_dir: str) -> dict:
    """A teacher's own test errors; an ensemble's members too, a specialists run's generalist too."""
    d = Path(run_dir)
    stage = json.loads((d / MANIFEST).read_text())["stage"]
    m = json.loads((d / "metrics.json").read_text())
    info = {"run": run_dir, "stage": stage, "test_errors": m.get("test_errors"),
            "test_accuracy": m.get("test_accuracy")}
    if stage == "ensemble":
        members = m.get("members") or [{**json.loads((p / "metrics.json").read_text()), "run": p.name}
                                       for p in sorted(d.glob("member-*"))]
        info["method"] = m.get("method")
        info["members"] = [{k: x.get(k) for k in ("run", "seed", "test_errors", "test_accuracy", "val_accuracy")}
                           for x in members]
        # the member a practitioner would pick is the best on validation; best on test is hindsight
        info["best_member_by_val"] = max(info["members"], key=lambda x: x["val_accuracy"] or 0)["run"]
        info["best_member_by_test"] = min(info["members"], key=lambda x: x["test_errors"] or 1e9)["run"]
    elif stage == "specialists":
        info.update(test_errors=m["combined"]["test_errors"], test_accuracy=m["combined"]["test_accuracy"],
                    generalist_test_errors=m["generalist"]["test_errors"], groups=m.get("groups"))
    return info


def machine() -> dict:
    """nproc, CPU model, torch version and git commit (with +dirty for local changes)."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], check=False, capture_output=True, text=True, cwd=REPO)
        return r.stdout.strip() if r.returncode == 0 else "unknown"

    commit = git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "git": commit}


def fmt(x, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def student_tables(name: str, hidden: str, rows: list[dict], teachers: list[str], temps: list[float],
                   seeds: list[int], baselines: list[dict]) -> list[str]:
    """Markdown for one student: test errors, gap recovered and agreement, T x teacher."""
    def cell_runs(tl, t):
        return [r for r in rows if r["teacher"] == tl and r["temperature"] == t]

    def mean(rs, k):
        v = [r[k] for r in rs if r.get(k) is not None]
        return statistics.mean(v) if v else None

    b_err = [b["test_errors"] for b in baselines]
    out = [f"## Student {name} (mlp {hidden.replace(',', '-')})", "",
           "Hard-label baseline test errors: " + ", ".join(f"s{b['seed']} {fmt(b['test_errors'])}"
                                                           + ("" if b["status"] in ("ok", "reused") else
                                                              f" ({b['status']})") for b in baselines)
           + (f" (mean {statistics.mean(b_err):g})" if len(b_err) > 1 and None not in b_err else ""), ""]
    teacher_err = {tl: sorted({r["teacher_test_errors"] for r in rows if r["teacher"] == tl
                               and r.get("teacher_test_errors") is not None}) for tl in teachers}
    head = "| T | " + " | ".join(f"{tl} (teacher {'/'.join(map(str, teacher_err[tl])) or '?'})"
                                 for tl in teachers) + " |"
    best = {}
    for tl in teachers:
        means = {t: mean(cell_runs(tl, t), "test_errors") for t in temps}
        done = [v for v in means.values() if v is not None]
        best[tl] = {t for t, v in means.items() if done and v == min(done)}
    for title, key, spec in (("Test errors (mean over seeds; each seed in brackets; **bold** = best T)",
                              "test_errors", "g"), ("Gap recovered (b - s) / (b - t)", "gap_recovered", ".0%"),
                             ("Agreement with the teacher on the test set", "teacher_agreement", ".4f")):
        out += [title + ":", "", head, "|---" * (len(teachers) + 1) + "|"]
        for t in temps:
            cells = []
            for tl in teachers:
                rs = cell_runs(tl, t)
                m = mean(rs, key)
                bad = sorted({r["status"][:100] for r in rs if r["status"] not in ("ok", "reused")})
                c = fmt(m, spec) if m is not None else ("; ".join(bad) if bad else "n/a")
                if key == "test_errors" and t in best[tl]:
                    c = f"**{c}**"
                if len(seeds) > 1:
                    c += " (" + ", ".join(fmt(r.get(key), spec) if r.get(key) is not None else
                                          r["status"].split(":")[0].replace("reused", "n/a").replace("ok", "n/a")
                                          for r in rs) + ")"
                cells.append(c)
            out.append(f"| {t:g} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def teachers_section(info: dict[str, dict]) -> list[str]:
    out = ["## Teachers", "", "| teacher | run | stage | test errors | test accuracy | notes |", "|---|---|---|---|---|---|"]
    for tl, i in info.items():
        note = ""
        if i["stage"] == "ensemble":
            note = (f"{i['method']} mean of {len(i['members'])} members; best member by validation "
                    f"{i['best_member_by_val']}, by test {i['best_member_by_test']}")
        elif i["stage"] == "specialists":
            note = f"generalist alone {i['generalist_test_errors']} errors; groups {i['groups']}"
        out.append(f"| {tl} | `{i['run']}` | {i['stage']} | {fmt(i['test_errors'])} | "
                   f"{fmt(i['test_accuracy'], '.4f')} | {note} |")
    for tl, i in info.items():
        if i["stage"] == "ensemble":
            out += ["", f"Members of {tl}:", "", "| member | seed | test errors | test accuracy | val accuracy |",
                    "|---|---|---|---|---|"]
            out += [f"| {x['run']} | {fmt(x['seed'])} | {fmt(x['test_errors'])} | {fmt(x['test_accuracy'], '.4f')} "
                    f"| {fmt(x['val_accuracy'], '.4f')} |" for x in i["members"]]
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", action="append", required=True, metavar="LABEL=RUN_DIR",
                    help="teacher run folder (generalist, ensemble, specialists), repeatable")
    ap.add_argument("--student", action="append", required=True, metavar="NAME=HIDDEN",
                    help="mlp student hidden sizes, repeatable: big=800,800")
    ap.add_argument("--temperatures", default="1,2,2.5,4,8,20")
    ap.add_argument("--alpha", type=float, default=0.1, help="weight of the hard-label loss")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--grad-clip", type=float, default=5.0, help="for every run, baselines included")
    ap.add_argument("--batch-size", type=int, default=None, help="passed to every run [kdens default]")
    ap.add_argument("--lr", type=float, default=None, help="passed to every run [kdens default]")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--runs", default="runs/fm/sweep", help="folder for the run folders and soft_targets/")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="bench/results/sweep", help="writes OUT.json, OUT.md and OUT.log")
    ap.add_argument("--dry-run", action="store_true", help="print the planned kdens commands and stop")
    args = ap.parse_args()
    teachers = pairs(args.teacher, "--teacher", "cnn=runs/fm/cnn")
    students = pairs(args.student, "--student", "big=800,800")
    try:
        temps = [float(t) for t in args.temperatures.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
        for hid in students.values():
            list(map(int, hid.split(",")))
    except ValueError as e:
        sys.exit(f"--temperatures, --seeds and --student sizes are comma lists of numbers: {e}")
    try:  # T-dependence decides how many caches a teacher needs; a bad folder fails here, not 40 runs later
        t_dependent = {tl: soft_scores_depend_on_temperature(load_teacher(d)) for tl, d in teachers.items()}
        info = {tl: teacher_info(d) for tl, d in teachers.items()}
    except (KdensError, OSError, KeyError) as e:
        sys.exit(f"--teacher: {e}")

    runs, out = Path(args.runs), Path(args.out)
    jobs = plan(args, teachers, students, temps, seeds, t_dependent)
    if args.dry_run:
        for j in jobs:
            print(("# after " + ", ".join(j.needs) + "\n" if j.needs else "") + "kdens " + shlex.join(j.args))
        return
    runs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    status = run_all(jobs, runs, args.jobs, out.with_suffix(".log"))
    wall = round(time.time() - t0, 1)

    keep = ("test_errors", "test_accuracy", "teacher_test_errors", "teacher_test_accuracy", "teacher_agreement",
            "baseline_test_errors", "gap_recovered", "epochs_run", "train_seconds")
    rows = []
    for j in jobs:
        m = run_metrics(runs / j.name, status[j.name]["status"])
        rows.append({"run": j.name, "kind": "distill" if j.teacher else "hard", "teacher": j.teacher,
                     "student": j.student, "temperature": j.temperature, "seed": j.seed, **status[j.name],
                     **{k: m.get(k) for k in keep}})
    mach = machine()
    result = {"command": shlex.join([sys.executable, *sys.argv]), "machine": mach, "wall_seconds": wall,
              "settings": {"teachers": teachers, "students": students, "temperatures": temps, "seeds": seeds,
                           "alpha": args.alpha, "epochs": args.epochs, "grad_clip": args.grad_clip,
                           "batch_size": args.batch_size, "lr": args.lr, "data": args.data, "runs": args.runs},
              "t_dependent_cache": t_dependent, "teachers": info, "runs": rows}
    atomic_write_json(out.with_suffix(".json"), result)

    run_s = [r["seconds"] for r in rows if r["seconds"] is not None and not r["reused"]]
    md = ["# Distillation sweep", "", f"`{result['command']}`", "",
          (f"Machine: {mach['nproc']} CPUs ({mach['cpu']}), torch {mach['torch']}, git {mach['git']}. "
          f"{args.data}, alpha {args.alpha:g}, {args.epochs} epochs, grad clip {args.grad_clip:g}, "
          f"{args.jobs} single-threaded jobs at a time. Wall time {wall:.0f} s in all; {len(run_s)} runs "
          f"trained now, {sum(run_s):.0f} s of run time, {len(rows) - len(run_s)} reused."), ""]
    md += teachers_section(info)
    for st, hid in students.items():
        md += student_tables(st, hid, [r for r in rows if r["student"] == st and r["kind"] == "distill"],
                             list(teachers), temps, seeds, [r for r in rows if r["student"] == st and
                                                            r["kind"] == "hard"])
    md += ["## Runs", "", "| run | status | wall s | test errors |", "|---|---|---|---|"]
    md += [f"| {r['run']} | {r['status']} | {fmt(r['seconds'])} | {fmt(r['test_errors'])} |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
