"""FPGA-adjacent target: an hls4ml HLS project plus its bit-accurate C simulation.

What is checked here: hls4ml (1.3) writes a Vitis/Vivado HLS project for the student in
fixed point; ``compile()`` builds the same C++ firmware with g++ into a library whose
``predict`` is a bit-accurate simulation of the fixed-point arithmetic. It runs on the real
test inputs and is compared with PyTorch (top-1 agreement, max |logit diff|, accuracy).
What is not: no synthesis, place-and-route or co-simulation — ``hm.build()`` needs Vitis
HLS / Vivado, which are not installed — so no resource (LUT/FF/DSP/BRAM) or clock-cycle
latency numbers. The C simulation's wall time is not hardware latency.

Guards against hls4ml's silent wrong answers (docs/toolchain.md): a leading Flatten on a 4-D
input followed by Linear layers converts without error and agrees ~10% with PyTorch, so
the leading Flatten is cut from the traced graph and the flattened input is fed instead;
layer types come from observed ranges (``deploy/fpga_precision.py``); and every export is
compared with PyTorch on real inputs, failing a check below ``min_agreement``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy import common
from deploy.fpga_precision import (DEFAULT_PRECISION, FixedType, activation_ranges, default_widths, hls_config,
                                   parse_precision)
from kdens.errors import ConfigError, ModelError

PROJECT_DIR = "hls4ml_prj"
"""Folder inside ``out_dir`` holding the generated HLS project."""
PROJECT_NAME = "kdens"
"""HLS top-level function / project name."""
TB_EXAMPLES = 100
"""Test examples written to ``tb_data/`` for the project's own C-simulation testbench."""
MAX_EXAMPLES = 1000
"""Default cap on simulated test examples (a seeded subset beyond it): a small CNN takes
~7 ms per 8x8 example in the C simulation, more at 28x28. Digits' test split fits whole."""
DEFAULT_MIN_AGREEMENT = 0.9
"""Top-1 agreement with PyTorch below which the ``parity`` check fails."""
LOG_FILE = "hls4ml.log"
"""hls4ml's conversion output, kept beside the project."""
_DROP = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)


def _import_hls4ml():
    """Import hls4ml lazily: it is optional and only this target needs it."""
    try:
        import hls4ml
    except ImportError:
        raise ConfigError("--target fpga needs hls4ml: pip install 'kdens[fpga]' (or pick --target onnx/tflite)") from None
    if shutil.which("g++") is None:
        raise ConfigError("--target fpga needs g++ for the C simulation: install it (apt-get install g++)")
    return hls4ml


def _is_leading_flatten(gm: torch.fx.GraphModule, node: torch.fx.Node, x: torch.fx.Node) -> bool:
    """Is ``node`` a flatten of the whole input from dim 1 (module, function or method)?"""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1
    args = list(node.args) + list(node.kwargs.values())
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        return args[:2] == [x, 1] and args[2:] in ([], [-1])
    return False


def prepare_for_hls(model: nn.Module) -> tuple[torch.fx.GraphModule, bool]:
    """Trace ``model`` as hls4ml will; drop Dropout/Identity and a leading input Flatten.

    Returns:
        ``(graph_module, flat_input)``; ``flat_input`` is True when the leading Flatten was
        cut, so the exported network takes ``x.reshape(N, -1)``.

    Raises:
        ModelError: torch.fx cannot trace the model, or it has more than one input.
    """
    _import_hls4ml()
    from hls4ml.utils.torch import CustomFXTracer

    model = _clone_eval(model)
    try:
        gm = torch.fx.GraphModule(model, CustomFXTracer().trace(model))
    except Exception as e:  # torch.fx raises many types for untraceable code
        raise ModelError(f"--target fpga: torch.fx cannot trace the model ({type(e).__name__}: {e}); "
                         "hls4ml needs a static graph of nn modules") from None
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _DROP):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelError(f"--target fpga: the model takes {len(inputs)} inputs; only one image input is supported")
    users = list(inputs[0].users)
    flat = len(users) == 1 and _is_leading_flatten(gm, users[0], inputs[0])
    if flat:
        users[0].replace_all_uses_with(inputs[0])
        gm.graph.erase_node(users[0])
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval(), flat


def _clone_eval(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().float().eval()


@contextlib.contextmanager
def _model_as_yaml_scalar():
    """While hls4ml writes ``hls4ml_config.yml``, store the model as a one-line summary.

    hls4ml dumps the PyTorch model object itself into the YAML (a ``!!python/object`` pickle
    of every tensor; a crash for a torch.fx GraphModule); the weights are already in
    ``firmware/weights``. The representer is removed again afterwards.
    """
    import yaml

    saved = dict(yaml.Dumper.yaml_multi_representers)

    def represent(dumper, m: nn.Module):
        n = sum(p.numel() for p in m.parameters())
        return dumper.represent_scalar("!pytorch_model", f"{type(m).__name__}, {n} params (weights in firmware/weights)")

    yaml.add_multi_representer(nn.Module, represent)
    try:
        yield
    finally:
        yaml.Dumper.yaml_multi_representers = saved


def compile_project(gm: torch.fx.GraphModule, input_shape: tuple[int, ...], ptype: FixedType,
                    ranges: dict[str, float], project_dir: Path, *, backend: str = "Vitis",
                    io_type: str | None = None, headroom_bits: int = 1,
                    tb: tuple[np.ndarray, np.ndarray] | None = None):
    """Convert to hls4ml, write the project into ``project_dir`` and compile the C simulation.

    Args:
        io_type: ``io_parallel`` (default for MLPs) or ``io_stream`` (default with convolutions:
            3-4x faster to compile, and what a streaming CNN needs on chip).
        tb: Optional (inputs, expected outputs) written to ``tb_data/`` for the testbench.

    Returns:
        ``(hls_model, chosen_precision, compile_seconds, log_text)``.

    Raises:
        ModelError: hls4ml cannot convert the model or the generated C++ does not compile.
    """
    hls4ml = _import_hls4ml()
    has_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in gm.modules())
    io_type = io_type or ("io_stream" if has_conv else "io_parallel")
    log = io.StringIO()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(log), _model_as_yaml_scalar():
        tb_args = {}
        if tb is not None:
            tb_args = {"input_data_tb": str(Path(tmp) / "x.npy"), "output_data_tb": str(Path(tmp) / "y.npy")}
            np.save(tb_args["input_data_tb"], np.ascontiguousarray(tb[0].reshape(len(tb[0]), -1)))
            np.save(tb_args["output_data_tb"], np.ascontiguousarray(tb[1]))
        try:
            cfg, chosen = hls_config(gm, input_shape, ptype, ranges, backend, headroom_bits)
            hm = hls4ml.converters.convert_from_pytorch_model(
                gm, output_dir=str(project_dir), project_name=PROJECT_NAME, backend=backend,
                hls_config=cfg, io_type=io_type, **tb_args)
            hm.compile()
        except Exception as e:  # hls4ml raises bare Exceptions for unsupported layers and g++ errors
            tail = "\n".join(log.getvalue().splitlines()[-15:])
            raise ModelError(f"--target fpga: hls4ml could not convert/compile the model at {ptype} "
                             f"({type(e).__name__}: {e}). hls4ml takes nn modules (Linear, Conv, ReLU, "
                             f"MaxPool, BatchNorm, Flatten ...): write reshapes as nn.Flatten, not "
                             f"x.view(...).\n{tail}") from None
    return hm, chosen, time.perf_counter() - t0, log.getvalue()


@dataclass
class _Prepared:
    """The traced graph, its calibration ranges and the evaluation examples with PyTorch logits."""

    gm: torch.fx.GraphModule
    flat: bool
    shape: tuple[int, ...]  # input shape without batch, as the exported net takes it
    ranges: dict[str, float]
    x_eval: np.ndarray  # (n, C, H, W)
    y_eval: np.ndarray  # (n,)
    ref: np.ndarray  # (n, classes) PyTorch logits
    n_test: int
    n_calib: int


def _prepare(model: nn.Module, data: common.DeployData, opts: common.DeployOptions,
             max_examples: int | None) -> _Prepared:
    gm, flat = prepare_for_hls(model)
    x_calib = common.calib_sample(data, opts)  # seeded --calib-size rows
    x_test = data.x_test
    if max_examples is not None and max_examples < 1:
        raise ConfigError(f"max_examples={max_examples} must be >= 1 (or None for all test examples)")
    idx = np.arange(len(x_test))
    if max_examples is not None and max_examples < len(x_test):
        idx = np.sort(np.random.default_rng(opts.seed).choice(len(x_test), size=max_examples, replace=False))
    x_eval = x_test[idx]
    shape = (int(np.prod(x_calib.shape[1:])),) if flat else tuple(x_calib.shape[1:])
    ref = common.torch_logits(_clone_eval(model), x_eval)  # (n, classes)
    with torch.no_grad():
        cut = gm(torch.from_numpy(np.ascontiguousarray(x_eval.reshape(len(x_eval), *shape)))).numpy()
    if ref.shape != cut.shape or not np.allclose(ref, cut, atol=1e-4, rtol=1e-4):
        raise ModelError("--target fpga: removing Dropout/leading Flatten changed the model's output; "
                         "its forward does more than its modules show")
    ranges = activation_ranges(gm, x_calib.reshape(len(x_calib), *shape))
    return _Prepared(gm, flat, shape, ranges, x_eval, data.y_test[idx], ref,
                     len(x_test), len(x_calib))


def _evaluate(hm, p: _Prepared) -> dict[str, Any]:
    """Run the C simulation and compare with PyTorch on the same examples."""
    t0 = time.perf_counter()
    out = np.asarray(hm.predict(np.ascontiguousarray(p.x_eval.reshape(len(p.x_eval), -1))), dtype=np.float32)
    wall = time.perf_counter() - t0
    out = out.reshape(len(p.x_eval), -1)  # (n, classes)
    if out.shape != p.ref.shape:
        raise ModelError(f"--target fpga: C simulation output shape {out.shape} != PyTorch {p.ref.shape}")
    return {"float_accuracy": common.compare(p.ref, p.ref, p.y_eval)["accuracy"],
            **common.compare(out, p.ref, p.y_eval), "logits": out,
            "csim_wall_ms_per_example": 1000.0 * wall / max(1, len(p.x_eval))}


def _checks(ev: dict, chosen: dict, min_agreement: float, n: int, ptype: FixedType, weight_max: float) -> dict:
    """Say plainly what was checked here and what was not (entries as in deploy/common.py)."""
    agree_ok = ev["agreement"] >= min_agreement
    unfit = sorted(k for k, v in chosen.items() if not v["fits"])
    weights_fit = weight_max <= ptype.max_value
    fit_msg = [f"calibration range exceeds even ap_fixed<W,W> in layers {unfit}"] if unfit else []
    if not weights_fit:
        fit_msg.append(f"weights reach |w| = {weight_max:.3g} but {ptype} holds at most {ptype.max_value:.3g} "
                       f"(more integer bits, e.g. ap_fixed<{ptype.width},{ptype.integer + 1}>, or AP_SAT)")
    return {
        "csim": common.check(True, f"bit-accurate C simulation of the generated HLS firmware, compiled "
                             f"with g++ (hls4ml compile), ran on {n} test inputs"),
        "parity": common.check(
            agree_ok,
            (f"C simulation agrees with PyTorch on {ev['agreement']:.2%} of top-1 predictions "
             f"(>= {min_agreement:.0%} required), max |logit diff| {ev['max_abs_diff']:.3g}") if agree_ok else
            (f"C simulation agrees with PyTorch on only {ev['agreement']:.2%} of top-1 predictions "
             f"(< {min_agreement:.0%} required; max |logit diff| {ev['max_abs_diff']:.3g}): the fixed-point "
             "type is too narrow or the conversion is wrong; try a wider --precision or "
             "ap_fixed<W,I,AP_RND_CONV,AP_SAT>"),
            agreement=ev["agreement"], min_agreement=min_agreement, max_abs_diff=ev["max_abs_diff"]),
        "accuracy": common.check(None, f"C simulation accuracy {ev['accuracy']:.2%} vs PyTorch float "
                                 f"{ev['float_accuracy']:.2%} on the same inputs (judged by the accuracy gate)"),
        "range_fit": common.check(not fit_msg, "; ".join(fit_msg) or "weights fit the user's type and every "
                                  "layer's calibration range fits its chosen type", weight_max_abs=weight_max),
        "synthesis": common.not_checked("hm.build() needs Vitis HLS/Vivado, not installed here: no synthesis, "
                                        "no resource (LUT/FF/DSP/BRAM) or clock-cycle latency numbers"),
        "latency": common.not_checked("C-simulation wall time is not hardware latency; no latency budget "
                                      "can be checked for this target"),
    }


def _resolve_type(precision: str | FixedType | None, opts: Any) -> FixedType:
    if isinstance(precision, FixedType):
        return precision
    return parse_precision(precision or getattr(opts, "precision", None) or DEFAULT_PRECISION)


def _refuse_unsupported(model: nn.Module) -> None:
    """Refuse, in one line, models whose layers this hls4ml path does not map (before any work)."""
    from kdens.mobilenet import MobileNetV2
    from kdens.models import Standardized

    core = model.core if isinstance(model, Standardized) else model
    if isinstance(core, MobileNetV2):
        raise ConfigError("--target fpga does not take mobilenet: its depthwise convolutions, residual adds and "
                          "global average pooling have no checked hls4ml mapping here; deploy it with --target "
                          "onnx or tflite, or distill an mlp/cnn/lenet5 student for the FPGA")


def deploy(model: nn.Module, data: common.DeployData, opts: common.DeployOptions, out_dir: Path,
           precision: str | None = None, backend: str = "Vitis", *, min_agreement: float | None = None,
           max_examples: int | None = MAX_EXAMPLES, headroom_bits: int = 1, io_type: str | None = None,
           sweep: list | None = None) -> dict:
    """Export ``model`` as an hls4ml project in ``out_dir/hls4ml_prj`` and check its C simulation.

    Args:
        model: The student (a copy is put in eval mode).
        data: x_calib (layer ranges, a seeded ``opts.calib_size`` sample), x_test and y_test.
        opts: Deploy options; ``opts.precision`` / ``opts.min_agreement`` are used if present.
        out_dir: ``<deploy>/fpga-<tag>/``; the project replaces ``out_dir/hls4ml_prj``.
        precision: User type, e.g. ``ap_fixed<16,6>``; overrides ``opts.precision``.
        backend: hls4ml backend (``Vitis`` or ``Vivado``: identical C simulation here).
        min_agreement: Parity floor (default 0.9); below it the ``parity`` check fails.
        max_examples: Cap on simulated test examples (seeded subset); None = all.
        headroom_bits: Guard integer bits above each layer's calibration range.
        io_type: Override ``io_parallel`` (MLPs) / ``io_stream`` (CNNs).
        sweep: Optional (W, I) pairs; adds ``report["sweep"]`` (see :func:`run_sweep`).

    Returns:
        The report dict (deploy/common.py conventions). ``size_bytes`` is the packed weight
        storage at the chosen type, ceil(params * W / 8), what the weights occupy on chip
        (``weight_header_bytes`` is the size of the C headers). ``latency_ms`` is None:
        hardware latency cannot be measured here. ``passed`` is False and ``failures`` says
        why when a check failed (the caller turns that into a failed gate).
    """
    _refuse_unsupported(model)
    ptype = _resolve_type(precision, opts)
    if min_agreement is None:
        min_agreement = getattr(opts, "min_agreement", None)
    min_agreement = DEFAULT_MIN_AGREEMENT if min_agreement is None else float(min_agreement)
    if not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement={min_agreement} must be in [0, 1], e.g. 0.9")
    hls4ml = _import_hls4ml()
    p = _prepare(model, data, opts, max_examples)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    project = out_dir / PROJECT_DIR
    shutil.rmtree(project, ignore_errors=True)  # a stale project must not mix with this one
    try:
        hm, chosen, compile_s, log = compile_project(
            p.gm, p.shape, ptype, p.ranges, project, backend=backend, io_type=io_type,
            headroom_bits=headroom_bits, tb=(p.x_eval[:TB_EXAMPLES], p.ref[:TB_EXAMPLES]))
        ev = _evaluate(hm, p)
    except BaseException:
        shutil.rmtree(project, ignore_errors=True)  # never leave a half-written project behind
        raise
    (out_dir / LOG_FILE).write_text(log)
    samples = common.save_samples(out_dir, p.x_eval, p.ref, ev["logits"])

    params = common.num_params(p.gm)
    names = sorted(str(f.relative_to(out_dir)) for f in project.rglob("*")
                   if f.is_file() and not {"nnet_utils", "ap_types"} & set(f.parts))
    report = {
        "target": "fpga", "precision": str(ptype), "weight_precision": str(ptype),
        "runtime": "hls4ml C simulation (g++)", "hls4ml_version": hls4ml.__version__,
        "backend": backend, "io_type": hm.config.get_config_value("IOType"),
        "project_dir": PROJECT_DIR, "files": common.file_sizes(out_dir, names + [LOG_FILE] + samples),
        "size_bytes": math.ceil(params * ptype.width / 8),
        "size_definition": f"packed weight storage: ceil(params * {ptype.width} bits / 8)",
        "float_size_bytes": 4 * params,
        "weight_header_bytes": sum(f.stat().st_size for f in (project / "firmware" / "weights").glob("*.h")),
        "params": params, "flat_input": p.flat, "input_shape": list(p.shape),
        "n_test": p.n_test, "n_eval": len(p.x_eval), "n_calib": p.n_calib,
        **{k: ev[k] for k in ("float_accuracy", "accuracy", "agreement", "max_abs_diff")},
        "latency_ms": None,
        "csim_wall_ms_per_example": ev["csim_wall_ms_per_example"],
        "compile_s": compile_s, "headroom_bits": headroom_bits,
        "precision_per_layer": chosen,
        "hls_layer_types": {layer.name: str(layer.get_output_variable().type.precision)
                            for layer in hm.get_layers()},
        "checks": _checks(ev, chosen, min_agreement, len(p.x_eval), ptype,
                          max((float(t.detach().abs().max()) for t in p.gm.parameters()), default=0.0)),
    }
    if sweep:
        report["sweep"] = run_sweep(model, data, sweep, opts=opts, rounding=ptype.rounding,
                                    overflow=ptype.overflow, backend=backend, headroom_bits=headroom_bits,
                                    io_type=io_type, prepared=p)
    return common.finish(report)


def run_sweep(model: nn.Module, data: common.DeployData, widths: list | None = None, *,
              opts: common.DeployOptions | None = None, rounding: str = "TRN", overflow: str = "WRAP",
              backend: str = "Vitis", max_examples: int | None = 500, headroom_bits: int = 1,
              io_type: str | None = None, prepared: _Prepared | None = None) -> list[dict]:
    """Accuracy and parity of the C simulation at several fixed-point widths.

    Each width is compiled in a temporary folder (7-16 s per MLP, more for CNNs) and deleted.

    Args:
        widths: (W, I) pairs or ``ap_fixed`` strings; default :func:`default_widths`.
            I is the weights' integer bits; layer outputs get theirs from the ranges.
        opts: Calibration size and seed (defaults of ``DeployOptions`` if None).
        rounding, overflow: Modes for the (W, I) pairs, e.g. ``"RND_CONV"``, ``"SAT"``.
        max_examples: Test examples simulated per width (seeded subset); None = all.

    Returns:
        One ``{precision, accuracy, float_accuracy, agreement, max_abs_diff, compile_s, n_eval}``
        per width, in the order given.
    """
    p = prepared or _prepare(model, data, opts or common.DeployOptions(), max_examples)
    results = []
    for w in widths or default_widths():
        if isinstance(w, (str, FixedType)):
            ptype = _resolve_type(w, None)
        else:
            ptype = parse_precision(f"ap_fixed<{int(w[0])},{int(w[1])},AP_{rounding},AP_{overflow}>")
        with tempfile.TemporaryDirectory(prefix="kdens-fpga-sweep-") as tmp:
            hm, _, compile_s, _ = compile_project(p.gm, p.shape, ptype, p.ranges, Path(tmp) / PROJECT_DIR,
                                                  backend=backend, io_type=io_type, headroom_bits=headroom_bits)
            ev = _evaluate(hm, p)
        results.append({"precision": str(ptype), **{k: ev[k] for k in
                        ("accuracy", "float_accuracy", "agreement", "max_abs_diff")},
                        "compile_s": compile_s, "n_eval": len(p.x_eval)})
    return results


sweep = run_sweep
"""Alias: ``deploy.fpga.sweep(model, data, widths)``."""
