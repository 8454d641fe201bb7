"""ONNX target: export the student, optionally quantize it, check it in ONNX Runtime.

- Export: ``torch.onnx.export(dynamo=True, external_data=False)`` with a dynamic batch
  axis (one file serves every batch size); if the dynamo exporter fails the legacy
  TorchScript exporter (opset 17) is used and the report says so.
- ``--quantize int8``: ``quant_pre_process`` (shape inference + graph optimization), then
  static QDQ quantization with per-channel int8 weights and int8 activations, calibrated
  with MinMax ranges on a seeded sample of the calibration data. Inputs/outputs stay
  float: the QuantizeLinear/DequantizeLinear pairs live inside the graph.
- ``--quantize dynamic``: weights int8, activations quantized on the fly per batch. Only
  for models without convolutions: on a small CNN it made ORT 9-33x slower than fp32
  (docs/toolchain.md), so it is refused there.

Checked: ``onnx.checker.check_model``; the file loads in ONNX Runtime; logits on the whole
test set against PyTorch (float: max |diff| within tolerance; int8: top-1 agreement and
accuracy drop, which the gates judge); latency per batch size and thread count.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy import common, latency
from deploy.common import DeployData, DeployOptions
from deploy.edge_runner import OnnxModel
from kdens.errors import ConfigError, ModelError
from kdens.raw_input import artifact_input

MODEL_FILE = "model.onnx"
FLOAT_TOL = 1e-4
"""Float parity: max |logit diff| <= FLOAT_TOL * max(1, max |PyTorch logit|)."""
KERNEL_MIN_AGREEMENT = 0.99
"""int8: fused ORT kernels must agree with the unfused QDQ graph on this share of inputs."""


def export_onnx(model: nn.Module, path: Path, example: np.ndarray) -> dict:
    """Export ``model`` to a single ``.onnx`` file with a dynamic batch axis.

    Args:
        model: Float model (exported in eval mode; its mode is restored).
        path: Output file.
        example: A real input batch, in the form the file will take, used for tracing.

    Returns:
        ``{"exporter": "dynamo"|"legacy", "note": str|None}``.
    """
    x = torch.from_numpy(common.input_array(example[:2]))  # raw uint8 images stay uint8
    # the exporter logs one warning per torchvision op it cannot register: noise for our nets
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    was_training = model.training
    model.eval()
    try:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")  # the dynamo exporter prints progress to stdout
                torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                                  input_names=["x"], output_names=["logits"],
                                  # a tuple, not {"x": ...}: dict keys must be forward()'s own
                                  # argument names (nn.Sequential calls it ``input``)
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
            return {"exporter": "dynamo", "note": None}
        except Exception as e:  # the dynamo exporter is young; the legacy one covers plain nets
            note = f"dynamo exporter failed ({type(e).__name__}: {str(e)[:300]}); used the legacy exporter"
            Path(path).unlink(missing_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["logits"],
                                  dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
            return {"exporter": "legacy", "note": note}
    finally:
        model.train(was_training)


class _CalibReader:
    """onnxruntime CalibrationDataReader over fixed batches of calibration inputs."""

    def __init__(self, x: np.ndarray, input_name: str, batch_size: int = 64):
        self._batches = [{input_name: common.input_array(x[i:i + batch_size])}
                         for i in range(0, len(x), batch_size)]
        self._i = 0

    def get_next(self) -> dict | None:
        if self._i >= len(self._batches):
            return None
        self._i += 1
        return self._batches[self._i - 1]

    def rewind(self) -> None:
        self._i = 0


def int8_needs_reduce_range() -> tuple[bool, str]:
    """Whether to quantize weights to 7 bits, and why.

    On x86-64 without VNNI, ONNX Runtime's int8 GEMM/conv kernels (u8s8 via ``vpmaddubsw``)
    saturate int16 partial sums: on a small CNN here (AVX2, no VNNI) the fused kernels
    agreed with PyTorch on 97% of test inputs while the same QDQ graph run unfused agreed
    on 99.7%. ``reduce_range`` (7-bit weights) removes the overflow (99.3%, fused == unfused).
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False, f"{platform.machine()}: no int16 saturation in ORT's int8 kernels"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True, "x86 CPU flags unreadable: 7-bit weights to be safe"
    if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")):
        return False, "x86 with VNNI: int8 dot products do not saturate"
    return True, ("x86 without VNNI: 7-bit weights (reduce_range) avoid int16 saturation in ORT's "
                  "int8 kernels; a model quantized on a VNNI host may saturate here")


def quantize_int8(float_path: Path, out_path: Path, x_calib: np.ndarray, work_dir: Path,
                  reduce_range: bool = False) -> None:
    """Static QDQ int8 (per-channel weights, int8 activations, MinMax calibration)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work_dir / "model.pre.onnx"
    quant_pre_process(str(float_path), str(pre))
    quantize_static(str(pre), str(out_path), _CalibReader(x_calib, "x"), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=input_normalization_nodes(pre))


def input_normalization_nodes(path: Path) -> list[str]:
    """Names of the nodes that turn the raw graph input into the model's input: the cast, /255 and
    NHWC -> NCHW of ``kdens.raw_input.Front`` and the standardization of ``kdens.models.Standardized``.

    They stay float: quantizing raw inputs whose features span e.g. 0.002 to 100,000 with one
    int8 scale would erase the small ones before the normalization could rescale them (a
    sensor CSV fell from 95% to 33% that way); int8 starts after them.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    frontier, names = {graph.input[0].name}, []
    for node in graph.node:  # topological order: the normalization comes first
        if any(i in frontier for i in node.input):
            if node.op_type not in ("Sub", "Mul", "Div", "Cast", "Transpose"):
                break
            names.append(node.name)
            frontier |= set(node.output)
    return names


def quantize_dynamic_int8(float_path: Path, out_path: Path, reduce_range: bool = False) -> None:
    """Dynamic-range int8: weights per-channel int8, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(float_path), str(out_path), per_channel=True, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8)


def unfused_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits with graph optimizations off: QDQ evaluated as written (the kernel reference)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 256]})[0] for i in range(0, len(x), 256)])


def check_dynamic_allowed(model: nn.Module) -> None:
    """Refuse ``--quantize dynamic`` for conv nets (ORT's dynamic conv path is much slower)."""
    if common.has_conv(model):
        raise ConfigError(
            "--quantize dynamic is refused for models with convolutions: ONNX Runtime's dynamic "
            "int8 convolution (ConvInteger) made a small CNN 9-33x slower than float32 here. "
            "Use --quantize int8 (static, calibrated), or --quantize none")


def _precision(opts: DeployOptions) -> str:
    return {"none": "float", "int8": "int8", "dynamic": "dynamic"}[opts.quantize]


def deploy(model: nn.Module, data: DeployData, opts: DeployOptions, out_dir: Path) -> dict:
    """Export, quantize and check the ONNX model; write it to ``out_dir/model.onnx``.

    Args:
        model: The student (float, CPU).
        data: Calibration and test arrays.
        opts: Quantization, latency and budget options (``io`` does not apply: QDQ models
            keep float inputs/outputs).
        out_dir: ``<deploy>/onnx-<precision>/``; created if missing.

    Returns:
        The report dict (see deploy/common.py); gates are added by the caller.
    """
    import onnx
    import onnxruntime as ort

    if opts.quantize == "dynamic":
        check_dynamic_allowed(model)
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    precision = _precision(opts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = common.torch_logits(model, data.x_test)  # (N, C)
    float_acc = common.compare(ref, ref, data.y_test)["accuracy"]

    with tempfile.TemporaryDirectory(prefix="kdens-onnx-") as tmp:
        tmp = Path(tmp)
        float_path = tmp / "model.float.onnx"
        how = export_onnx(model, float_path, data.x_test)
        onnx.checker.check_model(str(float_path))
        float_size = float_path.stat().st_size
        final = tmp / MODEL_FILE
        reduce_range, rr_reason = int8_needs_reduce_range() if precision != "float" else (False, None)
        if opts.quantize == "int8":
            quantize_int8(float_path, final, common.calib_sample(data, opts), tmp, reduce_range)
        elif opts.quantize == "dynamic":
            quantize_dynamic_int8(float_path, final, reduce_range)
        else:
            final = float_path
        onnx.checker.check_model(str(final))
        shutil.copyfile(final, out_dir / MODEL_FILE)

    path = out_dir / MODEL_FILE
    try:
        runner = OnnxModel(path, num_threads=max(opts.thread_counts()))
    except Exception as e:
        raise ModelError(f"{path} passed onnx.checker but ONNX Runtime cannot load it: {e}") from e
    out = runner.predict(data.x_test)  # (N, C)
    cmp = common.compare(out, ref, data.y_test)

    checks = {"structure": common.check(True, "onnx.checker.check_model passed on the exported "
                                        + ("and quantized files" if precision != "float" else "file"))}
    if precision == "float":
        tol = FLOAT_TOL * max(1.0, float(np.abs(ref).max()))
        ok = cmp["max_abs_diff"] <= tol
        checks["parity"] = common.check(ok, f"max |logit diff| vs PyTorch {cmp['max_abs_diff']:.3g} "
                                        f"{'<=' if ok else '>'} {tol:.3g} on {len(ref)} test inputs",
                                        tolerance=tol)
    else:
        checks["parity"] = common.info(f"{precision}: top-1 agreement with PyTorch "
                                        f"{cmp['agreement']:.2%}, max |logit diff| {cmp['max_abs_diff']:.3g} "
                                        "(judged by the accuracy gate)")
    if precision != "float":
        fused = common.compare(out, unfused_logits(path, data.x_test))
        ok = fused["agreement"] >= KERNEL_MIN_AGREEMENT
        checks["int8_kernels"] = common.check(
            ok, f"optimized int8 kernels vs the unfused QDQ graph: top-1 agreement {fused['agreement']:.2%} "
            f"({'>=' if ok else '<'} {KERNEL_MIN_AGREEMENT:.0%}), max |diff| {fused['max_abs_diff']:.3g}"
            + ("" if ok else "; the kernels saturate on this CPU: quantize with reduce_range"), **fused)
    in_shape = ["batch" if not isinstance(d, int) else d for d in runner.session.get_inputs()[0].shape]
    checks["io"] = common.info(f"{runner.input_dtype} inputs {in_shape}, float32 outputs"
                                + (" (--io int8 applies to tflite only; QDQ keeps the I/O as exported)"
                                   if opts.io == "int8" else ""))

    lat, env = common.latency_grid(lambda bs, t: OnnxModel(path, num_threads=t).run_fn(bs), data.x_test, opts)
    checks["latency"] = common.info(f"measured {', '.join(lat)} in onnxruntime (CPU EP)")

    samples = common.save_samples(out_dir, data.x_test, ref, out)
    report = {
        "target": "onnx", "precision": precision, "io": "float",
        "input": artifact_input(data.input, runner.input_dtype, in_shape),
        "runtime": f"onnxruntime {ort.__version__}",
        "runtimes": {"onnxruntime": {"version": ort.__version__, "loads": True,
                                     "agreement": cmp["agreement"], "max_abs_diff": cmp["max_abs_diff"]}},
        "reduce_range": reduce_range, "reduce_range_reason": rr_reason,
        "exporter": how["exporter"], "export_note": how["note"],
        "files": common.file_sizes(out_dir, [MODEL_FILE] + samples),
        "model_file": MODEL_FILE,
        "size_bytes": path.stat().st_size, "float_size_bytes": float_size,
        "params": common.num_params(model),
        "n_test": len(data.x_test), "n_calib": min(opts.calib_size, len(data.x_calib))
        if opts.quantize == "int8" else 0,
        "float_accuracy": float_acc, "accuracy": cmp["accuracy"], "agreement": cmp["agreement"],
        "max_abs_diff": cmp["max_abs_diff"],
        "latency_ms": lat, "latency_env": env,
        **latency.latency_bound_ms(common.weight_bytes(model, "float" if precision == "float" else "int8")),
        "checks": checks,
    }
    return common.finish(report)
