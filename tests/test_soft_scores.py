"""Soft targets at T: faithful ensemble targets (mean of softened members), in the cache and online.

docs/architecture.md: "Soft targets are the arithmetic mean of the members' softmax(z/T), or the
geometric mean (softmax of the mean log-probabilities / T), renormalized". The loss
softens the scores it gets as softmax(s / T); these tests check that what the teachers
hand it gives exactly those targets, computed here independently from each member's
own weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import stage
from distill.config import DistillConfig
from distill.teachers import load_teacher, soft_scores_depend_on_temperature, soft_scores_fn
from ensembles.config import EnsembleConfig
from ensembles.teacher import EnsembleTeacher
from kdens.config import GeneralistConfig, build
from kdens.models import load_model
from kdens.train import predict_logits

T = 5.0


def _json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two digits generalists (seeds 0, 1), and a 3-member arithmetic and geometric ensemble."""
    from ensembles import stage as ens_stage
    from generalist import stage as generalist

    root = tmp_path_factory.mktemp("soft")
    out = {}
    for name, seed in (("gen0", 0), ("gen1", 1)):
        cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [32]}, "epochs": 5,
                                       "batch_size": 64, "seed": seed})
        out[name] = generalist.run(cfg, root / name, progress=False)
    for method in ("arithmetic", "geometric"):
        cfg = build(EnsembleConfig, {"model": "mlp", "model_args": {"hidden": [32]}, "members": 3, "epochs": 5,
                                     "batch_size": 64, "seed": 10, "combine": method})
        out[method] = ens_stage.run(cfg, root / method, progress=False)
    return out


def _z(run: Path, x) -> torch.Tensor:
    """Logits (N, C) of one model run, or (K, N, C) of an ensemble run's members, in float64."""
    if (run / "model.json").exists():
        return predict_logits(load_model(run)[0], x).double()
    dirs = sorted(p for p in run.iterdir() if p.name.startswith("member-"))
    return torch.stack([predict_logits(load_model(d)[0], x) for d in dirs]).double()


def _soft(scores: torch.Tensor, t: float) -> torch.Tensor:
    """What the KD loss makes of teacher scores: softmax(s / T)."""
    return torch.softmax(torch.as_tensor(scores).double() / t, dim=-1)


def test_single_model_scores_are_its_log_probs_at_every_T(runs, digits):
    teacher = load_teacher(runs["gen0"])
    x = torch.from_numpy(digits.x_test)
    z = _z(runs["gen0"], digits.x_test)
    assert not soft_scores_depend_on_temperature(teacher)
    for t in (1.0, T):
        s = soft_scores_fn(teacher, t)(x)
        torch.testing.assert_close(s.double(), torch.log_softmax(z, 1), rtol=0, atol=1e-5)
        torch.testing.assert_close(_soft(s, t), torch.softmax(z / t, 1), rtol=0, atol=1e-6)


def test_arithmetic_run_ensemble_is_the_mean_of_softened_members(runs, digits):
    teacher = load_teacher(runs["arithmetic"])
    assert isinstance(teacher, EnsembleTeacher) and soft_scores_depend_on_temperature(teacher)
    x = torch.from_numpy(digits.x_test)
    z = _z(runs["arithmetic"], digits.x_test)  # (K, N, C)
    s = soft_scores_fn(teacher, T)(x)
    want = torch.softmax(z / T, 2).mean(0)  # (N, C): mean_k softmax(z_k / T)
    torch.testing.assert_close(_soft(s, T), want, rtol=0, atol=1e-6)
    # softening the T = 1 mixture (the old behaviour) is a different distribution
    old = _soft(teacher(x), T)
    assert float((old - want).abs().max()) > 1e-2
    # __call__ stays the T = 1 mixture, which metrics use
    torch.testing.assert_close(teacher(x).double().exp(), torch.softmax(z, 2).mean(0), rtol=0, atol=1e-6)


def test_geometric_run_ensemble_scores_serve_every_T(runs, digits):
    teacher = load_teacher(runs["geometric"])
    assert teacher.method == "geometric" and not soft_scores_depend_on_temperature(teacher)
    x = torch.from_numpy(digits.x_test)
    z = _z(runs["geometric"], digits.x_test)
    for t in (1.0, T):
        s = soft_scores_fn(teacher, t)(x)
        prod = torch.softmax(z / t, 2).prod(0) ** (1 / 3)  # (N, C) product of experts, unnormalized
        torch.testing.assert_close(_soft(s, t), prod / prod.sum(1, keepdim=True), rtol=0, atol=1e-6)


def test_calibration_temperature_and_method_override(runs, digits):
    from ensembles.teacher import load_teacher as load_ensemble

    x = torch.from_numpy(digits.x_test)
    z = _z(runs["arithmetic"], digits.x_test)
    tau = load_ensemble(runs["arithmetic"], temperature=2.0)  # tau divides every member's logits first
    torch.testing.assert_close(tau(x).double().exp(), torch.softmax(z / 2.0, 2).mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(_soft(tau.soft_scores(x, T), T), torch.softmax(z / (2.0 * T), 2).mean(0),
                               rtol=0, atol=1e-6)
    geo = load_ensemble(runs["arithmetic"], method="geometric")
    assert not geo.soft_scores_depend_on_temperature
    torch.testing.assert_close(geo(x).double(), torch.log_softmax(z.mean(0), 1), rtol=0, atol=1e-5)
    # both change the answers, so both are in what keys the soft-target cache
    base = load_ensemble(runs["arithmetic"]).describe()
    assert tau.describe()["temperature"] == 2.0 != base["temperature"]
    assert geo.describe()["combine"] == "geometric" != base["combine"]


def test_adhoc_ensembles_mix_the_members_soft_targets(runs, digits):
    x = torch.from_numpy(digits.x_test)
    pair = load_teacher(f"{runs['gen0']},{runs['gen1']}")
    assert soft_scores_depend_on_temperature(pair)
    zs = [_z(runs[g], digits.x_test) for g in ("gen0", "gen1")]
    want = (torch.softmax(zs[0] / T, 1) + torch.softmax(zs[1] / T, 1)) / 2
    torch.testing.assert_close(_soft(soft_scores_fn(pair, T)(x), T), want, rtol=0, atol=1e-6)
    # nested: an ensemble run listed with a generalist mixes the run's own soft targets
    nested = load_teacher([runs["arithmetic"], runs["gen0"]])
    inner = torch.softmax(_z(runs["arithmetic"], digits.x_test) / T, 2).mean(0)
    torch.testing.assert_close(_soft(soft_scores_fn(nested, T)(x), T), (inner + torch.softmax(zs[0] / T, 1)) / 2,
                               rtol=0, atol=1e-6)


def _distill(tmp_path: Path, teacher: str, name: str, temperature: float, **extra) -> dict:
    cfg = build(DistillConfig, {"teacher": teacher, "model": "mlp", "model_args": {"hidden": [16]},
                                "temperature": temperature, "epochs": 3, "batch_size": 64, **extra})  # 1 epoch ends at chance
    out = stage.run(cfg, tmp_path / "exp" / name, progress=False)
    return _json(out / "manifest.json")["soft_targets"]


def test_cache_holds_faithful_targets_and_is_keyed_by_T_for_arithmetic_ensembles(runs, tmp_path, digits):
    z = _z(runs["arithmetic"], digits.x_train)  # (K, N, C) on the transfer set
    a = _distill(tmp_path, str(runs["arithmetic"]), "a5", T)
    assert a["reused"] is False and a["soft_temperature"] == T
    np.testing.assert_allclose(_soft(np.load(a["path"]), T), torch.softmax(z / T, 2).mean(0), atol=1e-6, rtol=0)
    b = _distill(tmp_path, str(runs["arithmetic"]), "a2", 2.0)
    assert b["reused"] is False and b["path"] != a["path"]  # other T, other targets: rebuilt
    np.testing.assert_allclose(_soft(np.load(b["path"]), 2.0), torch.softmax(z / 2.0, 2).mean(0), atol=1e-6, rtol=0)
    c = _distill(tmp_path, str(runs["arithmetic"]), "a5again", T)
    assert c["reused"] is True and c["path"] == a["path"]
    # an ad-hoc list is an arithmetic ensemble too
    pair = f"{runs['gen0']},{runs['gen1']}"
    assert _distill(tmp_path, pair, "p5", T)["path"] != _distill(tmp_path, pair, "p2", 2.0)["path"]


@pytest.mark.parametrize("kind", ["gen0", "geometric"])
def test_cache_is_shared_across_T_for_T_free_teachers(runs, tmp_path, digits, kind):
    a = _distill(tmp_path, str(runs[kind]), "t5", T)
    b = _distill(tmp_path, str(runs[kind]), "t2", 2.0)
    assert a["reused"] is False and a["soft_temperature"] is None
    assert b["reused"] is True and b["path"] == a["path"]
    z = _z(runs[kind], digits.x_train)
    want = torch.log_softmax(z if z.ndim == 2 else z.mean(0), 1)  # geometric: log_softmax(mean_k z_k)
    np.testing.assert_allclose(np.load(a["path"]), want, atol=2e-5, rtol=0)


def test_online_jitter_path_uses_the_soft_scores(runs, tmp_path, monkeypatch, digits):
    seen = []
    real = stage.online_loss_fn

    def recording(loss, teacher_fn):  # the real loss function; only remember what it was given
        seen.append(teacher_fn)
        return real(loss, teacher_fn)

    monkeypatch.setattr(stage, "online_loss_fn", recording)
    info = _distill(tmp_path, str(runs["arithmetic"]), "jit", T, jitter=1, epochs=8)  # jitter learns slower
    assert info["online"] is True and len(seen) == 1
    x = torch.from_numpy(digits.x_test[:64])
    want = torch.softmax(_z(runs["arithmetic"], digits.x_test[:64]) / T, 2).mean(0)
    torch.testing.assert_close(_soft(seen[0](x), T), want, rtol=0, atol=1e-6)
