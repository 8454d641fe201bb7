"""Whether a training run learned anything: the checks ``fit`` runs during and after training.

A run that diverged, whose units died, or that ends where guessing would have ended must
not finish "successfully": it raises ``TrainingFailed`` (exit code 1) with what happened
and advice that fits the run's own settings, never repeating one already in force.

The rule after training, on the validation split, with the weights the run keeps:

- **Above chance.** ``k`` correct of ``n`` is tested one-sided against ``p0``, the larger of
  1/C and the majority class's share of the split: the run passes when
  ``P(X >= k | X ~ Binomial(n, p0)) < 0.001``. A split too small for any result to pass
  (``p0 ** n >= 0.001``) is not checked, and the record says so.
- **The loss improved.** The validation cross-entropy must be below that of always
  predicting the split's class frequencies (its entropy): the least any model that
  learned from the labels reaches.

Checks during training: the loss must stay finite, and the output must keep depending on
the input (every validation example getting identical logits means the units died).

Under the smoke-test cap (``KDENS_EPOCHS_CAP``, when it cut the run short) the after-training
rule is still computed and recorded, but a miss is a warning on stderr, not a failure: a run
cut to a few epochs is not expected to learn. The checks during training still fail it.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from kdens.errors import TrainingFailed

ALPHA = 0.001
"""Significance level of the above-chance test."""
GRAD_CLIP_ADVICE = 5.0
"""The --grad-clip suggested when none is set: what the examples use at high T."""


def _lr(value: float) -> float:
    return float(f"{value:.2g}")


def _steadier(cfg) -> list[tuple[str, object]]:
    """Settings that make steps smaller: a lower lr, and gradient clipping unless it is on."""
    changes: list[tuple[str, object]] = [("lr", _lr(cfg.resolved_lr / 10))]
    if cfg.grad_clip is None:
        changes.append(("grad_clip", GRAD_CLIP_ADVICE))
    return changes


def _fresh(changes: list[tuple[str, object]], cfg) -> list[tuple[str, object]]:
    """Drop suggestions already in force: advice must never repeat the run's own settings."""
    return [(k, v) for k, v in changes if getattr(cfg, k, None) != v]


def check_finite(pending: list[tuple[int, torch.Tensor]], epoch: int, cfg, desc: str) -> None:
    """Raise when one of the (step, loss) pairs of this epoch is NaN or infinite."""
    if not pending:
        return
    vals = torch.stack([v for _, v in pending])
    bad = ~torch.isfinite(vals)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise TrainingFailed(desc, f"the loss became {float(vals[i])} at epoch {epoch + 1}, step {pending[i][0] + 1}",
                             _fresh(_steadier(cfg), cfg), alternatives=["checking the inputs for NaN"])


def check_alive(logits: torch.Tensor, epoch: int, cfg, desc: str) -> None:
    """Stop a run whose output no longer depends on its input.

    Every validation example getting the same logits means the hidden units died (a ReLU
    net pushed far by one huge step); no later epoch can revive them, and the run would
    otherwise finish at chance. Seen with distillation at T=8 into a 30-30 MLP at SGD lr
    0.05 (the T^2-scaled soft gradient is up to T times a cross-entropy gradient early on),
    and with a conv net without normalization (examples/mymodels.py before it had BatchNorm).
    """
    if len(logits) < 2:
        return
    spread = float((logits - logits[0]).abs().max())
    if spread <= 1e-6 * (1.0 + float(logits[0].abs().max())):
        raise TrainingFailed(
            desc, f"the network's output stopped depending on its input at epoch {epoch + 1} (every "
            "validation example gets the same logits: its units died after too large a step)",
            _fresh(_steadier(cfg), cfg), alternatives=["giving the model normalization (e.g. BatchNorm after each "
                                                       "convolution), which keeps one large step from silencing it"])


def chance_test(correct: int, n: int, chance: float) -> float:
    """One-sided binomial p-value of ``correct`` of ``n`` against accuracy ``chance``."""
    from scipy.stats import binom

    return float(binom.sf(correct - 1, n, chance))


def check_learned(logits: torch.Tensor, y_val, history: list[dict], cfg, desc: str,
                  classes: list[int] | None = None) -> dict:
    """The after-training rule (module docstring) on the kept weights' validation logits (N, C).

    ``classes``: judge only the validation examples of these classes (a student whose transfer
    set omitted classes was never taught them: before its bias fix it is expected to miss them,
    which is the paper's experiment, not a failed training).

    Returns the record stored in metrics (``checked``, the counts, p-value, losses); raises
    ``TrainingFailed`` when the run is at chance or its loss never beat the class frequencies.
    """
    y = np.asarray(y_val, dtype=np.int64)
    if classes is not None:
        keep = np.isin(y, classes)
        logits, y = logits[torch.as_tensor(keep)], y[keep]
    n = len(y)
    if n == 0:
        return {"checked": False, "reason": "no validation split"}
    num_classes = int(logits.shape[1])
    counts = np.bincount(y, minlength=num_classes)
    majority = float(counts.max() / n)
    chance = max(1.0 / num_classes, majority)
    correct = int((logits.argmax(1).numpy() == y).sum())
    freq = counts[counts > 0] / n
    prior_loss = float(-(freq * np.log(freq)).sum())
    val_loss = float(F.cross_entropy(logits.double(), torch.as_tensor(y)))
    record = {"rule": f"one-sided binomial test of validation accuracy against chance, alpha={ALPHA}; "
                      "validation loss below the class-frequency guess",
              "val_correct": correct, "val_examples": n, "chance_accuracy": round(chance, 6),
              "val_loss": round(val_loss, 6), "class_frequency_loss": round(prior_loss, 6)}
    if classes is not None:
        record["classes_checked"] = sorted(int(c) for c in classes)
    if chance ** n >= ALPHA:
        return {**record, "checked": False,
                "reason": f"a validation split of {n} examples cannot show accuracy above chance "
                          f"({chance:.1%}) at alpha {ALPHA}"}
    p_value = chance_test(correct, n, chance)
    record.update(checked=True, p_value=p_value)
    at_chance, no_better = p_value >= ALPHA, not val_loss < prior_loss
    if not (at_chance or no_better):
        return {**record, "passed": True}
    what = []
    if at_chance:
        base = "the majority class's share" if majority > 1.0 / num_classes else f"1/{num_classes}"
        what.append(f"validation accuracy {correct / n:.1%} ({correct}/{n}) is not clearly above chance "
                    f"({chance:.1%}, {base}): one-sided binomial p = {p_value:.2g}, not below {ALPHA}")
    if no_better:
        what.append(f"the validation loss {val_loss:.3f} never got below {prior_loss:.3f}, the loss of always "
                    "guessing the class frequencies")
    cap = getattr(cfg, "epochs_cap", None)
    if cap is not None and cap < cfg.epochs:
        # a smoke test (KDENS_EPOCHS_CAP) checks that commands run, and a run cut short is not
        # expected to learn: say so, record it, and let the run finish
        print(f"warning: {desc}: {' and '.join(what)}; not failed: KDENS_EPOCHS_CAP={cap} cut it to {cap} of "
              f"its {cfg.epochs} epochs (a smoke-test setting)", file=sys.stderr, flush=True)
        return {**record, "passed": False, "waived": f"KDENS_EPOCHS_CAP={cap}"}
    changes, why, alternatives = _advice(history, cfg, chance)
    raise TrainingFailed(desc, " and ".join(what), _fresh(changes, cfg), why, alternatives)


NORMALIZE = "a model with normalization (e.g. BatchNorm after each convolution)"


def _advice(history: list[dict], cfg, chance: float) -> tuple[list[tuple[str, object]], list[str], list[str]]:
    """(settings, diagnosis, other advice) that fit how the run went (its per-epoch history)."""
    losses = [h["train_loss"] for h in history if h.get("train_loss") is not None and math.isfinite(h["train_loss"])]
    train_acc = history[-1].get("train_accuracy") if history else None
    if train_acc is not None and train_acc >= chance + 0.5 * (1.0 - chance):
        return [], [f"It fits its training set (training accuracy {train_acc:.1%}) but none of that carries over "
                    "to held-out examples"], ["checking that the labels belong to the images (shuffled or "
                                              "misaligned labels?) and that --data is the data you meant"]
    if len(history) < 2:  # one epoch says nothing about where the loss was heading
        return [("epochs", max(3, 3 * cfg.epochs))], [f"It ran {len(history)} epoch"], []
    if len(losses) >= 2 and losses[-1] > losses[0]:
        return _steadier(cfg), [f"The training loss rose ({losses[0]:.4g} -> {losses[-1]:.4g})"], []
    if losses and (losses[0] - min(losses)) < 0.02 * abs(losses[0]):
        why = [f"The training loss barely moved ({losses[0]:.4g} -> {min(losses):.4g}): the output hardly "
               "depends on the input, or the steps are too small"]
        if cfg.optimizer == "sgd":  # Adam's steps do not shrink with a vanishing gradient
            return [("optimizer", "adamw")] + ([("lr", 0.001)] if cfg.lr is not None else []), why, [NORMALIZE]
        return [("lr", _lr(cfg.resolved_lr * 10))], why, [NORMALIZE]
    best = min(range(len(history)), key=lambda i: history[i].get("val_loss", math.inf)) if history else 0
    if history and best == len(history) - 1:  # still improving when it ran out of epochs
        return [("epochs", cfg.epochs * 3)], ["The validation loss was still falling at the last epoch"], []
    return _steadier(cfg), [], []
