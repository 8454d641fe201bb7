"""Deploy benchmark: int8 accuracy and size per target, kdens vs hand-made exports, the weight bound.

The issue's numbers, on Fashion-MNIST with two finished runs (the 800-800 MLP student and
the small CNN):

1. Every model x {onnx, tflite} x {float, int8} is deployed with ``kdens deploy`` in a
   subprocess (``OMP_NUM_THREADS=1``, ``--threads 1``); from each report.json: int8 test
   accuracy within 0.5 points of float, int8 file <= 0.3x the float file.
2. For the int8 student, hand-made exports built the way docs/toolchain.md tells a
   practitioner to (``torch.onnx.export`` + ``quantize_static`` QDQ per-channel; PT2E int8
   + ``litert_torch.convert`` for a fixed batch-1 shape) are timed against kdens' int8
   files in ONE process, pinned to one CPU, one thread each, same input, interleaved:
   every round times every variant once (order rotated each round), and the reported
   number is the median over rounds of the per-round p50. On a machine shared with other
   jobs load drifts over seconds; interleaving makes the drift hit every variant alike.
   The artifact ``kdens bench`` puts first is compared with the best hand-made one.
3. Batch-1 int8 MLP latency beside the weight-streaming bound (int8 weight bytes /
   measured memory bandwidth), with whether the weights fit in the last-level cache.

Then ``kdens bench`` is run on each deploy folder and its table is included. Writes
``bench/results/deploy.json`` and ``bench/results/deploy.md``.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_deploy.py            # ~10 min on 2 busy cores
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_deploy.py --reuse    # keep finished deploys
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deploy import bench, common, latency
from deploy.tflite_check import DEFAULT_VENV
from deploy.edge_runner import OnnxModel, TFLiteModel, dequantize
from kdens.artifacts import atomic_write_json, atomic_write_text, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("onnx", "tflite")
QUANTS = ("none", "int8")
FOLDER = {("onnx", "none"): "onnx-float", ("onnx", "int8"): "onnx-int8",
          ("tflite", "none"): "tflite-float", ("tflite", "int8"): "tflite-int8"}
VARIANTS = [(t, q, "float") for t in TARGETS for q in QUANTS] + [("tflite", "int8", "int8")]
"""(target, --quantize, --io) deployed per model; the last is the int8-in/out file, which is what
the hand-made PT2E export is (so the two can be timed like for like)."""
MAX_DROP_POINTS = 0.5
MAX_SIZE_RATIO = 0.3


def _shell(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """The command as one would type it from the repo root (python shown as .venv/bin/python)."""
    parts = [".venv/bin/python" if c == sys.executable else c for c in cmd]
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(parts)


def _run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` from the repo root with OMP_NUM_THREADS=1; stdout+stderr go to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    return {"command": _shell(cmd, {"OMP_NUM_THREADS": "1"}), "returncode": r.returncode,
            "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}


# ---------------------------------------------------------------- 1. kdens deploy per target
def deploy_all(models: dict[str, Path], out_root: Path, venv: str, reuse: bool) -> dict:
    """``kdens deploy`` every model x target x quantization; returns {model: {folder: result}}."""
    res: dict[str, dict] = {}
    for key, run in models.items():
        out = out_root / f"deploy-{key}"
        out.mkdir(parents=True, exist_ok=True)
        res[key] = {}
        for target, q, io in VARIANTS:
            name = FOLDER[target, q] + ("-int8io" if io == "int8" else "")
            folder = out / name
            cmd = [sys.executable, "-m", "kdens", "deploy", "--model", str(run), "--target", target,
                   "--quantize", q, *(["--io", io] if io != "float" else []), "--batch-sizes", "1,32",
                   "--threads", "1", "--tflite-runtime-venv", venv, "--out", str(out), "--force"]
            if reuse and (folder / "manifest.json").exists():
                r = {"command": _shell(cmd, {"OMP_NUM_THREADS": "1"}), "returncode": None, "reused": True}
            else:
                print(f"[deploy] {key} {name} ...", flush=True)
                r = _run(cmd, out / f"{name}.log")
                print(f"[deploy]   rc={r['returncode']} {r['wall_s']} s", flush=True)
            r["report"] = json.loads((folder / "report.json").read_text())
            res[key][name] = r
    return res


def accuracy_size(deploys: dict) -> list[dict]:
    """One row per model x target: float vs int8 accuracy and file size, and the two checks."""
    rows = []
    for key, d in deploys.items():
        for target in TARGETS:
            f, q = d[FOLDER[target, "none"]]["report"], d[FOLDER[target, "int8"]]["report"]
            drop_torch = 100 * (q["float_accuracy"] - q["accuracy"])  # vs PyTorch float
            drop_export = 100 * (f["accuracy"] - q["accuracy"])  # vs the float export, same runtime
            ratio = q["size_bytes"] / f["size_bytes"]
            rt = q.get("runtimes", {}).get("tflite_runtime") or {}
            rows.append({
                "model": key, "target": target, "runtime": q["runtime"],
                "pytorch_float_accuracy": q["float_accuracy"], "float_accuracy": f["accuracy"],
                "int8_accuracy": q["accuracy"], "int8_agreement": q["agreement"],
                "drop_vs_pytorch_points": drop_torch, "drop_vs_float_export_points": drop_export,
                "accuracy_ok": max(drop_torch, drop_export) <= MAX_DROP_POINTS,
                "float_size_bytes": f["size_bytes"], "int8_size_bytes": q["size_bytes"], "size_ratio": ratio,
                "size_ok": ratio <= MAX_SIZE_RATIO, "reduce_range": q.get("reduce_range"),
                "tflite_runtime_agreement": rt.get("agreement"), "tflite_runtime_loads": rt.get("loads"),
                "int8_verdict": q.get("verdict"), "int8_failures": q.get("failures"),
                "commands": [d[FOLDER[target, "none"]]["command"], d[FOLDER[target, "int8"]]["command"]]})
    return rows


# ---------------------------------------------------------------- kdens bench
def kdens_bench(deploy_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "kdens", "bench", str(deploy_dir), "--threads", "1", "--batch-sizes", "1,32"]
    print(f"[bench] {deploy_dir} ...", flush=True)
    r = _run(cmd, deploy_dir / "bench.log")
    b = json.loads((deploy_dir / "bench.json").read_text())
    ranked = [row for row in bench.ranked(b["rows"]) if not row["baseline"] and row["latency_b1_rank_ms"]]
    return {**r, "table_md": (deploy_dir / "bench.md").read_text(), "rows": b["rows"],
            "pareto_front": b["pareto_front"], "first_artifact": ranked[0]["name"] if ranked else None}


# ---------------------------------------------------------------- 2. hand-made exports
class _Calib:
    """The CalibrationDataReader a practitioner writes: one dict per batch, then None."""

    def __init__(self, x: np.ndarray, batch: int = 64):
        self.batches = iter([{"x": x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def hand_onnx_int8(model, x_calib: np.ndarray, path: Path, tmp: Path) -> None:
    """docs/toolchain.md's ONNX recipe: dynamo export, quant_pre_process, static QDQ per-channel int8."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    f32, pre = tmp / "hand.float.onnx", tmp / "hand.pre.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), str(f32), dynamo=True, external_data=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    quant_pre_process(str(f32), str(pre))
    quantize_static(str(pre), str(path), _Calib(x_calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def hand_litert_int8(model, x_calib: np.ndarray, path: Path) -> None:
    """docs/toolchain.md's TFLite recipe: PT2E static int8 at a fixed batch-1 shape, litert_torch.convert."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import litert_torch
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    args = (torch.zeros(1, 1, 28, 28),)
    q = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    pm = prepare_pt2e(torch.export.export(model, args).module(), q)
    with torch.no_grad():
        for row in x_calib:  # the graph is fixed at batch 1
            pm(torch.from_numpy(row[None]))
    pm = convert_pt2e(pm, fold_quantize=False)
    move_exported_model_to_eval(pm)  # what litert_torch's "converted in training mode" warning asks for
    litert_torch.convert(pm, args, quant_config=QuantConfig(pt2e_quantizer=q)).export(str(path))


def interleaved(variants: dict[str, tuple], rounds: int, min_seconds: float) -> dict:
    """Median over rounds of per-round p50 (ms); each round times every variant once, order rotated.

    ``variants``: name -> (run_fn, prepared batch). Runs pinned to one CPU. Also returns the
    10th percentile over rounds of the per-round p50 (``quiet``): on this shared machine the
    per-round p50s are bimodal (a quiet level and one ~1.6x higher), and the median lands on
    whichever level half the rounds happened to hit.
    """
    with latency.pinned(1) as cpus, latency.OtherLoad() as other:
        timed = latency.interleaved_rounds(variants, rounds, warmup=20, min_runs=100, min_seconds=min_seconds)
    p50s = {n: [m["p50"] for m in ms] for n, ms in timed.items()}
    p90s = {n: [m["p90"] for m in ms] for n, ms in timed.items()}
    return {"pinned_cpus": cpus, "rounds": rounds, "min_seconds_per_measurement": min_seconds,
            "other_load_cpus": other.cpus,
            "median_p50_ms": {n: statistics.median(v) for n, v in p50s.items()},
            "median_p90_ms": {n: statistics.median(v) for n, v in p90s.items()},
            "quiet_p50_ms": {n: float(np.percentile(v, 10)) for n, v in p50s.items()},
            "min_p50_ms": {n: min(v) for n, v in p50s.items()},
            "per_round_p50_ms": {n: [round(x, 5) for x in v] for n, v in p50s.items()}}


def hand_vs_kdens(run: Path, deploy_dir: Path, first_artifact: str | None, rounds: int,
                  min_seconds: float) -> dict:
    """Build the hand-made int8 exports of ``run`` and time them against kdens' files, interleaved."""
    from kdens.runs import run_data
    from kdens.models import load_model

    torch.set_num_threads(1)
    data = run_data(read_manifest(run))
    model, _ = load_model(run)
    model.eval()
    arrays = common.DeployData(data.x_train, data.x_test, data.y_test)
    calib = common.calib_sample(arrays, common.DeployOptions(calib_size=512, seed=0, threads=(1,)))
    ref = common.torch_logits(model, data.x_test)
    work = Path(tempfile.mkdtemp(prefix="kdens-hand-"))
    hand_onnx, hand_tfl = deploy_dir / "hand-ort-int8.onnx", deploy_dir / "hand-litert-int8.tflite"
    t0 = time.perf_counter()
    hand_onnx_int8(model, calib, hand_onnx, work)
    t_onnx = time.perf_counter() - t0
    hand_litert_int8(model, calib, hand_tfl)
    t_tfl = time.perf_counter() - t0 - t_onnx
    print(f"[hand] built ORT int8 in {t_onnx:.1f} s, LiteRT int8 in {t_tfl:.1f} s", flush=True)

    ort_h = OnnxModel(hand_onnx, 1)
    tfl_h = TFLiteModel(hand_tfl, "ai_edge_litert", 1)
    acc = {"hand-ort-int8": common.compare(ort_h.predict(data.x_test), ref, data.y_test),
           "hand-litert-int8": common.compare(tfl_h.predict(data.x_test), ref, data.y_test)}
    xb = np.ascontiguousarray(data.x_test[:1])  # the same input for every variant
    in_d, out_d = tfl_h.io_details(1)
    raw_tfl = tfl_h.run_fn(1)
    variants = {
        "hand-ort-int8": (ort_h.run_fn(1), xb),
        "hand-litert-int8": (raw_tfl, tfl_h.prepare(xb, 1)),  # int8 in/out, input quantized untimed
        # informational: the same file with the float<->int8 conversion a float caller needs, in numpy
        "hand-litert-int8+numpy-io": (lambda x: dequantize(raw_tfl(tfl_h.prepare(x, 1)), out_d), xb),
    }
    # A/A controls: the same hand files in a second session each. Identical work, so their ratio
    # to the first session is the resolution of this measurement (per-session memory placement
    # alone moves a batch-1 p50 by about half a percent here).
    ort_aa, tfl_aa = OnnxModel(hand_onnx, 1), TFLiteModel(hand_tfl, "ai_edge_litert", 1)
    variants[AA_ORT] = (ort_aa.run_fn(1), xb)
    variants[AA_TFL] = (tfl_aa.run_fn(1), tfl_aa.prepare(xb, 1))
    kdens_models = {}
    for name in ("onnx-int8", "tflite-int8", "tflite-int8-int8io", "onnx-float", "tflite-float"):
        f = deploy_dir / name / json.loads((deploy_dir / name / "report.json").read_text())["model_file"]
        m = OnnxModel(f, 1) if f.suffix == ".onnx" else TFLiteModel(f, "ai_edge_litert", 1)
        kdens_models[name] = m
        variants[f"kdens {name}"] = (m.run_fn(1), m.prepare(xb, 1))
    print(f"[time] {len(variants)} variants x {rounds} rounds, interleaved ...", flush=True)
    timing = interleaved(variants, rounds, min_seconds)
    choice = f"kdens {first_artifact}" if first_artifact and f"kdens {first_artifact}" in variants else None
    summaries = {est: _summary(timing[f"{est}_p50_ms"], choice) for est in ("median", "quiet")}
    per_round = {}
    if choice:
        pr = timing["per_round_p50_ms"]
        per_round = latency.paired_verdict(pr[choice], pr["hand-ort-int8"], pr["hand-litert-int8"], pr[AA_ORT], pr[AA_TFL])
    return {
        "model_run": str(run), "hand_files": {"hand-ort-int8": str(hand_onnx), "hand-litert-int8": str(hand_tfl)},
        "hand_sizes_bytes": {"hand-ort-int8": hand_onnx.stat().st_size, "hand-litert-int8": hand_tfl.stat().st_size},
        "hand_build_seconds": {"hand-ort-int8": round(t_onnx, 1), "hand-litert-int8": round(t_tfl, 1)},
        "hand_io": {"input": np.dtype(in_d["dtype"]).name, "output": np.dtype(out_d["dtype"]).name},
        "hand_accuracy": acc, "calibration": "the same 512-row seeded training sample kdens uses (seed 0)",
        "timing": timing, "kdens_choice": choice, "kdens_choice_source": "first artifact in kdens bench's table",
        "summary": summaries, "per_round_choice_vs_best_hand": per_round,
    }


AA_ORT, AA_TFL = "hand-ort-int8 (A/A)", "hand-litert-int8 (A/A)"


def _summary(lat: dict[str, float], choice: str | None) -> dict:
    """Fastest variants and kdens/hand ratios under one latency estimator (``lat``: name -> ms)."""
    def best(names):
        return min(names, key=lat.get)

    def cmp(a: str, b: str) -> dict:
        return {"kdens": a, "hand": b, "ratio": lat[a] / lat[b]}

    hand = best(("hand-ort-int8", "hand-litert-int8"))
    kdens_int8 = best(("kdens onnx-int8", "kdens tflite-int8", "kdens tflite-int8-int8io"))
    out = {"fastest_overall": best([n for n in lat if n not in (AA_ORT, AA_TFL)]), "best_hand": hand,
           "best_kdens_int8": kdens_int8,
           "best_kdens_int8_vs_best_hand": cmp(kdens_int8, hand),
           "like_for_like": {  # the same calling interface on both sides
               "float_io": cmp(best(("kdens onnx-int8", "kdens tflite-int8")),
                               best(("hand-ort-int8", "hand-litert-int8+numpy-io"))),
               "ort": cmp("kdens onnx-int8", "hand-ort-int8"),
               "litert_int8_io": cmp("kdens tflite-int8-int8io", "hand-litert-int8"),
               "litert_float_io": cmp("kdens tflite-int8", "hand-litert-int8+numpy-io")}}
    if choice:
        out["kdens_choice_vs_best_hand"] = cmp(choice, hand)
        out["never_slower"] = lat[choice] <= lat[hand]
    return out


# ---------------------------------------------------------------- 3. weight-streaming bound
def weight_bound(run: Path, timing: dict) -> dict:
    from kdens.models import load_model

    model, _ = load_model(run)
    wb = common.weight_bytes(model, "int8")
    bws = [latency.memory_bandwidth_gbps.__wrapped__() for _ in range(3)]  # fresh each time, best kept
    b = latency.latency_bound_ms(wb, max(bws))
    names = ("kdens onnx-int8", "kdens tflite-int8", "kdens tflite-int8-int8io", "hand-ort-int8", "hand-litert-int8")
    return {**b, "bandwidth_samples_gbps": bws,
            "measured_b1_p50_ms": {n: {"median": timing["median_p50_ms"][n], "quiet": timing["quiet_p50_ms"][n]}
                                   for n in names},
            "measured_over_bound": {n: timing["median_p50_ms"][n] / b["latency_bound_ms"] for n in names}}


# ---------------------------------------------------------------- report
def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
    get = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in lscpu if ":" in ln}
    return {"model_name": get.get("Model name"), "cpus": get.get("CPU(s)"),
            "cores_per_socket": get.get("Core(s) per socket"), "hypervisor": get.get("Hypervisor vendor"),
            "lscpu_head": lscpu[:20], "python": sys.version.split()[0], "torch": torch.__version__}


def _cpus(v: float | None) -> str:
    return "an unknown number of" if v is None else f"{v:.2f}"


def _render_hand(key: str, h: dict, kdens_acc: dict) -> list[str]:
    t, sm = h["timing"], h["summary"]
    med, quiet = t["median_p50_ms"], t["quiet_p50_ms"]
    L = [f"## 2. Batch-1, 1-thread latency: kdens vs hand-made int8 exports ({key}: {h['model_run']})", "",
         (f"{t['rounds']} rounds x {len(med)} variants, >= {t['min_seconds_per_measurement']} s and >= 100 calls per "
         f"measurement, pinned to CPU {t['pinned_cpus']}, input = test image 0 for all. median = median over rounds "
         "of the per-round p50; quiet = 10th percentile over rounds of the per-round p50. Other processes kept "
         f"{_cpus(t.get('other_load_cpus'))} CPUs busy on average meanwhile."), "",
         ("| variant | median p50 (ms) | quiet p50 (ms) | min p50 (ms) | median p90 (ms) | vs best hand (median) "
         "| vs best hand (quiet) | test accuracy |"), "|---|---|---|---|---|---|---|---|"]
    bm, bq = med[sm["median"]["best_hand"]], quiet[sm["quiet"]["best_hand"]]
    accs = {**{k: v["accuracy"] for k, v in h["hand_accuracy"].items()},
            **{f"kdens {k}": v for k, v in kdens_acc.items()}}
    for n in sorted(med, key=med.get):
        a = accs.get(n, accs.get(n.replace("+numpy-io", "")))
        L.append(f"| {n} | {med[n]:.4f} | {quiet[n]:.4f} | {t['min_p50_ms'][n]:.4f} | {t['median_p90_ms'][n]:.4f} | "
                 f"{med[n] / bm:.2f}x | {quiet[n] / bq:.2f}x | {'-' if a is None else f'{100 * a:.2f}%'} |")
    L.append("")
    for est, v in sm.items():
        line = (f"- {est}: fastest **{v['fastest_overall']}**; best hand-made {v['best_hand']}; best kdens int8 "
                f"{v['best_kdens_int8']} ({v['best_kdens_int8_vs_best_hand']['ratio']:.3f}x the best hand-made)")
        if "kdens_choice_vs_best_hand" in v:
            line += (f"; kdens' choice ({h['kdens_choice_source']}) {h['kdens_choice']}: "
                     f"**{v['kdens_choice_vs_best_hand']['ratio']:.3f}x** the best hand-made (at or below on this "
                     f"estimator alone: {'yes' if v['never_slower'] else 'no'})")
        pairs = [f"{w} {c['kdens'].removeprefix('kdens ')}/{c['hand']} = {c['ratio']:.3f}"
                 for w, c in v["like_for_like"].items()]
        L.append(line + ". Like for like (same calling interface): " + "; ".join(pairs) + ".")
    fastest_kdens = min((n for n in med if n.startswith("kdens ")), key=med.get)
    if h["kdens_choice"] and h["kdens_choice"] != fastest_kdens:
        L.append(f"- `kdens bench` put {h['kdens_choice'].removeprefix('kdens ')} first, but in these rounds "
                 f"{fastest_kdens.removeprefix('kdens ')} is {med[h['kdens_choice']] / med[fastest_kdens]:.3f}x faster "
                 f"(median; {quiet[h['kdens_choice']] / quiet[fastest_kdens]:.3f}x quiet).")
    pr = h.get("per_round_choice_vs_best_hand") or {}
    if pr:
        L.append(f"- **per round** (the verdict): median of (kdens' choice / best hand-made in the same round) = "
                 f"**{pr['ratio_median']:.3f}** (95% CI {pr['ratio_ci95'][0]:.3f}-{pr['ratio_ci95'][1]:.3f}), slower "
                 f"in {pr['rounds_slower']} of {t['rounds']} rounds. A/A control (the same hand files in a second "
                 f"session): {pr['aa_ratio_median']:.3f} (95% CI {pr['aa_ci95'][0]:.3f}-{pr['aa_ci95'][1]:.3f}), "
                 f"'slower' in {pr['aa_rounds_slower']} of {t['rounds']}. Verdict: **{pr['verdict']}** "
                 f"(never slower: {'yes' if pr['never_slower'] else 'NO'}).")
    return L + [""]


def render(res: dict) -> str:
    m, L = res["machine"], []
    L += ["# Deploy benchmark (Fashion-MNIST)", "",
          (f"Machine: {m['model_name']}, {m['cpus']} CPUs ({m['cores_per_socket']} cores/socket, "
          f"{m['hypervisor']} VM). Load average at start {res['loadavg_start']}, before timing "
          f"{res['loadavg_before_timing']}, at end {res['loadavg_end']} (this benchmark alone keeps it near 1). "
          "Load from other jobs drifts over minutes, so every latency comparison below is interleaved in one "
          "process (rounds x variants, order rotated each round, median over rounds of the per-round p50) and "
          "pinned to one CPU with one thread."),
          "", f"Produced by `{res['command']}` in {res['wall_s']:.0f} s.", "",
          "## 1. int8 accuracy and size (from each deploy's report.json)", "",
          ("| model | target | PyTorch float | float export | int8 | drop (pts) | int8 size (KB) | float size (KB) "
          "| ratio | acc <= 0.5 | size <= 0.3x |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["accuracy_size"]:
        drop = max(r["drop_vs_pytorch_points"], r["drop_vs_float_export_points"])
        L.append(f"| {r['model']} | {r['target']} | {100 * r['pytorch_float_accuracy']:.2f}% | "
                 f"{100 * r['float_accuracy']:.2f}% | {100 * r['int8_accuracy']:.2f}% | {drop:.2f} | "
                 f"{r['int8_size_bytes'] / 1024:.1f} | {r['float_size_bytes'] / 1024:.1f} | {r['size_ratio']:.3f} | "
                 f"{'yes' if r['accuracy_ok'] else 'NO'} | {'yes' if r['size_ok'] else 'NO'} |")
    L += ["", "Drop = the larger of (PyTorch float - int8) and (float export - int8), in points. tflite-runtime 2.14 "
          "cross-check (top-1 agreement with PyTorch) of the int8 .tflite: "
          + ", ".join(f"{r['model']} {r['tflite_runtime_agreement']:.4f}" for r in res["accuracy_size"]
                      if r["target"] == "tflite" and r["tflite_runtime_agreement"] is not None) + ". int8 with "
          "int8 I/O (`--io int8`, tflite-int8-int8io): " + ", ".join(
              f"{k} {100 * d['tflite-int8-int8io']['summary']['accuracy']:.2f}% "
              f"({d['tflite-int8-int8io']['summary']['size_bytes'] / 1024:.1f} KB)"
              for k, d in res["deploys"].items() if "tflite-int8-int8io" in d) + ".", "",
          "Commands (each run from the repo root):", "", "```"]
    for key, d in res["deploys"].items():
        L += [v["command"] + (f"   # exit {v['returncode']}" if v.get("returncode") else "") for v in d.values()]
    L += ["```", ""]
    for key, h in res["hand_vs_kdens"].items():
        L += _render_hand(key, h, res["kdens_accuracy"][key])
    L += [("Hand-made exports follow docs/toolchain.md: `torch.onnx.export(dynamo=True)` + `quant_pre_process` "
          "+ `quantize_static(QDQ, per_channel=True, QInt8/QInt8)` (no reduce_range); PT2E symmetric per-channel "
          "static int8 at a fixed (1,1,28,28) shape + `litert_torch.convert` (int8 in/out; its input is quantized "
          "before timing, so its row is the runtime call alone; `+numpy-io` adds the numpy quantize/dequantize a "
          "float caller needs). Both are calibrated on the same 512 training rows as kdens. kdens' tflite-int8 "
          "has float I/O (QUANTIZE/DEQUANTIZE ops inside the file), tflite-int8-int8io (`--io int8`) has int8 "
          "I/O like the hand-made file (input quantized before timing); both have signatures b1 and b32 (b1 "
          "timed). All rows go through deploy/edge_runner.py's OnnxModel / TFLiteModel runners."), ""]
    w = res["weight_bound"]
    L += ["## 3. int8 MLP 800-800 at batch 1 vs the weight-streaming bound", "",
          (f"int8 weights {w['weight_bytes']} B; memory bandwidth {w['bandwidth_gbps']:.1f} GB/s (best of "
          f"{len(w['bandwidth_samples_gbps'])}: {', '.join(f'{b:.1f}' for b in w['bandwidth_samples_gbps'])}); "
          f"bound = {w['latency_bound_ms']:.4f} ms. Last-level cache {w['cache_bytes'] >> 20} MiB: weights fit in "
          f"cache: **{'yes' if w['weights_fit_in_cache'] else 'no'}**."), "",
          "| variant | b1 p50 median (ms) | / bound | b1 p50 quiet (ms) | / bound |", "|---|---|---|---|---|"]
    for n, v in w["measured_b1_p50_ms"].items():
        L.append(f"| {n} | {v['median']:.4f} | {v['median'] / w['latency_bound_ms']:.2f} | {v['quiet']:.4f} | "
                 f"{v['quiet'] / w['latency_bound_ms']:.2f} |")
    L += ["", ("The weights stay in cache between calls, so the DRAM streaming number is not a lower bound here: "
               "a warm runtime may beat it." if w["weights_fit_in_cache"] else
               "The weights do not fit in cache: the bound applies."), ""]
    for key, b in res["kdens_bench"].items():
        L += [f"## `kdens bench` — {key}", "", f"`{b['command']}`", "", b["table_md"],
              f"First artifact: {b['first_artifact']}. Pareto front: {', '.join(b['pareto_front'])}.", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mlp", type=Path, default=Path("runs/fm/student800-800-hard-s0"))
    p.add_argument("--cnn", type=Path, default=Path("runs/fm/cnn"))
    p.add_argument("--out-root", type=Path, default=Path("runs/fm"), help="deploys go to OUT_ROOT/deploy-<model>")
    p.add_argument("--tflite-runtime-venv", default=str(DEFAULT_VENV), help="the cross-check venv `make setup` makes")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--min-seconds", type=float, default=0.05, help="timed seconds per measurement")
    p.add_argument("--reuse", action="store_true", help="skip deploys whose folder has a manifest.json")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--render-only", action="store_true", help="rewrite deploy.md from an existing deploy.json")
    a = p.parse_args(argv)
    if a.render_only:
        atomic_write_text(a.results / "deploy.md", render(json.loads((a.results / "deploy.json").read_text())))
        return 0
    t0 = time.perf_counter()
    res: dict = {"command": _shell([sys.executable, "bench/bench_deploy.py", *(argv or sys.argv[1:])],
                                   {"OMP_NUM_THREADS": "1"}),
                 "machine": machine(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    models = {"mlp": a.mlp, "cnn": a.cnn}
    res["deploys"] = deploy_all(models, a.out_root, a.tflite_runtime_venv, a.reuse)
    res["accuracy_size"] = accuracy_size(res["deploys"])
    res["kdens_bench"] = {k: kdens_bench(a.out_root / f"deploy-{k}") for k in models}
    res["loadavg_before_timing"] = [round(v, 2) for v in os.getloadavg()]
    res["hand_vs_kdens"] = {k: hand_vs_kdens(run, a.out_root / f"deploy-{k}", res["kdens_bench"][k]["first_artifact"],
                                             a.rounds, a.min_seconds) for k, run in models.items()}
    res["kdens_accuracy"] = {k: {n: v["report"]["accuracy"] for n, v in d.items()} for k, d in res["deploys"].items()}
    res["weight_bound"] = weight_bound(a.mlp, res["hand_vs_kdens"]["mlp"]["timing"])
    res["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_s"] = time.perf_counter() - t0
    for d in res["deploys"].values():  # report.json stays in the deploy folder; keep the numbers used
        for v in d.values():
            rep = v.pop("report")
            v["summary"] = {k: rep.get(k) for k in ("accuracy", "float_accuracy", "agreement", "size_bytes",
                                                    "float_size_bytes", "latency_ms", "verdict", "failures",
                                                    "reduce_range")}
    a.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.results / "deploy.json", res)
    atomic_write_text(a.results / "deploy.md", render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
