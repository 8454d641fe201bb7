"""The experiment report: ``runs/<exp>/report.md`` with its figures, and optionally one HTML file.

Reads ``pipeline.json`` (written by ``kdens run``) and every stage folder it names, and
writes, in order: the summary (the file to ship; teacher, hard-label and distilled student
side by side; accuracy against size); the header (name, config file, when, wall time of this
run and of the stages when built); a table of the stages (status, time, main metrics) with
the errors of failed ones; training curves; test-set confusion matrices of the teachers, baselines
and students; the ensemble; the specialists' covariance heatmap and per-group table;
the distillation table (teacher / hard-label baseline / distilled); the deploy table
and its accuracy-latency Pareto plot; last, the configuration as parsed. A section whose
stages are absent, failed or not yet run is left out.

``report.md`` links ``report/*.png`` relatively; ``report.html`` is rendered from the
same sections as one self-contained page (images as base64 data URIs). Every file is
written atomically. Usage::

    from kdens.app.report import write_report
    write_report(Path("runs/digits"), html=True)
"""

from __future__ import annotations

from pathlib import Path

from kdens.artifacts import atomic_write_text
from kdens.app.report_data import Experiment, StageView, count, duration, fmt, num, pct, to_toml, total_params
from kdens.app.report_render import Code, Para, Section, Table, to_html, to_markdown
from kdens.app.report_sections import (FIG_DIR, Figures, confusion_section, curves_section, deploy_section,
                                       distillation_section, ensemble_section, problems, specialists_section)
from kdens.app.report_summary import summary_section

REPORT_MD, REPORT_HTML = "report.md", "report.html"
RESULT_SECTIONS = (curves_section, confusion_section, ensemble_section, specialists_section,
                   distillation_section, deploy_section)


def write_report(exp_dir: Path, *, html: bool = False) -> Path:
    """Write ``exp_dir/report.md`` (and ``report/*.png``), plus ``report.html`` when asked.

    Args:
        exp_dir: an experiment folder holding ``pipeline.json`` and the stage folders.
        html: also write ``report.html``, one self-contained file with the images inlined.

    Returns:
        The path of ``report.md``.

    Raises:
        ArtifactError: ``exp_dir`` has no readable ``pipeline.json``.
    """
    exp = Experiment.load(Path(exp_dir))
    figs = Figures(exp.root)
    # the answer first (what to ship, what distillation bought), the details after, the raw config last
    first = summary_section(exp, figs)
    sections = ([first] if first is not None else []) + [header_section(exp), stages_section(exp)]
    sections += [s for build in RESULT_SECTIONS if (s := build(exp, figs)) is not None]
    sections.append(config_section(exp))
    title = f"kdens experiment: {exp.pipeline.get('name', exp.root.name)}"
    md = atomic_write_text(exp.root / REPORT_MD, to_markdown(title, sections))
    if html:
        atomic_write_text(exp.root / REPORT_HTML, to_html(title, sections, exp.root))
    _remove_stale(exp.root / FIG_DIR, figs.written)
    return md


def _remove_stale(fig_dir: Path, written: set[Path]) -> None:
    """Drop figures an earlier report wrote for stages this one no longer shows."""
    for p in fig_dir.glob("*"):
        if p.suffix in (".png", ".json") and p.is_file() and p not in written:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- header, config, stages

def header_section(exp: Experiment) -> Section:
    p = exp.pipeline
    statuses: dict[str, int] = {}
    for s in exp.stages:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    rows = [["experiment", str(p.get("name", exp.root.name))],
            ["folder", exp.root.as_posix()],
            ["config file", str(p.get("config_file") or "-")],
            ["started", str(p.get("started") or "-")],
            ["finished", str(p.get("finished") or "not finished")],
            ["wall time of this run", duration(p.get("wall_seconds"))],
            ["wall time of the stages when built", duration(sum(
                num((s.manifest or {}).get("wall_seconds")) or 0.0 for s in exp.stages if s.usable))],
            ["stages", ", ".join(f"{n} {k}" for k, n in statuses.items()) or "none"]]
    return Section("Overview", [Table(["", ""], rows)])


def config_section(exp: Experiment) -> Section:
    config = exp.pipeline.get("config")
    if not isinstance(config, dict) or not config:
        return Section("Configuration", [Para("pipeline.json records no configuration.")])
    src = exp.pipeline.get("config_file")
    return Section("Configuration", [Para(f"As parsed from {src}:" if src else "As parsed:"),
                                     Code(to_toml(config), "toml")])


def _main_metrics(s: StageView) -> tuple[str, str, str, str]:
    """(test accuracy, test errors, params, note) of one stage, from its own files."""
    m = s.metrics or {}
    if s.kind == "deploy":
        r = s.file("report.json") or {}
        acc, n = num(r.get("accuracy")), num(r.get("n_test"))
        errors = fmt(round((1 - acc) * n)) if acc is not None and n else "-"
        from deploy.report import b1_latency  # the spine imports later stages lazily

        found = b1_latency(r)
        lat = found[1].get("p50") if found else None
        note = f"{fmt((r.get('size_bytes') or 0) / 1024, '.1f')} KB, b1 p50 {fmt(lat, '.4f')} ms, {r.get('verdict', '-')}"
        return pct(acc), errors, count(r.get("params")), note
    if s.kind == "bench":
        b = s.file("bench.json") or {}
        return "-", "-", "-", f"{len(b.get('rows', []))} variants; front: {', '.join(b.get('pareto_front', [])) or '-'}"
    params = m.get("params")
    if s.kind == "ensemble":
        note = f"{m.get('num_members', '?')} members, {m.get('method', '?')} mean"
    elif s.kind == "specialists":
        params = total_params(s)
        note = (f"generalist + {len(m.get('specialists', []))} specialists; generalist alone "
                f"{pct(m.get('generalist', {}).get('test_accuracy'))}")
    else:
        note = f"{fmt(m.get('epochs_run'))} epoch{'' if m.get('epochs_run') == 1 else 's'}"
        if m.get("stopped_early"):  # a cut schedule is a different run from the one asked for: say so
            lr = m.get("lr_at_stop")
            note += (f" of {fmt(m.get('epochs_planned'))} (stopped early"
                     + (f", lr still {lr:.2g}" if isinstance(lr, float) else "") + ")")
        if s.kind == "student":
            note += f", teacher {s.entry.get('teacher', '-')}"
    return pct(m.get("test_accuracy")), fmt(m.get("test_errors")), count(params), note


def stages_section(exp: Experiment) -> Section:
    rows = []
    for s in exp.stages:
        acc, errors, params, note = _main_metrics(s) if s.usable else ("-", "-", "-", "")
        built = (s.manifest or {}).get("wall_seconds") if s.usable else None
        rows.append([s.name, s.kind, s.status, fmt(num(s.entry.get("seconds")), ".1f"), fmt(num(built), ".1f"),
                     acc, errors, params, note, str(s.entry.get("dir", "-"))])
    blocks = [Table(["stage", "kind", "status", "seconds (this run)", "seconds (when built)", "test accuracy",
                     "test errors", "params", "notes", "folder"], rows,
                    note="'seconds (this run)' is the time this invocation spent (small for a reused stage); "
                         "'when built' is the wall time in the stage's manifest.")]
    return Section("Stages", blocks + problems(exp))


__all__ = ["REPORT_HTML", "REPORT_MD", "write_report"]
