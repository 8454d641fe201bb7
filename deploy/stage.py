"""Stage ``deploy``: export one trained model to a target, check it, gate it, write the report.

Reads a finished single-model run folder (generalist or student), rebuilds its dataset
from the manifest (fingerprint checked), and hands model + arrays to the target module
(``onnx_export``, ``tflite_export`` or ``fpga``). Writes ``<out>/<target>-<precision>/``
with the model file(s), ``report.json``, ``report.md`` and, last, ``manifest.json``.
A failed gate or check raises :class:`GateFailed` after everything is written, so the
artifact stays for inspection.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

from deploy.common import DeployData, DeployOptions
from deploy.report import evaluate_gates, gate_failure_message, write_report
from kdens.artifacts import MANIFEST, read_manifest, sha256_file, write_manifest
from kdens.errors import ConfigError, GateFailed

TARGETS = {"onnx": "deploy.onnx_export", "tflite": "deploy.tflite_export", "fpga": "deploy.fpga"}
DEFAULT_FPGA_PRECISION = "ap_fixed<16,6>"


def precision_tag(target: str, opts: DeployOptions, precision: str | None) -> str:
    """Folder-name precision: float / int8 / dynamic, or ap_fixed16_6 for FPGA types."""
    if target == "fpga":
        from deploy.fpga_precision import parse_precision

        return parse_precision(precision or DEFAULT_FPGA_PRECISION).tag
    tag = {"none": "float", "int8": "int8", "dynamic": "dynamic"}[opts.quantize]
    # int8 in/out is a different file from float I/O around int8: keep both side by side
    return tag + "-int8io" if target == "tflite" and opts.io == "int8" else tag


def run(model_dir: Path, target: str, opts: DeployOptions, out_root: Path, *,
        precision: str | None = None, sweep: list | None = None,
        min_agreement: float | None = None) -> tuple[Path, dict]:
    """Deploy ``model_dir`` to ``target`` under ``out_root``; returns (folder, report).

    Raises:
        GateFailed: a budget (--max-latency-ms, --max-accuracy-drop) or a check (parity,
            structure) failed; the folder is complete and says why.
    """
    from kdens.evaluate import dataset_for_run
    from kdens.models import load_model

    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} unknown; valid: {', '.join(TARGETS)}")
    if (precision is not None or sweep or min_agreement is not None) and target != "fpga":
        raise ConfigError("--precision, --sweep and --min-agreement apply to --target fpga only; "
                          "use --quantize for onnx/tflite")
    if target == "fpga" and opts.quantize != "none":
        raise ConfigError("--quantize applies to onnx/tflite; for --target fpga choose --precision ap_fixed<W,I>")
    t0 = time.time()
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, ("generalist", "student"))
    data = dataset_for_run(manifest)
    model, spec = load_model(model_dir)
    module = importlib.import_module(TARGETS[target])
    out_dir = Path(out_root) / f"{target}-{precision_tag(target, opts, precision)}"
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a redeploy is unfinished until its manifest lands
    arrays = DeployData(x_calib=data.x_train, x_test=data.x_test, y_test=data.y_test)
    if target == "fpga":
        report = module.deploy(model, arrays, opts, out_dir, precision=precision or DEFAULT_FPGA_PRECISION,
                               sweep=sweep, min_agreement=min_agreement)
    else:
        report = module.deploy(model, arrays, opts, out_dir)
    report["model_run"] = str(model_dir)
    report["model"] = {"name": spec["name"], "kwargs": spec["kwargs"]}
    report["gates"] = evaluate_gates(report, opts.max_latency_ms, opts.max_accuracy_drop)
    failures = [gate_failure_message(report["gates"])] + list(report.get("failures", []))
    failures = [f for f in failures if f]
    report["verdict"] = "fail" if failures else "pass"
    write_report(out_dir, report)
    write_manifest(out_dir, stage="deploy", config={"target": target, "precision": precision,
                                                    **_opts_dict(opts)},
                   inputs={str(model_dir / "manifest.json"): sha256_file(model_dir / "manifest.json"),
                           str(model_dir / "model.safetensors"): sha256_file(model_dir / "model.safetensors")},
                   data_fingerprint=data.fingerprint, seed=opts.seed, wall_seconds=round(time.time() - t0, 3),
                   metrics={k: report.get(k) for k in ("accuracy", "float_accuracy", "agreement", "size_bytes")})
    if failures:
        raise GateFailed("; ".join(failures) + f" (artifact kept in {out_dir})")
    return out_dir, report


def _opts_dict(opts: DeployOptions) -> dict:
    from dataclasses import asdict

    return asdict(opts)
