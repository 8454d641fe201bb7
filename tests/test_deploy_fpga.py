"""FPGA target: ap_fixed parsing, per-layer types from ranges, and the hls4ml C simulation.

The compile tests build real hls4ml projects with g++ (about 10 s each on 2 cores) and
compare the bit-accurate C simulation with PyTorch on digits.
"""

from __future__ import annotations

import importlib.util
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from deploy import common, fpga
from deploy.fpga_precision import FixedType, choose_layer_precision, integer_bits_for, parse_precision
from kdens.errors import ConfigError, ModelError
from kdens.models import build_model

needs_hls4ml = pytest.mark.skipif(importlib.util.find_spec("hls4ml") is None or shutil.which("g++") is None,
                                  reason="the fpga target needs the optional hls4ml extra and g++")


# ---------------------------------------------------------------- precision strings

@pytest.mark.parametrize("text,expected", [
    ("ap_fixed<16,6>", FixedType(16, 6, "TRN", "WRAP")),
    ("ap_fixed<8,3,AP_RND_CONV,AP_SAT>", FixedType(8, 3, "RND_CONV", "SAT")),
    (" ap_fixed< 12 , 4 , AP_RND > ", FixedType(12, 4, "RND", "WRAP")),
    ("ap_fixed<10,10,rnd_conv,sat_sym>", FixedType(10, 10, "RND_CONV", "SAT_SYM")),
])
def test_parse_precision_valid_and_round_trips(text, expected):
    t = parse_precision(text)
    assert t == expected
    assert parse_precision(str(t)) == t
    assert t.lsb == 2.0 ** -(t.width - t.integer)


@pytest.mark.parametrize("text", [
    "fixed<16,6>", "ap_ufixed<8,3>", "ap_int<8>", "ap_fixed<16>", "ap_fixed<16,6", "ap_fixed<1,1>",
    "ap_fixed<100,6>", "ap_fixed<16,0>", "ap_fixed<16,17>", "ap_fixed<8,3,AP_FOO,AP_SAT>",
    "ap_fixed<8,3,AP_RND,AP_WRAP_SM>", "ap_fixed<8,3,AP_RND,AP_SAT,3>", "", "16,6",
])
def test_bad_precision_raises_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError, match=r"--precision.*e\.g\. --precision 'ap_fixed<16,6>'"):
        parse_precision(text)


def test_integer_bits_are_the_fewest_that_hold_the_range():
    assert integer_bits_for(0.0, 8) == 1
    assert integer_bits_for(0.99, 16) == 1  # [-1, 1 - 2^-15]
    assert integer_bits_for(1.0, 16) == 2  # 1.0 itself needs the next bit
    assert integer_bits_for(1000.0, 8) == 8  # cannot fit: capped at W
    rng = np.random.default_rng(0)
    for m, w in zip(np.exp(rng.uniform(-6, 6, 300)), rng.integers(4, 33, 300)):
        i = integer_bits_for(float(m), int(w))
        if i < w:
            assert m <= FixedType(int(w), i).max_value
        if i > 1:
            assert m > FixedType(int(w), i - 1).max_value  # one bit fewer would overflow


def test_layer_types_follow_ranges_keep_width_and_modes():
    user = parse_precision("ap_fixed<8,3,AP_RND_CONV,AP_SAT>")
    ranges = {"small": 0.3, "mid": 5.0, "big": 100.0, "huge": 1000.0, "input": 1.0}
    chosen = choose_layer_precision(ranges, user, headroom_bits=0)
    types = {k: parse_precision(v["type"]) for k, v in chosen.items()}
    assert [types[k].integer for k in ("small", "mid", "big")] == [1, 4, 8]
    assert all(t.width == 8 and (t.rounding, t.overflow) == ("RND_CONV", "SAT") for t in types.values())
    assert chosen["big"]["fits"] and not chosen["huge"]["fits"]
    guarded = choose_layer_precision(ranges, user, headroom_bits=1, exact=frozenset({"input"}))
    assert parse_precision(guarded["mid"]["type"]).integer == 5  # one guard bit
    assert parse_precision(guarded["input"]["type"]).integer == 2  # known range: no guard bit
    with pytest.raises(ConfigError, match="headroom_bits"):
        choose_layer_precision(ranges, user, headroom_bits=-1)


# ---------------------------------------------------------------- graph preparation

class _TorchFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.flatten(x, 1))))


@needs_hls4ml
@pytest.mark.parametrize("make", [
    lambda: build_model("mlp", 10, (1, 8, 8), hidden=[16, 8], dropout=0.3, input_dropout=0.2),
    lambda: nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(64, 10)),
    _TorchFlatten,
])
def test_prepare_cuts_leading_flatten_and_dropout(make):
    model = make().eval()
    gm, flat = fpga.prepare_for_hls(model)
    assert flat
    kinds = {type(m) for m in gm.modules()}
    assert not kinds & {nn.Flatten, nn.Dropout}
    assert not any(n.target is torch.flatten for n in gm.graph.nodes)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(gm(x.reshape(5, -1)), model(x))


@needs_hls4ml
def test_prepare_keeps_a_cnns_inner_flatten():
    model = build_model("cnn", 10, (1, 8, 8), width=4, hidden=8).eval()
    gm, flat = fpga.prepare_for_hls(model)
    assert not flat
    assert any(isinstance(m, nn.Flatten) for m in gm.modules())
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(gm(x), model(x))


@needs_hls4ml
def test_activation_ranges_match_forward_hooks():
    model = build_model("mlp", 10, (1, 8, 8), hidden=[16]).eval()
    gm, _ = fpga.prepare_for_hls(model)
    x = np.random.default_rng(0).random((50, 64), dtype=np.float32)
    ranges = fpga.activation_ranges(gm, x, batch_size=16)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, float(o.abs().max())))
             for n, m in gm.named_modules() if n and not isinstance(m, nn.Sequential)]
    with torch.no_grad():
        gm(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    assert ranges["x"] == pytest.approx(float(x.max()))
    for name, value in seen.items():
        assert ranges[name.replace(".", "_")] == pytest.approx(value)


@needs_hls4ml
def test_model_hls4ml_cannot_read_raises_model_error(digits, tmp_path):
    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.view(x.shape[0], -1))

    data = common.DeployData(digits.x_train[:64], digits.x_test[:32], digits.y_test[:32])
    with pytest.raises(ModelError, match="nn.Flatten"):
        fpga.deploy(ViewNet(), data, common.DeployOptions(), tmp_path / "fpga")
    assert not (tmp_path / "fpga" / fpga.PROJECT_DIR).exists()


def test_bad_options_fail_before_compiling(digits, tmp_path):
    data = common.DeployData(digits.x_train[:64], digits.x_test[:32], digits.y_test[:32])
    model = build_model("mlp", 10, (1, 8, 8), hidden=[8])
    with pytest.raises(ConfigError, match="--precision"):
        fpga.deploy(model, data, common.DeployOptions(), tmp_path, precision="ap_fixed<16;6>")
    with pytest.raises(ConfigError, match="min_agreement"):
        fpga.deploy(model, data, common.DeployOptions(), tmp_path, min_agreement=1.5)
    assert not (tmp_path / fpga.PROJECT_DIR).exists()


# ---------------------------------------------------------------- compiled C simulation

def _train(model: nn.Module, digits, steps: int = 300) -> nn.Module:
    torch.manual_seed(0)
    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: 2 threads on a busy 2-core machine were 40x slower
    try:
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_mlp(digits):
    """64-16-10 MLP trained on digits for a few hundred steps, with its deploy data."""
    torch.manual_seed(0)
    model = _train(build_model("mlp", 10, (1, 8, 8), hidden=[16], dropout=0.1), digits)
    data = common.DeployData(digits.x_train, digits.x_test, digits.y_test)
    return model, data


@pytest.fixture(scope="module")
def report16(tiny_mlp, tmp_path_factory):
    model, data = tiny_mlp
    out = tmp_path_factory.mktemp("fpga-ap_fixed16_6")
    opts = common.DeployOptions(calib_size=256, seed=0)
    return out, opts, fpga.deploy(model, data, opts, out, precision="ap_fixed<16,6>")


@needs_hls4ml
def test_ap_fixed16_project_matches_pytorch(report16, tiny_mlp):
    out, _, r = report16
    model, data = tiny_mlp
    prj = out / fpga.PROJECT_DIR
    for f in ("firmware/kdens.cpp", "firmware/kdens.h", "firmware/parameters.h", "build_prj.tcl",
              "kdens_test.cpp", "tb_data/tb_input_features.dat", "tb_data/tb_output_predictions.dat"):
        assert (prj / f).is_file(), f
    assert list((prj / "firmware" / "weights").glob("w*.h"))
    assert "python/object" not in (prj / "hls4ml_config.yml").read_text()  # no pickled model
    assert all((out / f).is_file() for f in r["files"])
    assert r["target"] == "fpga" and r["precision"] == "ap_fixed<16,6>" and r["flat_input"]
    assert r["n_eval"] == r["n_test"] == len(data.x_test)
    assert r["float_accuracy"] > 0.8  # the model learned something, so accuracy means something
    assert r["agreement"] >= 0.95
    assert abs(r["accuracy"] - r["float_accuracy"]) <= 0.02
    assert r["passed"] and not r["failures"] and r["checks"]["parity"]["passed"]
    assert r["checks"]["synthesis"]["checked"] is False and r["latency_ms"] is None
    assert r["size_bytes"] == math.ceil(r["params"] * 16 / 8) and r["params"] == 64 * 16 + 16 + 16 * 10 + 10
    # the saved samples reproduce: C-sim logits agree with the PyTorch logits saved beside them
    sim, ref = np.load(out / common.SAMPLE_RUNTIME), np.load(out / common.SAMPLE_TORCH)
    assert (sim.argmax(1) == ref.argmax(1)).mean() >= 0.95


@needs_hls4ml
def test_per_layer_types_reflect_activation_ranges(report16, tiny_mlp):
    _, opts, r = report16
    model, data = tiny_mlp
    gm, _ = fpga.prepare_for_hls(model)
    x = common.calib_sample(data, opts).reshape(opts.calib_size, -1)
    ranges = fpga.activation_ranges(gm, x)
    chosen = r["precision_per_layer"]
    assert set(chosen) == {"x", "body_0", "body_1", "head"}
    for name, c in chosen.items():
        t = parse_precision(c["type"])
        assert t.width == 16 and c["fits"]
        if name == "x":  # images in [0, 1]: ap_fixed<16,2> holds 1.0, no guard bit
            assert t.integer == 2
            continue
        assert c["max_abs"] == pytest.approx(ranges[name])
        assert t.integer == integer_bits_for(ranges[name], 16) + r["headroom_bits"]
        assert r["hls_layer_types"][name].startswith(f"fixed<16,{t.integer},")  # hls4ml used it
    assert parse_precision(chosen["head"]["type"]).integer > parse_precision(chosen["x"]["type"]).integer


@needs_hls4ml
def test_too_narrow_precision_is_reported_not_silent(tiny_mlp, tmp_path):
    model, data = tiny_mlp
    r = fpga.deploy(model, data, common.DeployOptions(calib_size=256), tmp_path,
                    precision="ap_fixed<4,1>", min_agreement=0.9)
    assert r["agreement"] < 0.9
    assert r["passed"] is False
    assert r["checks"]["parity"]["passed"] is False
    assert any(f.startswith("parity:") and "too narrow" in f for f in r["failures"])
    assert (tmp_path / fpga.PROJECT_DIR / "build_prj.tcl").is_file()  # kept for inspection


@needs_hls4ml
@pytest.mark.slow
@needs_hls4ml
def test_sweep_reports_accuracy_per_width(tiny_mlp):
    model, data = tiny_mlp
    rows = fpga.sweep(model, data, [(16, 6), (10, 4), (6, 2)], opts=common.DeployOptions(calib_size=256))
    assert [r["precision"] for r in rows] == ["ap_fixed<16,6>", "ap_fixed<10,4>", "ap_fixed<6,2>"]
    assert rows[0]["agreement"] >= 0.95
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n_eval"] == len(data.x_test) for r in rows)
    assert rows[-1]["max_abs_diff"] > rows[0]["max_abs_diff"]  # fewer bits, larger error


@needs_hls4ml
@pytest.mark.slow
@needs_hls4ml
def test_small_cnn_streams_and_matches_pytorch(digits, tmp_path):
    model = _train(build_model("cnn", 10, (1, 8, 8), width=4, hidden=16), digits, steps=200)
    data = common.DeployData(digits.x_train, digits.x_test, digits.y_test)
    r = fpga.deploy(model, data, common.DeployOptions(calib_size=256), tmp_path, max_examples=200)
    assert r["io_type"] == "io_stream" and not r["flat_input"] and r["n_eval"] == 200
    assert r["agreement"] >= 0.95 and r["passed"]
