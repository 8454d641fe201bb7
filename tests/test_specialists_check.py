"""Issue 17, item 3: a specialist that does not help on the validation split is dropped, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import specialists.stage as spec_stage
from generalist import stage as gen_stage
from kdens import metrics as M
from kdens.app.cli import KdensGroup, evaluate
from kdens.app.cli_specialists import train_specialists
from kdens.config import GeneralistConfig, build
from kdens.models import load_model, save_model
from kdens.train import predict_logits
from specialists.check import check_one

GROUPS = "3,5,8;1,7"  # sorted: spec-00 = [1, 7], spec-01 = [3, 5, 8]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [32]}, "epochs": 5, "batch_size": 64})
    return gen_stage.run(cfg, tmp_path_factory.mktemp("gen") / "generalist", progress=False)


def _json(p: Path):
    return json.loads(Path(p).read_text())


def _invoke(*args):
    group = KdensGroup()
    group.add_command(train_specialists)
    group.add_command(evaluate)
    return CliRunner().invoke(group, [*map(str, args)], catch_exceptions=False)


def _sabotage(monkeypatch, names: set[str]):
    """Specialists in ``names`` are trained, then their group's output rows are rotated: confidently wrong."""
    real = spec_stage.train_specialist

    def bad(run_dir, group, *args, desc="specialist", **kw):
        metrics = real(run_dir, group, *args, desc=desc, **kw)
        if desc in names:
            model, spec = load_model(run_dir)
            exact = hasattr(model, "base")  # either start (--init): C head rows, or |S| + 1
            head = model.base.head if exact else model.head
            rows = list(group) if exact else list(range(len(group)))
            rot = rows[1:] + rows[:1]
            with torch.no_grad():
                head.weight[rows], head.bias[rows] = 3 * head.weight[rot].clone(), 3 * head.bias[rot].clone()
            save_model(run_dir, model, spec)
        return metrics

    monkeypatch.setattr(spec_stage, "train_specialist", bad)


# ---------------------------------------------------------------- the rule, on made-up outputs


def _outputs(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 6, (n,), generator=g)
    z = torch.randn(n, 6, generator=g, dtype=torch.float64) + 1.5 * torch.nn.functional.one_hot(y, 6)
    return torch.log_softmax(z, 1), y.numpy()


def test_rule_keeps_a_helpful_and_drops_a_harmful_specialist():
    log_pg, y = _outputs()
    group = [1, 4]
    onehot = torch.zeros(len(y), 3, dtype=torch.float64)
    onehot[np.arange(len(y)), [group.index(c) if c in group else 2 for c in y]] = 1.0
    oracle = 0.9 * onehot + 0.1 / 3  # mostly right on the 3-way task
    liar = oracle[:, [1, 0, 2]]  # swaps the group's two classes
    good, bad = check_one(log_pg, oracle, group, y, 1), check_one(log_pg, liar, group, y, 1)
    assert good["keep"] and not bad["keep"] and "rises" in bad["reason"]
    # the numbers are those of the closed-form combination with one active specialist (independent check)
    p_g = log_pg.exp()
    on = np.isin(p_g.argmax(1).numpy(), group)
    for rec, p_m in ((good, oracle), (bad, liar)):
        q = p_g.clone()
        mass_s = p_g[:, group].sum(1)
        new_s = (mass_s + 1 - p_m[:, 2]) / 2  # Q_S = (P_g(S) + p_m(S)) / 2
        q[:, group] = (p_g[:, group] + p_m[:, :2]) / 2
        rest = [k for k in range(6) if k not in group]
        q[:, rest] = p_g[:, rest] * ((1 - new_s) / (1 - mass_s))[:, None]
        q = torch.where(torch.as_tensor(on)[:, None], q, p_g)
        a = rec["active"]
        assert a["count"] == int(on.sum())
        assert a["generalist_nll"] == pytest.approx(M.nll(log_pg.numpy()[on], y[on]), rel=1e-9)
        assert a["combined_nll"] == pytest.approx(M.nll(q.log().numpy()[on], y[on]), rel=1e-9)
        assert a["combined_accuracy"] == pytest.approx(M.accuracy(q.numpy()[on], y[on]))
        assert rec["group"]["count"] == int(np.isin(y, group).sum())


def test_rule_drops_on_lost_answers_and_when_never_active():
    # lower NLL but fewer correct answers: two near-ties flipped to wrong, one confident fix
    p_g = torch.tensor([[0.5, 0.4, 0.1], [0.5, 0.4, 0.1], [0.6, 0.35, 0.05]], dtype=torch.float64)
    p_m = torch.tensor([[0.4, 0.599, 0.001], [0.4, 0.599, 0.001], [0.01, 0.98, 0.01]], dtype=torch.float64)
    y = np.array([0, 0, 1])
    rec = check_one(p_g.log(), p_m, [0, 1], y, 1)
    a = rec["active"]
    assert a["count"] == 3 and a["combined_nll"] < a["generalist_nll"]
    assert (a["generalist_correct"], a["combined_correct"]) == (2, 1)
    assert not rec["keep"] and "1 fewer correct of 3" in rec["reason"]
    log_pg, y = _outputs(seed=1)
    group = [2, 5]
    # never active: the generalist never ranks the group first
    low = torch.log_softmax(log_pg - 50 * torch.isin(torch.arange(6), torch.tensor(group)), 1)
    never = check_one(low, torch.full((len(y), 3), 1 / 3, dtype=torch.float64), group, y, 1)
    assert not never["keep"] and never["active"]["count"] == 0 and "never takes part" in never["reason"]
    # one that agrees with the generalist exactly changes nothing: not a lower NLL, so dropped
    same = log_pg.exp()
    folded = torch.cat([same[:, group], same[:, [0, 1, 3, 4]].sum(1, keepdim=True)], 1)
    rec = check_one(log_pg, folded, group, y, 1)
    assert not rec["keep"] and rec["active"]["combined_nll"] == pytest.approx(rec["active"]["generalist_nll"])
    assert rec["active"]["count"] > 0


# ---------------------------------------------------------------- the stage, with a deliberately bad specialist


def test_bad_specialist_is_dropped_and_recorded(gen, tmp_path, monkeypatch, digits):
    _sabotage(monkeypatch, {"spec-01"})
    common = ["train-specialists", "--generalist", gen, "--groups", GROUPS, "--epochs", 2, "--batch-size", 64,
              "--quiet", "--init", "fitted-row"]  # the other start end to end (teacher, evaluate); exact elsewhere
    r = _invoke(*common, "--out", tmp_path / "drop")
    assert r.exit_code == 0, r.output
    assert "dropped spec-01 (group [3, 5, 8])" in r.output
    kept_all = _invoke(*common, "--keep-unhelpful", "--out", tmp_path / "keep")
    assert kept_all.exit_code == 0, kept_all.output
    run, keep = tmp_path / "drop", tmp_path / "keep"
    m, mk = _json(run / "metrics.json"), _json(keep / "metrics.json")
    bad = m["specialists"][1]
    assert bad["run"] == "spec-01" and bad["used"] is False and bad["validation_check"]["keep"] is False
    a = bad["validation_check"]["active"]
    assert a["combined_nll"] > a["generalist_nll"] and "rises" in bad["validation_check"]["reason"]
    assert [d["run"] for d in m["dropped"]] == (["spec-00", "spec-01"] if not m["specialists"][0]["used"]
                                                else ["spec-01"])
    assert m["validation_check"]["enabled"] is True and "lower total NLL" in m["validation_check"]["rule"]
    assert mk["validation_check"]["enabled"] is False and mk["dropped"] == [] and mk["specialists"][1]["used"]
    assert mk["specialists"][1]["validation_check"] == bad["validation_check"]  # checked either way
    cl = _json(run / "clusters.json")["validation_check"]
    assert [3, 5, 8] not in cl["used"] and cl["dropped"] == m["dropped"] and len(cl["checks"]) == 2
    assert cl["checks"][1]["active"] == a
    # the numbers are those of the real models on the validation split
    g_model = load_model(gen)[0]
    log_pg = torch.log_softmax(predict_logits(g_model, digits.x_val).double(), 1)
    on = np.isin(log_pg.argmax(1).numpy(), [3, 5, 8])
    assert a["count"] == int(on.sum()) and a["generalist_nll"] == pytest.approx(
        M.nll(log_pg.numpy()[on], digits.y_val[on]), rel=1e-9)
    # the combination leaves the bad specialist's group to the generalist ...
    man = _json(run / "manifest.json")
    assert "spec-01" not in man["specialists"] and "spec-01" in man["dropped"]
    assert [3, 5, 8] not in m["groups"] and [3, 5, 8] not in man["groups"]
    row = next(e for e in m["per_group"] if e["group"] == [3, 5, 8])  # still in the table
    row_keep = next(e for e in mk["per_group"] if e["group"] == [3, 5, 8])
    assert row["combined_accuracy"] >= row_keep["combined_accuracy"]  # the bad one only hurt its group
    assert row_keep["combined_accuracy"] < row_keep["generalist_accuracy"]
    # ... which the teacher and kdens evaluate agree with
    from specialists.teacher import load_teacher

    t = load_teacher(run)
    assert [3, 5, 8] not in t.groups
    x = torch.as_tensor(digits.x_test)
    assert m["combined"]["test_accuracy"] == pytest.approx(M.accuracy(t(x).double().numpy(), digits.y_test))
    ev = _invoke("evaluate", run)
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["per_group"] == m["per_group"]


def test_every_specialist_dropped_leaves_the_generalist(gen, tmp_path, monkeypatch, digits):
    _sabotage(monkeypatch, {"spec-00", "spec-01"})
    out = tmp_path / "none"
    r = _invoke("train-specialists", "--generalist", gen, "--groups", GROUPS, "--epochs", 1, "--batch-size", 64,
                "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    assert "no specialist used: the combination is the generalist" in r.output and "nan" not in r.output
    m, man = _json(out / "metrics.json"), _json(out / "manifest.json")
    assert man["specialists"] == [] and man["dropped"] == ["spec-00", "spec-01"] and m["groups"] == []
    assert m["combined"] == m["generalist"]
    from distill.teachers import load_teacher

    t = load_teacher(str(out))
    x = torch.as_tensor(digits.x_test[:100])
    gen_lp = torch.log_softmax(predict_logits(load_model(gen)[0], x).double(), 1)
    torch.testing.assert_close(t(x).double(), gen_lp, atol=1e-6, rtol=0)
    assert _invoke("evaluate", out).exit_code == 0
