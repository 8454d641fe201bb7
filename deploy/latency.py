"""Latency measurement: percentiles over timed runs, CPU pinning, and a memory-bandwidth bound.

What is timed is one call of the runtime on an already prepared batch (inputs converted,
session built), the way a serving loop calls it; conversion of inputs is not timed.
Thread counts are set on the runtime (ORT ``intra_op_num_threads``, LiteRT
``num_threads``, ``torch.set_num_threads`` for eager PyTorch); the process is also pinned
to that many CPUs with ``os.sched_setaffinity`` where the OS allows it, so that
single-thread numbers do not migrate between cores.

For MLPs at batch 1 the lower bound on latency is reading every weight once from
memory: ``weight bytes / bandwidth`` (``latency_bound_ms``). It is only a bound when the
weights do not fit in the last-level cache; small students do fit, and runtimes beat it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kdens.errors import ConfigError


def measure(run_fn: Callable[[np.ndarray], Any], x_batch: np.ndarray, warmup: int = 10,
            min_runs: int = 50, min_seconds: float = 0.5, max_runs: int = 100_000) -> dict:
    """Time ``run_fn(x_batch)`` repeatedly and return latency percentiles in milliseconds.

    Runs ``warmup`` untimed calls, then timed calls until both ``min_runs`` calls and
    ``min_seconds`` seconds are reached (or ``max_runs``). Each call is timed on its own with
    ``time.perf_counter_ns``.

    Returns:
        ``{"p50", "p90", "p99", "mean", "min", "runs"}`` (ms, except runs).
    """
    if min_runs < 1:
        raise ConfigError(f"min_runs={min_runs} must be >= 1")
    # edge_runner ships alone in device bundles (numpy only), so the loop lives there
    from deploy.edge_runner import percentiles

    return percentiles(run_fn, x_batch, warmup, min_runs, min_seconds, max_runs=max_runs)


def interleaved_rounds(jobs: dict, rounds: int, warmup: int, min_runs: int, min_seconds: float) -> dict:
    """Time every job once per round, for ``rounds`` rounds, the order rotated one step each round.

    ``jobs``: key -> (run_fn, prepared batch). Returns key -> one :func:`measure` dict per
    round. Interleaving makes load drift on a shared machine hit every job alike, where
    timing them one after another lets the drift decide a close ranking. The caller pins.
    """
    keys = list(jobs)
    out: dict = {k: [] for k in keys}
    for r in range(rounds):
        k0 = r % len(keys) if keys else 0
        for key in keys[k0:] + keys[:k0]:
            fn, xb = jobs[key]
            out[key].append(measure(fn, xb, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds))
    return out


def other_load_is_high(cpus: float, ncpu: int | None = None) -> bool:
    """Whether other processes were busy enough while timing to doubt a close ranking.

    A quarter of a CPU on a small board, or a tenth of the machine on a big one: pinned
    runs share caches and memory bandwidth with whatever else runs, but a few daemons on a
    64-core host do not disturb them the way one busy neighbour does on 2 cores.
    """
    ncpu = ncpu or os.cpu_count() or 1
    return cpus > max(0.25, 0.1 * ncpu)


def busy_seconds(stat_line: str, clk_tck: int) -> float | None:
    """Busy CPU-seconds in /proc/stat's first line (``cpu user nice system idle iowait irq softirq steal``).

    Steal counts as busy: it is the host's other VMs taking this machine's CPUs.
    """
    fields = stat_line.split()
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / clk_tck


def _machine_busy_seconds() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (None off Linux)."""
    try:
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return busy_seconds(line, os.sysconf("SC_CLK_TCK"))


def other_cpus(busy: float | None, own: float, wall: float) -> float | None:
    """CPUs others kept busy: the machine's busy seconds less this process's, over the wall time."""
    if busy is None or wall <= 0:
        return None
    return max(0.0, (busy - own) / wall)


class OtherLoad:
    """How many CPUs other processes kept busy, on average, while a block ran.

    Machine busy time minus this process's CPU time, over the wall time. Contention does
    not slow every runtime alike (on the 2-core box here, a neighbour job took int8 ORT's
    lead over float XNNPACK on a small CNN from 1.2x to nothing), so a latency ranking
    taken under load is reported with the load it was taken under. ``cpus`` is None where
    /proc/stat does not exist.
    """

    def __enter__(self) -> OtherLoad:
        self.cpus: float | None = None
        self._t, self._busy, self._own = time.perf_counter(), _machine_busy_seconds(), time.process_time()
        return self

    def __exit__(self, *exc) -> bool:
        busy, wall = _machine_busy_seconds(), time.perf_counter() - self._t
        if busy is not None and self._busy is not None:
            self.cpus = other_cpus(busy - self._busy, time.process_time() - self._own, wall)
        return False


def median_ci(ratios, n_boot: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of paired per-round ratios (seeded, so reports reproduce)."""
    r = np.asarray(ratios, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(r), size=(n_boot, len(r)))
    meds = np.median(r[idx], axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def paired_ratio(a, b) -> dict:
    """a / b round by round (both timed in the same rounds): median, 95% interval, rounds a was slower."""
    r = np.asarray(a, dtype=float) / np.asarray(b, dtype=float)
    lo, hi = median_ci(r)
    return {"median": float(np.median(r)), "ci95": [lo, hi], "rounds_slower": int((r > 1).sum()), "rounds": len(r)}


def paired_verdict(choice, ort, tfl, ort_aa, tfl_aa) -> dict:
    """A chosen artifact against the best of two hand-made files, round by round, beside an A/A control.

    Per round: choice / min(hand ORT, hand LiteRT), and the A/A ratio min(second sessions) /
    min(first sessions) — identical work, so it shows how far apart two timings of the same
    thing land. "slower" needs the choice's interval above 1 *and* above the A/A interval;
    "faster" needs it below 1; anything else is a tie at this measurement's resolution.
    """
    hand = np.minimum(ort, tfl)
    c = paired_ratio(choice, hand)
    aa = paired_ratio(np.minimum(ort_aa, tfl_aa), hand)
    (lo, hi), aa_hi = c["ci95"], aa["ci95"][1]
    verdict = "faster" if hi < 1 else "slower" if lo > 1 and lo > aa_hi else "tie"
    return {"ratio_median": c["median"], "ratio_ci95": c["ci95"], "rounds_slower": c["rounds_slower"],
            "aa_ratio_median": aa["median"], "aa_ci95": aa["ci95"], "aa_rounds_slower": aa["rounds_slower"],
            "verdict": verdict, "never_slower": verdict != "slower"}


def latency_key(batch_size: int, threads: int) -> str:
    """Key of one measurement in ``report["latency_ms"]``, e.g. ``b1_t1``."""
    return f"b{batch_size}_t{threads}"


@contextlib.contextmanager
def pinned(n_threads: int) -> Iterator[list[int] | None]:
    """Pin this process to the first ``n_threads`` CPUs it may use; restore on exit.

    Yields the CPU list, or None where affinity cannot be set (macOS, containers that
    forbid it) — measurements then run unpinned.
    """
    try:
        before = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        yield None
        return
    cpus = sorted(before)[:max(1, n_threads)]
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        yield None
        return
    try:
        yield cpus
    finally:
        os.sched_setaffinity(0, before)


def batch_of(x: np.ndarray, batch_size: int) -> np.ndarray:
    """The first ``batch_size`` rows of ``x``, tiled if ``x`` is shorter."""
    reps = -(-batch_size // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size] if reps > 1 else x[:batch_size])


def latency_grid(make_run_fn: Callable[[int, int], Callable[[np.ndarray], Any]], x: np.ndarray,
                 batch_sizes: tuple[int, ...], threads: tuple[int, ...], *, warmup: int = 10,
                 min_runs: int = 50, min_seconds: float = 0.5,
                 prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[dict, dict]:
    """Measure every (batch size, thread count) pair.

    Args:
        make_run_fn: ``(batch_size, threads) -> run_fn``; builds the session/interpreter
            with that many threads (called while the process is pinned).
        x: Real inputs; batches are their first rows.
        batch_sizes: Batch sizes to measure.
        threads: Thread counts to measure.
        warmup: Untimed calls per pair.
        min_runs: Timed calls at least per pair.
        min_seconds: Timed seconds at least per pair.
        prepare: Optional conversion of a float batch into what ``run_fn`` takes (e.g. int8).

    Returns:
        ``(latency_ms, env)``: ``{"b1_t1": {"p50", ...}, ...}`` and
        ``{"pinned_cpus": {"t1": [0], ...}, "cpu_count": n}``.
    """
    out: dict[str, dict] = {}
    pins: dict[str, list[int] | None] = {}
    for t in threads:
        with pinned(t) as cpus:
            pins[f"t{t}"] = cpus
            for bs in batch_sizes:
                xb = batch_of(x, bs)
                if prepare is not None:
                    xb = prepare(xb)
                run_fn = make_run_fn(bs, t)
                out[latency_key(bs, t)] = measure(run_fn, xb, warmup, min_runs, min_seconds)
    return out, {"pinned_cpus": pins, "cpu_count": os.cpu_count()}


def _last_level_cache_bytes() -> int:
    """Size of cpu0's largest cache from sysfs (Linux); 32 MiB if unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        txt = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        try:
            sizes.append(int(txt.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return max(sizes, default=32 << 20)


@functools.lru_cache(maxsize=4)
def memory_bandwidth_gbps(size_mb: int | None = None, repeats: int = 3) -> float:
    """Streaming memory bandwidth in GB/s from a numpy copy of a buffer far larger than cache.

    ``np.copyto`` of an n-byte buffer reads n and writes n bytes, so bandwidth is
    ``2 n / t`` with t the best of ``repeats`` copies. The buffer is 8x the last-level
    cache (64-512 MiB) unless ``size_mb`` is given. Cached per process (~0.3 s).
    """
    if size_mb is None:
        size_mb = min(512, max(64, 8 * _last_level_cache_bytes() >> 20))
    n = size_mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        best = min(best, (time.perf_counter_ns() - t0) / 1e9)
    return 2 * src.nbytes / best / 1e9


def latency_bound_ms(weight_bytes: int, bandwidth_gbps: float | None = None) -> dict:
    """Lower bound on batch-1 latency from streaming ``weight_bytes`` once from DRAM.

    Only a bound when the weights do not stay in the last-level cache between calls
    (``weights_fit_in_cache`` False); an int8 784-800-800-10 MLP (1.3 MB) fits in a 32 MB
    L3, and a warm runtime then beats the DRAM number.

    Returns ``{"latency_bound_ms", "weight_bytes", "bandwidth_gbps", "cache_bytes",
    "weights_fit_in_cache"}``.
    """
    bw = memory_bandwidth_gbps() if bandwidth_gbps is None else bandwidth_gbps
    llc = _last_level_cache_bytes()
    return {"latency_bound_ms": weight_bytes / (bw * 1e9) * 1e3, "weight_bytes": int(weight_bytes),
            "bandwidth_gbps": bw, "cache_bytes": llc, "weights_fit_in_cache": weight_bytes <= llc}


def torch_latency(model, x: np.ndarray, batch_sizes: tuple[int, ...], threads: tuple[int, ...],
                  **kw: Any) -> tuple[dict, dict]:
    """Eager PyTorch latency grid (``torch.set_num_threads``), the baseline the exports beat."""
    import torch

    model = model.eval()
    before = torch.get_num_threads()

    def make(bs: int, t: int):
        torch.set_num_threads(t)

        def run(xb: np.ndarray):
            with torch.inference_mode():
                return model(torch.from_numpy(xb))
        return run

    try:
        return latency_grid(make, x, batch_sizes, threads, **kw)
    finally:
        torch.set_num_threads(before)
