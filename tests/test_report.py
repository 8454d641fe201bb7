"""The experiment report on a real, tiny digits experiment built stage by stage through the CLI."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import tomllib
from pathlib import Path

import pytest
import torch

from kdens.app.pipeline import run_pipeline
from kdens.app.plan import load_plan
from kdens.app.report import write_report
from kdens.errors import ArtifactError, GateFailed

PIPELINE = """
name = "digits"
[data]
data = "digits"
val_fraction = 0.1
[generalist]
model = "mlp"
model_args = { hidden = [32] }
epochs = 8
batch_size = 32
[ensemble]
members = 2
model = "mlp"
model_args = { hidden = [16] }
epochs = 2
batch_size = 64
[specialists]
groups = "3,5,8;1,7"
epochs = 2
batch_size = 64
[[distill]]
name = "student"
teacher = "specialists"
model = "mlp"
model_args = { hidden = [16] }
temperature = 4.0
alpha = 0.1
epochs = 8
batch_size = 32
[deploy]
student = "student"
targets = ["onnx:float", "onnx:int8"]
batch_sizes = [1]
threads = 1
max_latency_ms = 1e-6
[bench]
threads = 1
batch_sizes = [1]
"""
CONFIG = tomllib.loads(PIPELINE)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A real ``kdens run`` of every stage kind on digits; both exports miss an impossible latency budget."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops on a shared 2-core box
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "digits.toml").write_text(PIPELINE)
    root = tmp / "digits"
    try:
        with pytest.raises(GateFailed, match="latency"):
            run_pipeline(load_plan(tmp / "digits.toml", out=root), progress=False, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    md = root / "report.md"
    pipeline = _json(root / "pipeline.json")
    return {"root": root, "md": md, "text": md.read_text(), "pipeline": pipeline}


def _section(text: str, title: str) -> str:
    """The Markdown between '## title' and the next level-2 heading."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert m, f"no section {title!r}"
    return m.group(1)


def _table_rows(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[2:]]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _json(path: Path):
    return json.loads(Path(path).read_text())


def test_report_has_every_section_in_order(experiment):
    text = experiment["text"]
    assert experiment["md"] == experiment["root"] / "report.md"
    titles = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert titles == ["Summary", "Overview", "Stages", "Training curves", "Confusion matrices (test set)",
                      "Ensemble", "Specialists", "Distillation", "Deploy", "Configuration"]
    assert text.startswith("# kdens experiment: digits\n")
    overview = _section(text, "Overview")
    assert "digits.toml" in overview and experiment["pipeline"]["started"] in overview


def test_configuration_block_is_the_config_as_toml(experiment):
    block = re.search(r"```toml\n(.*?)\n```", _section(experiment["text"], "Configuration"), re.DOTALL).group(1)
    assert tomllib.loads(block) == CONFIG == experiment["pipeline"]["config"]
    assert "[generalist]\nmodel = \"mlp\"\nmodel_args = { hidden = [32] }\n" in block  # as people write it
    assert "[[distill]]\nname = \"student\"" in block


def test_stages_table_has_status_time_and_metrics(experiment):
    root, rows = experiment["root"], _table_rows(_section(experiment["text"], "Stages"))
    by_name = {r[0]: r for r in rows}
    assert list(by_name) == [s["name"] for s in experiment["pipeline"]["stages"]]
    for s in experiment["pipeline"]["stages"]:
        assert by_name[s["name"]][2] == s["status"] and by_name[s["name"]][3] == f"{s['seconds']:.1f}"
    gen = _json(root / "generalist" / "metrics.json")
    assert by_name["generalist"][5] == f"{100 * gen['test_accuracy']:.2f}%"
    assert by_name["generalist"][6] == str(gen["test_errors"]) and by_name["generalist"][7] == f"{gen['params']:,}"
    assert {s["status"] for s in experiment["pipeline"]["stages"]} == {"done", "gate-failed"}
    for target in ("onnx-float", "onnx-int8"):  # a failed gate keeps the artifact: its numbers are shown
        deploy = _json(root / "deploy" / target / "report.json")
        assert by_name[f"deploy:{target}"][2] == "gate-failed"
        assert by_name[f"deploy:{target}"][5] == f"{100 * deploy['accuracy']:.2f}%"


def test_gate_failed_stages_show_their_error(experiment):
    stages = _section(experiment["text"], "Stages")
    errors = {s["name"]: s["error"] for s in experiment["pipeline"]["stages"] if s["status"] == "gate-failed"}
    assert set(errors) == {"deploy:onnx-float", "deploy:onnx-int8"}
    for name, error in errors.items():
        assert "latency" in error and f"{name} (deploy) gate-failed:" in stages
        assert f"```\n{error}\n```" in stages


def test_figures_are_real_pngs_and_all_linked(experiment):
    root, text = experiment["root"], experiment["text"]
    links = re.findall(r"!\[[^\]]*\]\((report/[^)]+\.png)\)", text)
    pngs = sorted(p.relative_to(root).as_posix() for p in (root / "report").glob("*.png"))
    assert sorted(links) == pngs and len(pngs) >= 4
    for rel in pngs:
        data = (root / rel).read_bytes()
        w, h = _png_size(data)
        assert len(data) > 5000 and w >= 300 and h >= 300, rel
    names = set(pngs)
    assert {"report/training-curves.png", "report/covariance-specialists.png", "report/pareto.png",
            "report/summary.png"} <= names
    for s in ("generalist", "ensemble", "specialists", "baseline-student", "student"):
        assert f"report/confusion-{s}.png" in names


def test_confusion_counts_agree_with_each_stage_metrics(experiment):
    root = experiment["root"]
    record = _json(root / "report" / "confusion.json")
    dirs = {s["name"]: s["dir"] for s in experiment["pipeline"]["stages"]}
    assert set(record) == {"generalist", "ensemble", "specialists", "baseline:student", "student"}
    for name, r in record.items():
        m = r["matrix"]
        assert r["class_names"] == [str(k) for k in range(10)] and len(m) == 10
        assert sum(map(sum, m)) == r["test_examples"] == 359  # digits' test split
        assert r["test_errors"] == r["test_examples"] - sum(m[k][k] for k in range(10))
        assert r["test_errors"] == _json(root / dirs[name] / "metrics.json")["test_errors"], name


def test_distillation_table_reports_the_students_numbers(experiment):
    root = experiment["root"]
    m = _json(root / "students" / "student" / "metrics.json")
    base = _json(root / "baselines" / "student" / "metrics.json")
    rows = _table_rows(_section(experiment["text"], "Distillation"))
    assert len(rows) == 1
    row = rows[0]
    assert row[0] == "student" and row[1] == "specialists"
    assert row[2] == f"{m['teacher_test_errors']} ({100 * m['teacher_test_accuracy']:.2f}%)"
    assert row[3] == f"{base['test_errors']} (baseline:student)" and m["baseline_test_errors"] == base["test_errors"]
    assert row[4] == f"{m['test_errors']} ({100 * m['test_accuracy']:.2f}%)"
    gap = m["gap_recovered"]
    assert row[5] == (f"{100 * gap:.1f}%" if gap is not None else
                      "n/a (lead within noise)" if "noise" in m.get("gap_recovered_note", "") else "-")
    assert row[6] == f"{100 * m['teacher_agreement']:.2f}%" and row[7] == "4" and row[8] == "0.1"


def test_specialists_table_lists_every_group(experiment):
    root = experiment["root"]
    sec = _section(experiment["text"], "Specialists")
    m = _json(root / "specialists" / "metrics.json")
    rows = {r[0]: r for r in _table_rows(sec) if len(r) == 9}
    assert set(rows) == {"3, 5, 8", "1, 7", "0", "2", "4", "6", "9"}
    runs = {tuple(e["group"]): e["run"] + ("" if e["used"] else " (dropped)") for e in m["specialists"]}
    assert rows["3, 5, 8"][1] == runs[(3, 5, 8)] and rows["1, 7"][1] == runs[(1, 7)] != runs[(3, 5, 8)]
    for d in m["dropped"]:  # a specialist the validation check dropped is named, with the numbers why
        assert f"{d['run']} ({', '.join(d['class_names'])}) was dropped" in sec and d["reason"] in sec
    assert rows["0"][1] == "none (one class)"
    g = next(e for e in m["per_group"] if e["group"] == [3, 5, 8])
    assert rows["3, 5, 8"][2] == str(g["count"]) and rows["3, 5, 8"][5] == str(g["delta_correct"])
    assert f"({m['combined']['test_errors']} errors)" in sec


def test_specialists_section_names_a_dropped_specialist(experiment, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(experiment["root"], root)
    path = root / "specialists" / "metrics.json"
    m = _json(path)
    m["specialists"][1]["used"] = False  # as the validation check writes it (specialists.check)
    m["dropped"] = [{"run": "spec-01", "group": [3, 5, 8], "class_names": ["3", "5", "8"],
                     "reason": "validation NLL where it takes part rises from 0.1000 (generalist) to 0.2000 "
                               "(with it), n=39"}]
    path.write_text(json.dumps(m))
    sec = _section(write_report(root).read_text(), "Specialists")
    rows = {r[0]: r for r in _table_rows(sec) if len(r) == 9}
    assert rows["3, 5, 8"][1] == "spec-01 (dropped)" and rows["1, 7"][1] == "spec-00"
    assert ("specialists: spec-01 (3, 5, 8) was dropped after the validation check, and the generalist serves its "
            "group: validation NLL where it takes part rises from 0.1000 (generalist) to 0.2000 (with it), n=39.") in sec


def test_deploy_section_from_bench(experiment):
    root = experiment["root"]
    bench = _json(root / "deploy" / "bench.json")
    rows = _table_rows(_section(experiment["text"], "Deploy"))
    assert {r[1] for r in rows} == {r["name"] for r in bench["rows"]} == {"onnx-float", "onnx-int8", "pytorch-float"}
    for r in rows:
        assert (r[0] == "*") == (r[1] in bench["pareto_front"])
    by = {r["name"]: r for r in bench["rows"]}
    assert [r[1] for r in rows] == sorted(by, key=lambda n: by[n]["latency_b1_rank_ms"])  # kdens bench's order
    onnx = next(r for r in rows if r[1] == "onnx-float")
    assert onnx[7] == f"{by['onnx-float']['latency_b1_quiet_p50_ms']:.4f}"  # timed in rounds: a quiet level
    assert next(r for r in rows if r[1] == "pytorch-float")[7] == "-"
    assert (root / "report" / "pareto.png").read_bytes() == (root / "deploy" / "bench.png").read_bytes()


def test_html_is_one_self_contained_file(experiment):
    root = experiment["root"]
    page = (root / "report.html").read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in page and "<script" not in page and "<link" not in page
    assert len(srcs) == len(list((root / "report").glob("*.png")))
    for s in srcs:
        _png_size(base64.b64decode(s.split(",", 1)[1]))
    assert "<table>" in page and "<h2>Distillation</h2>" in page
    assert "gate-failed" in page and "latency" in page and "ms budget" in page  # the gates' errors, escaped


def test_missing_optional_stages_are_left_out(experiment, tmp_path):
    src, root = experiment["root"], tmp_path / "small"
    for folder in ("generalist", "baselines/student", "students/student"):
        shutil.copytree(src / folder, root / folder)
    stale = root / "report" / "confusion-old.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG old")
    stages = [s for s in experiment["pipeline"]["stages"] if s["name"] in ("generalist", "baseline:student", "student")]
    stages.insert(1, {"name": "specialists", "kind": "specialists", "dir": "specialists", "status": "failed",
                      "seconds": 1.5, "error": "ConfigError: --clusters 4 found no group of 2 or more classes"})
    stages[-1] = {**stages[-1], "status": "reused"}
    stages.append({"name": "deploy:onnx-float", "kind": "deploy", "dir": "deploy/onnx-float", "status": "running",
                   "seconds": 0.0, "error": None})
    stages.append({"name": "bench", "kind": "bench", "dir": "deploy", "status": "pending", "seconds": 0.0,
                   "error": None})
    (root / "pipeline.json").write_text(json.dumps({"name": "small", "config_file": None, "config": {},
                                                    "started": "2026-11-23T15:00:00", "finished": None,
                                                    "wall_seconds": 3.0, "stages": stages}))
    text = write_report(root, html=True).read_text()
    titles = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert titles == ["Summary", "Overview", "Stages", "Training curves", "Confusion matrices (test set)",
                      "Distillation", "Configuration"]
    assert "ConfigError: --clusters 4 found no group" in _section(text, "Stages")
    assert "not finished" in _section(text, "Overview")
    assert "Interrupted while running (rerun `kdens run` to resume): deploy:onnx-float." in _section(text, "Stages")
    assert "Not run (pending): bench." in _section(text, "Stages")
    assert not stale.exists() and (root / "report.html").exists()
    row = _table_rows(_section(text, "Distillation"))[0]
    m = _json(root / "students" / "student" / "metrics.json")
    assert row[1] == "specialists" and row[4].startswith(f"{m['test_errors']} (")


def test_a_folder_without_pipeline_json_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="pipeline.json"):
        write_report(tmp_path)


def test_deploy_without_bench_reads_each_report_and_draws_the_front(experiment, tmp_path):
    src, root = experiment["root"], tmp_path / "nobench"
    shutil.copytree(src / "deploy" / "onnx-float", root / "deploy" / "onnx-float")
    stages = [s for s in experiment["pipeline"]["stages"] if s["name"] == "deploy:onnx-float"]
    stages.append({"name": "bench", "kind": "bench", "dir": "deploy", "status": "failed", "seconds": 0.2,
                   "error": "ArtifactError: deploy/onnx-float/model.onnx no longer loads"})
    (root / "pipeline.json").write_text(json.dumps({"name": "nobench", "stages": stages}))
    text = write_report(root).read_text()
    assert re.findall(r"^## (.+)$", text, re.MULTILINE) == ["Summary", "Overview", "Stages", "Deploy", "Configuration"]
    rows = _table_rows(_section(text, "Deploy"))
    rep = _json(root / "deploy" / "onnx-float" / "report.json")
    assert [r[1] for r in rows] == ["onnx-float"] and rows[0][0] == "*"
    assert rows[0][5] == f"{100 * rep['accuracy']:.2f}%" and "no bench stage result" in _section(text, "Deploy")
    _png_size((root / "report" / "pareto.png").read_bytes())
    assert "pipeline.json records no configuration." in text and not (root / "report.html").exists()


def test_confusion_counts_are_reused_until_the_stage_manifest_changes(experiment, tmp_path):
    root = tmp_path / "again"
    shutil.copytree(experiment["root"], root)
    conf = root / "report" / "confusion.json"
    record = _json(conf)
    true = record["student"]["matrix"]
    assert record["student"]["manifest_sha256"]
    marked = [row[:] for row in true]
    marked[0][0] -= 1
    marked[0][1] += 1  # one more error, same total: only a reused record keeps it
    record["student"]["matrix"] = marked
    conf.write_text(json.dumps(record))
    write_report(root, html=False)
    assert _json(conf)["student"]["matrix"] == marked
    assert f"{record['student']['test_errors'] + 1} errors of 359" in (root / "report.md").read_text()

    manifest = root / "students" / "student" / "manifest.json"
    manifest.write_text(json.dumps(_json(manifest)))  # same content, new bytes: a different sha256
    write_report(root, html=False)
    again = _json(conf)
    assert again["student"]["matrix"] == true
    assert again["generalist"]["matrix"] == record["generalist"]["matrix"]


def test_summary_compares_teacher_twin_and_student_and_ships_nothing_that_failed(experiment):
    root, sec = experiment["root"], _section(experiment["text"], "Summary")
    assert "Nothing to recommend: no artifact passed its gates" in sec  # both exports missed the budget
    rows = {r[0]: r for r in _table_rows(sec)}
    student = _json(root / "students" / "student" / "metrics.json")
    twin = _json(root / "baselines" / "student" / "metrics.json")
    teacher = _json(root / "specialists" / "metrics.json")["combined"]
    assert rows["teacher"][1:4] == ["specialists", f"{100 * teacher['test_accuracy']:.2f}%", str(teacher["test_errors"])]
    assert rows["hard-label student"][3] == str(twin["test_errors"]) and rows["distilled student"][3] == str(
        student["test_errors"])
    assert rows["distilled student"][4] == f"{student['params']:,}" == rows["hard-label student"][4]
    assert "report/summary.png" in sec
