"""Hinton's loss and logit matching: pure tensor-in, tensor-out functions.

The methods ``kd``, ``soft`` and ``logits`` (``distill.methods``, whose registry picks
them by ``--method``) compute these, with one calling convention,
``loss(student_logits, teacher_scores, y)``:

* ``kd``     -- Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural
  Network": a hard cross-entropy term plus the T^2-scaled KL to the softened teacher.
* ``soft``   -- the same with no hard term (alpha = 0); needs no labels.
* ``logits`` -- Ba & Caruana (2014), "Do Deep Nets Really Need to be Deep?": squared
  error between zero-meaned logits, the high-temperature limit of ``soft``.

Teacher scores are whatever the soft-target cache holds: teacher logits, or teacher
log-probabilities (ensembles and specialist combinations answer in log-probabilities).
Both are softened as ``log_softmax(s_t / T)``. For logits that is the paper's
``softmax(z_t / T)``; for log-probabilities ``log p`` it is ``p^(1/T)`` renormalized,
which is the same distribution because ``log p`` differs from the logits only by a
per-row constant, and softmax ignores per-row constants (also after dividing by T).

Reductions: the KL is summed over classes and averaged over the batch (PyTorch's
``batchmean``); cross-entropy is averaged over the batch. Losses are computed in at
least float32 (half / bfloat16 inputs are upcast so autocast does not hurt the soft
term), float64 inputs stay float64.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from kdens.errors import ConfigError, ModelError

def _finite_float(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _check_temperature(temperature: float) -> None:
    t = _finite_float(temperature)
    if t is None or t <= 0:
        raise ConfigError(
            f"--temperature must be a finite number > 0, got {temperature!r}; "
            "the paper uses values between 1 and 20"
        )


def _check_alpha(alpha: float) -> None:
    a = _finite_float(alpha)
    if a is None or not 0.0 <= a <= 1.0:
        raise ConfigError(
            f"--alpha must lie in [0, 1] (weight of the hard-label loss), got {alpha!r}"
        )


def _check_shapes(student_logits: Tensor, teacher_scores: Tensor, y: Tensor | None) -> None:
    if student_logits.ndim != 2:
        raise ModelError(
            f"student logits must have shape (batch, classes), got {tuple(student_logits.shape)}"
        )
    if teacher_scores.shape != student_logits.shape:
        raise ModelError(
            f"student logits {tuple(student_logits.shape)} and teacher scores "
            f"{tuple(teacher_scores.shape)} differ in shape; build the student with as many "
            "classes as the teacher predicts"
        )
    if y is not None and tuple(y.shape) != (student_logits.shape[0],):
        raise ModelError(
            f"labels must have shape ({student_logits.shape[0]},), got {tuple(y.shape)}"
        )


def _work_dtype(t: Tensor) -> torch.dtype:
    # half precision loses the small differences between softened distributions
    return torch.promote_types(t.dtype, torch.float32)


def soft_kl(student_logits: Tensor, teacher_scores: Tensor, temperature: float) -> Tensor:
    """KL(softmax(s_t / T) || softmax(z_s / T)), summed over classes, mean over batch.

    Not scaled by T^2; ``kd_loss`` applies the scale. Classes the teacher gives
    probability exactly zero (log-probability ``-inf``) contribute 0 (0 log 0 = 0).

    Args:
        student_logits: student logits z_s, (B, C).
        teacher_scores: teacher logits or log-probabilities s_t, (B, C).
        temperature: softening temperature T > 0.

    Returns:
        Scalar tensor.
    """
    dtype = _work_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)  # (B, C)
    # -inf (p = 0) becomes the most negative finite number: exp() of it is still exactly 0,
    # and 0 * (finite) = 0 where 0 * (-inf) would be NaN
    log_p = F.log_softmax(teacher_scores.to(dtype) / temperature, dim=1).clamp_min(torch.finfo(dtype).min)
    # one fused op (forward and backward): sum_k p (log p - log q), mean over the batch;
    # identical inputs give exactly 0. It runs every step, so its cost is the distillation overhead.
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def kd_loss(
    student_logits: Tensor,
    teacher_scores: Tensor,
    y: Tensor | None,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Knowledge-distillation loss of Hinton, Vinyals & Dean (2015).

    ``L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(softmax(s_t/T) || softmax(z_s/T))``

    The gradient of the KL term w.r.t. z_s is ``(q - p) / T``, which for large T shrinks
    like 1/T^2 (section 2.1 of the paper); the T^2 factor keeps the soft term's
    gradient scale independent of T, so changing T does not silently re-weight
    the hard and soft terms. A term whose weight is zero is not computed, so
    ``alpha = 1`` is exactly cross-entropy and ``alpha = 0`` needs no labels.

    Args:
        student_logits: student logits z_s, (B, C).
        teacher_scores: teacher logits or log-probabilities at T = 1, (B, C); see the
            module docstring for why both are softened as ``log_softmax(s_t / T)``.
        y: integer labels (B,), or None for an unlabeled transfer set (needs alpha = 0).
        temperature: softening temperature T > 0.
        alpha: weight of the hard-label term, in [0, 1].

    Returns:
        Scalar tensor.

    Raises:
        ConfigError: bad temperature or alpha, or labels missing while alpha > 0.
        ModelError: shapes of logits, scores and labels disagree.
    """
    _check_temperature(temperature)
    _check_alpha(alpha)
    if y is None and alpha > 0:
        raise ConfigError(
            f"--alpha {alpha} weights a hard-label loss, but this transfer set has no labels; "
            "use --alpha 0 (or --loss soft) with an unlabeled transfer set"
        )
    _check_shapes(student_logits, teacher_scores, y)
    dtype = _work_dtype(student_logits)
    loss = student_logits.new_zeros((), dtype=dtype)
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(student_logits.to(dtype), y.long())
    if alpha < 1:
        soft = soft_kl(student_logits, teacher_scores, temperature)
        loss = loss + (1.0 - alpha) * temperature**2 * soft
    return loss


def soft_loss(
    student_logits: Tensor,
    teacher_scores: Tensor,
    y: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Soft-target loss only: ``T^2 * KL(softmax(s_t/T) || softmax(z_s/T))``.

    ``kd_loss`` with ``alpha = 0``; labels are accepted for a uniform calling
    convention and ignored.

    Args:
        student_logits: student logits z_s, (B, C).
        teacher_scores: teacher logits or log-probabilities, (B, C).
        y: ignored.
        temperature: softening temperature T > 0.

    Returns:
        Scalar tensor.
    """
    return kd_loss(student_logits, teacher_scores, None, temperature, 0.0)


def logit_matching_loss(student_logits: Tensor, teacher_scores: Tensor) -> Tensor:
    """Logit matching of Ba & Caruana (2014): L2 between zero-meaned logits.

    ``L = mean_b (1 / (2C)) * sum_k (zbar_s[b,k] - zbar_t[b,k])^2``, with
    ``zbar = z - mean_k z`` per row, i.e. half the mean squared error over all
    (B, C) entries.

    The 1/(2C) scale is chosen so that this is exactly the large-T limit of the soft
    term: for zero-meaned logits, ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) ->
    (1/(2C)) sum_k (z_s,k - z_t,k)^2`` as T -> inf (second-order expansion of the KL
    around the uniform distribution, Hinton et al. 2015, section 2.1). So ``soft`` at
    a high temperature and ``logits`` are on the same scale and can share a learning
    rate. Zero-meaning makes teacher log-probabilities and teacher logits give the
    same loss (they differ by a per-row constant).

    Args:
        student_logits: student logits z_s, (B, C).
        teacher_scores: teacher logits or log-probabilities, (B, C); must be finite.

    Returns:
        Scalar tensor.
    """
    _check_shapes(student_logits, teacher_scores, None)
    dtype = _work_dtype(student_logits)
    zs = student_logits.to(dtype)
    zt = teacher_scores.to(dtype)
    diff = (zs - zs.mean(dim=1, keepdim=True)) - (zt - zt.mean(dim=1, keepdim=True))  # (B, C)
    return 0.5 * diff.pow(2).mean()
