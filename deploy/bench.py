"""``kdens bench``: one table of every deployed variant, its accuracy/latency Pareto front, a plot.

Rows come from ``<deploy>/*/report.json`` (one per target-precision folder, including the
PyTorch eager baseline in ``pytorch-float/`` when :func:`baseline_report` was written
there), and optionally from JSON results a device produced with ``edge_runner.py``
(:func:`merge_import`). The latency compared is batch-1 p50 with the fewest threads
measured (``b1_t1`` by default): the edge case, and the number least disturbed by other
load on the machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy import latency
from deploy.report import b1_latency
from kdens.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

BASELINE_DIR = "pytorch-float"


def _largest_batch(lat: dict) -> str | None:
    """Key of the largest batch size measured with the fewest threads (e.g. ``b32_t1``)."""
    keys = [(int(k.split("_t")[1]), -int(k[1:].split("_")[0]), k) for k in lat]
    big = min(keys)[2] if keys else None
    return None if big is None or big.startswith("b1_") else big


def row(name: str, report: dict, device: str = "host") -> dict:
    """Flatten one report into a table row."""
    found = b1_latency(report)
    lat = report.get("latency_ms") or {}
    big = _largest_batch(lat)
    gates = report.get("gates") or {}
    return {
        "name": name, "device": device, "target": report.get("target"), "precision": report.get("precision"),
        "runtime": report.get("runtime"), "size_bytes": report.get("size_bytes"), "params": report.get("params"),
        "accuracy": report.get("accuracy"), "float_accuracy": report.get("float_accuracy"),
        "agreement": report.get("agreement"), "max_abs_diff": report.get("max_abs_diff"),
        "latency_key": found[0] if found else None,
        "latency_b1_p50_ms": found[1]["p50"] if found else None,
        "latency_b1_p90_ms": found[1]["p90"] if found else None,
        "latency_b1_rounds_p50_ms": (report.get("latency_rounds_p50_ms") or {}).get(found[0]) if found else None,
        "latency_b1_quiet_p50_ms": found[1].get("quiet_p50") if found else None,
        # what the table ranks by: the quiet level where kdens bench timed rounds, else the p50
        "latency_b1_rank_ms": (found[1].get("quiet_p50") or found[1]["p50"]) if found else None,
        "latency_big_key": big, "latency_big_p50_ms": lat[big]["p50"] if big else None,
        "gates_passed": None if not gates else all(g.get("passed") is not False for g in gates.values()),
        "baseline": report.get("target") == "pytorch",
    }


def collect(deploy_dir: Path) -> list[dict]:
    """One row per ``<deploy_dir>/*/report.json`` (sorted by folder name)."""
    rows = []
    for path in sorted(Path(deploy_dir).glob("*/report.json")):
        rows.append(row(path.parent.name, read_json(path)))
    return rows


def pareto_front(rows: list[dict], latency: str = "latency_b1_p50_ms") -> list[str]:
    """Names of rows not dominated in (accuracy higher, latency lower).

    Row a dominates b if a.accuracy >= b.accuracy and a.latency <= b.latency with one strict.
    Rows without accuracy or latency are not on the front.
    """
    pts = [(r["name"], r["accuracy"], r[latency]) for r in rows
           if r.get("accuracy") is not None and r.get(latency) is not None]
    front = []
    for name, acc, lat in pts:
        dominated = any((a >= acc and l <= lat) and (a > acc or l < lat) for _, a, l in pts)
        if not dominated:
            front.append(name)
    return front


def mark_ties(rows: list[dict]) -> None:
    """Compare every host row with the fastest one round by round, in place.

    ``kdens bench`` times all artifacts in the same interleaved rounds, so each round gives
    a paired ratio (row / fastest, the fastest by quiet level). A row whose 95% interval of
    the median ratio reaches 1 or below is ``tied_with_fastest``: it is not measurably
    slower, so the table's order between them is no reason to pick one (two sessions of
    the same file differ by about 1% at batch 1).
    """
    timed = [r for r in rows if r["device"] == "host" and r.get("latency_b1_rounds_p50_ms")
             and r.get("latency_b1_rank_ms") is not None]
    for r in rows:
        r["ratio_to_fastest"], r["tied_with_fastest"], r["fastest_host"] = None, None, False
    if len(timed) < 2:
        return
    fastest = min(timed, key=lambda r: r["latency_b1_rank_ms"])
    fastest["fastest_host"] = True
    for r in timed:
        if r is fastest or len(r["latency_b1_rounds_p50_ms"]) != len(fastest["latency_b1_rounds_p50_ms"]):
            continue
        ratio = latency.paired_ratio(r["latency_b1_rounds_p50_ms"], fastest["latency_b1_rounds_p50_ms"])
        r["ratio_to_fastest"] = ratio
        r["tied_with_fastest"] = ratio["ci95"][0] <= 1.0


def _rank_ms(r: dict) -> float | None:
    """The latency a row is ranked by (rows written before kdens bench kept rounds: their p50)."""
    return r.get("latency_b1_rank_ms", r.get("latency_b1_p50_ms"))


def ranked(rows: list[dict]) -> list[dict]:
    """Rows in the bench table's order: by batch-1 latency (quiet level where timed in rounds), unmeasured last."""
    return sorted(rows, key=lambda r: (_rank_ms(r) is None, _rank_ms(r) or 0, r["name"]))


def _speedups(rows: list[dict]) -> None:
    """Add ``speedup_vs_eager`` (baseline b1 p50 / row b1 p50) per device, in place."""
    for dev in {r["device"] for r in rows}:
        base = next((r for r in rows if r["baseline"] and r["device"] == dev and r["latency_b1_p50_ms"]), None)
        for r in rows:
            if r["device"] == dev:
                r["speedup_vs_eager"] = (base["latency_b1_p50_ms"] / r["latency_b1_p50_ms"]
                                         if base and r["latency_b1_p50_ms"] else None)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render_table(rows: list[dict], front: list[str], other_load_cpus: float | None = None) -> str:
    """Markdown table sorted by batch-1 latency (quiet level where timed in rounds; rows without
    latency last); * marks the front."""
    rows = ranked(rows)
    lines = ["| | variant | device | runtime | size (KB) | accuracy | agreement | b1 p50 quiet (ms) | b1 p50 (ms) "
             "| b1 p90 (ms) | large batch p50 (ms) | vs eager | gates |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = None if r["accuracy"] is None else 100 * r["accuracy"]
        big = f"{r['latency_big_p50_ms']:.4f} ({r['latency_big_key']})" if r["latency_big_p50_ms"] else "-"
        gates = "-" if r["gates_passed"] is None else ("pass" if r["gates_passed"] else "FAIL")
        speedup = "-" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.1f}x"
        lines.append(f"| {'*' if r['name'] in front and r['device'] == 'host' else ''} | {r['name']} | {r['device']} "
                     f"| {r['runtime'] or '-'} | {_fmt(None if r['size_bytes'] is None else r['size_bytes'] / 1024, '.1f')} "
                     f"| {_fmt(acc, '.2f')}% | {_fmt(r['agreement'], '.4f')} | {_fmt(r.get('latency_b1_quiet_p50_ms'), '.4f')} "
                     f"| {_fmt(r['latency_b1_p50_ms'], '.4f')} "
                     f"| {_fmt(r['latency_b1_p90_ms'], '.4f')} | {big} | {speedup} "
                     f"| {gates} |")
    lines += ["", "`*` = on the host's accuracy/latency Pareto front (batch 1, fewest threads). Rows are "
              "ranked by the quiet p50 (20th percentile over interleaved rounds of each round's p50: what a call "
              "costs when nothing disturbs it); p50/p90 are medians over the rounds. "
              "Accuracy of device rows is the host's for the same file; their agreement is measured on the device."]
    ties = [r for r in rows if r.get("tied_with_fastest")]
    if ties:
        first = next(r["name"] for r in rows if r.get("fastest_host"))
        lines += ["", f"Not measurably slower than the fastest ({first}) at batch 1 (paired per-round ratio, "
                  "95% interval reaching 1): " + "; ".join(
            f"{r['name']} ({r['ratio_to_fastest']['median']:.3f}x, 95% interval "
            f"{r['ratio_to_fastest']['ci95'][0]:.3f}-{r['ratio_to_fastest']['ci95'][1]:.3f})" for r in ties)
            + ". Their order is noise: pick among them by accuracy, size or calling interface."]
    if other_load_cpus is not None:
        if latency.other_load_is_high(other_load_cpus):
            lines += ["", f"**Warning:** other processes kept {other_load_cpus:.2f} CPUs busy on average while this "
                      "table was timed. Contention slows runtimes unevenly, so this order may not hold on an idle "
                      "machine or on the target device: rerun `kdens bench` when nothing else runs."]
        else:
            lines += ["", f"Other processes while timing: {other_load_cpus:.2f} CPUs busy on average."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], front: list[str], path: Path) -> Path:
    """Scatter accuracy vs batch-1 latency (the table's ranking one; log x), the front as a step line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pts = [r for r in rows if r["accuracy"] is not None and _rank_ms(r)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts.sort(key=lambda r: _rank_ms(r))
    for i, r in enumerate(pts):
        on = r["name"] in front and r["device"] == "host"
        ax.scatter(_rank_ms(r), 100 * r["accuracy"], marker="o" if r["device"] == "host" else "s",
                   color="C3" if on else "C0", zorder=3)
        ax.annotate(r["name"] + ("" if r["device"] == "host" else f" @{r['device']}"),
                    (_rank_ms(r), 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(4, (4, -11, 15)[i % 3]), fontsize=8)  # staggered: near points stay readable
    fr = sorted((_rank_ms(r), 100 * r["accuracy"]) for r in pts
                if r["name"] in front and r["device"] == "host")
    if fr:
        ax.step([p[0] for p in fr], [p[1] for p in fr], where="post", color="C3", lw=1, label="Pareto front")
        ax.legend(loc="best")
    if pts:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("batch-1 latency: quiet p50 where timed in rounds (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_bench(deploy_dir: Path, rows: list[dict], out: Path | None = None,
                other_load_cpus: float | None = None, skipped: dict[str, str] | None = None) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into ``out`` (default ``deploy_dir``).

    ``other_load_cpus``: CPUs other processes kept busy while the rows were timed (None when
    this call timed nothing or cannot tell); recorded, and a warning when it is high.
    ``skipped``: export folders left out and why (named in bench.json and bench.md).
    """
    out = Path(out or deploy_dir)
    rows = [dict(r) for r in rows]
    _speedups(rows)
    mark_ties(rows)
    front = pareto_front([r for r in rows if r["device"] == "host"], latency="latency_b1_rank_ms")
    for r in rows:
        r["pareto"] = r["name"] in front and r["device"] == "host"
    paths = {"json": atomic_write_json(out / "bench.json", {"deploy_dir": str(deploy_dir), "pareto_front": front,
                                                             "other_load_cpus": other_load_cpus, "rows": rows,
                                                             "skipped": skipped or {}}),
             "md": atomic_write_text(out / "bench.md", render_table(rows, front, other_load_cpus)
                                     + "".join(f"\nLeft out: {k} ({v})\n" for k, v in (skipped or {}).items())),
             "png": plot(rows, front, out / "bench.png")}
    return paths


def merge_import(rows: list[dict], result_json: Path | dict) -> list[dict]:
    """Add a device's ``edge_runner.py`` results (one row per model) to ``rows``.

    Accuracy is taken from the host row of the same file (the device ran only the
    bundle's sample inputs); ``agreement`` is the device's agreement with PyTorch there.
    """
    res = result_json if isinstance(result_json, dict) else read_json(Path(result_json))
    env = res.get("environment", {})
    device = env.get("host") or env.get("machine") or "device"
    host = {r["name"]: r for r in rows if r["device"] == "host"}
    merged = list(rows)
    for item in res.get("results", []):
        base = dict(host.get(item["name"], {"name": item["name"], "target": None, "precision": None,
                                            "size_bytes": None, "params": None, "accuracy": None,
                                            "float_accuracy": None, "max_abs_diff": None, "gates_passed": None,
                                            "baseline": False}))
        lat = item.get("latency_ms") or {}
        b1 = sorted((int(k.split("_t")[1]), k) for k in lat if k.startswith("b1_t"))
        big = _largest_batch(lat)
        base.update({"device": f"{device} ({env.get('machine', '?')})" if item.get("loads") else f"{device} (failed)",
                     "runtime": item.get("runtime"), "agreement": item.get("agreement"),
                     "max_abs_diff": item.get("max_abs_diff"), "error": item.get("error"),
                     "gates_passed": None, "baseline": False,  # host gates say nothing about this device
                     "latency_key": b1[0][1] if b1 else None,
                     "latency_b1_p50_ms": lat[b1[0][1]]["p50"] if b1 else None,
                     "latency_b1_p90_ms": lat[b1[0][1]]["p90"] if b1 else None,
                     # the device's own numbers only: nothing timed in host rounds carries over
                     "latency_b1_quiet_p50_ms": None, "latency_b1_rounds_p50_ms": None,
                     "latency_b1_rank_ms": lat[b1[0][1]]["p50"] if b1 else None,
                     "latency_big_key": big, "latency_big_p50_ms": lat[big]["p50"] if big else None})
        merged.append(base)
    return merged


def baseline_report(model, data, opts) -> dict:
    """PyTorch eager float report (same keys as a target's), for ``<deploy>/pytorch-float/``."""
    import torch

    from deploy import common, latency

    ref = common.torch_logits(model, data.x_test)
    acc = common.compare(ref, ref, data.y_test)["accuracy"]
    lat, env = latency.torch_latency(model, data.x_test, opts.batch_sizes, opts.thread_counts(),
                                     warmup=opts.latency_warmup, min_runs=opts.latency_min_runs,
                                     min_seconds=opts.latency_min_seconds)
    params = common.num_params(model)
    return {"target": "pytorch", "precision": "float", "runtime": f"torch {torch.__version__} eager",
            "files": {}, "size_bytes": 4 * params, "float_size_bytes": 4 * params, "params": params,
            "n_test": len(data.x_test), "float_accuracy": acc, "accuracy": acc, "agreement": 1.0,
            "max_abs_diff": 0.0, "latency_ms": lat, "latency_env": env,
            **latency.latency_bound_ms(common.weight_bytes(model, "float")),
            "checks": {"latency": common.info("eager PyTorch, torch.set_num_threads per thread count")},
            "passed": True, "failures": []}
