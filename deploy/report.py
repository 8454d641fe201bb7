"""Deploy reports: budget gates, their failure messages, and report.json / report.md.

A gate compares one measured number with the user's budget:

- ``latency_b1_p90_ms``: p90 latency at batch 1 with the fewest threads measured
  (``b1_t1`` by default), against ``--max-latency-ms``.
- ``accuracy_drop_points``: ``100 * (float_accuracy - accuracy)``, the test accuracy lost
  by the deployed model against PyTorch float, in percentage points, against
  ``--max-accuracy-drop``.

``margin = limit - measured``: positive is headroom, negative is by how much it missed.
A gate whose number this target cannot measure (no batch-1 latency, e.g. the FPGA C
simulation) has ``passed = None`` and a ``reason``; it neither passes nor fails.
"""

from __future__ import annotations

from pathlib import Path

from kdens.artifacts import atomic_write_json, atomic_write_text

LATENCY_GATE = "latency_b1_p90_ms"
ACCURACY_GATE = "accuracy_drop_points"


def b1_latency(report: dict) -> tuple[str, dict] | None:
    """``(key, stats)`` of the batch-1 measurement with the fewest threads, or None."""
    lat = report.get("latency_ms") or {}
    b1 = [(int(k.split("_t")[1]), k) for k in lat if k.startswith("b1_t")]
    if not b1:
        return None
    key = min(b1)[1]
    return key, lat[key]


def evaluate_gates(report: dict, max_latency_ms: float | None, max_accuracy_drop: float | None) -> dict:
    """Gates for the budgets that were given (None = no budget, no gate).

    Returns:
        ``{gate name: {"limit", "measured", "passed", "margin", ...}}``.
    """
    gates: dict[str, dict] = {}
    if max_latency_ms is not None:
        found = b1_latency(report)
        if found is None:
            gates[LATENCY_GATE] = {"limit": float(max_latency_ms), "measured": None, "passed": None,
                                   "margin": None, "reason": f"target {report.get('target')} has no "
                                   "batch-1 latency measurement (add 1 to --batch-sizes, or the target "
                                   "cannot measure latency on this machine)"}
        else:
            key, stats = found
            measured = float(stats["p90"])
            gates[LATENCY_GATE] = {"limit": float(max_latency_ms), "measured": measured,
                                   "passed": measured <= max_latency_ms,
                                   "margin": float(max_latency_ms) - measured, "source": key}
    if max_accuracy_drop is not None:
        fa, acc = report.get("float_accuracy"), report.get("accuracy")
        if fa is None or acc is None:
            gates[ACCURACY_GATE] = {"limit": float(max_accuracy_drop), "measured": None, "passed": None,
                                    "margin": None, "reason": "report has no float_accuracy/accuracy"}
        else:
            drop = 100.0 * (float(fa) - float(acc))
            gates[ACCURACY_GATE] = {"limit": float(max_accuracy_drop), "measured": drop,
                                    "passed": drop <= max_accuracy_drop,
                                    "margin": float(max_accuracy_drop) - drop,
                                    "float_accuracy": float(fa), "accuracy": float(acc)}
    return gates


def gate_failure_message(gates: dict) -> str | None:
    """One line per failed gate saying by how much it missed; None if none failed."""
    lines = []
    for name, g in gates.items():
        if g.get("passed") is not False:
            continue
        over = g["measured"] - g["limit"]
        if name == LATENCY_GATE:
            pct = f", {100 * over / g['limit']:.1f}% over" if g["limit"] > 0 else ""
            lines.append(f"batch-1 p90 latency ({g.get('source', 'b1')}) is {g['measured']:.4g} ms, "
                         f"over the {g['limit']:.4g} ms budget by {over:.4g} ms{pct}")
        elif name == ACCURACY_GATE:
            lines.append(f"test accuracy dropped {g['measured']:.2f} points "
                         f"({100 * g['float_accuracy']:.2f}% float -> {100 * g['accuracy']:.2f}% deployed), "
                         f"over the {g['limit']:.2f}-point budget by {over:.2f} points")
        else:
            lines.append(f"{name}: measured {g['measured']:.4g} > limit {g['limit']:.4g} by {over:.4g}")
    return "\n".join(lines) or None


def _fmt(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def bound_line(report: dict) -> str | None:
    """The weight-streaming bound, said so that it never sits unexplained above latencies that beat it.

    Reading every weight once from DRAM bounds a batch-1 call only when the weights do not
    stay in the last-level cache between calls. When they fit, warm calls read them from
    cache and can beat the DRAM number: the line says so. When they do not fit and a
    measured batch-1 p50 still beats it, the bandwidth measured here (one thread copying)
    understates what the runtime gets: no line, rather than a "bound" the table contradicts.
    """
    bound = report.get("latency_bound_ms")
    if bound is None:
        return None
    b1 = [v["p50"] for k, v in (report.get("latency_ms") or {}).items() if k.startswith("b1_") and v]
    beaten = bool(b1) and min(b1) < bound
    size = f"{report.get('weight_bytes')} B of weights at {_fmt(report.get('bandwidth_gbps'), '.1f')} GB/s"
    if report.get("weights_fit_in_cache"):
        cache = report.get("cache_bytes")
        where = f"the {cache / 2**20:.0f} MiB last-level cache" if cache else "the last-level cache"
        return (f"Weight-streaming time from DRAM: {bound:.4f} ms ({size}). Not a bound here: the weights fit in "
                f"{where}, so warm calls read them from cache" + (" and beat it." if beaten else "."))
    if beaten:
        return None
    return f"Weight-streaming bound: {bound:.4f} ms ({size}): no batch-1 call reads its weights from DRAM faster."


def render_markdown(report: dict) -> str:
    """A short human-readable summary of one deploy report."""
    name = f"{report.get('target')}-{report.get('precision')}"
    acc, fa = report.get("accuracy"), report.get("float_accuracy")
    lines = [f"# Deploy report: {name}", "",
             "| runtime | size (bytes) | float size | params | accuracy | float accuracy | agreement | max abs diff |",
             "|---|---|---|---|---|---|---|---|",
             f"| {report.get('runtime', '-')} | {report.get('size_bytes', '-')} | "
             f"{report.get('float_size_bytes', '-')} | {report.get('params', '-')} | "
             f"{_fmt(None if acc is None else 100 * acc, '.2f')}% | {_fmt(None if fa is None else 100 * fa, '.2f')}% | "
             f"{_fmt(report.get('agreement'), '.4f')} | {_fmt(report.get('max_abs_diff'), '.3g')} |", ""]
    inp = report.get("input")
    if inp:  # what the file takes, in one line: the first thing a user wiring it up needs
        rng = inp.get("range") or ["?", "?"]
        channels = f", channels {inp['channel_order']}" if inp.get("channel_order") else ""
        lo, hi = (f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in rng)
        lines += [f"Input: {inp['dtype']} {inp['layout']} {inp['shape']}, values {lo}..{hi}"
                  f" ({inp.get('range_from')}){channels}" + (f"; {inp['note']}" if inp.get("note") else ""), ""]
    lat = report.get("latency_ms") or {}
    if lat:
        lines += ["| latency (ms) | p50 | p90 | p99 | runs |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['p50']:.4f} | {v['p90']:.4f} | {v['p99']:.4f} | {v['runs']} |" for k, v in lat.items()]
        bound = bound_line(report)
        if bound:
            lines.append(f"\n{bound}")
        lines.append("")
    gates = report.get("gates") or {}
    if gates:
        lines += ["| gate | limit | measured | margin | passed |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(g.get('limit'))} | {_fmt(g.get('measured'))} | {_fmt(g.get('margin'))} | "
                  f"{'-' if g.get('passed') is None else ('yes' if g['passed'] else 'NO')} |"
                  for k, g in gates.items()]
        lines.append("")
    checks = report.get("checks") or {}
    if checks:
        lines.append("Checks:")
        for k, c in checks.items():
            state = ("not checked" if not c.get("checked") else "measured" if c.get("passed") is None
                     else "passed" if c["passed"] else "FAILED")
            lines.append(f"- {k}: {state} — {c.get('message') or c.get('reason') or ''}".rstrip(" —"))
        lines.append("")
    return "\n".join(lines)


def finalize(out_dir: Path, report: dict, max_latency_ms: float | None,
             max_accuracy_drop: float | None) -> str | None:
    """Add ``report["gates"]``, write report.json/report.md, return the failure message (or None).

    The caller raises ``GateFailed`` with the message; the artifact stays on disk either way.
    """
    report["gates"] = evaluate_gates(report, max_latency_ms, max_accuracy_drop)
    write_report(out_dir, report)
    msg = gate_failure_message(report["gates"])
    return None if msg is None else f"{report.get('target')}-{report.get('precision')}: " + msg.replace(
        "\n", f"\n{report.get('target')}-{report.get('precision')}: ")


def write_report(out_dir: Path, report: dict) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir`` (each via temp file + os.replace)."""
    out_dir = Path(out_dir)
    j = atomic_write_json(out_dir / "report.json", report)
    m = atomic_write_text(out_dir / "report.md", render_markdown(report))
    return j, m
