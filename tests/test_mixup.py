"""--augment mixup: parsing, the blended batches the model sees, the two-label loss, the online teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from distill.loop import online_loss_fn
from kdens.app.cli import cli
from kdens.config import mixup_alpha, parse_augment
from kdens.errors import ConfigError
from kdens.train import TrainConfig, fit, mixup_loss


def test_parse_mixup():
    assert parse_augment("mixup") == ["mixup=1"] and mixup_alpha(["mixup=1"]) == 1.0
    assert parse_augment("mixup=0.2, flip") == ["flip", "mixup=0.2"] and mixup_alpha(["flip", "mixup=0.2"]) == 0.2
    assert parse_augment(["crop", "mixup=2"]) == ["crop", "mixup=2"]  # a config file's list
    assert mixup_alpha(["crop", "flip"]) is None
    for bad, why in (("mixup=0", "a number > 0"), ("mixup=-1", "a number > 0"), ("mixup=x", "got 'x'"),
                     ("crop=2", "unknown"), ("mixups", "unknown")):
        with pytest.raises(ConfigError, match=why):
            parse_augment(bad)


class _Recorder(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.head = torch.nn.Linear(d, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x.detach().clone())
        return self.head(x)


def _blend_of(seen: torch.Tensor, clean: torch.Tensor) -> tuple[float, list[int]]:
    """Recover (1 - lambda) and the partner of every row from seen = lam * clean + (1 - lam) * clean[perm]."""
    coef, partner = [], []
    for i in range(len(seen)):
        d = seen[i] - clean[i]
        if d.abs().max() < 1e-6:  # paired with itself, or lambda = 1
            coef.append(None)
            partner.append(i)
            continue
        best = None
        for j in range(len(clean)):
            v = clean[j] - clean[i]
            if j == i or v.norm() == 0:
                continue
            c = float(d @ v / (v @ v))
            if (d - c * v).abs().max() < 1e-5:
                best = (c, j)
        assert best is not None, f"row {i} is not a blend of its example with another row of the batch"
        coef.append(best[0])
        partner.append(best[1])
    cs = [c for c in coef if c is not None]
    assert cs and max(cs) - min(cs) < 1e-5  # one lambda for the whole batch
    return cs[0], partner


def test_the_model_sees_blends_of_its_own_batch_with_one_lambda():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 5)).astype(np.float32)
    y = rng.integers(0, 3, 48)
    batches = [torch.arange(0, 16), torch.arange(16, 32), torch.arange(32, 48)]
    net = _Recorder(5)
    fit(net, x, y, cfg=TrainConfig(epochs=2, batch_size=16, augment=["mixup=1"]), progress=False,
        sampler=lambda epoch, gen: batches)
    assert len(net.seen) == 6
    lams = []
    for k, seen in enumerate(net.seen):
        one_minus, partner = _blend_of(seen, torch.from_numpy(x[batches[k % 3].numpy()]))
        assert sorted(partner) == list(range(16))  # a permutation of the batch
        lams.append(1 - one_minus)
    assert all(0.0 <= lam <= 1.0 for lam in lams) and len({round(v, 6) for v in lams}) == 6  # fresh each step


def test_mixup_loss_weighs_the_two_labels_and_asks_the_teacher_once():
    torch.manual_seed(0)
    logits = torch.randn(8, 4)
    xb = torch.randn(8, 6)
    yb = torch.randint(0, 4, (8,))
    perm = torch.randperm(8)
    idx = torch.arange(8)
    calls = []

    def teacher(x):
        calls.append(x)
        return torch.randn(len(x), 4)

    def kd(z, scores, y):
        return F.cross_entropy(z, y) + 0.0 * scores.sum()

    fn = online_loss_fn(kd, teacher)
    got = mixup_loss(fn, logits, xb, yb, idx, 0.3, perm)
    want = 0.3 * F.cross_entropy(logits, yb) + 0.7 * F.cross_entropy(logits, yb[perm])
    assert torch.allclose(got, want) and len(calls) == 1  # both labels, one teacher pass
    fn(logits, xb.clone(), yb, idx)
    assert len(calls) == 2  # another batch is scored again
    unlabeled = mixup_loss(lambda z, x, y, i: z.sum() if y is None else z.sum() * 0, logits, xb, None, idx, 0.3, perm)
    assert torch.allclose(unlabeled, logits.sum())


def test_cli_mixup_on_features_and_in_distillation(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)) * [1e-3, 1.0, 1e3, 10.0]
    y = (x[:, 1] + x[:, 2] / 1e3 > 0).astype(int)
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,c,d,y\n" + "\n".join(",".join(f"{v:.6g}" for v in r) + f",{c}" for r, c in zip(x, y)) + "\n")
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(csv), "--model", "mlp", "--model-arg", "hidden=16",
                                 "--augment", "mixup=0.4", "--epochs", "30", "--quiet", "--out", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["config"]["train"]["augment"] == ["mixup=0.4"]
    assert m["test_accuracy"] > 0.8  # it learns through the blends
    r = CliRunner().invoke(cli, ["train-generalist", "--data", str(csv), "--model", "mlp", "--augment", "flip,mixup",
                                 "--out", str(tmp_path / "f")])
    assert r.exit_code == 2 and "--augment flip crops and flips images" in r.output and "mixup works" in r.output
    out = tmp_path / "exp" / "s"
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(tmp_path / "g"), "--model", "mlp", "--model-arg",
                                 "hidden=8", "--augment", "mixup", "--epochs", "5", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["soft_targets"]["online"] is True  # blends change every step
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(tmp_path / "g"), "--model", "mlp", "--method", "fitnets",
                                 "--augment", "mixup", "--out", str(tmp_path / "exp" / "fit")])
    assert r.exit_code == 2 and "--augment mixup does not apply to --method fitnets" in r.output, r.output
    assert not (tmp_path / "exp" / "fit").exists()
