"""Stage ``deploy``: export one trained model to a target, check it, gate it, write the report.

Reads a finished single-model run folder (generalist or student; its manifest's hashes
checked), rebuilds its dataset from the manifest (fingerprint checked), and hands model +
arrays to the target module (``onnx_export``, ``tflite_export`` or ``fpga``; a tree student,
already an ONNX file, to ``onnx_ready``). Writes the
run folder (``<out>/<target>-<precision>/`` from the CLI) with the model file(s),
``report.json``, ``report.md`` and, last, ``manifest.json``. A failed gate or check raises
:class:`GateFailed` after everything is written, so the artifact stays for inspection.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deploy import onnx_ready
from deploy.common import DeployData, sample_rows
from deploy.config import DEFAULT_FPGA_PRECISION, DeployConfig
from deploy.onnx_ready import check_target, input_files, onnx_student
from deploy.report import evaluate_gates, gate_failure_message, write_report
from kdens.artifacts import MANIFEST, read_manifest, sha256_file, write_manifest
from kdens.errors import ArtifactError, GateFailed
from kdens.imported import require_torch
from kdens.mapped import MappedRows
from kdens.models import load_model
from kdens.raw_input import RawInput, artifact_input, to_raw
from kdens.runs import data_config, run_data

MODULES = {"onnx": "deploy.onnx_export", "tflite": "deploy.tflite_export", "fpga": "deploy.fpga"}


def run(cfg: DeployConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Deploy ``cfg.model`` to ``cfg.target`` into ``run_dir``; returns the folder.

    An export has no partial state worth continuing, so ``resume`` redoes it; a finished
    folder is redone only with ``force``. ``progress`` is accepted for the stage contract
    (exports print nothing while they run).

    Raises:
        GateFailed: a budget (--max-latency-ms, --max-accuracy-drop) or a check (parity,
            structure) failed; the folder is complete and says why.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    model_dir = Path(cfg.model)
    manifest = read_manifest(model_dir, ("generalist", "student"))
    if (run_dir / MANIFEST).exists() and not (force or resume):
        raise ArtifactError(f"{run_dir} already holds a finished deploy; pass --force to export again, "
                            "or choose another --out")
    tree = onnx_student(model_dir)  # a tree student is an ONNX file already (deploy/onnx_ready.py)
    if tree is not None:
        check_target(tree, model_dir, cfg.target, cfg.opts.quantize)
    if cfg.target == "tflite":  # a cross-check venv named explicitly must work: refuse before any write
        from deploy.tflite_check import find_tflite_runtime

        find_tflite_runtime(cfg.opts.tflite_runtime_venv)
    data = run_data(manifest)
    model, spec = load_model(model_dir) if tree is None else (None, tree)
    if tree is None:
        require_torch(model, model_dir, f"kdens deploy exports a PyTorch network to {cfg.target}")
    module = importlib.import_module(MODULES[cfg.target])
    (run_dir / MANIFEST).unlink(missing_ok=True)  # a redeploy is unfinished until its manifest lands
    opts = cfg.opts
    if tree is not None or cfg.target == "fpga":
        # a tree's ONNX file takes the model input as it was fitted; hls4ml takes one ap_fixed input
        # type: the float model input (its report says how to get there)
        arrays = DeployData(x_calib=data.x_train, x_test=data.x_test, y_test=data.y_test)
    else:  # ONNX and TFLite files take the user's raw arrays; every gate feeds them exactly those
        raw = data.raw_input
        model = RawInput(model, raw)
        x_calib, x_test = data.x_train, data.x_test
        if isinstance(x_calib, MappedRows):  # read only the calibration rows calib_sample would pick
            x_calib = np.asarray(sample_rows(x_calib, opts.calib_size, opts.seed))
        if isinstance(x_test, MappedRows):  # every test row feeds the gates
            x_test = np.asarray(x_test)
        arrays = DeployData(x_calib=to_raw(x_calib, raw), x_test=to_raw(x_test, raw), y_test=data.y_test, input=raw)
    if tree is not None:
        report = onnx_ready.deploy(model_dir, tree, arrays, opts, run_dir, manifest.get("metrics", {}).get("params"))
    elif cfg.target == "fpga":
        report = module.deploy(model, arrays, opts, run_dir, precision=cfg.precision or DEFAULT_FPGA_PRECISION,
                               sweep=cfg.sweep, min_agreement=cfg.min_agreement)
    else:
        report = module.deploy(model, arrays, opts, run_dir)
    if cfg.target == "fpga":
        report["input"] = fpga_input(data.raw_input, list(data.input_shape))
    report["model_run"] = str(model_dir)
    report["model"] = {"name": spec["name"], "kwargs": spec["kwargs"]}
    report["gates"] = evaluate_gates(report, opts.max_latency_ms, opts.max_accuracy_drop)
    failures = [gate_failure_message(report["gates"])] + list(report.get("failures", []))
    failures = [f for f in failures if f]
    report["verdict"] = "fail" if failures else "pass"
    write_report(run_dir, report)
    config = {**asdict(cfg), "opts": asdict(opts)}
    write_manifest(run_dir, stage="deploy", config=config,
                   inputs={str(model_dir / name): sha256_file(model_dir / name)
                           for name in [MANIFEST] + (input_files(tree) if tree else ["model.safetensors"])},
                   data_fingerprint=data.fingerprint, seed=opts.seed, wall_seconds=round(time.time() - t0, 3),
                   metrics={k: report.get(k) for k in ("accuracy", "float_accuracy", "agreement", "size_bytes")},
                   extra={"data_config": data_config(manifest), "verdict": report["verdict"]})
    if failures:
        raise GateFailed("; ".join(failures) + f" (artifact kept in {run_dir})")
    return run_dir


def fpga_input(raw: dict | None, shape: list[int]) -> dict:
    """The FPGA project's input: the float model input, not the user's raw arrays.

    hls4ml gives the whole input one ap_fixed type and has no cast, /255 or transpose layer
    to put in front; folding /255 and the standardization into the first layer instead is
    inexact for zero-padded convolutions (the padding would no longer be the mean). So the
    HLS input is the model input, and the report says how to make it from the raw arrays.
    """
    raw = raw or {}
    uint8, nhwc = raw.get("dtype") == "uint8", raw.get("layout") == "nhwc"
    steps = [s for s, on in (("divide the uint8 pixels by 255", uint8),
                             ("transpose NHWC -> NCHW", nhwc)) if on]
    note = ("the HLS input is the float model input (ap_fixed in hardware)"
            + (": " + ", then ".join(steps) if steps else "") + "; the C simulation flattens it")
    layout = "features" if raw.get("layout") == "features" else "nchw"
    return artifact_input({**raw, "layout": layout, "range": [0.0, 1.0] if uint8 else raw.get("range"),
                           "range_from": "uint8 / 255" if uint8 else raw.get("range_from")},
                          "float32", ["batch", *shape], note)
