"""Edge bundles: everything a device needs to check a deployed model, in one tarball.

Layout inside the archive (one top folder, ``kdens-bundle/``)::

    bundle.json            models, their sample files, host accuracy and host latency
    edge_runner.py         needs numpy + tflite_runtime / ai_edge_litert / onnxruntime
    README.txt             how to run it and bring the results back
    tflite-int8/model.tflite  sample_x.npy  sample_torch_logits.npy  sample_runtime_logits.npy
    onnx-float/model.onnx     ...

On the device: ``python edge_runner.py --bundle . --out results.json``; back on the host,
``deploy.bench.merge_import(rows, "results.json")`` puts the device's rows in the table.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

from deploy.common import SAMPLE_RUNTIME, SAMPLE_TORCH, SAMPLE_X
from deploy.report import b1_latency
from kdens.artifacts import MANIFEST, atomic_write_bytes, read_json, read_manifest
from kdens.errors import ArtifactError

RUNNER = Path(__file__).with_name("edge_runner.py")
TOP = "kdens-bundle"
SHIPPABLE = (".tflite", ".onnx")

README = """kdens edge bundle
=================

Needs Python 3.8+, numpy, and one runtime: tflite_runtime, ai_edge_litert or onnxruntime
(tflite-runtime 2.14 needs numpy<2).

    python edge_runner.py --bundle . --out results.json          # all models, runtime auto
    python edge_runner.py --bundle . --runtime tflite_runtime --threads 1,4

results.json holds, per model: whether it loads, top-1 agreement and max |logit diff|
against PyTorch (sample_torch_logits.npy) and against the host runtime
(sample_runtime_logits.npy), and latency p50/p90/p99 per batch size and thread count.
Copy it back and merge it with `deploy.bench.merge_import` (kdens bench --import).
"""


def _entries(deploy_dir: Path) -> list[dict]:
    """One entry per finished export (its manifest verifies) whose report names a shippable model file."""
    out = []
    for rep_path in sorted(Path(deploy_dir).glob("*/report.json")):
        folder = rep_path.parent
        if not (folder / MANIFEST).exists():
            continue  # an export that did not finish (or the eager baseline): nothing to ship
        read_manifest(folder, "deploy")
        rep = read_json(rep_path)
        model_file = rep.get("model_file")
        if not model_file or Path(model_file).suffix not in SHIPPABLE:
            continue
        missing = [n for n in (model_file, SAMPLE_X, SAMPLE_TORCH) if not (folder / n).exists()]
        if missing:
            raise ArtifactError(f"{folder} lacks {', '.join(missing)}; re-run `kdens deploy` for this target")
        found = b1_latency(rep)
        out.append({"name": folder.name, "target": rep.get("target"), "precision": rep.get("precision"),
                    "io": rep.get("io"), "io_quantization": rep.get("io_quantization"),
                    "file": f"{folder.name}/{model_file}", "x": f"{folder.name}/{SAMPLE_X}",
                    "torch_logits": f"{folder.name}/{SAMPLE_TORCH}",
                    "runtime_logits": f"{folder.name}/{SAMPLE_RUNTIME}"
                    if (folder / SAMPLE_RUNTIME).exists() else None,
                    "batch_sizes": sorted({int(k[1:].split("_")[0]) for k in rep.get("latency_ms") or {}}) or [1],
                    "host_runtime": rep.get("runtime"), "host_accuracy": rep.get("accuracy"),
                    "host_latency_b1": {found[0]: found[1]} if found else None})
    return out


def make_bundle(deploy_dir: Path, out_tar: Path) -> Path:
    """Write a self-contained ``.tar.gz`` of every deployed .tflite/.onnx model in ``deploy_dir``.

    Raises:
        ArtifactError: no deployed model with a report, or a target folder lacks its samples.
    """
    deploy_dir = Path(deploy_dir)
    models = _entries(deploy_dir)
    if not models:
        raise ArtifactError(f"no */report.json with a .tflite or .onnx model under {deploy_dir}; "
                            "run `kdens deploy --target tflite,onnx` first")
    spec = {"kdens_bundle": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": models}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        add_bytes("bundle.json", (json.dumps(spec, indent=2) + "\n").encode())
        add_bytes("edge_runner.py", RUNNER.read_bytes(), 0o755)
        add_bytes("README.txt", README.encode())
        for m in models:
            for key in ("file", "x", "torch_logits", "runtime_logits"):
                if m[key]:
                    add_bytes(m[key], (deploy_dir / m[key]).read_bytes())
    return atomic_write_bytes(Path(out_tar), buf.getvalue())
