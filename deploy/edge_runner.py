#!/usr/bin/env python3
"""Run kdens-deployed models on an edge device: parity with PyTorch and latency, as JSON.

Self-contained on purpose (it ships inside ``kdens`` bundles): needs only numpy plus
whichever of ``tflite_runtime``, ``ai_edge_litert`` or ``onnxruntime`` is installed.
kdens also uses it on the host to cross-check ``.tflite`` files in tflite-runtime.

Usage::

    python edge_runner.py --bundle .            # every model listed in ./bundle.json
    python edge_runner.py --model m.tflite --x sample_x.npy --expected sample_torch_logits.npy

TFLite files from kdens have one fixed-shape signature per batch size ("b1", "b32");
int8 inputs are quantized and int8 outputs dequantized with the tensors' own
scale/zero point, so logits are always compared in float.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RUNTIMES = ("tflite_runtime", "ai_edge_litert", "onnxruntime")


def runtime_version(runtime: str) -> str | None:
    """Installed version of ``runtime``, or None if it cannot be imported."""
    try:
        if runtime == "tflite_runtime":
            import tflite_runtime
            return getattr(tflite_runtime, "__version__", "?")
        if runtime == "ai_edge_litert":
            from importlib.metadata import version
            import ai_edge_litert.interpreter  # noqa: F401
            return version("ai-edge-litert")
        if runtime == "onnxruntime":
            import onnxruntime
            return onnxruntime.__version__
    except Exception:
        return None
    raise ValueError(f"unknown runtime {runtime!r}; choose from {RUNTIMES}")


def pick_runtime(path: Path, runtime: str = "auto") -> str:
    """The runtime to use for ``path``: the one asked for, else the first installed one."""
    if runtime != "auto":
        return runtime
    wanted = ("onnxruntime",) if path.suffix == ".onnx" else ("tflite_runtime", "ai_edge_litert")
    for r in wanted:
        if runtime_version(r) is not None:
            return r
    raise RuntimeError(f"no runtime for {path.name}: install one of {', '.join(wanted)}")


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float -> the tensor's int8/uint8 type with its (scale, zero point); float passes through."""
    dtype = np.dtype(detail["dtype"])
    scale, zp = detail["quantization"]
    if dtype.kind == "f" or not scale:  # float, or raw (unquantized) uint8 pixels: taken as they are
        return np.ascontiguousarray(x, dtype=dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zp, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    """Quantized output -> float32 logits; float passes through."""
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32)
    scale, zp = detail["quantization"]
    return ((y.astype(np.float32) - zp) * scale).astype(np.float32)


@contextlib.contextmanager
def without_runtime_info():
    """Drop the runtime's C++ INFO lines from stderr (file descriptor 2) while the block runs.

    TFLite's native logger writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    straight to fd 2 when the first signature runs, past Python's sys.stderr and past
    TF_CPP_MIN_LOG_LEVEL, which only the TensorFlow converter reads. The fd is pointed at a
    temporary file meanwhile; every other line is written back to stderr afterwards.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 to redirect (an embedded interpreter): leave it be
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode(errors="replace").splitlines(keepends=True)
                    if not ln.startswith("INFO: ")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class TFLiteModel:
    """A multi-signature ``.tflite`` file in tflite_runtime or ai_edge_litert."""

    def __init__(self, path: Path, runtime: str = "ai_edge_litert", num_threads: int = 1):
        if runtime == "tflite_runtime":
            from tflite_runtime.interpreter import Interpreter
        else:
            from ai_edge_litert.interpreter import Interpreter
        self.runtime = runtime
        self._runners: dict[int, tuple] = {}
        self.signatures: dict[int, str] = {}
        with without_runtime_info():  # the delegate is made (and announced) on the first run: warm up here
            self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
            for name in self.interpreter.get_signature_list():
                runner = self.interpreter.get_signature_runner(name)
                (in_name, in_d), = runner.get_input_details().items()
                (out_name, out_d), = runner.get_output_details().items()
                bs = int(in_d["shape"][0])
                self.signatures[bs] = name
                self._runners[bs] = (runner, in_name, in_d, out_name, out_d)
                runner(**{in_name: np.zeros(in_d["shape"], dtype=in_d["dtype"])})
        if not self.signatures:
            raise RuntimeError(f"{path} has no signatures; kdens writes one per batch size")
        self.input_dtype = np.dtype(next(iter(self._runners.values()))[2]["dtype"]).name

    def io_details(self, batch_size: int | None = None) -> tuple[dict, dict]:
        """Input and output tensor details (dtype, quantization) of one signature."""
        _, _, in_d, _, out_d = self._runners[batch_size if batch_size is not None else min(self._runners)]
        return in_d, out_d

    def prepare(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """Convert a float batch to the signature's input type (int8 for --io int8)."""
        return quantize(x, self._runners[batch_size][2])

    def run_fn(self, batch_size: int):
        """A function running one prepared batch of exactly ``batch_size`` (raw output)."""
        runner, in_name, _, out_name, _ = self._runners[batch_size]
        return lambda xb: runner(**{in_name: xb})[out_name]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float logits (N, C): full chunks through the largest signature, the rest padded."""
        sizes = sorted(self.signatures)
        outs, i = [], 0
        while i < len(x):
            left = len(x) - i
            fits = [s for s in sizes if s <= left]
            bs = max(fits) if fits else min(sizes)
            chunk = x[i:i + bs]
            n = len(chunk)
            if n < bs:  # pad with copies of the last row; the padding's outputs are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
            _, _, in_d, _, out_d = self._runners[bs]
            outs.append(dequantize(self.run_fn(bs)(self.prepare(chunk, bs)), out_d)[:n])
            i += n
        return np.concatenate(outs)


class OnnxModel:
    """An ``.onnx`` file with a dynamic batch axis in onnxruntime (CPU)."""

    def __init__(self, path: Path, num_threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        self.runtime = "onnxruntime"
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_dtype = {"tensor(uint8)": "uint8"}.get(self.session.get_inputs()[0].type, "float32")
        self.signatures: dict[int, str] = {}

    def prepare(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def run_fn(self, batch_size: int):
        sess, name = self.session, self.input_name
        return lambda xb: sess.run(None, {name: xb})[0]

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return np.concatenate([self.run_fn(batch_size)(self.prepare(x[i:i + batch_size], batch_size))
                               for i in range(0, len(x), batch_size)]).astype(np.float32)


def load(path: Path, runtime: str = "auto", num_threads: int = 1):
    """Open ``path`` in ``runtime`` (auto: the first installed one that reads it)."""
    runtime = pick_runtime(Path(path), runtime)
    if runtime == "onnxruntime":
        return OnnxModel(path, num_threads)
    return TFLiteModel(path, runtime, num_threads)


def percentiles(fn, xb: np.ndarray, warmup: int, min_runs: int, min_seconds: float,
                max_runs: int | None = None) -> dict:
    """p50/p90/p99/mean/min (ms) of single timed calls ``fn(xb)``.

    Runs ``warmup`` untimed calls, then timed calls until both ``min_runs`` calls and
    ``min_seconds`` seconds are reached (or ``max_runs``). The one timing loop of kdens:
    host measurements (deploy/latency.py) call it too, so device rows merged into
    ``kdens bench`` are measured the same way as host rows.
    """
    for _ in range(warmup):
        fn(xb)
    times = []
    deadline = time.perf_counter_ns() + int(min_seconds * 1e9)
    while (max_runs is None or len(times) < max_runs) and (len(times) < min_runs
                                                          or time.perf_counter_ns() < deadline):
        t0 = time.perf_counter_ns()
        fn(xb)
        times.append(time.perf_counter_ns() - t0)
    ms = np.asarray(times, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "runs": len(times)}


def compare(out: np.ndarray, ref: np.ndarray) -> dict:
    return {"agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(out.astype(np.float64) - ref).max())}


def run_one(path: Path, x: np.ndarray, expected: np.ndarray | None, runtime: str = "auto",
            threads: tuple[int, ...] = (1,), batch_sizes: tuple[int, ...] | None = None,
            latency: bool = True, warmup: int = 10, min_runs: int = 50, min_seconds: float = 0.5,
            expected_runtime: np.ndarray | None = None) -> dict:
    """Parity and latency of one model file; never raises for a model that fails to load."""
    res: dict = {"file": str(path), "loads": False, "error": None}
    try:
        rt = pick_runtime(Path(path), runtime)
        res["runtime"] = f"{rt} {runtime_version(rt)}"
        model = load(path, rt, threads[0])
        res["loads"] = True
        out = model.predict(x)
        if expected is not None:
            res.update(compare(out, expected))
        if expected_runtime is not None:
            res.update({f"{k}_host_runtime": v for k, v in compare(out, expected_runtime).items()})
        if latency:
            sizes = batch_sizes or tuple(sorted(model.signatures)) or (1,)
            res["latency_ms"] = {}
            for t in threads:
                m = model if t == threads[0] else load(path, rt, t)
                for bs in sizes:
                    if m.signatures and bs not in m.signatures:
                        continue
                    xb = np.concatenate([x] * (-(-bs // len(x))))[:bs]
                    res["latency_ms"][f"b{bs}_t{t}"] = percentiles(
                        m.run_fn(bs), m.prepare(xb, bs), warmup, min_runs, min_seconds)
    except Exception as e:  # a device that cannot run a file is a result, not a crash
        res["error"] = f"{type(e).__name__}: {e}"
    return res


def environment() -> dict:
    return {"host": platform.node(), "machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "runtimes": {r: v for r in RUNTIMES if (v := runtime_version(r)) is not None}}


def run_bundle(bundle: Path, runtime: str = "auto", **kw) -> dict:
    """Run every model listed in ``bundle/bundle.json``."""
    spec = json.loads((bundle / "bundle.json").read_text())
    results = []
    for m in spec["models"]:
        x = np.load(bundle / m["x"])
        exp = np.load(bundle / m["torch_logits"]) if m.get("torch_logits") else None
        exp_rt = np.load(bundle / m["runtime_logits"]) if m.get("runtime_logits") else None
        if runtime != "auto" and (Path(m["file"]).suffix == ".onnx") != (runtime == "onnxruntime"):
            continue
        kw_m = dict(kw)
        if kw_m.get("batch_sizes") is None and m.get("batch_sizes"):
            kw_m["batch_sizes"] = tuple(m["batch_sizes"])  # what the host measured
        results.append({"name": m["name"], **run_one(bundle / m["file"], x, exp, runtime,
                                                     expected_runtime=exp_rt, **kw_m)})
    return {"environment": environment(), "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle folder holding bundle.json")
    p.add_argument("--model", type=Path, help="one .tflite or .onnx file")
    p.add_argument("--x", type=Path,
                   help="inputs .npy, as the model takes them (e.g. float32 N x 1 x H x W, or uint8 N x H x W x C)")
    p.add_argument("--expected", type=Path, help="reference logits .npy")
    p.add_argument("--expected-runtime", type=Path, help="host runtime's logits .npy (optional)")
    p.add_argument("--runtime", default="auto", choices=("auto",) + RUNTIMES)
    p.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,4")
    p.add_argument("--batch-sizes", default=None, help="default: every signature (tflite) or 1 (onnx)")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--min-seconds", type=float, default=0.5)
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, help="write JSON here instead of stdout")
    a = p.parse_args(argv)
    kw = dict(threads=tuple(int(t) for t in a.threads.split(",")), latency=not a.no_latency,
              batch_sizes=tuple(int(b) for b in a.batch_sizes.split(",")) if a.batch_sizes else None,
              warmup=a.warmup, min_runs=a.min_runs, min_seconds=a.min_seconds)
    if a.bundle:
        result = run_bundle(a.bundle, a.runtime, **kw)
    elif a.model and a.x:
        exp = np.load(a.expected) if a.expected else None
        exp_rt = np.load(a.expected_runtime) if a.expected_runtime else None
        result = {"environment": environment(),
                  "results": [{"name": a.model.stem, **run_one(a.model, np.load(a.x), exp, a.runtime,
                                                               expected_runtime=exp_rt, **kw)}]}
    else:
        p.error("give --bundle DIR, or --model FILE with --x FILE")
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    else:
        print(text)
    return 0 if all(r["loads"] for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
