"""Classification metrics on logits or log-probabilities (pure numpy/torch)."""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_log_probs(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Log-softmax of logits; log-probabilities pass through unchanged."""
    t = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    return torch.log_softmax(t, dim=1).numpy()  # (N, C)


def accuracy(scores, y) -> float:
    """Top-1 accuracy of logits or log-probabilities ``scores`` (N, C) against labels ``y``."""
    y = np.asarray(y)
    if len(y) == 0:
        return float("nan")
    return float((np.asarray(scores).argmax(1) == y).mean())


def errors(scores, y) -> int:
    """Number of top-1 mistakes, the unit the paper reports."""
    return int((np.asarray(scores).argmax(1) != np.asarray(y)).sum())


def nll(scores, y) -> float:
    """Mean negative log-likelihood of the true labels (natural log)."""
    lp = _as_log_probs(scores)
    y = np.asarray(y)
    return float(-lp[np.arange(len(y)), y].mean())


def ece(scores, y, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017).

    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|.
    """
    p = np.exp(_as_log_probs(scores))
    conf = p.max(1)
    correct = p.argmax(1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins so that confidence 1.0 lands in the last bin
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def agreement(scores_a, scores_b) -> float:
    """Fraction of examples on which two predictors' top-1 classes agree."""
    return float((np.asarray(scores_a).argmax(1) == np.asarray(scores_b).argmax(1)).mean())


def confusion_matrix(scores, y, num_classes: int) -> np.ndarray:
    """Counts (C, C): rows are true classes, columns predicted classes."""
    pred = np.asarray(scores).argmax(1)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y), pred), 1)
    return cm


def summary(scores, y, prefix: str = "") -> dict:
    """accuracy, errors and NLL under ``{prefix}accuracy`` etc."""
    return {
        f"{prefix}accuracy": accuracy(scores, y),
        f"{prefix}errors": errors(scores, y),
        f"{prefix}nll": nll(scores, y),
    }


def _noise(a: int, b: int) -> float:
    """Twice the standard error of a difference of two error counts on one split, ``2 * sqrt(a + b)``."""
    return 2.0 * math.sqrt(a + b)


def worse_than_baseline(baseline_errors: int | None, student_errors: int | None) -> str | None:
    """Why a distilled student counts as worse than its hard-label baseline, or None.

    Worse means more test errors than the baseline by more than the noise ``gap_recovered``
    allows a teacher's lead, ``2 * sqrt(b + s)``. A run can pass every check of
    ``kdens.health`` (it learned *something*) and still be wrecked: a 30-30 student distilled
    at T = 8 without gradient clipping ended at 8,083 test errors against its baseline's 291.
    """
    if baseline_errors is None or student_errors is None:
        return None
    b, s = int(baseline_errors), int(student_errors)
    noise = _noise(b, s)
    if s - b <= noise:
        return None
    return (f"the student makes {s} test errors, its hard-label baseline {b}: distillation made it worse by "
            f"more than sampling noise (2 * sqrt({b} + {s}) = {noise:.0f})")


def gap_recovered(baseline_errors: int | None, teacher_errors: int | None,
                  student_errors: int | None) -> tuple[float | None, str | None]:
    """Share of the baseline-to-teacher error gap a student closed, or (None, why not).

    ``(b - s) / (b - t)`` divides by the teacher's lead, so a lead inside the test split's
    sampling noise turns a few errors either way into any ratio at all (a 6-error lead once
    printed -57.5). The ratio is given only when the lead exceeds twice the standard error of a
    difference of two error counts on the same split, ``2 * sqrt(b + t)`` (each count taken as
    Poisson and the two as independent; errors of models on one split are positively
    correlated, so this overstates the noise and errs towards "n/a"). Otherwise None with the
    reason, in words a report can show.
    """
    if None in (baseline_errors, teacher_errors, student_errors):
        return None, "needs the baseline's, the teacher's and the student's test errors"
    b, t, s = int(baseline_errors), int(teacher_errors), int(student_errors)
    noise = _noise(b, t)
    if b <= t:
        return None, f"the teacher ({t} test errors) is not better than the baseline ({b}): nothing to recover"
    if b - t <= noise:
        return None, (f"the teacher's lead over the baseline ({b} - {t} = {b - t} test errors) is within "
                      f"sampling noise (2 * sqrt({b} + {t}) = {noise:.0f})")
    return (b - s) / (b - t), None
