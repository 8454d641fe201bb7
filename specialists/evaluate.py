"""Generalist versus generalist + specialists, broken down as in Hinton et al. 2015, Tables 3-4.

The paper reports the combined model's gain by the number of active specialists that
cover the correct class: examples no specialist covers cannot gain, and the gain grows
with coverage. These functions are pure: scores and labels in, a JSON-ready dict out.
"""

from __future__ import annotations

import numpy as np
import torch

from kdens.errors import ConfigError


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _compare(gen_ok: np.ndarray, comb_ok: np.ndarray, mask: np.ndarray) -> dict:
    """Counts and accuracies of both models on the examples selected by ``mask``."""
    n = int(mask.sum())
    g, c = int(gen_ok[mask].sum()), int(comb_ok[mask].sum())
    return {
        "count": n,
        "generalist_correct": g,
        "combined_correct": c,
        "delta_correct": c - g,
        "generalist_accuracy": g / n if n else None,
        "combined_accuracy": c / n if n else None,
        # the paper's "relative accuracy change": extra correct answers per generalist one
        "relative_improvement": (c - g) / g if g else None,
    }


def breakdown(gen_scores, comb_scores, y, groups: list[list[int]], active) -> dict:
    """Generalist vs combined accuracy, overall and where specialists can matter.

    Args:
        gen_scores: generalist logits or log-probabilities, shape (N, C).
        comb_scores: combined log-probabilities (from :func:`specialists.combine.combine`), (N, C).
        y: true labels, shape (N,).
        groups: the specialists' class groups (M of them).
        active: (N, M) bool, which specialists took part for each example.

    Returns:
        ``{"overall", "any_active", "by_covering", "per_group"}``: ``overall`` and
        ``any_active`` (examples with at least one active specialist) are comparison
        dicts (count, correct counts, accuracies, delta and relative improvement);
        ``by_covering`` is a list of those with ``n_covering`` = number of active
        specialists whose group holds the true class (0, 1, 2, ...); ``per_group``
        one per group with ``group``, over the examples whose true class is in it.
    """
    gen, comb, y, act = _np(gen_scores), _np(comb_scores), _np(y).astype(np.int64), _np(active).astype(bool)
    n, c = gen.shape
    if comb.shape != (n, c) or y.shape != (n,) or act.shape != (n, len(groups)):
        raise ConfigError(
            f"shape mismatch: gen_scores {gen.shape}, comb_scores {comb.shape}, y {y.shape}, "
            f"active {act.shape} for {len(groups)} groups; all must describe the same N examples"
        )
    gen_ok = gen.argmax(1) == y  # (N,)
    comb_ok = comb.argmax(1) == y  # (N,)
    member = np.zeros((c, len(groups)), dtype=bool)  # (C, M)
    for m, g in enumerate(groups):
        member[list(g), m] = True
    covering = (act & member[y]).sum(1)  # (N,) active specialists whose group holds y
    everything = np.ones(n, dtype=bool)
    by_covering = [
        {"n_covering": int(k), **_compare(gen_ok, comb_ok, covering == k)}
        for k in range(int(covering.max(initial=0)) + 1)
    ]
    per_group = [
        {"group": [int(k) for k in g], **_compare(gen_ok, comb_ok, member[y, m])}
        for m, g in enumerate(groups)
    ]
    return {
        "overall": _compare(gen_ok, comb_ok, everything),
        "any_active": _compare(gen_ok, comb_ok, act.any(1)),
        "by_covering": by_covering,
        "per_group": per_group,
    }
