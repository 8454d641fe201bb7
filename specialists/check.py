"""Does each specialist help? A check on the validation split before the combination uses it.

A specialist that is worse than the generalist on its own group still changes every
example where it takes part (issue 17: a 2-class specialist with validation NLL 0.031 vs
the generalist's 0.023 pulled its group from 76.5% to 74.0% on the test split). So each
specialist is scored on the validation split exactly as the combination would use it --
alone with the generalist, active where the generalist's top-n classes meet its group,
combined by :func:`specialists.combine.combine` -- against the generalist alone on the
same examples (where it is inactive the combination *is* the generalist, so those
examples cannot tell the two apart).

**Rule** (:data:`RULE`): keep a specialist when, over the validation examples where it
takes part, the combination's total negative log-likelihood is lower than the
generalist's *and* it does not lose correct answers. Otherwise it is dropped, and the
combination leaves its group to the generalist. NLL decides because it is the loss both
models were trained on and, unlike accuracy on a few hundred examples, it moves with
every example; the accuracy condition stops one whose lower NLL comes with fewer correct
answers. No retraining: a dropped specialist's
group is simply served by the generalist.

With top-n = 1 and disjoint groups at most one specialist is active per example, so the
check alone equals the check together; with a larger top-n it is the specialist's own
contribution, which is what deciding about it one at a time needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kdens.train import predict_logits
from specialists.combine import active_specialists, combine

RULE = ("keep a specialist when, on the validation examples where it takes part (the generalist's top-n classes "
        "meet its group), generalist + it has a lower total NLL than the generalist alone and no fewer correct "
        "answers; otherwise drop it and leave its group to the generalist")


def _scores(log_p: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """(summed NLL, correct answers) of log-probabilities (n, C) on labels (n,)."""
    if not len(y):
        return 0.0, 0
    return float(-log_p[np.arange(len(y)), y].sum()), int((log_p.argmax(1) == y).sum())


def check_one(log_pg: torch.Tensor, p_m: torch.Tensor, group: list[int], y, top_n: int) -> dict:
    """The check of one specialist from its outputs; pure (tensors in, a JSON-ready dict out).

    Args:
        log_pg: the generalist's log-probabilities on the validation split, (N, C) float64.
        p_m: the specialist's probabilities on the same examples, (N, |S| + 1), dustbin last.
        group: its classes S.
        y: validation labels (N,).
        top_n: as the combination uses it.

    Returns:
        ``keep``, ``reason`` and the numbers behind them: on the examples where it takes
        part (``active``) and on the examples of its group (``group``, true class in S),
        the count, mean NLL and accuracy of the generalist and of generalist + specialist.
    """
    y = np.asarray(y, dtype=np.int64)
    p_g = log_pg.exp()
    active = active_specialists(p_g, [list(group)], top_n)  # (N, 1)
    log_q, _ = combine(p_g, [p_m.to(p_g.dtype)], [list(group)], active)
    lg, lq = log_pg.numpy(), log_q.numpy()
    out: dict = {}
    for name, mask in (("active", active[:, 0].numpy()), ("group", np.isin(y, list(group)))):
        n = int(mask.sum())
        (nll_g, ok_g), (nll_c, ok_c) = _scores(lg[mask], y[mask]), _scores(lq[mask], y[mask])
        out[name] = {"count": n,
                     "generalist_nll": nll_g / n if n else None, "combined_nll": nll_c / n if n else None,
                     "generalist_accuracy": ok_g / n if n else None, "combined_accuracy": ok_c / n if n else None,
                     "generalist_correct": ok_g, "combined_correct": ok_c,
                     "nll_change": (nll_c - nll_g) / n if n else None}
    a = out["active"]
    if a["count"] == 0:
        keep, reason = False, "it never takes part on the validation split, so nothing shows that it helps"
    elif not a["combined_nll"] < a["generalist_nll"]:
        keep, reason = False, (f"validation NLL where it takes part rises from {a['generalist_nll']:.4f} "
                               f"(generalist) to {a['combined_nll']:.4f} (with it), n={a['count']}")
    elif a["combined_correct"] < a["generalist_correct"]:
        keep, reason = False, (f"validation accuracy where it takes part falls from {a['generalist_accuracy']:.4f} "
                               f"to {a['combined_accuracy']:.4f} ({a['generalist_correct'] - a['combined_correct']} "
                               f"fewer correct of {a['count']}) although NLL falls")
    else:
        keep, reason = True, (f"validation NLL where it takes part falls from {a['generalist_nll']:.4f} to "
                              f"{a['combined_nll']:.4f}, accuracy {a['generalist_accuracy']:.4f} -> "
                              f"{a['combined_accuracy']:.4f} (n={a['count']})")
    return {"keep": keep, "reason": reason, "top_n": int(top_n), **out}


def check_specialists(generalist: nn.Module, specialists: list[nn.Module], groups: list[list[int]], x_val, y_val,
                      top_n: int = 1, batch_size: int = 2048) -> list[dict]:
    """:func:`check_one` for every specialist on the validation split (x_val, y_val)."""
    log_pg = torch.log_softmax(predict_logits(generalist, x_val, batch_size).double(), 1)  # (N, C)
    return [check_one(log_pg, torch.softmax(predict_logits(model, x_val, batch_size).double(), 1), g, y_val, top_n)
            for model, g in zip(specialists, groups)]
