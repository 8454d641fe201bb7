"""One specialist (Hinton, Vinyals & Dean 2015, section 5.2): init, half-group batches, dustbin correction.

A specialist for the class group S predicts the |S| classes of S plus one dustbin class
for everything else. It starts from the generalist (:func:`init_specialist`): exactly as the
generalist restricted to S (``init="exact"``, the default: a trainable copy whose output is
``[z_S, lse(z_rest) + c]``, :mod:`specialists.model`), or as its architecture with |S| + 1
outputs and a linear dustbin row fitted to that log-sum-exp (``init="fitted-row"``; the two
are compared in BENCHMARKS.md section 8). Half of every training
batch comes from S and half from the other classes (:func:`half_group_sampler`); that
over-represents S, so after training the dustbin logit is raised by the log odds ratio
(``specialists.combine.oversampling_factor``) and the saved weights already carry it.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdens import metrics as M
from kdens.artifacts import atomic_write_json
from kdens.errors import ConfigError, DataError
from kdens.models import count_params, save_model
from kdens.train import Sampler, TrainConfig, fit, predict_logits, schedule_metrics
from specialists.combine import oversampling_factor
from specialists.model import INITS, fitted_row_specialist, head_features, raise_dustbin, specialist_from_generalist

REST_FRACTION_IN_BATCHES = 0.5  # half of every batch comes from outside the group
INIT_EXAMPLES = 4096  # training examples that fit the fitted-row dustbin and check either start


def remap_labels(y, group: list[int]) -> np.ndarray:
    """Labels of a specialist's task: class ``group[j]`` -> j, any other class -> |S| (the dustbin)."""
    y = np.asarray(y, dtype=np.int64)
    table = np.full(int(max(y.max(initial=0), max(group))) + 1, len(group), dtype=np.int64)
    table[list(group)] = np.arange(len(group))
    return table[y]  # (N,)


def fold_log_probs(log_p: torch.Tensor, group: list[int]) -> torch.Tensor:
    """A C-class distribution seen by a specialist: log p on S, then log of the mass outside S, (N, |S| + 1)."""
    outside = [k for k in range(log_p.shape[1]) if k not in set(group)]
    return torch.cat([log_p[:, list(group)], torch.logsumexp(log_p[:, outside], 1, keepdim=True)], 1)


def half_group_sampler(y, group: list[int], batch_size: int) -> Sampler:
    """Batches of which half are examples of ``group`` and half examples of the other classes.

    One epoch is one pass over the group's examples in a random order, ``batch_size // 2``
    at a time; each batch adds as many examples drawn without replacement from a random
    order of the rest (a fresh order is appended if the rest runs out). Everything comes
    from the ``generator`` that :func:`kdens.train.fit` passes in, so a seeded run (and a
    resumed one) sees the same batches.

    Args:
        y: training labels (N,).
        group: the specialist's classes.
        batch_size: examples per batch (>= 2); an odd size uses batch_size - 1.

    Returns:
        ``sampler(epoch, generator) -> list of LongTensor index batches`` for ``fit``.
    """
    in_group = np.isin(np.asarray(y), list(group))
    g_idx = torch.from_numpy(np.flatnonzero(in_group))  # (N_S,)
    r_idx = torch.from_numpy(np.flatnonzero(~in_group))  # (N - N_S,)
    if len(g_idx) == 0 or len(r_idx) == 0:
        raise DataError(f"group {list(group)} has {len(g_idx)} training examples and the rest {len(r_idx)}; "
                        "a specialist needs both")
    half = batch_size // 2
    if half < 1:
        raise DataError(f"--batch-size {batch_size} cannot be split in half; use >= 2")

    def sample(epoch: int, gen: torch.Generator) -> list[torch.Tensor]:
        dev = gen.device
        g = g_idx.to(dev)[torch.randperm(len(g_idx), generator=gen, device=dev)]
        chunks = g.split(half)
        need = len(g)  # one rest example per group example
        rest = [r_idx.to(dev)[torch.randperm(len(r_idx), generator=gen, device=dev)]
                for _ in range(-(-need // len(r_idx)))]
        r = torch.cat(rest)[:need].split(half)
        return [torch.cat([a, b]) for a, b in zip(chunks, r)]

    return sample


def init_specialist(generalist: nn.Module, gen_spec: dict, group: list[int], x_check=None,
                    batch_size: int = 2048, init: str = "exact") -> tuple[nn.Module, dict, dict]:
    """A specialist for ``group`` started from the generalist.

    ``init="exact"``: :class:`specialists.model.FoldedSpecialist`, a copy of the generalist
    (every weight, the C-way head included) whose output is ``[z_S, lse(z_rest) + c]``,
    c = 0 at the start, so its |S| + 1-way softmax *is* the folded generalist's.
    ``init="fitted-row"``: :func:`specialists.model.fitted_row_specialist`, the dustbin a
    linear row fitted on the head inputs of ``x_check``.

    Args:
        generalist, gen_spec: the generalist model and its model.json spec.
        group: the specialist's classes S.
        x_check: training inputs on which the start is checked against the folded
            generalist (and, for fitted-row, the dustbin row is fitted).

    Returns:
        (model in train mode on the CPU, its model.json spec, ``{"init", "init_max_abs_logprob_diff", ...}``:
        the largest |log p_specialist - log p_folded| over ``x_check``, float64 arithmetic).
    """
    if init not in INITS:
        raise ConfigError(f"--init {init!r} unknown; valid: {', '.join(INITS)}")
    info: dict = {"init": init, "init_max_abs_logprob_diff": None}
    if init == "exact":
        model, spec = specialist_from_generalist(generalist, gen_spec, group)
    else:
        feats = head_features(generalist, x_check, batch_size)
        model, spec, fit_info = fitted_row_specialist(generalist, gen_spec, group, feats)
        info.update(fit_info)
    if x_check is not None and len(x_check):
        spec_lp = torch.log_softmax(predict_logits(model, x_check, batch_size).double(), 1)
        gen_lp = fold_log_probs(torch.log_softmax(predict_logits(generalist, x_check, batch_size).double(), 1), group)
        info["init_max_abs_logprob_diff"] = float((spec_lp - gen_lp).abs().max())
    return model.train(), spec, info


class DustbinCorrected(nn.Module):
    """``model`` whose dustbin logit is raised by ``log_factor`` in eval mode only.

    Training (train mode) sees the raw logits, as in the paper; validation (eval mode,
    where :func:`kdens.train.fit` measures its early-stopping loss) sees the corrected
    ones, so the kept epoch is the one with the lowest loss on the natural class mix.
    """

    def __init__(self, model: nn.Module, log_factor: float, num_outputs: int):
        super().__init__()
        self.model = model
        offset = torch.zeros(num_outputs)
        offset[-1] = log_factor
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)  # (B, |S| + 1)
        return z if self.training else z + self.offset.to(z.dtype)


def train_specialist(run_dir: Path, group: list[int], generalist: nn.Module, gen_spec: dict, x, y, x_val, y_val,
                     x_test, y_test, train: TrainConfig, *, key: str, resume: bool = False, progress: bool = True,
                     desc: str = "specialist", init: str = "exact") -> dict:
    """Initialise, train and correct one specialist; write its weights, metrics and history (no manifest).

    Args:
        run_dir: the specialist's folder (its checkpoint lives there while it trains).
        group: its classes S.
        generalist, gen_spec: the generalist model and its model.json spec.
        x, y: the generalist's training examples; x_val, y_val and x_test, y_test: its
            validation and test splits (original labels; remapped here).
        train: optimisation settings (seed included).
        key: fingerprint of the run, refused on resume if the checkpoint has another.
        init: how it starts, ``"exact"`` or ``"fitted-row"`` (:func:`init_specialist`).

    Returns:
        The metrics written to metrics.json.
    """
    t0 = time.time()
    n_check = min(len(y), INIT_EXAMPLES)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(train.seed))[:n_check].numpy()
    model, spec, init_info = init_specialist(generalist, gen_spec, group, x[np.sort(pick)], train.eval_batch_size,
                                             init)
    frac_rest = float(1.0 - np.isin(y, group).mean())  # the rest's share of the true class mix
    factor = oversampling_factor(frac_rest, REST_FRACTION_IN_BATCHES)
    wrapped = DustbinCorrected(model, math.log(factor), len(group) + 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit(wrapped, x, remap_labels(y, group), x_val, remap_labels(y_val, group), train,
                 sampler=half_group_sampler(y, group, train.batch_size), ckpt_dir=run_dir, resume=resume,
                 run_key=key, progress=progress, desc=desc)
    model = wrapped.model.cpu()
    bs = train.eval_batch_size
    val_raw = predict_logits(model, x_val, bs) if len(y_val) else None  # before the correction
    raise_dustbin(model, math.log(factor))  # the saved model is calibrated to the true mix
    metrics = {"group": list(group), **task_metrics(model, generalist, group, x_test, y_test, "test_", bs)}
    if len(y_val):
        metrics.update(task_metrics(model, generalist, group, x_val, y_val, "val_", bs))
        metrics["val_nll_uncorrected"] = M.nll(val_raw.numpy(), remap_labels(y_val, group))
    metrics.update(frac_rest_true=frac_rest, frac_rest_batches=REST_FRACTION_IN_BATCHES,
                   oversampling_factor=factor, log_oversampling_factor=math.log(factor), **init_info,
                   params=count_params(model), train_seconds=round(result.seconds, 3),
                   best_val_loss=result.best_val_loss, **schedule_metrics(result, train), train_examples=len(y),
                   group_train_examples=int(np.isin(y, group).sum()), wall_seconds=round(time.time() - t0, 3))
    save_model(run_dir, model, spec)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "history.json", result.history)
    return metrics


def task_metrics(model: nn.Module, generalist: nn.Module, group: list[int], x, y, prefix: str,
                 bs: int = 2048) -> dict:
    """The specialist's and the folded generalist's scores on the |S| + 1-way task, and on S's examples."""
    yt = remap_labels(y, group)
    spec = torch.log_softmax(predict_logits(model, x, bs).double(), 1).numpy()  # (N, |S| + 1)
    gen = fold_log_probs(torch.log_softmax(predict_logits(generalist, x, bs).double(), 1), group).numpy()
    inside = yt < len(group)
    out = {}
    for who, s in (("", spec), ("generalist_", gen)):
        out.update({f"{prefix}{who}accuracy": M.accuracy(s, yt), f"{prefix}{who}nll": M.nll(s, yt),
                    f"{prefix}{who}in_group_accuracy": M.accuracy(s[inside], yt[inside])})
    return out


def specialist_train_config(train: TrainConfig, index: int) -> TrainConfig:
    """Specialist ``index`` trains with seed + index (distinct dropout and batch draws)."""
    return replace(train, seed=train.seed + index)
