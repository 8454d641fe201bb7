"""Pipeline files -> stages (kdens/plan.py): resolution, sharing and the errors users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdens.errors import ConfigError
from kdens.app.plan import build_plan, load_plan


def _doc(**extra) -> dict:
    doc = {"name": "t", "data": {"data": "digits"},
           "generalist": {"model": "mlp", "model_args": {"hidden": [16]}, "epochs": 2},
           "distill": [{"name": "s", "model": "mlp", "model_args": {"hidden": [8]}, "epochs": 2}]}
    doc.update(extra)
    return doc


def test_default_plan_orders_and_wires_stages(tmp_path):
    plan = build_plan(_doc(specialists={"clusters": 3}, deploy={"targets": ["onnx:int8", "tflite:float"]}),
                      out=tmp_path / "exp")
    names = [s.name for s in plan.stages]
    assert names == ["generalist", "specialists", "baseline:s", "s", "deploy:onnx-int8", "deploy:tflite-float",
                     "bench"]
    student = plan.stage("s")
    assert student.config.teacher == str(tmp_path / "exp" / "specialists")  # default: the strongest teacher
    assert student.config.baseline == str(tmp_path / "exp" / "baselines" / "s")
    assert student.config.cache_dir == str(tmp_path / "exp" / "soft_targets")
    assert student.needs == ["specialists", "baseline:s"]
    assert plan.stage("specialists").config.generalist == str(tmp_path / "exp" / "generalist")
    base = plan.stage("baseline:s").config
    assert base.model_args == {"hidden": [8]} and base.train.epochs == 2 and base.data == "digits"
    assert plan.stage("deploy:onnx-int8").config.opts.quantize == "int8"
    assert plan.stage("bench").needs == ["deploy:onnx-int8", "deploy:tflite-float"]


def test_temperature_list_makes_one_student_each_sharing_one_baseline(tmp_path):
    doc = _doc()
    doc["distill"] = [{"name": "s", "model": "mlp", "temperature": [2, 8.5], "epochs": 2},
                      {"name": "other", "model": "mlp", "temperature": 4, "epochs": 2}]
    plan = build_plan(doc, out=tmp_path)
    students = [s for s in plan.stages if s.kind == "student"]
    assert [s.name for s in students] == ["s-T2", "s-T8.5", "other"]
    assert [s.config.temperature for s in students] == [2.0, 8.5, 4.0]
    baselines = [s for s in plan.stages if s.kind == "baseline"]
    assert len(baselines) == 1  # same architecture and recipe: one hard-label run serves all three
    assert {s.config.baseline for s in students} == {str(tmp_path / "baselines" / "s")}


def test_different_recipes_get_their_own_baselines(tmp_path):
    doc = _doc()
    doc["distill"] = [{"name": "a", "model": "mlp", "epochs": 2}, {"name": "b", "model": "mlp", "epochs": 3}]
    plan = build_plan(doc, out=tmp_path)
    assert [s.name for s in plan.stages if s.kind == "baseline"] == ["baseline:a", "baseline:b"]


def test_a_student_can_share_an_earlier_students_baseline(tmp_path):
    # a new recipe (jitter, longer) judged against the paper's baseline rather than its own twin
    doc = _doc()
    doc["distill"] = [{"name": "paper", "model": "mlp", "epochs": 2},
                      {"name": "new", "model": "mlp", "epochs": 4, "jitter": 1, "baseline": "paper"}]
    plan = build_plan(doc, out=tmp_path)
    assert [s.name for s in plan.stages if s.kind == "baseline"] == ["baseline:paper"]
    new = plan.stage("new")
    assert new.config.baseline == str(tmp_path / "baselines" / "paper") and "baseline:paper" in new.needs
    assert new.config.train.jitter == 1 and new.config.train.epochs == 4
    for bad in ("nobody", "new"):  # unknown, or not defined earlier
        doc["distill"][1]["baseline"] = bad
        with pytest.raises(ConfigError, match=f"baseline = '{bad}' must be true or false, or the name of an earlier"):
            build_plan(doc, out=tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key/table(s) bogus"),
    ({"generalist": {"model": "mlp", "epohcs": 3}}, "[generalist] unknown config key 'epohcs'"),
    ({"data": {"data": "digits", "seed": 1}}, "[data] has unknown key(s) seed"),
    ({"specialists": {"clusters": 3, "generalist": "x"}}, "takes its generalist from the [generalist] table"),
    ({"distill": [{"model": "mlp", "teacher": "ensemble"}]}, "has no [ensemble] table"),
    ({"distill": [{"model": "mlp", "teacher": "nowhere"}]}, "neither a stage"),
    ({"distill": [{"model": "mlp", "temperature": -1}]}, "--temperature -1"),
    ({"distill": [{"model": "mlp", "baseline": "yes"}]}, "must be true or false"),
    ({"distill": [{"model": "mlp", "baseline": 3}]}, "must be true or false, or the name"),
    ({"distill": [{"model": "mlp", "name": "../escape"}]}, "it names a folder"),
    ({"deploy": {"targets": ["gpu:int8"]}}, "unknown target 'gpu'"),
    ({"deploy": {"targets": ["onnx:int4"]}}, "onnx:int4"),
    ({"deploy": {"student": "nobody"}}, "student = 'nobody' is not a student here"),
    ({"deploy": {"max_latency": 3}}, "[deploy] unknown key(s) max_latency"),
    ({"bench": {"threads": 1}}, "add a [deploy] table"),
    ({"report": {"pdf": True}}, "[report] has unknown key(s)"),
])
def test_bad_files_name_the_key_and_the_fix(change, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        build_plan(_doc(**change), out=tmp_path)
    assert message in str(e.value)


def test_a_pipeline_needs_a_teacher(tmp_path):
    with pytest.raises(ConfigError, match="no teacher"):
        build_plan({"data": {"data": "digits"}}, out=tmp_path)
    with pytest.raises(ConfigError, match=r"\[specialists\] needs a \[generalist\]"):
        build_plan({"ensemble": {"members": 2, "model": "mlp"}, "specialists": {"clusters": 2}}, out=tmp_path)


def test_from_accepts_names_and_kinds(tmp_path):
    plan = build_plan(_doc(deploy={"targets": ["onnx"]}), out=tmp_path)
    assert plan.stages[plan.start_index("distill")].name == "baseline:s"
    assert plan.stages[plan.start_index("s")].name == "s"
    assert plan.stages[plan.start_index("deploy")].name == "deploy:onnx-float"
    with pytest.raises(ConfigError, match="valid: .*distill"):
        plan.start_index("nope")


def test_ints_in_toml_become_option_lists(tmp_path):
    plan = build_plan(_doc(deploy={"threads": 1, "batch_sizes": [1, 8]}, bench={"threads": [1, 2]}), out=tmp_path)
    assert plan.stage("deploy:onnx-int8").config.opts.threads == (1,)
    assert plan.stage("deploy:onnx-int8").config.opts.batch_sizes == (1, 8)
    bench = plan.stage("bench").config
    assert (bench.threads, bench.batch_sizes, bench.measure) == ("1,2", "1,32", True)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_example_resolves(path, tmp_path):
    plan = load_plan(path, out=tmp_path)
    kinds = [s.kind for s in plan.stages]
    assert "student" in kinds
    assert ("deploy" not in kinds) or kinds[-1] == "bench"  # what is deployed is benched last
    for stage in plan.stages:  # each stage's inputs come before it
        assert all(plan.stages.index(plan.stage(n)) < plan.stages.index(stage) for n in stage.needs)


def test_a_fraction_student_gets_a_twin_on_the_same_fraction(tmp_path):
    plain = {"name": "all", "model": "mlp", "model_args": {"hidden": [8]}, "epochs": 2}
    few = {**plain, "name": "few", "transfer": "fraction=0.1"}
    plan = build_plan(_doc(distill=[plain, few]), out=tmp_path)
    assert plan.stage("baseline:all").config.train_fraction == 1.0
    assert plan.stage("baseline:few").config.train_fraction == 0.1  # same examples, hard labels
    assert plan.stage("few").config.transfer == "fraction=0.1" and plan.stage("few").needs[-1] == "baseline:few"


def test_distill_tables_take_methods_hints_and_generations(tmp_path):
    doc = _doc(deploy={"targets": ["onnx"], "student": "ban"})
    doc["distill"] = [
        {"name": "dkd", "model": "mlp", "method": "dkd", "method_args": {"beta": 2}, "epochs": 2},
        {"name": "fit", "model": "mlp", "method": "fitnets", "hint": ["body.1:body.1"], "epochs": 2},
        {"name": "ban", "teacher": "generalist", "generations": 3, "epochs": 2},
    ]
    plan = build_plan(doc, out=tmp_path)
    dkd, fit, ban = (plan.stage(n).config for n in ("dkd", "fit", "ban"))
    assert (dkd.method, dkd.method_args["beta"], dkd.method_args["warmup"], dkd.temperature) == ("dkd", 2, 20, 4.0)
    assert (fit.method, fit.hint, fit.temperature) == ("fitnets", ["body.1:body.1"], 3.0)  # the method's own T
    # born-again students of [generalist] copy its architecture; so does their hard-label baseline
    assert (ban.generations, ban.model, ban.model_args) == (3, "mlp", {"hidden": [16]})
    assert plan.stage("baseline:ban").config.model_args == {"hidden": [16]}
    # method keys stay out of the baseline: dkd and fit (same recipe) share one hard-label run
    assert plan.stage("dkd").config.baseline == plan.stage("fit").config.baseline
    # the deployed student of a generations run is its last generation
    assert plan.stage("deploy:onnx-float").config.model == str(tmp_path / "students" / "ban" / "gen-03")


@pytest.mark.parametrize("table, message", [
    ({"model": "mlp", "method": "crd"}, "[distill student] unknown --method 'crd'; valid methods: kd"),
    ({"model": "mlp", "method": "dkd", "method_args": {"betta": 1}}, "unknown --method-arg betta"),
    ({"model": "mlp", "method": "kd", "hint": "body:body"}, "--hint names hidden layers"),
    ({"model": "mlp", "method": "rkd", "temperature": [2, 4]}, "--temperature does not apply to --method rkd"),
])
def test_bad_method_tables_name_the_key(table, message, tmp_path):
    doc = _doc()
    doc["distill"] = [{"name": "student", **table}]
    with pytest.raises(ConfigError) as e:
        build_plan(doc, out=tmp_path)
    assert message in str(e.value)
