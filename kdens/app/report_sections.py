"""The report's result sections, each built from the run folders of one kind of stage.

Every builder takes the :class:`~kdens.app.report_data.Experiment` and a :class:`Figures`
sink and returns a :class:`~kdens.app.report_render.Section`, or None when the stages it
describes are absent (or none of them finished), so the report simply leaves it out.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from kdens import metrics as M
from kdens.artifacts import MANIFEST, atomic_write_json, sha256_file
from kdens.errors import KdensError
from kdens.app.report_data import DataCache, Experiment, StageView, count, fmt, maybe_json, pct, test_scores, total_params
from kdens.app.report_plots import plot_confusion, plot_training_curves
from kdens.app.report_render import Code, Gallery, Image, Para, Section, Table

FIG_DIR = "report"


class Figures:
    """Where the report's files go (``<exp>/report/``), and which ones this report wrote."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.written: set[Path] = set()

    def path(self, name: str) -> Path:
        p = self.root / FIG_DIR / name
        p.parent.mkdir(parents=True, exist_ok=True)
        self.written.add(p)
        return p

    def image(self, path: Path, caption: str) -> Image:
        return Image(path.relative_to(self.root).as_posix(), caption)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "stage"


# ---------------------------------------------------------------- training curves

def curves_section(exp: Experiment, figs: Figures) -> Section | None:
    """Per-epoch losses and validation accuracy of every supervised run of the pipeline."""
    curves = []
    for s in exp.by_kind("generalist", "baseline", "student", "ensemble"):
        if s.kind == "ensemble":
            members = (s.manifest or {}).get("members") or sorted(p.name for p in s.path.glob("member-*"))
            curves += [(f"{s.name}/{m}", "ensemble", h) for m in members
                       if isinstance(h := s.file(f"{m}/history.json"), list) and h]
        elif isinstance(h := s.file("history.json"), list) and h:
            curves.append((s.name, s.kind, h))
    if not curves:
        return None
    path = plot_training_curves(curves, figs.path("training-curves.png"))
    return Section("Training curves", [
        figs.image(path, "Train loss, validation loss and validation accuracy per epoch"),
        Para("Line style by role: teacher solid (ensemble members dotted), hard-label baseline dashed, "
             "student dash-dot. A student's train loss is its distillation loss (soft term scaled by T^2), "
             "so compare students with the others on the validation panels, which are cross-entropy and "
             "accuracy on hard labels for every run.")])


# ---------------------------------------------------------------- confusion matrices

CONFUSION_JSON = "confusion.json"


def confusion_section(exp: Experiment, figs: Figures) -> Section | None:
    """Test-set confusion matrices of the teachers, the hard-label baselines and the students.

    The scores are recomputed from the saved weights (the same teacher a student was
    distilled from); the counts also go to ``report/confusion.json``, each with the sha256 of
    the stage's manifest. A later report reuses a stage's counts while that sha is unchanged:
    scoring every teacher again is most of a report's time (a minute on Fashion-MNIST), and a
    finished stage's predictions cannot change without a new manifest.
    """
    stages = exp.by_kind("generalist", "ensemble", "specialists", "baseline", "student")
    if not stages:
        return None
    previous = maybe_json(figs.root / FIG_DIR / CONFUSION_JSON)  # none or unreadable: recompute all
    previous = previous if isinstance(previous, dict) else {}
    cache, images, notes, record = DataCache(), [], [], {}
    for s in stages:
        sha = sha256_file(s.path / MANIFEST) if (s.path / MANIFEST).is_file() else None
        old = previous.get(s.name) if isinstance(previous.get(s.name), dict) else {}
        if sha and old.get("manifest_sha256") == sha and old.get("kind") == s.kind:
            cm, class_names = np.asarray(old["matrix"], dtype=np.int64), list(old["class_names"])
        else:
            try:
                data = cache.for_manifest(s.manifest)
                scores = test_scores(s, data)
            except (KdensError, OSError, RuntimeError, ValueError, KeyError) as e:
                # one unloadable folder (moved generalist, changed data) must not cost the whole report
                notes.append(f"{s.name}: no confusion matrix ({type(e).__name__}: {e})")
                continue
            cm = M.confusion_matrix(scores, data.y_test, data.num_classes)  # (C, C)
            class_names = list(data.class_names)
        errors, n = int(cm.sum() - cm.trace()), int(cm.sum())
        title = f"{s.name} ({s.kind}): {pct(1 - errors / n if n else None)} accuracy, {errors} errors of {n}"
        path = plot_confusion(cm, class_names, title, figs.path(f"confusion-{_slug(s.name)}.png"))
        images.append(figs.image(path, title))
        record[s.name] = {"kind": s.kind, "class_names": class_names, "test_examples": n,
                          "test_errors": errors, "matrix": cm.tolist(), "manifest_sha256": sha}
    blocks = []
    if images:
        atomic_write_json(figs.path(CONFUSION_JSON), record)
        blocks += [Para("Rows are true classes, columns predictions; colours are row-normalized "
                        "(the share of each true class), numbers are counts. Counts: report/confusion.json."),
                   Gallery(images)]
    blocks += [Para(n) for n in notes]
    return Section("Confusion matrices (test set)", blocks)


# ---------------------------------------------------------------- ensemble

def ensemble_section(exp: Experiment, figs: Figures) -> Section | None:
    blocks = []
    for s in exp.by_kind("ensemble"):
        m = s.metrics or {}
        rows = [[e.get("run", f"member-{k:02d}"), str(e.get("model", "-")), fmt(e.get("seed")),
                 pct(e.get("test_accuracy")), fmt(e.get("test_errors")), fmt(e.get("test_nll"), ".4f"),
                 count(e.get("params"))] for k, e in enumerate(m.get("members", []))]
        rows.append([f"{s.name} ({m.get('method', '?')} mean, T={fmt(m.get('temperature'))})", "", "",
                     pct(m.get("test_accuracy")), fmt(m.get("test_errors")), fmt(m.get("test_nll"), ".4f"),
                     count(m.get("params"))])
        blocks.append(Table(["member", "model", "seed", "test accuracy", "test errors", "test NLL", "params"], rows,
                            note=f"Test disagreement between members: {pct(m.get('disagreement'))}; the ensemble "
                                 f"beats its best member on accuracy: {fmt(m.get('beats_best_member_accuracy'))}, "
                                 f"on NLL: {fmt(m.get('beats_best_member_nll'))}."))
    return Section("Ensemble", blocks) if blocks else None


# ---------------------------------------------------------------- specialists

def _heatmap(s: StageView, clusters: dict, figs: Figures) -> Image | None:
    """The covariance of the generalist's predictions with the groups outlined (redrawn, else copied)."""
    from specialists.plot import save_covariance_heatmap  # the spine imports later stages lazily

    if clusters.get("source") == "groups":
        how = "given by --groups"
    else:
        how = f"k-means on the {clusters.get('affinity') or 'covariance'} matrix, K={clusters.get('n_clusters')}"
        st = clusters.get("stability") or {}
        if st.get("mean_pairwise_ari") is not None:
            how += (f"; across {len(st.get('seeds', []))} k-means seeds the groupings agree at a mean pairwise "
                    f"adjusted Rand index of {st['mean_pairwise_ari']:.2f}")
    caption = (f"{s.name}: covariance of the generalist's predictions on {clusters.get('examples', '?')} "
               f"{clusters.get('split', 'validation')} examples; boxes are the specialists' groups ({how})")
    out = figs.path(f"covariance-{_slug(s.name)}.png")
    try:
        save_covariance_heatmap(clusters["covariance"], clusters["groups"], clusters["classes"], out,
                                title="Covariance of generalist predictions")
    except (KeyError, TypeError, ValueError, KdensError):
        if not (s.path / "clusters.png").exists():
            figs.written.discard(out)
            return None
        shutil.copyfile(s.path / "clusters.png", out)
    return figs.image(out, caption)


def specialists_section(exp: Experiment, figs: Figures) -> Section | None:
    blocks = []
    for s in exp.by_kind("specialists"):
        m, clusters = s.metrics or {}, s.file("clusters.json") or {}
        if clusters and (im := _heatmap(s, clusters, figs)) is not None:
            blocks.append(im)
        gen, comb = m.get("generalist", {}), m.get("combined", {})
        blocks.append(Para(f"{s.name}: generalist {pct(gen.get('test_accuracy'))} ({fmt(gen.get('test_errors'))} "
                           f"errors) -> generalist + specialists {pct(comb.get('test_accuracy'))} "
                           f"({fmt(comb.get('test_errors'))} errors) on the test set; specialists of the "
                           f"generalist's top-{fmt(m.get('top_n'))} classes take part."))
        per_group = {tuple(e["group"]): e for e in m.get("per_group", []) if "group" in e}
        own = {tuple(e["group"]): e for e in m.get("specialists", []) if "group" in e}
        names = clusters.get("classes") or []
        groups = clusters.get("all_groups") or m.get("groups") or []
        rows = []
        for g in groups:
            e, sp = per_group.get(tuple(g), {}), own.get(tuple(g))
            label = ", ".join(names[k] if k < len(names) else str(k) for k in g)
            who = "none (one class)" if not sp else sp["run"] if sp.get("used", True) else f"{sp['run']} (dropped)"
            rows.append([label, who, fmt(e.get("count")),
                         pct(e.get("generalist_accuracy")), pct(e.get("combined_accuracy")),
                         fmt(e.get("delta_correct")), pct(sp.get("test_in_group_accuracy")) if sp else "-",
                         fmt(sp.get("epochs_run")) if sp else "-", count(sp.get("params")) if sp else "-"])
        if rows:
            blocks.append(Table(["classes", "specialist", "test examples", "generalist accuracy",
                                 "combined accuracy", "extra correct", "specialist in-group accuracy", "epochs",
                                 "params"], rows,
                                note="Accuracies on the test examples whose true class is in the group; "
                                     "'extra correct' = combined minus generalist correct answers."))
        for d in m.get("dropped", []):
            blocks.append(Para(f"{s.name}: {d.get('run')} ({', '.join(map(str, d.get('class_names') or d['group']))}) "
                               f"was dropped after the validation check, and the generalist serves its group: "
                               f"{d.get('reason')}."))
        cover = [[fmt(e.get("n_covering")), fmt(e.get("count")), pct(e.get("generalist_accuracy")),
                  pct(e.get("combined_accuracy")), fmt(e.get("delta_correct")),
                  pct(e.get("relative_improvement"))] for e in m.get("by_covering", [])]
        if cover:
            blocks.append(Table(["active specialists covering the true class", "test examples",
                                 "generalist accuracy", "combined accuracy", "extra correct",
                                 "relative improvement"], cover, note="As in Hinton et al. 2015, Table 4."))
    return Section("Specialists", blocks) if blocks else None


# ---------------------------------------------------------------- distillation

def distillation_section(exp: Experiment, figs: Figures) -> Section | None:
    """Per student: teacher, hard-label baseline and distilled errors, gap recovered, agreement, T, alpha."""
    rows = []
    for s in exp.by_kind("student"):
        m = s.metrics or {}
        teacher = exp.get(s.entry.get("teacher"))
        base = exp.get(s.entry.get("baseline"))
        b = m.get("baseline_test_errors")
        if b is None and base is not None and base.usable:
            b = (base.metrics or {}).get("test_errors")
        t, e = m.get("teacher_test_errors"), m.get("test_errors")
        gap = m.get("gap_recovered")
        why = m.get("gap_recovered_note")
        if gap is None and why is None:  # a run from before the note: compute it here
            gap, why = M.gap_recovered(b, t, e)
        gap_cell = pct(gap, 1) if gap is not None else ("n/a (lead within noise)" if why and "noise" in why else "-")
        tparams = total_params(teacher) if teacher is not None and teacher.usable else None
        rows.append([s.name, teacher.name if teacher else str(s.entry.get("teacher", "-")),
                     f"{fmt(t)} ({pct(m.get('teacher_test_accuracy'))})",
                     f"{fmt(b)} ({base.name})" if b is not None and base is not None else
                     f"{fmt(b)} (twin fitted in the run)" if b is not None and m.get("hard_label_twin") else fmt(b),
                     f"{fmt(e)} ({pct(m.get('test_accuracy'))})", gap_cell, pct(m.get("teacher_agreement")),
                     fmt(m.get("temperature")), fmt(m.get("alpha")), _loss(m),
                     str(m.get("transfer", "-")), f"{count(tparams)} -> {count(m.get('params'))}"
                     + (f" ({m['model']}, {m['leaves']} leaves)" if m.get("leaves") is not None else "")])
    if not rows:
        return None
    return Section("Distillation", [Table(
        ["student", "teacher", "teacher errors (acc.)", "hard-label baseline errors", "distilled errors (acc.)",
         "gap recovered", "agreement with teacher", "T", "alpha", "loss", "transfer", "params teacher -> student"],
        rows, note="Errors are counted on the test set. Gap recovered = (baseline - distilled) / (baseline - "
                   "teacher) errors, shown only when the teacher's lead b - t exceeds 2 * sqrt(b + t) errors (twice "
                   "the sampling noise of the difference; n/a otherwise); agreement = share of test examples where "
                   "student and teacher pick the same class. A tree student's baseline is its hard-label twin (the "
                   "same tree settings on hard labels), fitted in its own run; its params are the numbers its nodes "
                   "store.")])


def _loss(m: dict) -> str:
    """The method, and for a feature method where its teacher's features came from (online, memory, disk)."""
    loss = str(m.get("loss", "-"))
    return f"{loss} (teacher features: {m['teacher_features']})" if m.get("teacher_features") else loss


# ---------------------------------------------------------------- deploy

def deploy_section(exp: Experiment, figs: Figures) -> Section | None:
    """The bench table (or each deploy folder's report) and the accuracy/latency Pareto plot."""
    from deploy import bench  # the spine imports later stages lazily

    deploys = exp.by_kind("deploy")
    benches = exp.by_kind("bench")
    bench_json = benches[0].file("bench.json") if benches else None
    if bench_json and bench_json.get("rows"):
        rows, front, source = bench_json["rows"], bench_json.get("pareto_front", []), benches[0].path
    elif deploys:
        names = {d.path.name for d in deploys}  # this pipeline's deploy folders, not older ones beside them
        rows = [r for root in sorted({d.path.parent for d in deploys}) for r in bench.collect(root)
                if r["name"] in names]
        front, source = bench.pareto_front(rows), None
    else:
        return None
    if not rows:
        return None
    table = []
    for r in bench.ranked(rows):  # kdens bench's own order
        gates = r.get("gates_passed")
        table.append(["*" if r.get("pareto") or (r["name"] in front and r.get("device", "host") == "host") else "",
                      r["name"], str(r.get("device", "host")), str(r.get("runtime") or "-"),
                      fmt(None if r.get("size_bytes") is None else r["size_bytes"] / 1024, ".1f"),
                      pct(r.get("accuracy")), fmt(r.get("agreement"), ".4f"),
                      fmt(r.get("latency_b1_quiet_p50_ms"), ".4f"), fmt(r.get("latency_b1_p50_ms"), ".4f"),
                      fmt(r.get("latency_b1_p90_ms"), ".4f"),
                      "-" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.1f}x",
                      "-" if gates is None else ("pass" if gates else "FAIL")])
    out = figs.path("pareto.png")
    if source is not None and (source / "bench.png").exists():
        shutil.copyfile(source / "bench.png", out)
    else:
        bench.plot(rows, front, out)
    where = f"kdens bench ({source.relative_to(exp.root).as_posix()}/bench.json)" if source else \
        "each deploy folder's report.json (no bench stage result: latencies from deploy time)"
    return Section("Deploy", [
        Table(["front", "variant", "device", "runtime", "size (KB)", "test accuracy", "agreement",
               "b1 quiet p50 (ms)", "b1 p50 (ms)", "b1 p90 (ms)", "vs eager", "gates"], table,
              note=f"From {where}. * = on the accuracy / batch-1 latency Pareto front."),
        figs.image(out, "Test accuracy against batch-1 latency (the quiet p50 where kdens bench timed rounds); "
                        "the red step line is the Pareto front")])


def problems(exp: Experiment) -> list:
    """Blocks naming every failed or gate-failed stage with its error, and the stages never run."""
    blocks = []
    for s in exp.stages:
        if s.status in ("failed", "gate-failed"):
            blocks += [Para(f"{s.name} ({s.kind}) {s.status}:"),
                       Code(str(s.entry.get("error") or "no error message recorded"))]
    running = [s.name for s in exp.stages if s.status == "running"]
    if running:
        blocks.append(Para("Interrupted while running (rerun `kdens run` to resume): " + ", ".join(running) + "."))
    pending = [s.name for s in exp.stages if s.status == "pending"]
    if pending:
        blocks.append(Para("Not run (pending): " + ", ".join(pending) + "."))
    missing = [s.name for s in exp.stages if s.status in ("done", "reused") and not s.usable]
    if missing:
        blocks.append(Para("Marked finished but without a manifest in their folder (moved or deleted?): "
                           + ", ".join(missing) + "."))
    return blocks

