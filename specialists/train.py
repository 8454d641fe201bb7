"""One specialist (Hinton, Vinyals & Dean 2015, section 5.2): init, half-group batches, dustbin correction.

A specialist for the class group S predicts the |S| classes of S plus one dustbin class
for everything else. It is the generalist's architecture with |S| + 1 outputs, starting
from the generalist's weights: the trunk and the head rows of S are copied, the dustbin
row is fitted (:func:`fit_dustbin_row`). Half of every training batch comes from S and
half from the other classes (:func:`half_group_sampler`); that over-represents S, so
after training the dustbin logit is raised by the log odds ratio
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
from kdens.errors import DataError, ModelError
from kdens.models import build_model, count_params, model_spec, save_model
from kdens.train import Sampler, TrainConfig, fit, predict_logits
from specialists.combine import oversampling_factor

REST_FRACTION_IN_BATCHES = 0.5  # half of every batch comes from outside the group
DUSTBIN_FIT_EXAMPLES = 4096  # training examples used to fit the dustbin row at initialisation


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


@torch.inference_mode()
def head_features(model: nn.Module, x, batch_size: int = 2048) -> torch.Tensor:
    """What ``model.head`` receives for inputs ``x`` (eval mode), (N, H) float32 on the CPU."""
    feats: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda mod, args: feats.append(args[0].float().cpu()))
    try:
        predict_logits(model, x, batch_size)
    finally:
        hook.remove()
    return torch.cat(feats) if feats else torch.empty(0, model.head.in_features)


def fit_dustbin_row(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    group: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dustbin row (w, b) of the head whose logit best matches the generalist's folded log-mass.

    The generalist's probability that an example lies outside S is softmax-consistent with
    a dustbin logit ``lse_{j not in S} z_j(h)``; with it the specialist would start as the
    generalist folded onto S + dustbin. A linear row cannot equal that log-sum-exp (it is
    convex in h), so it is fitted by ridge least squares on the features h of training
    examples: ``min ||[h, 1] (w, b) - lse||^2 + lam ||w||^2``, lam = 1e-3 mean(diag h'h / n).
    The common alternative (mean of the other rows, logsumexp of their biases) is exact
    only where the other classes' logits are equal, and is far too low on confident
    examples of one of them, which then start in S (its error is reported for comparison).

    Args:
        features: head inputs h of some training examples, (N, H).
        weight: the generalist's head weight (C, H); bias (C,).
        group: the specialist's classes S.

    Returns:
        (w (H,), b (), {"dustbin_init_rmse", "dustbin_init_rmse_mean_rows"}) in weight's dtype.
    """
    outside = [k for k in range(weight.shape[0]) if k not in set(group)]
    h = features.double()  # (N, H)
    w_out, b_out = weight[outside].double(), bias[outside].double()  # (R, H), (R,)
    target = torch.logsumexp(h @ w_out.T + b_out, 1)  # (N,)
    x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)  # (N, H + 1)
    gram = x.T @ x / len(x)  # (H + 1, H + 1)
    lam = 1e-3 * float(gram.diagonal()[:-1].mean().clamp_min(1e-12))
    ridge = torch.full((x.shape[1],), lam, dtype=h.dtype)
    ridge[-1] = 0.0  # the bias is not shrunk
    sol = torch.linalg.solve(gram + torch.diag(ridge), x.T @ target / len(x))  # (H + 1,)
    rmse = float(((x @ sol - target) ** 2).mean().sqrt())
    mean_rows = h @ w_out.mean(0) + torch.logsumexp(b_out, 0)  # (N,)
    rmse_mean = float(((mean_rows - target) ** 2).mean().sqrt())
    info = {"dustbin_init_rmse": rmse, "dustbin_init_rmse_mean_rows": rmse_mean}
    return sol[:-1].to(weight.dtype), sol[-1].to(bias.dtype), info


def init_specialist(generalist: nn.Module, gen_spec: dict, group: list[int],
                    features: torch.Tensor) -> tuple[nn.Module, dict, dict]:
    """The generalist's architecture with |S| + 1 outputs, starting from its weights.

    Every parameter and buffer except the head's is copied; the head's rows 0..|S|-1 are
    the generalist's rows of ``group`` (in that order) and the last row is the dustbin
    (:func:`fit_dustbin_row` on ``features``, the head inputs of training examples).

    Returns:
        (model in train mode on the CPU, its model.json spec, dustbin-fit info).
    """
    if not isinstance(getattr(generalist, "head", None), nn.Linear):
        raise ModelError(f"generalist model {gen_spec['name']!r} has no `head: nn.Linear`; specialists copy its "
                         "output rows from it")
    spec = model_spec(gen_spec["name"], len(group) + 1, gen_spec["input_shape"], gen_spec["kwargs"])
    model = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["kwargs"])
    src = {k: v.detach().cpu() for k, v in generalist.state_dict().items()}
    w, b = src["head.weight"], src["head.bias"]  # (C, H), (C,)
    w_d, b_d, info = fit_dustbin_row(features, w, b, group)
    state = {k: v for k, v in src.items() if not k.startswith("head.")}
    state["head.weight"] = torch.cat([w[list(group)], w_d[None]])  # (|S| + 1, H)
    state["head.bias"] = torch.cat([b[list(group)], b_d[None]])  # (|S| + 1,)
    model.load_state_dict(state)
    return model.train(), spec, info


class DustbinCorrected(nn.Module):
    """``model`` whose dustbin logit is raised by ``log_factor`` in eval mode only.

    Training (train mode) sees the raw logits, as in the paper; validation (eval mode,
    where :func:`kdens.train.fit` measures its early-stopping loss) sees the corrected
    ones, so the kept epoch is the one with the lowest loss on the natural class mix.
    """

    def __init__(self, model: nn.Module, log_factor: float):
        super().__init__()
        self.model = model
        offset = torch.zeros(model.head.out_features)
        offset[-1] = log_factor
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)  # (B, |S| + 1)
        return z if self.training else z + self.offset.to(z.dtype)


def train_specialist(run_dir: Path, group: list[int], generalist: nn.Module, gen_spec: dict, x, y, x_val, y_val,
                     x_test, y_test, train: TrainConfig, *, key: str, resume: bool = False, progress: bool = True,
                     desc: str = "specialist") -> dict:
    """Initialise, train and correct one specialist; write its weights, metrics and history (no manifest).

    Args:
        run_dir: the specialist's folder (its checkpoint lives there while it trains).
        group: its classes S.
        generalist, gen_spec: the generalist model and its model.json spec.
        x, y: the generalist's training examples; x_val, y_val and x_test, y_test: its
            validation and test splits (original labels; remapped here).
        train: optimisation settings (seed included).
        key: fingerprint of the run, refused on resume if the checkpoint has another.

    Returns:
        The metrics written to metrics.json.
    """
    t0 = time.time()
    n_fit = min(len(y), DUSTBIN_FIT_EXAMPLES)
    pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(train.seed))[:n_fit].numpy()
    feats = head_features(generalist, x[np.sort(pick)], train.eval_batch_size)
    model, spec, init_info = init_specialist(generalist, gen_spec, group, feats)
    frac_rest = float(1.0 - np.isin(y, group).mean())  # the rest's share of the true class mix
    factor = oversampling_factor(frac_rest, REST_FRACTION_IN_BATCHES)
    wrapped = DustbinCorrected(model, math.log(factor))
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit(wrapped, x, remap_labels(y, group), x_val, remap_labels(y_val, group), train,
                 sampler=half_group_sampler(y, group, train.batch_size), ckpt_dir=run_dir, resume=resume,
                 run_key=key, progress=progress, desc=desc)
    model = wrapped.model.cpu()
    bs = train.eval_batch_size
    val_raw = predict_logits(model, x_val, bs) if len(y_val) else None  # before the correction
    with torch.no_grad():
        model.head.bias[-1] += math.log(factor)  # the saved model is calibrated to the true mix
    metrics = {"group": list(group), **task_metrics(model, generalist, group, x_test, y_test, "test_", bs)}
    if len(y_val):
        metrics.update(task_metrics(model, generalist, group, x_val, y_val, "val_", bs))
        metrics["val_nll_uncorrected"] = M.nll(val_raw.numpy(), remap_labels(y_val, group))
    metrics.update(frac_rest_true=frac_rest, frac_rest_batches=REST_FRACTION_IN_BATCHES,
                   oversampling_factor=factor, log_oversampling_factor=math.log(factor), **init_info,
                   params=count_params(model), train_seconds=round(result.seconds, 3),
                   best_epoch=result.best_epoch, best_val_loss=result.best_val_loss, epochs_run=len(result.history),
                   stopped_early=result.stopped_early, train_examples=len(y),
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
