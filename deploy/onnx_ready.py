"""ONNX target for students that are already ONNX files: tree students (``kdens distill --model tree|gbt``).

Their run folder holds ``model.onnx`` (converted with skl2onnx when the student was fitted)
and the fitting library's own probabilities on the test split (``model.json``'s
``reference``), so nothing is exported again and no pickled model is loaded. The checks are
the ones a network student gets: ``onnx.checker``, the file loads in ONNX Runtime, parity
with the reference on every test input (max |probability diff|), accuracy on the test set
(the accuracy gate compares it with the reference's), and latency per batch size and thread
count. The graph answers probabilities, not logits.

Only ``--target onnx --quantize none`` applies: the graph is ONNX-ML ``TreeEnsemble`` nodes,
which neither ONNX Runtime's quantizer nor the TFLite / FPGA converters (PyTorch networks) take.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from deploy import common
from deploy.common import DeployData, DeployOptions
from deploy.edge_runner import OnnxModel
from kdens.artifacts import read_json
from kdens.errors import ArtifactError, ConfigError, ModelError

MODEL_FILE = "model.onnx"
PARITY_TOL = 1e-5
"""Max |probability diff| between ONNX Runtime and the fitting library (float32 thresholds and sums)."""


def onnx_student(model_dir: Path) -> dict | None:
    """The run folder's model.json when its model is stored as ONNX (a tree student), else None."""
    path = Path(model_dir) / "model.json"
    spec = read_json(path) if path.exists() else {}
    # an imported ONNX teacher (kdens import-model) is ONNX too but has no fitted reference: it is
    # loaded as a model and refused by the stage as not a PyTorch network
    return spec if spec.get("format") == "onnx" and spec.get("reference") else None


def check_target(spec: dict, model_dir: Path, target: str, quantize: str) -> None:
    """Refuse, in one line, what a tree student cannot be deployed as."""
    if target != "onnx":
        raise ConfigError(f"--target {target} converts PyTorch networks; {model_dir} is a {spec['name']} student "
                          f"(an ONNX-ML tree ensemble): use --target onnx")
    if quantize != "none":
        raise ConfigError(f"--quantize {quantize} does not apply to the {spec['name']} student in {model_dir}: "
                          "its TreeEnsemble nodes have no int8 form; use --quantize none")


def input_files(spec: dict) -> list[str]:
    """The files of the student folder a deploy reads (hashed into the deploy's manifest)."""
    return [spec["file"], spec["reference"]]


def deploy(model_dir: Path, spec: dict, data: DeployData, opts: DeployOptions, out_dir: Path,
           params: int | None) -> dict:
    """Check the student's ONNX file in ONNX Runtime against its reference; copy it to ``out_dir``.

    Returns:
        The report dict (see deploy/common.py); gates are added by the caller.
    """
    import onnx
    import onnxruntime as ort

    ref = np.load(Path(model_dir) / spec["reference"])  # (N, C) the fitting library's probabilities
    if ref.shape != (len(data.x_test), spec["num_classes"]):
        raise ArtifactError(f"{model_dir}/{spec['reference']} holds {ref.shape}, not the ({len(data.x_test)}, "
                            f"{spec['num_classes']}) test probabilities of this data; refit the student")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    shutil.copyfile(Path(model_dir) / spec["file"], path)
    onnx.checker.check_model(str(path))
    try:
        runner = OnnxModel(path, num_threads=max(opts.thread_counts()))
    except Exception as e:
        raise ModelError(f"{path} passed onnx.checker but ONNX Runtime cannot load it: {e}") from e
    out = runner.predict(data.x_test)  # (N, C) probabilities
    cmp = common.compare(out, ref, data.y_test)
    float_acc = common.compare(ref, ref, data.y_test)["accuracy"]
    ok = cmp["max_abs_diff"] <= PARITY_TOL
    checks = {
        "structure": common.check(True, "onnx.checker.check_model passed on the student's file"),
        "parity": common.check(ok, f"max |probability diff| vs scikit-learn {cmp['max_abs_diff']:.3g} "
                               f"{'<=' if ok else '>'} {PARITY_TOL:g} on {len(ref)} test inputs", tolerance=PARITY_TOL),
        "io": common.info("float32 inputs, float32 probabilities out"),
    }
    lat, env = common.latency_grid(lambda bs, t: OnnxModel(path, num_threads=t).run_fn(bs), data.x_test, opts)
    checks["latency"] = common.info(f"measured {', '.join(lat)} in onnxruntime (CPU EP)")
    samples = common.save_samples(out_dir, data.x_test, ref, out)
    size = path.stat().st_size
    report = {
        "target": "onnx", "precision": "float", "io": "float", "outputs": "probabilities",
        "reference": f"scikit-learn {spec.get('versions', {}).get('scikit-learn', '?')} predict (saved at fit time)",
        "runtime": f"onnxruntime {ort.__version__}",
        "runtimes": {"onnxruntime": {"version": ort.__version__, "loads": True,
                                     "agreement": cmp["agreement"], "max_abs_diff": cmp["max_abs_diff"]}},
        "reduce_range": False, "reduce_range_reason": None,
        "exporter": f"skl2onnx {spec.get('versions', {}).get('skl2onnx', '?')} (at fit time)", "export_note": None,
        "files": common.file_sizes(out_dir, [MODEL_FILE] + samples), "model_file": MODEL_FILE,
        "size_bytes": size, "float_size_bytes": size, "params": params,
        "n_test": len(data.x_test), "n_calib": 0,
        "float_accuracy": float_acc, "accuracy": cmp["accuracy"], "agreement": cmp["agreement"],
        "max_abs_diff": cmp["max_abs_diff"], "latency_ms": lat, "latency_env": env, "checks": checks,
    }
    return common.finish(report)
