"""TFLite target: litert-torch conversion, PT2E int8, checks in LiteRT and tflite-runtime.

- Fixed shapes only: litert-torch cannot lower a dynamic batch through Flatten, so the
  file holds one signature per batch size ("b1", "b32", ...); the signatures share one
  set of weight buffers (each adds only its tensor metadata, ~2.7 KB for a small MLP).
- ``--quantize int8``: PT2E static quantization (symmetric per-channel int8 weights,
  int8 activations). The model is exported once with a dynamic batch axis, calibrated
  once on a seeded sample of the calibration data, and the same calibrated graph is
  converted for every signature, so all signatures share one set of scales.
  The converter makes the file's inputs/outputs int8 (``--io int8``). For ``--io float``
  a QUANTIZE op is added after each input and a DEQUANTIZE op before each output in the
  flatbuffer: the same int8 graph, float tensors at the boundary.
- Input handling stays float: when the model takes the user's raw arrays (uint8 / NHWC,
  ``kdens.raw_input.RawInput``) or standardizes its inputs (``kdens.models.Standardized``),
  only the layers after that are quantized; the file takes the raw arrays (uint8 stays
  uint8) and int8 starts at the standardized values. Quantizing raw-range features with one
  int8 scale would erase the small ones (as for ONNX, ``onnx_export.input_normalization_nodes``).
  Such a file's input is never int8, whatever ``--io``; ``--io int8`` then gives int8 outputs.
- ``--quantize dynamic`` is refused: tflite-runtime 2.14 refuses PT2E dynamic files and
  silently miscomputes ai-edge-quantizer dynamic files (docs/toolchain.md).

Pitfall handled: a module called twice (one ``nn.MaxPool2d`` or ``nn.ReLU`` reused) makes
``prepare_pt2e`` fail, because both calls carry the same module path; each call gets its
own path before annotation.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploy import common, latency
from deploy.common import DeployData, DeployOptions
from deploy.edge_runner import TFLiteModel, quantize
from deploy.tflite_check import check_in_tflite_runtime, find_tflite_runtime
from kdens.errors import ConfigError, ModelError
from kdens.raw_input import artifact_input, split_front

MODEL_FILE = "model.tflite"
FLOAT_TOL = 1e-4
"""Float parity: max |logit diff| <= FLOAT_TOL * max(1, max |PyTorch logit|)."""


def signature_name(batch_size: int) -> str:
    return f"b{batch_size}"


def _litert():
    """Import litert_torch lazily (8-10 s, optional), with its progress printing off.

    Its import chain reports things a kdens user cannot act on: torchao's CUDA-only
    kernels "failing" to load on a CPU build, the TF converter's INFO lines, and a
    torch pytree FutureWarning. They are quieted here (errors still show).
    """
    import logging
    import warnings

    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter's absl INFO/WARNING lines
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's Enum registration notice
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    try:
        import litert_torch
    except ImportError as e:
        raise ConfigError(f"the tflite target needs litert-torch (pip install litert-torch): {e}") from e
    return litert_torch


def _convert(modules: dict[int, nn.Module], example: np.ndarray, quant_config=None) -> bytes:
    """Convert one signature per batch size into one flatbuffer."""
    lt = _litert()
    conv = None
    for bs, mod in sorted(modules.items()):
        x = torch.from_numpy(np.ascontiguousarray(latency.batch_of(example, bs)))
        conv = (lt.signature if conv is None else conv.signature)(signature_name(bs), mod, (x,))
    edge = conv.convert(quant_config=quant_config) if quant_config is not None else conv.convert()
    with tempfile.TemporaryDirectory(prefix="kdens-tflite-") as tmp:
        path = Path(tmp) / MODEL_FILE
        edge.export(str(path))
        return path.read_bytes()


def unique_call_paths(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give every call of a reused module its own path in ``nn_module_stack`` (in place).

    torch.export marks the k-th call of module ``pool`` with key ``L__self___pool@k`` but
    the same path ``pool``; PT2E annotation groups nodes by path, so two MaxPool2d calls
    become one partition and ``prepare_pt2e`` fails. Appending ``@k`` to the path fixes it.
    """
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: ((path + key[key.index("@"):]) if "@" in key else path, typ)
                for key, (path, typ) in stack.items()}
    return gm


def quantize_pt2e(model: nn.Module, x_calib: np.ndarray, calib_batch: int = 32):
    """PT2E static int8: export (dynamic batch), annotate, calibrate, convert.

    Returns:
        ``(graph_module, quantizer)``: the quantize/dequantize graph and the quantizer that
        ``litert_torch`` needs to lower it to int8 kernels.
    """
    _litert()
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    x0 = torch.from_numpy(np.ascontiguousarray(latency.batch_of(x_calib, max(2, calib_batch))))
    try:
        ep = torch.export.export(model, (x0,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:
        raise ModelError(f"torch.export with a dynamic batch axis failed, so the int8 TFLite model cannot "
                         f"share one calibration across batch sizes: {type(e).__name__}: {e}. Make forward() "
                         "batch-size agnostic (e.g. nn.Flatten instead of x.view(32, -1))") from e
    pm = prepare_pt2e(unique_call_paths(ep.module()), quantizer)
    with torch.no_grad():
        for i in range(0, len(x_calib), calib_batch):
            pm(torch.from_numpy(np.ascontiguousarray(x_calib[i:i + calib_batch])))
    pm = convert_pt2e(pm, fold_quantize=False)
    move_exported_model_to_eval(pm)
    for m in pm.modules():  # litert-torch warns about modules left in training mode
        m.training = False
    return pm, quantizer


def _unpack(buf: bytes):
    """Flatbuffer -> mutable object tree (``ModelT``); refuses weights stored outside it."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf(bytearray(buf), 0)
    if any((getattr(b, "offset", 0) or 0) > 1 for b in model.buffers or []):
        raise ModelError("the .tflite keeps weights outside the flatbuffer (>2 GB model); kdens cannot "
                         "rewrite it: use --io int8")
    return model


def _pack(model) -> bytes:
    import flatbuffers

    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def add_float_io(buf: bytes) -> bytes:
    """Give an int8-I/O flatbuffer float32 inputs/outputs by adding QUANTIZE/DEQUANTIZE ops.

    For every signature: each int8 input tensor becomes the output of a new QUANTIZE op
    fed by a new float32 input; each int8 output feeds a new DEQUANTIZE op whose float32
    result becomes the output. Scales come from the int8 tensors, so the arithmetic
    inside is unchanged. (The reverse of TensorFlow's ``modify_model_interface``.)
    """
    from ai_edge_litert import schema_py_generated as fb

    model = _unpack(buf)

    def opcode(code: int) -> int:
        for i, oc in enumerate(model.operatorCodes):
            if max(oc.builtinCode, oc.deprecatedBuiltinCode) == code:
                oc.version = max(oc.version, 2)
                return i
        oc = fb.OperatorCodeT()
        oc.builtinCode = oc.deprecatedBuiltinCode = code  # < 127: both fields hold it
        oc.version = 2  # int8 (not uint8) quantize/dequantize
        model.operatorCodes.append(oc)
        return len(model.operatorCodes) - 1

    q_op, dq_op = opcode(fb.BuiltinOperator.QUANTIZE), opcode(fb.BuiltinOperator.DEQUANTIZE)
    for sig in model.signatureDefs:
        sg = model.subgraphs[sig.subgraphIndex]
        sg.inputs, sg.outputs = [int(i) for i in sg.inputs], [int(i) for i in sg.outputs]
        remap: dict[tuple[str, int], int] = {}
        for kind in ("inputs", "outputs"):
            for pos, ti in enumerate(getattr(sg, kind)):
                t = sg.tensors[ti]
                if t.type != fb.TensorType.INT8:
                    continue
                ft = fb.TensorT()
                ft.shape = [int(d) for d in t.shape]
                ft.shapeSignature = None if t.shapeSignature is None else [int(d) for d in t.shapeSignature]
                ft.type, ft.buffer = fb.TensorType.FLOAT32, 0  # buffer 0: the empty sentinel
                ft.name = (t.name.decode() if isinstance(t.name, bytes) else t.name) + "_float"
                sg.tensors.append(ft)
                fi = len(sg.tensors) - 1
                op = fb.OperatorT()
                if kind == "inputs":
                    op.opcodeIndex, op.inputs, op.outputs = q_op, [fi], [ti]
                    sg.operators.insert(0, op)
                else:
                    op.opcodeIndex, op.inputs, op.outputs = dq_op, [ti], [fi]
                    sg.operators.append(op)
                getattr(sg, kind)[pos] = fi
                remap[(kind, ti)] = fi
        for kind in ("inputs", "outputs"):
            for tm in getattr(sig, kind):
                tm.tensorIndex = remap.get((kind, tm.tensorIndex), tm.tensorIndex)
    return _pack(model)


def _io_details(m: TFLiteModel) -> dict:
    """dtype and (scale, zero point) of the input and output (equal across signatures)."""
    def desc(d):
        return {"dtype": np.dtype(d["dtype"]).name, "scale": float(d["quantization"][0]),
                "zero_point": int(d["quantization"][1])}
    inp, out = m.io_details()
    return {"input": desc(inp), "output": desc(out)}


def deploy(model: nn.Module, data: DeployData, opts: DeployOptions, out_dir: Path) -> dict:
    """Convert, quantize and check the TFLite model; write it to ``out_dir/model.tflite``.

    Args:
        model: The student (float, CPU).
        data: Calibration and test arrays.
        opts: ``quantize`` none|int8, ``io``, batch sizes (= signatures), threads, budgets.
        out_dir: ``<deploy>/tflite-<precision>/``; created if missing.

    Returns:
        The report dict (see deploy/common.py); gates are added by the caller.
    """
    if opts.quantize == "dynamic":
        raise ConfigError("--quantize dynamic is not offered for tflite: tflite-runtime 2.14 refuses "
                          "PT2E dynamic-range files and silently miscomputes ai-edge-quantizer ones "
                          "(~10% agreement). Use --quantize int8 (static, calibrated) or none")
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    precision = "int8" if opts.quantize == "int8" else "float"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ref = common.torch_logits(model, data.x_test)  # (N, C)
    float_acc = common.compare(ref, ref, data.y_test)["accuracy"]

    float_buf = _convert({bs: model for bs in opts.batch_sizes}, data.x_test)
    notes = []
    if precision == "int8":
        calib = common.calib_sample(data, opts)
        front, core = split_front(model)
        if front is None:
            pm, quantizer = quantize_pt2e(model, calib)
        else:  # int8 starts after the raw input's cast/scale/transpose and standardization (float)
            with torch.no_grad():
                core_calib = front(torch.from_numpy(common.input_array(calib))).numpy()
            core_q, quantizer = quantize_pt2e(core, core_calib)
            pm = nn.Sequential(front, core_q)
            pm.training = False
            notes.append("input handling and standardization kept float32 in front of the int8 graph")
        from litert_torch.quantize.quant_config import QuantConfig

        buf = _convert({bs: pm for bs in opts.batch_sizes}, data.x_test, QuantConfig(pt2e_quantizer=quantizer))
        if opts.io == "float":
            buf = add_float_io(buf)
            notes.append("float I/O: QUANTIZE/DEQUANTIZE ops added at the int8 inputs and outputs")
    else:
        buf = float_buf
    from kdens.artifacts import atomic_write_bytes

    path = atomic_write_bytes(out_dir / MODEL_FILE, buf)

    try:
        litert = TFLiteModel(path, "ai_edge_litert", num_threads=max(opts.thread_counts()))
    except Exception as e:
        raise ModelError(f"{path} does not load in ai_edge_litert: {e}") from e
    sigs = {signature_name(bs) for bs in opts.batch_sizes}
    out = litert.predict(data.x_test)  # (N, C) float, dequantized
    cmp = common.compare(out, ref, data.y_test)
    io = _io_details(litert)

    in_detail = litert.io_details()[0]
    note = f"one signature per batch size ({', '.join(f'{signature_name(b)}: {b}' for b in opts.batch_sizes)})"
    if io["input"]["dtype"] == "int8":
        note += (f"; quantize the input first: int8 = clip(round(x / {io['input']['scale']:.6g}) + "
                 f"{io['input']['zero_point']}, -128, 127)")
    input_entry = artifact_input(data.input, io["input"]["dtype"], ["batch", *map(int, in_detail["shape"][1:])], note)
    checks = {"signatures": common.check(
        set(litert.signatures.values()) == sigs,
        f"signatures {sorted(litert.signatures.values())} (expected {sorted(sigs)}), fixed shapes")}
    if precision == "float":
        tol = FLOAT_TOL * max(1.0, float(np.abs(ref).max()))
        ok = cmp["max_abs_diff"] <= tol
        checks["parity"] = common.check(ok, f"ai_edge_litert: max |logit diff| vs PyTorch {cmp['max_abs_diff']:.3g} "
                                        f"{'<=' if ok else '>'} {tol:.3g} on {len(ref)} test inputs", tolerance=tol)
    else:
        checks["parity"] = common.info(f"int8: top-1 agreement with PyTorch {cmp['agreement']:.2%}, max "
                                        f"|logit diff| {cmp['max_abs_diff']:.3g} (judged by the accuracy gate)")
    runtimes = {"ai_edge_litert": {"version": litert_version(), "loads": True, "delegate": "XNNPACK (default)",
                                   "agreement": cmp["agreement"], "max_abs_diff": cmp["max_abs_diff"]}}
    tr_python, why_not = find_tflite_runtime(opts.tflite_runtime_venv)
    if tr_python is not None:
        tr = check_in_tflite_runtime(path, data.x_test, ref, python=tr_python, expected_runtime=out,
                                     latency_threads=(min(opts.thread_counts()),),
                                     min_seconds=opts.latency_min_seconds)
        runtimes["tflite_runtime"] = tr
        if tr.get("loads") is None:
            checks["tflite_runtime"] = common.not_checked(tr.get("error") or "not checked")
        else:
            ok = bool(tr["loads"]) and tr.get("agreement_host_runtime", 0.0) >= 0.99
            checks["tflite_runtime"] = common.check(
                ok, (f"tflite-runtime loads the file; top-1 agreement with ai_edge_litert "
                     f"{tr.get('agreement_host_runtime', float('nan')):.2%}, with PyTorch {tr.get('agreement', float('nan')):.2%}")
                if tr["loads"] else f"tflite-runtime cannot run the file: {tr.get('error')}")
    else:
        runtimes["tflite_runtime"] = {"loads": None, "error": f"not checked: {why_not}"}
        checks["tflite_runtime"] = common.not_checked(why_not)

    prepare = (lambda xb: quantize(xb, in_detail)) if io["input"]["dtype"] == "int8" else None
    lat, env = common.latency_grid(lambda bs, t: TFLiteModel(path, "ai_edge_litert", num_threads=t).run_fn(bs),
                                   data.x_test, opts, prepare=prepare)
    checks["latency"] = common.info(f"measured {', '.join(lat)} in ai_edge_litert (XNNPACK) through the "
                                     "signature runner; int8 inputs are quantized before timing")

    samples = common.save_samples(out_dir, data.x_test, ref, out)
    report = {
        "target": "tflite", "precision": precision, "io": io["input"]["dtype"].replace("float32", "float"),
        "io_quantization": io, "input": input_entry,
        "runtime": f"ai_edge_litert {litert_version()}", "runtimes": runtimes,
        "converter": f"litert-torch {_litert().__version__}" + (" + PT2E static int8" if precision == "int8" else ""),
        "signatures": {signature_name(bs): bs for bs in opts.batch_sizes},
        "notes": notes,
        "files": common.file_sizes(out_dir, [MODEL_FILE] + samples), "model_file": MODEL_FILE,
        "size_bytes": path.stat().st_size, "float_size_bytes": len(float_buf),
        "params": common.num_params(model),
        "n_test": len(data.x_test), "n_calib": min(opts.calib_size, len(data.x_calib)) if precision == "int8" else 0,
        "float_accuracy": float_acc, "accuracy": cmp["accuracy"], "agreement": cmp["agreement"],
        "max_abs_diff": cmp["max_abs_diff"],
        "latency_ms": lat, "latency_env": env,
        **latency.latency_bound_ms(common.weight_bytes(model, precision)),
        "checks": checks,
    }
    return common.finish(report)


def litert_version() -> str:
    from importlib.metadata import version

    return version("ai-edge-litert")
