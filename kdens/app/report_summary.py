"""The report's first screen and ``kdens run``'s last lines: which file to ship, and what
distillation bought against the same student trained on hard labels.

The recommended artifact is the host artifact that passed its gates and comes first in
``kdens bench``'s order (batch-1 latency, its quiet level where timed in rounds): the gates
already hold accuracy to the budget the user gave, so among the files that keep it, the
fastest is the one to ship. With no bench result, each deploy folder's report stands in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdens.app.report_data import Experiment, StageView, count, fmt, num, pct, total_params
from kdens.app.report_plots import figure, save_figure
from kdens.app.report_render import Image, Para, Section, Table

BYTES_PER_PARAM = 4  # float32 weights: what a model costs before export


@dataclass
class Model:
    """One row of the three-way comparison."""

    role: str
    name: str
    accuracy: float | None
    errors: int | None
    params: int | None
    gap_recovered: float | None = None

    @property
    def size_bytes(self) -> int | None:
        return None if self.params is None else self.params * BYTES_PER_PARAM


@dataclass
class Summary:
    """What the first screen says; every field may be missing when its stage is."""

    ship: dict | None = None
    """The recommended artifact's bench row, plus ``path`` (the model file, relative to the experiment)."""
    ship_note: str = ""
    """Why nothing is recommended, when ``ship`` is None."""
    models: list[Model] = field(default_factory=list)
    """Teacher, hard-label student, distilled student (those that exist), in that order."""
    artifacts: list[dict] = field(default_factory=list)
    """Every deployed artifact's bench row (host), for the plot."""


def _rows(exp: Experiment) -> list[dict]:
    from deploy import bench

    benches = exp.by_kind("bench")
    rows = (benches[0].file("bench.json") or {}).get("rows") if benches else None
    if rows:
        return [r for r in rows if r.get("device", "host") == "host"]
    names = {d.path.name for d in exp.by_kind("deploy")}
    roots = sorted({d.path.parent for d in exp.by_kind("deploy")})
    return [r for root in roots for r in bench.collect(root) if r["name"] in names]


def _student(exp: Experiment) -> StageView | None:
    """The student the pipeline deploys (else its first finished one)."""
    deployed = [exp.get(d.entry.get("student")) for d in exp.by_kind("deploy")]
    return next((s for s in deployed if s is not None and s.usable), None) or next(iter(exp.by_kind("student")), None)


def summarize(exp: Experiment) -> Summary:
    """Read the experiment into a :class:`Summary` (files only; nothing is recomputed)."""
    from deploy import bench

    out = Summary()
    rows = _rows(exp)
    out.artifacts = [r for r in rows if not r.get("baseline")]
    shippable = [r for r in bench.ranked(out.artifacts) if r.get("gates_passed") is not False]
    if shippable:
        best = dict(shippable[0])
        deploy = next((d for d in exp.by_kind("deploy") if d.path.name == best["name"]), None)
        report = deploy.file("report.json") if deploy is not None else None
        model_file = (report or {}).get("model_file")
        if deploy is not None and model_file:
            best["path"] = (deploy.path / model_file).as_posix()
        out.ship = best
    elif out.artifacts:
        out.ship_note = "no artifact passed its gates (see the Deploy section for by how much each missed)"
    else:
        out.ship_note = "nothing was deployed (add a [deploy] table)"
    student = _student(exp)
    if student is None:
        return out
    m = student.metrics or {}
    teacher, base = exp.get(student.entry.get("teacher")), exp.get(student.entry.get("baseline"))
    if teacher is not None and teacher.usable:
        tm = teacher.metrics or {}
        acc = tm.get("test_accuracy", (tm.get("combined") or {}).get("test_accuracy"))
        errors = tm.get("test_errors", (tm.get("combined") or {}).get("test_errors"))
        out.models.append(Model("teacher", teacher.name, acc, errors, total_params(teacher)))
    if base is not None and base.usable:
        bm = base.metrics or {}
        out.models.append(Model("hard-label student", base.name, bm.get("test_accuracy"), bm.get("test_errors"),
                                bm.get("params")))
    out.models.append(Model("distilled student", student.name, m.get("test_accuracy"), m.get("test_errors"),
                            m.get("params"), num(m.get("gap_recovered"))))
    return out


def _size(n: int | float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KB" if n < 1024 ** 2 else f"{n / 1024 ** 2:.2f} MB"


def ship_line(s: Summary) -> str:
    """One line: the file to ship and what it costs, or why there is none."""
    r = s.ship
    if r is None:
        return f"ship: nothing recommended: {s.ship_note}"
    lat = r.get("latency_b1_p50_ms")
    return (f"ship: {r.get('path', r['name'])}  ({r.get('target')} {r.get('precision')}, {_size(r.get('size_bytes'))}, "
            f"batch-1 p50 {fmt(lat, '.4f')} ms, test accuracy {pct(r.get('accuracy'))})")


def comparison_lines(s: Summary) -> list[str]:
    """One line per model of the three-way comparison."""
    lines = []
    for m in s.models:
        gap = "" if m.role != "distilled student" else f", gap recovered {pct(m.gap_recovered, 1)}"
        lines.append(f"{m.role} ({m.name}): {pct(m.accuracy)} test accuracy, {fmt(m.errors)} errors, "
                     f"{count(m.params)} params ({_size(m.size_bytes)} float32){gap}")
    return lines


def terminal_lines(exp_dir: Path) -> list[str]:
    """What ``kdens run`` prints last."""
    s = summarize(Experiment.load(Path(exp_dir)))
    return [ship_line(s), *comparison_lines(s)]


def plot_summary(s: Summary, path: Path) -> Path:
    """Test accuracy against size (log x): the models as float32 weights, every deployed artifact."""
    fig = figure(7, 4.2, layout="constrained")
    ax = fig.add_subplot()
    markers = {"teacher": "s", "hard-label student": "v", "distilled student": "o"}
    for m in s.models:
        if m.accuracy is not None and m.size_bytes:
            ax.scatter(m.size_bytes / 1024, 100 * m.accuracy, marker=markers[m.role], s=60, label=f"{m.role} ({m.name})")
    arts = [r for r in s.artifacts if r.get("accuracy") is not None and r.get("size_bytes")]
    if arts:
        ax.scatter([r["size_bytes"] / 1024 for r in arts], [100 * r["accuracy"] for r in arts], marker="x", s=50,
                   color="black", label="deployed artifacts")
        for i, r in enumerate(sorted(arts, key=lambda r: r["size_bytes"])):
            star = " (ship)" if s.ship is not None and r["name"] == s.ship["name"] else ""
            ax.annotate(r["name"] + star, (r["size_bytes"] / 1024, 100 * r["accuracy"]), fontsize=7,
                        xytext=(6, (8, -12, 20, -24)[i % 4]), textcoords="offset points")  # neighbours apart
    ax.set_xscale("log")
    ax.set_xlabel("size (KB, log scale; models as float32 weights)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def summary_section(exp: Experiment, figs) -> Section | None:
    """The first screen: the file to ship, the three-way comparison, accuracy against size."""
    s = summarize(exp)
    if s.ship is None and not s.models and not s.artifacts:
        return None
    r = s.ship
    if r is None:
        blocks: list = [Para(f"Nothing to recommend: {s.ship_note}.")]
    else:
        blocks = [Table(["ship this file", "target", "precision", "size", "batch-1 p50 (ms)", "test accuracy"],
                        [[str(r.get("path", r["name"])), str(r.get("target")), str(r.get("precision")),
                          _size(r.get("size_bytes")), fmt(r.get("latency_b1_p50_ms"), ".4f"), pct(r.get("accuracy"))]],
                        note="The fastest deployed file that passed its gates, in kdens bench's order "
                             "(batch-1 latency, its quiet level where timed in rounds); the Deploy section has all.")]
    if s.models:
        rows = [[m.role, m.name, pct(m.accuracy), fmt(m.errors), count(m.params), _size(m.size_bytes),
                 pct(m.gap_recovered, 1) if m.role == "distilled student" else ""] for m in s.models]
        blocks.append(Table(["", "run", "test accuracy", "test errors", "params", "size (float32)",
                             "gap recovered"], rows,
                            note="Gap recovered = (hard-label errors - distilled errors) / (hard-label errors - "
                                 "teacher errors), on the test set."))
    path = plot_summary(s, figs.path("summary.png"))
    blocks.append(Image(path.relative_to(exp.root).as_posix(),
                        "Test accuracy against size: teacher, hard-label and distilled student (float32 weights) "
                        "and every deployed artifact"))
    return Section("Summary", blocks)
