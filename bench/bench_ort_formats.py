"""Does the ONNX Runtime int8 recipe change batch-1 latency? Formats timed side by side.

kdens quantizes ONNX with static QDQ, int8 activations and int8 per-channel weights, and
adds ``reduce_range`` (7-bit weights) on x86 CPUs without VNNI, where ORT's fast u8s8
kernels can saturate (deploy/onnx_export.py). This script asks whether any of those
choices costs or buys latency: it quantizes one float ONNX file five ways (s8s8 and u8s8
activations, each with and without reduce_range, and the QOperator format), checks each
one's test accuracy, and times them interleaved in one process, pinned to one CPU, one
thread, like bench/bench_deploy.py. Ratios are per round against plain s8s8 (what
docs/toolchain.md's hand recipe makes), with a 95% bootstrap interval.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_ort_formats.py --deploy runs/fm/deploy-cnn
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_deploy as B  # noqa: E402  (interleaved timing and the hand-made recipe's calibration reader)

from deploy import latency  # noqa: E402
from deploy.edge_runner import OnnxModel  # noqa: E402
from kdens.artifacts import atomic_write_json, read_manifest  # noqa: E402
from kdens.runs import run_data  # noqa: E402

REFERENCE = "s8s8"


def recipes():
    from onnxruntime.quantization import QuantFormat, QuantType

    return {"s8s8": (QuantFormat.QDQ, QuantType.QInt8, False),
            "s8s8-reduce-range": (QuantFormat.QDQ, QuantType.QInt8, True),
            "u8s8": (QuantFormat.QDQ, QuantType.QUInt8, False),
            "u8s8-reduce-range": (QuantFormat.QDQ, QuantType.QUInt8, True),
            "qoperator-u8s8-reduce-range": (QuantFormat.QOperator, QuantType.QUInt8, True)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deploy", type=Path, required=True, help="a kdens deploy folder holding onnx-float/")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--min-seconds", type=float, default=0.05)
    p.add_argument("--calib", type=int, default=512, help="calibration rows (seeded sample of the training split)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    a = p.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_dir = a.deploy / "onnx-float"
    report = json.loads((float_dir / "report.json").read_text())
    data = run_data(read_manifest(Path(report["model_run"])))
    rows = np.random.default_rng(0).choice(len(data.x_train), min(a.calib, len(data.x_train)), replace=False)
    calib = data.x_train[rows]
    work = Path(tempfile.mkdtemp(prefix="kdens-ort-formats-"))
    pre = work / "pre.onnx"
    quant_pre_process(str(float_dir / report["model_file"]), str(pre))
    xb = np.ascontiguousarray(data.x_test[:1])
    variants, accuracy = {}, {}
    for name, (fmt, act, reduce_range) in recipes().items():
        path = work / f"{name}.onnx"
        quantize_static(str(pre), str(path), B._Calib(calib), quant_format=fmt, per_channel=True,
                        activation_type=act, weight_type=QuantType.QInt8, reduce_range=reduce_range)
        m = OnnxModel(path, 1)
        accuracy[name] = float((m.predict(data.x_test).argmax(1) == data.y_test).mean())
        variants[name] = (m.run_fn(1), xb)
        print(f"{name:28s} test accuracy {accuracy[name]:.4f}", flush=True)
    timing = B.interleaved(variants, a.rounds, a.min_seconds)
    ref = timing["per_round_p50_ms"][REFERENCE]
    rows_out = {}
    for name in variants:
        r = latency.paired_ratio(timing["per_round_p50_ms"][name], ref)
        rows_out[name] = {"accuracy": accuracy[name], "median_p50_ms": timing["median_p50_ms"][name],
                          "ratio_vs_s8s8": r["median"], "ratio_ci95": r["ci95"], "rounds_slower": r["rounds_slower"]}
        print(f"{name:28s} p50 {timing['median_p50_ms'][name]:.4f} ms  vs s8s8 {r['median']:.3f} "
              f"(95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}), slower in {r['rounds_slower']}/{a.rounds} rounds")
    if a.out:
        atomic_write_json(a.out, {"deploy": str(a.deploy), "rounds": a.rounds, "results": rows_out,
                                  "pinned_cpus": timing["pinned_cpus"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
