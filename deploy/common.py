"""Shared deploy machinery: the data and options every target takes, and report helpers.

Each target module (``onnx_export``, ``tflite_export``, ``fpga``) exposes
``deploy(model, data, opts, out_dir) -> dict``; this module holds what they share so that
every report is computed the same way: PyTorch reference logits, accuracy, top-1
agreement and max |logit diff| against PyTorch, file sizes, and the seeded calibration
sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deploy import latency
from kdens import metrics
from kdens.errors import ConfigError
from kdens.mapped import MappedRows

QUANTIZE_MODES = ("none", "int8", "dynamic")
IO_MODES = ("float", "int8")
SAMPLE_X = "sample_x.npy"
"""Sample test inputs saved beside each deployed model (for bundles and device checks)."""
SAMPLE_TORCH = "sample_torch_logits.npy"
"""PyTorch logits on ``SAMPLE_X``: the parity reference on another machine."""
SAMPLE_RUNTIME = "sample_runtime_logits.npy"
"""The host runtime's (dequantized) logits on ``SAMPLE_X``: what a device should reproduce."""
N_SAMPLES = 64


def all_cores() -> int:
    """CPUs this process may run on (affinity mask), falling back to ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class DeployData:
    """Arrays a deploy needs: x as the artifact will take it, y int64 (N,).

    x is float32 model input (images (N, C, H, W) in [0, 1], or features) unless ``input``
    describes the user's raw form (``kdens.raw_input``): then x is in that form (e.g. uint8
    NHWC) and the model passed to a target must take it (``kdens.raw_input.RawInput``).
    """

    x_calib: np.ndarray
    """Calibration inputs (training or transfer data), never the test set."""
    x_test: np.ndarray
    """Test inputs for parity and accuracy."""
    y_test: np.ndarray
    """Test labels."""
    input: dict | None = None
    """The raw-input description x follows (``kdens.raw_input.describe``); None: float32 model inputs."""

    @property
    def dtype(self) -> type:
        """What the artifact takes: uint8 for raw uint8 images, else float32."""
        return np.uint8 if (self.input or {}).get("dtype") == "uint8" else np.float32

    def __post_init__(self) -> None:
        dtype = self.dtype
        if not isinstance(self.x_calib, MappedRows):  # memory-mapped rows stay on disk: calib_sample reads a sample
            self.x_calib = np.ascontiguousarray(self.x_calib, dtype=dtype)
        self.x_test = np.ascontiguousarray(self.x_test, dtype=dtype)
        self.y_test = np.asarray(self.y_test, dtype=np.int64)
        if len(self.x_test) != len(self.y_test):
            raise ConfigError(f"x_test has {len(self.x_test)} rows but y_test has {len(self.y_test)}")
        if len(self.x_test) == 0 or len(self.x_calib) == 0:
            raise ConfigError("deploy needs non-empty x_calib and x_test")
        if self.x_calib.shape[1:] != self.x_test.shape[1:]:
            raise ConfigError(f"x_calib shape {self.x_calib.shape[1:]} != x_test shape {self.x_test.shape[1:]}")


@dataclass
class DeployOptions:
    """How to quantize, what to measure and which budgets to enforce (``kdens deploy`` flags)."""

    quantize: str = "none"
    """--quantize: none (float32), int8 (static, calibrated) or dynamic (ONNX, no convs)."""
    batch_sizes: tuple[int, ...] = (1, 32)
    """--batch-sizes: batch sizes measured (TFLite: one signature per size)."""
    threads: tuple[int, ...] | None = None
    """--threads: runtime thread counts measured; None: 1 and all cores, resolved where it runs
    (so that the setting, and a pipeline's key, do not depend on the machine)."""
    calib_size: int = 512
    """--calib-size: calibration examples, a seeded sample of x_calib."""
    io: str = "float"
    """--io: tensor type of the TFLite model's inputs/outputs for int8 (float or int8)."""
    max_latency_ms: float | None = None
    """--max-latency-ms: budget for batch-1 p90 latency (single thread)."""
    max_accuracy_drop: float | None = None
    """--max-accuracy-drop: budget in percentage points of test accuracy below PyTorch float."""
    seed: int = 0
    """--seed: seeds the calibration sample."""
    latency_warmup: int = 10
    """Untimed runs before measuring."""
    latency_min_runs: int = 50
    """Timed runs at least (per batch size and thread count)."""
    latency_min_seconds: float = 0.5
    """Timed seconds at least (per batch size and thread count)."""
    tflite_runtime_venv: str | None = None
    """--tflite-runtime-venv: the tflite-runtime 2.14 cross-check venv (``make setup`` makes it);
    None: the default place, checked when present; "none": skip the check."""

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANTIZE_MODES)}")
        if self.io not in IO_MODES:
            raise ConfigError(f"--io {self.io!r} is not one of {', '.join(IO_MODES)}")
        if self.io == "int8" and self.quantize != "int8":
            raise ConfigError(f"--io int8 needs --quantize int8 (got --quantize {self.quantize}): "
                              "a float or dynamic-range model has float inputs and outputs")
        self.batch_sizes = _positive_ints(self.batch_sizes, "--batch-sizes", "1,32")
        if self.threads is not None:
            self.threads = _positive_ints(self.threads, "--threads", "1,2")
        if int(self.calib_size) < 1:
            raise ConfigError(f"--calib-size {self.calib_size} must be >= 1, e.g. 512")
        self.calib_size = int(self.calib_size)
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"--max-latency-ms {self.max_latency_ms} must be > 0, e.g. 1.0")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 100:
            raise ConfigError(f"--max-accuracy-drop {self.max_accuracy_drop} must be in [0, 100] "
                              "percentage points, e.g. 1.0")
        if self.tflite_runtime_venv is not None:
            self.tflite_runtime_venv = str(self.tflite_runtime_venv)
        if self.latency_warmup < 0 or self.latency_min_runs < 1 or self.latency_min_seconds < 0:
            raise ConfigError("latency settings need warmup >= 0, min_runs >= 1 and min_seconds >= 0 "
                              f"(got {self.latency_warmup}, {self.latency_min_runs}, {self.latency_min_seconds})")


    def thread_counts(self) -> tuple[int, ...]:
        """The thread counts to measure on this machine: ``threads``, else 1 and all cores."""
        return self.threads if self.threads is not None else tuple(sorted({1, all_cores()}))


def _positive_ints(values: Any, flag: str, example: str) -> tuple[int, ...]:
    """Parse ``values`` (a tuple or a comma string) into sorted unique positive ints."""
    if isinstance(values, str):
        values = [v for v in values.replace(" ", "").split(",") if v]
    try:
        out = tuple(sorted({int(v) for v in values}))
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {values!r} must be positive integers, e.g. {example}") from None
    if not out or out[0] < 1:
        raise ConfigError(f"{flag} {values!r} must be positive integers, e.g. {example}")
    return out


@torch.inference_mode()
def torch_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """PyTorch float32 logits (N, C) of ``model`` in eval mode on CPU.

    The model's train/eval state is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        outs = [model(torch.from_numpy(input_array(x[i:i + batch_size])))
                for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs).float().numpy()  # (N, C)


def input_array(x: np.ndarray) -> np.ndarray:
    """uint8 raw images stay uint8 (the model casts them); anything else becomes float32."""
    return np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32)


def sample_rows(x, size: int, seed: int):
    """A seeded sample of ``size`` rows of ``x`` in row order (``x`` itself if it has no more).
    On memory-mapped rows the sample is still a view: nothing is read until it is used."""
    n = len(x)
    if size >= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(n, size, replace=False))]


def calib_sample(data: DeployData, opts: DeployOptions) -> np.ndarray:
    """A seeded sample of ``calib_size`` rows of ``x_calib`` (all rows if fewer)."""
    return np.ascontiguousarray(sample_rows(data.x_calib, opts.calib_size, opts.seed), dtype=data.dtype)


def compare(logits: np.ndarray, ref: np.ndarray, y: np.ndarray | None = None) -> dict:
    """Accuracy of ``logits`` on ``y``, top-1 agreement and max |diff| against ``ref`` (N, C)."""
    out = {"agreement": metrics.agreement(logits, ref),
           "max_abs_diff": float(np.abs(np.asarray(logits, np.float64) - ref).max())}
    if y is not None:
        out["accuracy"] = metrics.accuracy(logits, y)
    return out


def num_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def has_conv(model: nn.Module) -> bool:
    """True if ``model`` contains any convolution module."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def file_sizes(out_dir: Path, names: list[str]) -> dict[str, int]:
    """``{name: size in bytes}`` for files in ``out_dir``."""
    return {n: (Path(out_dir) / n).stat().st_size for n in names}


def weight_bytes(model: nn.Module, precision: str) -> int:
    """Bytes the weights occupy at ``precision`` (int8: 1 byte per weight, else float32)."""
    return num_params(model) * (1 if precision == "int8" else 4)


def save_samples(out_dir: Path, x: np.ndarray, torch_out: np.ndarray, runtime_out: np.ndarray) -> list[str]:
    """Save up to ``N_SAMPLES`` test inputs with PyTorch and runtime logits; returns file names."""
    from kdens.artifacts import atomic_save_npy

    n = min(N_SAMPLES, len(x))
    atomic_save_npy(Path(out_dir) / SAMPLE_X, input_array(x[:n]))  # in the form the artifact takes
    for name, arr in ((SAMPLE_TORCH, torch_out[:n]), (SAMPLE_RUNTIME, runtime_out[:n])):
        atomic_save_npy(Path(out_dir) / name, np.ascontiguousarray(arr, dtype=np.float32))
    return [SAMPLE_X, SAMPLE_TORCH, SAMPLE_RUNTIME]


def check(passed: bool | None, message: str, **extra: Any) -> dict:
    """One entry of ``report["checks"]``: what was compared and whether it passed.

    ``passed=None``: measured here, but judged elsewhere (e.g. by a gate) or informational.
    """
    return {"checked": True, "passed": None if passed is None else bool(passed), "message": message, **extra}


def info(message: str, **extra: Any) -> dict:
    """A ``report["checks"]`` entry that was measured but has no pass/fail of its own."""
    return check(None, message, **extra)


def not_checked(reason: str) -> dict:
    """A ``report["checks"]`` entry for something this machine could not check."""
    return {"checked": False, "passed": None, "reason": reason}


def finish(report: dict) -> dict:
    """Add ``passed`` and ``failures`` (failed checks) to ``report``, as deploy/fpga.py does."""
    failures = [f"{k}: {v.get('message', '')}" for k, v in report["checks"].items()
                if v.get("checked") and v.get("passed") is False]
    report["passed"] = not failures
    report["failures"] = failures
    return report


def latency_grid(make_run_fn, x: np.ndarray, opts: DeployOptions, prepare=None) -> tuple[dict, dict]:
    """``deploy.latency.latency_grid`` over the options' batch sizes, thread counts and timing budget
    (every target measures the same grid)."""
    return latency.latency_grid(make_run_fn, x, opts.batch_sizes, opts.thread_counts(), warmup=opts.latency_warmup,
                                min_runs=opts.latency_min_runs, min_seconds=opts.latency_min_seconds,
                                prepare=prepare)
