"""Combining ensemble members' predictions into one teacher distribution.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", §1 and
§3: the cumbersome model can be an ensemble, and its soft targets are the members'
distributions averaged. Two averages are offered, both at a temperature T:

* arithmetic: ``p(c) = 1/K sum_k softmax(z_k / T)_c`` — the mixture; what the paper
  uses for the ensemble teacher.
* geometric: ``p(c) ∝ prod_k softmax(z_k / T)_c^(1/K)`` renormalized — the product of
  experts; it sharpens where members agree. Because each member's log-softmax differs
  from ``z_k / T`` by a per-example constant, this equals ``softmax(mean_k z_k / T)``.

Everything is computed in log space with ``logsumexp`` so that a member that is very
sure (probabilities underflowing to zero) cannot produce ``log 0``.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import torch

from kdens import metrics
from kdens.errors import ConfigError

METHODS = ("arithmetic", "geometric")


def _check_logits(member_logits: torch.Tensor) -> torch.Tensor:
    z = torch.as_tensor(member_logits)
    if z.ndim != 3 or z.shape[0] < 1 or z.shape[2] < 2:
        raise ConfigError(
            f"member_logits must have shape (K members, N examples, C >= 2 classes), "
            f"got {tuple(z.shape)}; stack the members' logits with torch.stack(list, 0)"
        )
    if not z.is_floating_point():
        z = z.to(torch.float32)
    return z


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(
            f"unknown ensemble combination method {method!r}; valid: {', '.join(METHODS)}"
        )


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")


def combine_log_probs(
    member_logits: torch.Tensor, method: str = "arithmetic", temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities of the ensemble's combined distribution.

    arithmetic: ``log p = logsumexp_k log_softmax(z_k / T) - log K``.
    geometric:  ``log p = log_softmax(mean_k log_softmax(z_k / T))``.

    Args:
        member_logits: logits of K members on the same N examples, shape (K, N, C).
        method: ``"arithmetic"`` or ``"geometric"``.
        temperature: softmax temperature T > 0 applied to every member.

    Returns:
        Log-probabilities, shape (N, C); ``exp`` of each row sums to 1.

    Raises:
        ConfigError: unknown method, bad temperature or bad shape.
    """
    _check_method(method)
    _check_temperature(temperature)
    z = _check_logits(member_logits)
    log_p = torch.log_softmax(z / temperature, dim=2)  # (K, N, C)
    if method == "arithmetic":
        return torch.logsumexp(log_p, dim=0) - math.log(z.shape[0])  # (N, C)
    # geometric: the normalized product of experts
    return torch.log_softmax(log_p.mean(dim=0), dim=1)  # (N, C)


def member_disagreement(member_logits: torch.Tensor) -> float:
    """Mean over pairs of members of the fraction of examples whose top-1 classes differ.

    Diversity is what makes an ensemble beat its members; zero means the members are
    interchangeable. A single member has no pairs and disagrees with no one: 0.0.

    Args:
        member_logits: shape (K, N, C).
    """
    z = _check_logits(member_logits)
    top = z.argmax(dim=2)  # (K, N)
    pairs = list(combinations(range(z.shape[0]), 2))
    if not pairs or z.shape[1] == 0:
        return 0.0
    return float(np.mean([(top[i] != top[j]).double().mean().item() for i, j in pairs]))


def _metrics(log_p: torch.Tensor, y: np.ndarray) -> dict:
    s = log_p.detach().cpu().double().numpy()
    return {
        "accuracy": metrics.accuracy(s, y),
        "errors": metrics.errors(s, y),
        "nll": metrics.nll(s, y),
        "ece": metrics.ece(s, y),
    }


def ensemble_metrics(
    member_logits: torch.Tensor,
    y,
    method: str = "arithmetic",
    temperature: float = 1.0,
) -> dict:
    """Per-member and ensemble accuracy, errors, NLL and ECE, plus disagreement.

    Members are scored at the same temperature as the ensemble so that NLL and ECE
    compare like with like (accuracy does not depend on T).

    Args:
        member_logits: shape (K, N, C).
        y: true labels, shape (N,).
        method: combination method, see :func:`combine_log_probs`.
        temperature: softmax temperature T > 0.

    Returns:
        ``{"method", "temperature", "num_members", "members": [dict per member],
        "ensemble": dict, "mean_member_accuracy", "best_member_accuracy",
        "disagreement"}``; every metric dict has accuracy, errors, nll, ece.
    """
    _check_method(method)
    _check_temperature(temperature)
    z = _check_logits(member_logits)
    y = np.asarray(torch.as_tensor(y).cpu())
    if y.shape != (z.shape[1],):
        raise ConfigError(
            f"labels y have shape {y.shape} but member_logits hold {z.shape[1]} examples; "
            "pass the labels of the split the members were run on"
        )
    members = [_metrics(torch.log_softmax(z[k] / temperature, dim=1), y) for k in range(z.shape[0])]
    accs = [m["accuracy"] for m in members]
    return {
        "method": method,
        "temperature": float(temperature),
        "num_members": int(z.shape[0]),
        "members": members,
        "ensemble": _metrics(combine_log_probs(z, method, temperature), y),
        "mean_member_accuracy": float(np.mean(accs)),
        "best_member_accuracy": float(np.max(accs)),
        "disagreement": member_disagreement(z),
    }
