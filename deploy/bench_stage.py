"""``kdens bench``: every deployed artifact re-measured side by side, plus the PyTorch baseline.

Latencies recorded at deploy time come from different moments (and machine loads);
comparing targets fairly means timing them in one process, one after another, with the
same threads and batch sizes. This module does that, adds a PyTorch eager row, merges
device results (``--import``), and writes bench.json / bench.md / bench.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deploy import bench, common, edge_runner
from kdens.artifacts import atomic_write_json
from kdens.errors import ArtifactError

BASELINE = "pytorch-float"


def _reports(deploy_dir: Path) -> dict[str, dict]:
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(deploy_dir).glob("*/report.json"))}
    found.pop(BASELINE, None)
    if not found:
        raise ArtifactError(f"no deployed models (*/report.json) under {deploy_dir}; run `kdens deploy` first")
    return found


def remeasure(deploy_dir: Path, name: str, report: dict, threads, batch_sizes, opts) -> dict:
    """Fresh latency of one ONNX/TFLite artifact in this process (parity re-checked on its samples)."""
    folder = Path(deploy_dir) / name
    model_file = report.get("model_file")
    if not model_file or Path(model_file).suffix not in (".onnx", ".tflite"):
        return report  # fpga: no host latency to measure
    x = np.load(folder / common.SAMPLE_X)
    ref = np.load(folder / common.SAMPLE_TORCH)
    res = edge_runner.run_one(folder / model_file, x, ref, threads=tuple(threads), batch_sizes=tuple(batch_sizes),
                              warmup=opts.latency_warmup, min_runs=opts.latency_min_runs,
                              min_seconds=opts.latency_min_seconds)
    if not res["loads"]:
        raise ArtifactError(f"{folder / model_file} no longer loads ({res['error']}); redeploy it")
    return {**report, "latency_ms": res["latency_ms"], "latency_source": "kdens bench (side by side)"}


def baseline(deploy_dir: Path, reports: dict[str, dict], opts) -> dict | None:
    """PyTorch eager report of the model the artifacts came from (if they share one)."""
    from kdens.artifacts import read_manifest
    from kdens.evaluate import dataset_for_run
    from kdens.models import load_model

    runs = {r.get("model_run") for r in reports.values() if r.get("model_run")}
    if len(runs) != 1:
        return None  # artifacts of several models: no single eager baseline
    run = Path(runs.pop())
    data = dataset_for_run(read_manifest(run))
    model, _ = load_model(run)
    report = bench.baseline_report(model, common.DeployData(data.x_train, data.x_test, data.y_test), opts)
    report["model_run"] = str(run)
    atomic_write_json(Path(deploy_dir) / BASELINE / "report.json", report)
    return report


def run(deploy_dir: Path, threads, batch_sizes, *, imports: tuple[Path, ...] = (), bundle: Path | None = None,
        measure: bool = True) -> dict[str, Path]:
    """Build the bench table for ``deploy_dir``; returns the written paths."""
    deploy_dir = Path(deploy_dir)
    opts = common.DeployOptions(threads=threads, batch_sizes=batch_sizes)
    reports = _reports(deploy_dir)
    if measure:
        reports = {n: remeasure(deploy_dir, n, r, opts.threads, opts.batch_sizes, opts) for n, r in reports.items()}
        base = baseline(deploy_dir, reports, opts)
        if base is not None:
            reports[BASELINE] = base
    elif (deploy_dir / BASELINE / "report.json").exists():
        reports[BASELINE] = json.loads((deploy_dir / BASELINE / "report.json").read_text())
    rows = [bench._row(n, r) for n, r in sorted(reports.items())]
    for imp in imports:
        rows = bench.merge_import(rows, imp)
    paths = bench.write_bench(deploy_dir, rows)
    if bundle is not None:
        from deploy.bundle import make_bundle

        paths["bundle"] = make_bundle(deploy_dir, bundle)
    return paths
