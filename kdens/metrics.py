"""Classification metrics on logits or log-probabilities (pure numpy/torch)."""

from __future__ import annotations

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
