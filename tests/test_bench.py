"""Gates, report files, latency measurement and the bench table on synthetic reports (fast)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from deploy import bench, latency
from deploy.report import evaluate_gates, finalize, gate_failure_message, render_markdown, write_report


def _report(target="onnx", precision="float", acc=0.95, facc=0.96, b1=(0.10, 0.12), b32=None, threads=1):
    lat = {f"b1_t{threads}": {"p50": b1[0], "p90": b1[1], "p99": b1[1] * 1.5, "runs": 100, "mean": b1[0]}}
    if b32 is not None:
        lat[f"b32_t{threads}"] = {"p50": b32, "p90": b32 * 1.1, "p99": b32 * 1.2, "runs": 100, "mean": b32}
    return {"target": target, "precision": precision, "runtime": f"{target}-rt 1.0", "size_bytes": 1000,
            "float_size_bytes": 4000, "params": 1000, "accuracy": acc, "float_accuracy": facc,
            "agreement": 0.99, "max_abs_diff": 0.1, "latency_ms": lat,
            "checks": {"parity": {"checked": True, "passed": True, "message": "ok"},
                       "latency": {"checked": True, "passed": None, "message": "timed"},
                       "synthesis": {"checked": False, "passed": None, "reason": "no vendor tools"}}}


def test_gates_pass_and_fail_with_margins():
    rep = _report(acc=0.93, facc=0.96, b1=(0.10, 0.125))
    gates = evaluate_gates(rep, max_latency_ms=0.1, max_accuracy_drop=1.0)
    lat, acc = gates["latency_b1_p90_ms"], gates["accuracy_drop_points"]
    assert lat["measured"] == 0.125 and lat["passed"] is False and lat["margin"] == pytest.approx(-0.025)
    assert lat["source"] == "b1_t1"
    assert acc["measured"] == pytest.approx(3.0) and acc["passed"] is False
    assert acc["margin"] == pytest.approx(-2.0)
    msg = gate_failure_message(gates)
    assert "0.125 ms" in msg and "by 0.025 ms" in msg and "25.0% over" in msg
    assert "dropped 3.00 points" in msg and "by 2.00 points" in msg and "96.00% float -> 93.00%" in msg

    ok = evaluate_gates(rep, max_latency_ms=0.2, max_accuracy_drop=3.5)
    assert all(g["passed"] for g in ok.values())
    assert ok["latency_b1_p90_ms"]["margin"] == pytest.approx(0.075)
    assert gate_failure_message(ok) is None


def test_gates_only_those_asked_and_unmeasurable_latency():
    rep = _report()
    assert evaluate_gates(rep, None, None) == {}
    assert set(evaluate_gates(rep, None, 1.0)) == {"accuracy_drop_points"}
    # an accuracy gain is a negative drop, never a failure
    assert evaluate_gates(_report(acc=0.97, facc=0.96), None, 0.0)["accuracy_drop_points"]["passed"]
    fpga = dict(rep, latency_ms=None)
    g = evaluate_gates(fpga, 1.0, None)["latency_b1_p90_ms"]
    assert g["passed"] is None and "no batch-1 latency" in g["reason"]
    assert gate_failure_message({"latency_b1_p90_ms": g}) is None
    # with several thread counts the gate uses the fewest (the edge case)
    multi = _report(b1=(0.2, 0.3))
    multi["latency_ms"]["b1_t4"] = {"p50": 0.05, "p90": 0.06, "p99": 0.07, "runs": 10}
    assert evaluate_gates(multi, 0.1, None)["latency_b1_p90_ms"]["source"] == "b1_t1"


def test_write_report_atomic_json_and_markdown(tmp_path):
    rep = _report()
    rep["gates"] = evaluate_gates(rep, 0.05, 2.0)
    j, m = write_report(tmp_path / "onnx-float", rep)
    assert json.loads(j.read_text()) == rep
    md = m.read_text()
    assert md.startswith("# Deploy report: onnx-float") and "| b1_t1 |" in md and "| NO |" in md
    assert "- parity: passed — ok" in md and "- latency: measured — timed" in md
    assert "- synthesis: not checked — no vendor tools" in md
    assert sorted(p.name for p in (tmp_path / "onnx-float").iterdir()) == ["report.json", "report.md"]
    assert render_markdown({"target": "fpga", "precision": "x", "latency_ms": None, "checks": {}})


def test_finalize_writes_gates_and_names_the_variant(tmp_path):
    rep = _report(acc=0.90, facc=0.96)
    msg = finalize(tmp_path, rep, max_latency_ms=0.01, max_accuracy_drop=1.0)
    lines = msg.splitlines()
    assert len(lines) == 2 and all(ln.startswith("onnx-float: ") for ln in lines)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["gates"]["accuracy_drop_points"]["passed"] is False
    assert finalize(tmp_path, _report(), max_latency_ms=1.0, max_accuracy_drop=None) is None


def test_measure_times_each_call():
    stats = latency.measure(lambda x: time.sleep(0.002), np.zeros(1), warmup=1, min_runs=5, min_seconds=0.0)
    assert stats["runs"] == 5
    assert 2.0 <= stats["p50"] <= stats["p90"] <= stats["p99"] and stats["p50"] < 50
    stats = latency.measure(lambda x: None, np.zeros(1), warmup=0, min_runs=3, min_seconds=0.05)
    assert stats["runs"] > 3  # ran until min_seconds elapsed


def test_latency_grid_pins_and_keys():
    calls = []
    grid, env = latency.latency_grid(lambda bs, t: (lambda xb: calls.append((bs, t, len(xb)))),
                                     np.zeros((5, 1, 2, 2), np.float32), (1, 8), (1,), warmup=0,
                                     min_runs=2, min_seconds=0.0)
    assert set(grid) == {"b1_t1", "b8_t1"} and {(1, 1, 1), (8, 1, 8)} == set(calls)
    assert env["pinned_cpus"]["t1"] in (None, [min(__import__("os").sched_getaffinity(0))])


def test_bandwidth_bound():
    import math

    bw = latency.memory_bandwidth_gbps(64)
    assert math.isfinite(bw) and bw > 0  # a measurement of this machine: only its sign is known
    b = latency.latency_bound_ms(10**9, bandwidth_gbps=10.0)
    assert b["latency_bound_ms"] == pytest.approx(100.0) and b["weights_fit_in_cache"] is False
    assert latency.latency_bound_ms(10**9, bandwidth_gbps=20.0)["latency_bound_ms"] == pytest.approx(50.0)


def _deploy_dir(tmp_path):
    reps = {"onnx-float": _report("onnx", "float", 0.960, 0.960, (0.30, 0.35), b32=1.0),
            "onnx-int8": _report("onnx", "int8", 0.955, 0.960, (0.10, 0.12), b32=0.5),
            "tflite-int8": _report("tflite", "int8", 0.958, 0.960, (0.05, 0.06), b32=0.4),
            "tflite-float": _report("tflite", "float", 0.960, 0.960, (0.20, 0.25)),  # dominates onnx-float
            "pytorch-float": _report("pytorch", "float", 0.960, 0.960, (0.60, 0.70)),
            "fpga-ap_fixed": dict(_report("fpga", "ap_fixed<16,6>", 0.95, 0.96), latency_ms=None)}
    for name, rep in reps.items():
        write_report(tmp_path / name, rep)
    (tmp_path / "not-a-target").mkdir()
    return tmp_path


def test_bench_collect_pareto_and_files(tmp_path):
    d = _deploy_dir(tmp_path)
    rows = bench.collect(d)
    assert {r["name"] for r in rows} == {"onnx-float", "onnx-int8", "tflite-int8", "tflite-float",
                                         "pytorch-float", "fpga-ap_fixed"}
    assert set(bench.pareto_front(rows)) == {"tflite-int8", "tflite-float"}
    paths = bench.write_bench(d, rows)
    out = json.loads(paths["json"].read_text())
    assert set(out["pareto_front"]) == {"tflite-int8", "tflite-float"}
    by = {r["name"]: r for r in out["rows"]}
    assert by["tflite-int8"]["speedup_vs_eager"] == pytest.approx(12.0)
    assert by["tflite-int8"]["latency_big_key"] == "b32_t1" and by["tflite-float"]["latency_big_key"] is None
    md = paths["md"].read_text().splitlines()
    order = [ln.split("|")[2].strip() for ln in md[2:8]]
    assert order == ["tflite-int8", "onnx-int8", "tflite-float", "onnx-float", "pytorch-float", "fpga-ap_fixed"]
    assert md[2].startswith("| * | tflite-int8") and md[3].startswith("|  | onnx-int8")
    assert len({ln.count("|") for ln in md[:8]}) == 1, "every table row has the header's column count"
    assert "0.4000 (b32_t1)" in md[2]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_ties_and_missing():
    rows = [{"name": "a", "accuracy": 0.9, "latency_b1_p50_ms": 1.0},
            {"name": "b", "accuracy": 0.9, "latency_b1_p50_ms": 1.0},  # identical points: neither dominates
            {"name": "c", "accuracy": 0.8, "latency_b1_p50_ms": 2.0},
            {"name": "d", "accuracy": None, "latency_b1_p50_ms": 0.1}]
    assert bench.pareto_front(rows) == ["a", "b"]


def _timed_report(rounds, target="onnx", precision="int8"):
    """A report as ``kdens bench`` leaves it after interleaved rounds (per-round b1 p50s kept)."""
    rounds = [float(v) for v in rounds]
    rep = _report(target=target, precision=precision, b1=(float(np.median(rounds)), 2 * float(np.median(rounds))))
    rep["latency_ms"]["b1_t1"]["quiet_p50"] = float(np.percentile(rounds, 20))
    rep["latency_rounds_p50_ms"] = {"b1_t1": rounds}
    return rep


def test_rows_within_resolution_of_the_fastest_are_marked_tied():
    """Paired per-round ratios: 1% noise around the fastest is a tie, a steady 5% is not."""
    rng = np.random.default_rng(0)
    base = rng.normal(0.10, 0.003, 30)  # per-round p50s of the fastest, drifting with load
    rows = [bench.row("fast", _timed_report(base)),
            bench.row("twin", _timed_report(base * rng.normal(1.0, 0.01, 30))),
            bench.row("slow", _timed_report(base * 1.05)),
            bench.row("pytorch-float", {**_report(target="pytorch", b1=(0.5, 0.6))}),
            {**bench.row("phone", _timed_report(base * 3)), "device": "pixel"}]
    bench.mark_ties(rows)
    by = {r["name"]: r for r in rows}
    first = "fast" if by["fast"]["fastest_host"] else "twin"  # equal work: either may rank first
    other = {"fast": "twin", "twin": "fast"}[first]
    assert by[first]["fastest_host"] and by[first]["tied_with_fastest"] is None
    assert by[other]["tied_with_fastest"] is True
    lo, hi = by[other]["ratio_to_fastest"]["ci95"]
    assert lo <= 1.0 <= hi
    assert by["slow"]["tied_with_fastest"] is False
    assert by["slow"]["ratio_to_fastest"]["median"] == pytest.approx(1.05, rel=0.012)
    assert by["slow"]["ratio_to_fastest"]["ci95"][0] > 1.0
    assert by["pytorch-float"]["tied_with_fastest"] is None and by["phone"]["tied_with_fastest"] is None
    text = bench.render_table(rows, [])
    assert f"Not measurably slower than the fastest ({first}) at batch 1" in text and f"{other} (" in text
    assert "slow (" not in text


def test_the_table_ranks_by_the_quiet_level_not_the_median():
    """Seen on this VM: the faster file hit by slow rounds more often had the higher median."""
    rng = np.random.default_rng(1)
    slow_round = rng.random(30) < 0.6  # a neighbour thrashes the cache in 60% of this file's rounds
    fast = np.where(slow_round, 0.20, 0.12) * rng.normal(1, 0.01, 30)
    steady = 0.15 * rng.normal(1, 0.01, 30)
    rows = [bench.row("onnx-float", _timed_report(steady, precision="float")),
            bench.row("onnx-int8", _timed_report(fast))]
    by = {r["name"]: r for r in rows}
    assert by["onnx-int8"]["latency_b1_p50_ms"] > by["onnx-float"]["latency_b1_p50_ms"]  # the median misleads
    assert by["onnx-int8"]["latency_b1_rank_ms"] < by["onnx-float"]["latency_b1_rank_ms"]
    lines = bench.render_table(rows, []).splitlines()
    assert lines[2].split("|")[2].strip() == "onnx-int8"


def test_other_load_arithmetic_and_the_table_warns():
    """Machine busy seconds less our own, over the wall time; /proc/stat's steal counts as busy."""
    #          user nice system idle iowait irq softirq steal
    line = "cpu  300  0    100    900  50     0   0       100 0 0"
    assert latency.busy_seconds(line, 100) == pytest.approx(5.0)  # 500 busy ticks; idle/iowait are not
    assert latency.busy_seconds("intr 1 2 3", 100) is None
    assert latency.other_cpus(busy=3.0, own=1.0, wall=2.0) == pytest.approx(1.0)
    assert latency.other_cpus(busy=0.5, own=1.0, wall=2.0) == 0.0  # never negative
    assert latency.other_cpus(busy=None, own=1.0, wall=2.0) is None
    with latency.OtherLoad() as other:  # the real probe: a number where /proc/stat exists
        time.sleep(0.05)
    assert other.cpus is None or other.cpus >= 0.0
    row = {"name": "a", "device": "host", "target": None, "precision": None, "runtime": None, "size_bytes": None,
           "accuracy": None, "agreement": None, "latency_b1_p50_ms": 0.1, "latency_b1_p90_ms": None,
           "latency_big_p50_ms": None, "latency_big_key": None, "gates_passed": None}
    assert latency.other_load_is_high(1.0, ncpu=2)  # a 2-core box with one busy neighbour
    assert not latency.other_load_is_high(1.0, ncpu=64)  # the same neighbour on a big host
    assert "**Warning:** other processes kept 100.00 CPUs" in bench.render_table([row], [], 100.0)
    assert "Other processes while timing: 0.05 CPUs" in bench.render_table([row], [], 0.05)
    assert "Other processes" not in bench.render_table([row], [], None)


def test_merge_import_adds_device_rows(tmp_path):
    rows = bench.collect(_deploy_dir(tmp_path))
    result = {"environment": {"host": "pi5", "machine": "aarch64"},
              "results": [{"name": "tflite-int8", "loads": True, "runtime": "tflite_runtime 2.14.0",
                           "agreement": 0.98, "max_abs_diff": 0.3, "error": None,
                           "latency_ms": {"b1_t1": {"p50": 0.5, "p90": 0.6, "p99": 0.7, "runs": 50},
                                          "b32_t1": {"p50": 4.0, "p90": 4.1, "p99": 4.2, "runs": 50}}},
                          {"name": "onnx-int8", "loads": False, "error": "no runtime", "latency_ms": None}]}
    (tmp_path / "res.json").write_text(json.dumps(result))
    merged = bench.merge_import(rows, tmp_path / "res.json")
    dev = [r for r in merged if r["device"] != "host"]
    assert len(merged) == len(rows) + 2 and len(dev) == 2
    pi = next(r for r in dev if r["name"] == "tflite-int8")
    assert pi["device"] == "pi5 (aarch64)" and pi["latency_b1_p50_ms"] == 0.5 and pi["agreement"] == 0.98
    assert pi["accuracy"] == 0.958  # host accuracy of the same file
    assert pi["gates_passed"] is None and not pi["baseline"]
    failed = next(r for r in dev if r["name"] == "onnx-int8")
    assert failed["device"] == "pi5 (failed)" and failed["latency_b1_p50_ms"] is None
    # device rows never enter the host's front, and the table still renders
    paths = bench.write_bench(tmp_path, merged, tmp_path / "out")
    assert "pi5 (aarch64)" in paths["md"].read_text()
    out_rows = json.loads(paths["json"].read_text())["rows"]
    # no eager baseline ran on the device: no speedup against the host's eager numbers
    assert next(r for r in out_rows if r["device"] == "pi5 (aarch64)")["speedup_vs_eager"] is None
    assert set(json.loads(paths["json"].read_text())["pareto_front"]) == {"tflite-int8", "tflite-float"}


def test_paired_verdict_slower_faster_and_tie_against_the_aa_control():
    """A 3% slower choice is 'slower', 3% faster is 'faster', identical work is a tie."""
    rng = np.random.default_rng(1)
    hand = rng.normal(0.1, 0.002, 60)  # drifting per-round p50s
    slow_runtime = hand * 1.5          # the other runtime, never the best
    aa = hand * rng.normal(1, 0.004, 60)
    noisy = hand * rng.normal(1, 0.004, 60)
    assert latency.paired_verdict(hand * 1.03, hand, slow_runtime, aa, slow_runtime)["verdict"] == "slower"
    assert latency.paired_verdict(hand * 0.97, hand, slow_runtime, aa, slow_runtime)["verdict"] == "faster"
    v = latency.paired_verdict(noisy, hand, slow_runtime, aa, slow_runtime)
    assert v["verdict"] == "tie" and v["never_slower"]
    lo, hi = v["ratio_ci95"]
    assert lo <= v["ratio_median"] <= hi and 0.98 < lo and hi < 1.02
    assert json.loads(json.dumps(v)) == v  # the results file takes it as is


def test_rows_from_an_older_bench_json_rank_and_plot_by_their_p50(tmp_path):
    """bench.json written before kdens bench kept rounds has no ranking key: p50 stands in."""
    old = []
    for name, p50 in (("b", 0.2), ("a", 0.1)):
        row = bench.row(name, _report(b1=(p50, 2 * p50)))
        del row["latency_b1_rank_ms"], row["latency_b1_quiet_p50_ms"], row["latency_b1_rounds_p50_ms"]
        old.append(row)
    lines = bench.render_table(old, ["a"]).splitlines()
    assert [ln.split("|")[2].strip() for ln in lines[2:4]] == ["a", "b"]
    assert bench.plot(old, ["a"], tmp_path / "old.png").read_bytes()[:4] == b"\x89PNG"


def test_the_weight_streaming_bound_never_sits_unexplained_above_faster_latencies():
    from deploy.report import bound_line

    lat = {"b1_t1": {"p50": 0.01, "p90": 0.02, "p99": 0.03, "runs": 10}}
    cached = {"latency_bound_ms": 0.1, "weight_bytes": 10**6, "bandwidth_gbps": 10.0, "cache_bytes": 32 * 2**20,
              "weights_fit_in_cache": True, "latency_ms": lat}
    text = render_markdown({"target": "onnx", "precision": "int8", **cached})
    assert "Not a bound here: the weights fit in the 32 MiB last-level cache" in text and "beat it" in text
    dram = {**cached, "weights_fit_in_cache": False}
    assert bound_line(dram) is None and "streaming" not in render_markdown(dram)
    slow = {**dram, "latency_ms": {"b1_t1": {"p50": 0.5, "p90": 0.6, "p99": 0.7, "runs": 10}}}
    assert bound_line(slow).startswith("Weight-streaming bound: 0.1000 ms")


def test_runtime_info_lines_are_dropped_at_the_file_descriptor(capfd):
    """TFLite's native logger writes past sys.stderr, straight to fd 2; other lines still show."""
    import os

    from deploy.edge_runner import without_runtime_info

    with without_runtime_info():
        os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nERROR: a real problem\n")
    err = capfd.readouterr().err
    assert "INFO:" not in err and "ERROR: a real problem" in err
