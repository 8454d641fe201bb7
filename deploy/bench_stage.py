"""``kdens bench``: every deployed artifact re-measured side by side, plus the PyTorch baseline.

Latencies recorded at deploy time come from different moments (and machine loads);
comparing targets fairly means timing them in one process, one after another, with the
same threads and batch sizes. This module does that, adds a PyTorch eager row, merges
device results (``--import``), and writes bench.json / bench.md / bench.png and, last, a
``manifest.json`` (stage ``bench``) into the deploy folder.

Only finished exports are benched: sub-folders whose manifest (stage ``deploy``) verifies.
A folder without one (an export that did not finish) or whose model run has changed since
(stale) is left out and named in bench.json's ``skipped``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from deploy import bench, common, edge_runner
from kdens.artifacts import MANIFEST, atomic_write_json, read_json, read_manifest, sha256_file, write_manifest
from kdens.errors import ArtifactError, ConfigError

BASELINE = "pytorch-float"


@dataclass
class BenchConfig:
    """``kdens bench`` (or a pipeline's ``[bench]`` table)."""

    threads: list[int] | str = "1"
    """--threads: thread counts to measure, comma-separated."""
    batch_sizes: list[int] | str = "1,32"
    """--batch-sizes: batch sizes to measure, comma-separated."""
    imports: tuple[str, ...] = ()
    """--import: device result JSON files (edge_runner.py) merged into the table."""
    bundle: str | None = None
    """--bundle: also write a self-contained .tar.gz for a Pi/phone-class device."""
    measure: bool = True
    """False (--no-measure): use the latencies recorded at deploy time."""

    def __post_init__(self) -> None:
        for key in ("threads", "batch_sizes"):  # TOML users write 1 or [1, 32]
            value = getattr(self, key)
            setattr(self, key, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
        self.imports = tuple(str(p) for p in self.imports)
        self.options()  # refuse bad thread counts or batch sizes before any work

    def options(self) -> common.DeployOptions:
        try:
            return common.DeployOptions(threads=self.threads, batch_sizes=self.batch_sizes)
        except ConfigError as e:
            raise ConfigError(f"bench: {e}") from None


def finished_exports(deploy_dir: Path) -> tuple[dict[str, dict], dict[str, dict], dict[str, str]]:
    """(reports, manifests, skipped) of the finished, current exports under ``deploy_dir``.

    ``skipped`` maps a left-out sub-folder to why: no manifest (unfinished), or its model
    run's files differ from the hashes the export recorded (stale).
    """
    reports, manifests, skipped = {}, {}, {}
    for folder in sorted(p for p in Path(deploy_dir).iterdir() if p.is_dir() and p.name != BASELINE):
        if not (folder / "report.json").exists() and not (folder / MANIFEST).exists():
            continue  # not an export at all
        if not (folder / MANIFEST).exists():
            skipped[folder.name] = "unfinished: no manifest.json (the deploy did not finish)"
            continue
        manifest = read_manifest(folder, "deploy")
        changed = [path for path, digest in manifest.get("inputs", {}).items()
                   if Path(path).exists() and sha256_file(Path(path)) != digest]
        if changed:
            skipped[folder.name] = f"stale: {changed[0]} changed since this export; deploy again"
            continue
        reports[folder.name], manifests[folder.name] = read_json(folder / "report.json"), manifest
    if not reports:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise ArtifactError(f"no finished deploys under {deploy_dir}" + (f" ({why})" if why else "")
                            + "; run `kdens deploy --out " + str(deploy_dir) + " ...` first")
    return reports, manifests, skipped


def remeasure_all(deploy_dir: Path, reports: dict[str, dict], threads, batch_sizes, opts,
                  rounds: int = 30) -> tuple[dict[str, dict], float | None]:
    """Fresh latency of every ONNX/TFLite artifact, timed interleaved in this process.

    Each round times every (artifact, batch size) once, pinned to ``t`` CPUs, in an order
    rotated every round; each reported statistic is the median over rounds. Timing the
    artifacts one after another instead lets load drift on a shared machine decide the
    ranking (a small CNN's tflite-float came out first although onnx-int8 was 1.15x faster
    when interleaved). Parity is re-checked on each folder's samples. Also returns how many
    CPUs other processes kept busy meanwhile (None off Linux).
    """
    from deploy import latency

    models, out = {}, dict(reports)
    for name, report in reports.items():
        folder = Path(deploy_dir) / name
        model_file = report.get("model_file")
        if not model_file or Path(model_file).suffix not in (".onnx", ".tflite"):
            continue  # fpga: no host latency to measure
        x, ref = np.load(folder / common.SAMPLE_X), np.load(folder / common.SAMPLE_TORCH)
        res = edge_runner.run_one(folder / model_file, x, ref, latency=False)
        if not res["loads"]:
            raise ArtifactError(f"{folder / model_file} no longer loads ({res['error']}); redeploy it")
        models[name] = (folder / model_file, x)
    stats: dict[str, dict[str, list[dict]]] = {n: {} for n in models}
    with latency.OtherLoad() as other:
        _timed_rounds(models, stats, threads, batch_sizes, opts, rounds)
    for n, per_key in stats.items():
        # quiet_p50: the 20th percentile over rounds. On a shared VM some rounds run ~1.6x slow
        # (from outside the VM: nothing inside it was busy); when that hits one artifact
        # in more rounds than another, their medians swap. The quiet level ranks what each
        # artifact costs on an idle device; the medians stay the reported p50/p90/p99.
        lat = {key: {s: float(np.median([m[s] for m in ms])) for s in ("p50", "p90", "p99", "mean", "min")}
               | {"quiet_p50": float(np.percentile([m["p50"] for m in ms], 20)),
                  "runs": int(sum(m["runs"] for m in ms)), "rounds": len(ms)} for key, ms in per_key.items()}
        out[n] = {**reports[n], "latency_ms": lat, "latency_source": f"kdens bench (interleaved, {rounds} rounds)",
                  "latency_rounds_p50_ms": {key: [m["p50"] for m in ms] for key, ms in per_key.items()}}
    return out, other.cpus


def _timed_rounds(models, stats, threads, batch_sizes, opts, rounds: int) -> None:
    """Fill ``stats[name][latency key]`` with one measurement per round, order rotated each round."""
    from deploy import latency

    for t in threads:
        with latency.pinned(t):
            runners = {n: edge_runner.load(path, num_threads=t) for n, (path, _) in models.items()}
            jobs = {(n, bs): (m.run_fn(bs), m.prepare(latency.batch_of(models[n][1], bs), bs))
                    for n, m in runners.items() for bs in batch_sizes if not m.signatures or bs in m.signatures}
            timed = latency.interleaved_rounds(jobs, rounds, warmup=opts.latency_warmup,
                                               min_runs=max(1, opts.latency_min_runs // rounds),
                                               min_seconds=opts.latency_min_seconds / rounds)
            for (n, bs), ms in timed.items():
                stats[n][latency.latency_key(bs, t)] = ms


def baseline(deploy_dir: Path, reports: dict[str, dict], opts) -> dict | None:
    """PyTorch eager report of the model the artifacts came from (if they share one)."""
    from deploy.onnx_ready import onnx_student
    from kdens.models import load_model
    from kdens.runs import run_data

    runs = {r.get("model_run") for r in reports.values() if r.get("model_run")}
    if len(runs) != 1:
        return None  # artifacts of several models: no single eager baseline
    run = Path(runs.pop())
    if onnx_student(run) is not None:
        return None  # a tree student has no eager model: its ONNX file is the model
    data = run_data(read_manifest(run))
    model, _ = load_model(run)
    report = bench.baseline_report(model, common.DeployData(data.x_train, data.x_test, data.y_test), opts)
    report["model_run"] = str(run)
    atomic_write_json(Path(deploy_dir) / BASELINE / "report.json", report)
    return report


def run(cfg: BenchConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Build the bench table for the deploy folder ``run_dir``; returns it.

    A bench is a measurement: every call measures again (``resume`` and ``force`` change
    nothing), and the manifest is written last, so an interrupted bench leaves none.
    """
    t0 = time.time()
    deploy_dir = Path(run_dir)
    opts = cfg.options()
    (deploy_dir / MANIFEST).unlink(missing_ok=True)
    reports, manifests, skipped = finished_exports(deploy_dir)
    other_load = None
    if cfg.measure:
        reports, other_load = remeasure_all(deploy_dir, reports, opts.thread_counts(), opts.batch_sizes, opts)
        base = baseline(deploy_dir, reports, opts)
        if base is not None:
            reports[BASELINE] = base
    elif (deploy_dir / BASELINE / "report.json").exists():
        reports[BASELINE] = read_json(deploy_dir / BASELINE / "report.json")
    rows = [bench.row(n, r) for n, r in sorted(reports.items())]
    for imp in cfg.imports:
        rows = bench.merge_import(rows, Path(imp))
    bench.write_bench(deploy_dir, rows, other_load_cpus=other_load, skipped=skipped)
    if cfg.bundle is not None:
        from deploy.bundle import make_bundle

        make_bundle(deploy_dir, Path(cfg.bundle))
    write_manifest(deploy_dir, stage="bench", config=asdict(cfg),
                   inputs={str(deploy_dir / n / MANIFEST): sha256_file(deploy_dir / n / MANIFEST) for n in manifests},
                   wall_seconds=round(time.time() - t0, 3),
                   metrics={"rows": len(rows), "skipped": len(skipped), "other_load_cpus": other_load})
    return deploy_dir
