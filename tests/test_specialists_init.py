"""How a specialist starts (issue 17, item 5): exactly as the folded generalist, or with a fitted dustbin row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import specialists.train as spec_train

from generalist import stage as gen_stage
from kdens import metrics as M
from kdens.app.cli import KdensGroup
from kdens.app.cli_specialists import train_specialists
from kdens.config import GeneralistConfig, build
from kdens.errors import ConfigError
from kdens.models import load_model
from kdens.train import predict_logits
from specialists.train import DustbinCorrected, init_specialist, remap_labels


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A small digits generalist: mlp hidden=32, 5 epochs."""
    torch.set_num_threads(1)
    cfg = build(GeneralistConfig, {"model": "mlp", "model_args": {"hidden": [32]}, "epochs": 5, "batch_size": 64})
    return gen_stage.run(cfg, tmp_path_factory.mktemp("gen") / "generalist", progress=False)


def _json(path: Path):
    return json.loads(Path(path).read_text())


def _spec(gen, *args):
    group = KdensGroup()
    group.add_command(train_specialists)
    return CliRunner().invoke(group, ["train-specialists", "--generalist", str(gen), "--epochs", "2", "--batch-size",
                                      "64", "--quiet", "--keep-unhelpful", *map(str, args)], catch_exceptions=False)


def test_initial_specialist_is_the_generalist(gen, digits):
    """Item 5 of issue 17: at step 0 the specialist's |S| + 1 distribution is the folded generalist's."""
    g_model, g_spec = load_model(gen)
    group = [3, 5, 8]
    model, spec, info = init_specialist(g_model, g_spec, group, digits.x_train[:300], init="exact")
    assert spec["name"] == "specialists.model:folded" and spec["num_classes"] == 4
    assert spec["kwargs"] == {"base": "mlp", "base_classes": 10, "group": group, "base_args": g_spec["kwargs"]}
    a, b = g_model.state_dict(), model.state_dict()
    assert sorted(b) == sorted(["dustbin_bias"] + [f"base.{k}" for k in a])  # the whole generalist, trainable
    assert all(torch.equal(a[k], b[f"base.{k}"]) for k in a) and float(b["dustbin_bias"]) == 0.0
    assert all(p.requires_grad for p in model.parameters())
    # independent check on unseen examples: fold the generalist's probabilities by hand
    held = digits.x_test
    p_gen = torch.softmax(predict_logits(g_model, held).double(), 1)
    rest = [k for k in range(10) if k not in group]
    folded = torch.cat([p_gen[:, group], p_gen[:, rest].sum(1, keepdim=True)], 1)  # (N, 4)
    p_spec = torch.softmax(predict_logits(model, held).double(), 1)
    assert float((p_spec - folded).abs().max()) < 1e-6
    lp_spec = torch.log_softmax(predict_logits(model, held).double(), 1)
    assert float((lp_spec - folded.log()).abs().max()) < 1e-5  # log-probabilities too, in float32 arithmetic
    assert 0 <= info["init_max_abs_logprob_diff"] < 1e-5
    # a trained copy moves away from it: the check can fail
    with torch.no_grad():
        model.dustbin_bias += 0.1
    assert float((torch.softmax(predict_logits(model, held).double(), 1) - folded).abs().max()) > 1e-3


def test_fitted_row_start(gen, digits):
    """--init fitted-row: the generalist's architecture with |S| + 1 outputs, a least-squares dustbin row."""
    g_model, g_spec = load_model(gen)
    group = [3, 5, 8]
    model, spec, info = init_specialist(g_model, g_spec, group, digits.x_train[:500], init="fitted-row")
    assert spec["name"] == "mlp" and spec["num_classes"] == 4 and spec["kwargs"] == g_spec["kwargs"]
    a, b = g_model.state_dict(), model.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))
    assert torch.equal(b["head.weight"][:3], a["head.weight"][group])
    assert torch.equal(b["head.bias"][:3], a["head.bias"][group])
    rest = [k for k in range(10) if k not in group]
    zs = predict_logits(model, digits.x_train[:500]).double()
    target = torch.logsumexp(predict_logits(g_model, digits.x_train[:500]).double()[:, rest], 1)
    assert float(((zs[:, -1] - target) ** 2).mean().sqrt()) == pytest.approx(info["dustbin_init_rmse"], rel=1e-3)
    assert info["dustbin_init_rmse"] < info["dustbin_init_rmse_mean_rows"]  # better than the mean of the rows
    assert info["init"] == "fitted-row" and info["init_max_abs_logprob_diff"] > 1e-3  # close, not exact
    with pytest.raises(ConfigError, match="--init 'lse'"):
        init_specialist(g_model, g_spec, group, digits.x_train[:10], init="lse")


def test_specialist_saves_and_loads_without_pickles(gen, digits, tmp_path):
    from safetensors.torch import load_file

    from kdens.errors import ModelError
    from kdens.models import build_model, save_model
    from specialists.model import folded

    g_model, g_spec = load_model(gen)
    model, spec, _ = init_specialist(g_model, g_spec, [1, 7], init="exact")
    with torch.no_grad():
        model.dustbin_bias += 0.25
        model.base.head.weight[2] *= 1.5
    save_model(tmp_path, model, spec)
    assert _json(tmp_path / "model.json")["name"] == "specialists.model:folded"
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(model.state_dict())
    again, again_spec = load_model(tmp_path)
    x = torch.as_tensor(digits.x_test[:50])
    assert torch.equal(again(x), model.eval()(x)) and again_spec["kwargs"]["group"] == [1, 7]
    with pytest.raises(ModelError, match="not 5"):
        folded(5, (1, 8, 8), "mlp", 10, [1, 7], {"hidden": [32]})
    with pytest.raises(ModelError, match="fewer than all"):
        build_model("specialists.model:folded", 11, (1, 8, 8), base="mlp", base_classes=10, group=list(range(10)))


def test_dustbin_offset_only_in_eval():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.head(x)

    inner = Tiny()
    m = DustbinCorrected(inner, 1.5, 4)
    x = torch.randn(5, 3)
    raw = inner(x)
    torch.testing.assert_close(m.train()(x), raw)  # training sees the paper's raw logits
    torch.testing.assert_close(m.eval()(x), raw + torch.tensor([0, 0, 0, 1.5]))  # validation the corrected ones


@pytest.mark.parametrize("init", ["exact", "fitted-row"])
def test_dustbin_correction_is_in_the_saved_weights(gen, tmp_path, monkeypatch, digits, init):
    raw = {}
    real_fit = spec_train.fit
    # where each start keeps its dustbin offset, and its other output weights
    bias, weight = (("dustbin_bias", "base.head.weight") if init == "exact" else ("head.bias", "head.weight"))

    def spying_fit(model, *args, desc="train", **kw):
        result = real_fit(model, *args, desc=desc, **kw)
        state = model.model.state_dict()
        raw[desc] = (state[bias][-1].detach().clone(), state[weight].detach().clone())
        return result

    monkeypatch.setattr(spec_train, "fit", spying_fit)
    out = tmp_path / "corr"
    assert _spec(gen, "--groups", "3,5,8;1,7", "--init", init, "--out", out).exit_code == 0
    y = digits.y_train
    for m, g in enumerate([[1, 7], [3, 5, 8]]):
        sdir = out / f"spec-{m:02d}"
        met = _json(sdir / "metrics.json")
        f = float(np.isin(y, g, invert=True).mean())
        factor = (f / (1 - f)) / 1.0  # the odds ratio against half-rest batches
        assert met["frac_rest_true"] == pytest.approx(f) and met["oversampling_factor"] == pytest.approx(factor)
        state = load_model(sdir)[0].state_dict()
        b0, w0 = raw[sdir.name]
        assert torch.equal(state[weight], w0) and met["init"] == init
        assert float(state[bias][-1] - b0) == pytest.approx(math.log(factor), abs=1e-5)
        if init == "fitted-row":
            assert torch.equal(state[bias][:-1], load_model(sdir)[0].head.bias[:-1])
        # early stopping and val_nll are on corrected logits with the natural class mix
        yv = remap_labels(digits.y_val, g)
        assert met["val_nll"] == pytest.approx(M.nll(predict_logits(load_model(sdir)[0], digits.x_val).numpy(), yv),
                                               rel=1e-6)
        assert met["best_val_loss"] == pytest.approx(met["val_nll"], rel=1e-4)
        assert met["val_nll_uncorrected"] != pytest.approx(met["val_nll"], rel=1e-4)
