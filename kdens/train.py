"""The one supervised training loop every stage reuses (generalist, members, specialists, students).

Data lives in memory (on the GPU when training there) and is batched by index, which
avoids DataLoader overhead for data that fits; data that does not (an .npy folder,
``kdens.mapped``) stays on disk and each batch is read when the sampler draws it. Stages
swap the loss (``loss_fn``) and the batch composition (``sampler``); everything else — optimizer, schedule, max-norm,
jitter, early stopping, checkpoint/resume, progress, the health checks of ``kdens.health``
(NaN, dead units, a run that ends at chance fails with exit code 1), DDP — is shared.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdens import health
from kdens.config import (  # noqa: F401 (TrainConfig's old home)
    EPOCHS_CAP_ENV,
    TrainConfig,
    mixup_alpha,
    pixel_augments,
    without_unset_cap,
)
from kdens.errors import ConfigError, TrainingError, TrainingFailed
from kdens.mapped import MappedRows
from kdens.progress import Progress

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
Sampler = Callable[[int, torch.Generator], Iterable[torch.Tensor]]
CHECKPOINT = "checkpoint.pt"
@dataclass
class TrainResult:
    """What a finished training run reports; the model holds the best weights."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = float("nan")
    stopped_early: bool = False
    """Early stopping ended the run before its last epoch (never true when every epoch ran)."""
    seconds: float = 0.0
    resumed_from_epoch: int = 0
    health: dict = field(default_factory=dict)
    """What ``kdens.health.check_learned`` found on the kept weights (metrics: ``training_check``)."""


def schedule_metrics(result: TrainResult, cfg: TrainConfig) -> dict:
    """How much of its schedule a run used, for metrics.json (``early_stop_note`` reads it back)."""
    out = {"best_epoch": result.best_epoch, "epochs_run": len(result.history), "epochs_planned": cfg.run_epochs,
           "stopped_early": result.stopped_early}
    if result.stopped_early and result.history:
        out.update(patience=cfg.patience, lr_at_stop=result.history[-1]["lr"], lr_start=cfg.resolved_lr)
    return out


def early_stop_note(m: dict) -> str | None:
    """One line saying that early stopping cut a run's schedule short, or None when it did not.

    A cut cosine schedule is a different (worse) run than the one asked for: the learning rate
    never decayed. Said on the result line and in the report, not only in metrics.json.
    """
    if not m.get("stopped_early"):
        return None
    lr = m.get("lr_at_stop")
    lr_part = (f" while the learning rate was still {lr:.3g} (of {m['lr_start']:.3g})"
               if isinstance(lr, float) and m.get("lr_start") else "")
    return (f"early stopping ended the run at epoch {m.get('epochs_run')} of {m.get('epochs_planned', '?')}: "
            f"no lower validation loss for {m.get('patience', '?')} epochs{lr_part}; the best epoch "
            f"({m.get('best_epoch')}) was kept. Leave --patience unset to run the whole schedule")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def jitter_batch(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an independent random (dy, dx) in [-k, k]^2, zero-filling."""
    if k <= 0:
        return x
    b, c, h, w = x.shape
    shifts = torch.randint(-k, k + 1, (2, b), generator=gen, device=gen.device)
    padded = F.pad(x, (k, k, k, k))  # (B, C, H+2k, W+2k)
    rows = torch.arange(h, device=x.device)[None, :] + k - shifts[0][:, None].to(x.device)  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + k - shifts[1][:, None].to(x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def crop_padding(h: int, w: int) -> int:
    """Pixels ``--augment crop`` pads each side with: an eighth of the shorter side, at least 1
    (4 px on 32x32, CIFAR's usual choice; 2 px on 16x16)."""
    return max(1, round(min(h, w) / 8))


def augment_batch(x: torch.Tensor, names: list[str], gen: torch.Generator) -> torch.Tensor:
    """``--augment``: ``crop`` pads by reflection and takes a random crop of the original size,
    ``flip`` mirrors each image left-right with probability 1/2; (B, C, H, W) in and out.

    Reflection rather than zeros (which ``--jitter`` uses): the pixels shifted in look like the
    image's own border, not a black frame the test images never have.
    """
    names = pixel_augments(names)  # mixup is applied by fit, after these
    if not names:
        return x
    b, c, h, w = x.shape
    if "crop" in names:
        p = min(crop_padding(h, w), h - 1, w - 1)  # reflection needs padding < size
        if p > 0:
            padded = F.pad(x, (p, p, p, p), mode="reflect")  # (B, C, H+2p, W+2p)
            off = torch.randint(0, 2 * p + 1, (2, b), generator=gen, device=gen.device).to(x.device)
            rows = torch.arange(h, device=x.device)[None, :] + off[0][:, None]  # (B, H)
            cols = torch.arange(w, device=x.device)[None, :] + off[1][:, None]  # (B, W)
            bidx = torch.arange(b, device=x.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
            x = x.permute(0, 3, 1, 2).contiguous()
    if "flip" in names:
        mirror = (torch.rand(b, generator=gen, device=gen.device) < 0.5).to(x.device)  # (B,)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def mixup_draw(n: int, alpha: float, gen: torch.Generator) -> tuple[float, torch.Tensor]:
    """``--augment mixup=A``: lambda ~ Beta(A, A) and a permutation of the batch, from ``gen``
    (so a resumed run draws the same). One lambda per batch, as in Zhang et al. (2018)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device).item())
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam, torch.randperm(n, generator=gen, device=gen.device)


def mixup_loss(loss_fn: "LossFn", logits: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor | None,
               idx: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """The loss of a mixed batch ``xb = lam * x + (1 - lam) * x[perm]``: ``lam * L(y) + (1 - lam) *
    L(y[perm])``. Terms that do not use the labels (a teacher's soft targets on ``xb``) are equal in
    both and so count once; without labels the loss is one call."""
    if yb is None:
        return loss_fn(logits, xb, None, idx)
    return lam * loss_fn(logits, xb, yb, idx) + (1.0 - lam) * loss_fn(logits, xb, yb[perm], idx[perm])


def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale every unit's incoming weights to L2 norm <= max_norm (Srivastava et al. 2014)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.view(m.weight.shape[0], -1)  # (out, fan_in)
                norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
                w.mul_(norms.clamp(max=max_norm) / norms)


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters: decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.resolved_weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.resolved_lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.resolved_lr)


def lr_at(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for a (0-based) epoch and step; pure so resume needs no scheduler state."""
    base = cfg.resolved_lr
    if cfg.schedule == "cosine":  # over the epochs that run: a capped smoke test still anneals
        t = (epoch * steps_per_epoch + step) / max(1, cfg.run_epochs * steps_per_epoch)
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return base * cfg.gamma ** (epoch // cfg.step_size)
    return base


def distributed() -> tuple[int, int]:
    """(rank, world size) of the joined process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def default_sampler(n: int, batch_size: int) -> Sampler:
    def sample(epoch: int, gen: torch.Generator) -> Iterable[torch.Tensor]:
        perm = torch.randperm(n, generator=gen, device=gen.device)
        return perm.split(batch_size)
    return sample


def batches(x, batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive row batches of ``x`` (an array, a tensor or memory-mapped rows) as CPU tensors;
    memory-mapped rows are read batch by batch, never whole."""
    if isinstance(x, MappedRows):
        for i in range(0, len(x), batch_size):
            yield torch.from_numpy(x.take(np.arange(i, min(i + batch_size, len(x)))))
        return
    xt = torch.as_tensor(x)
    for i in range(0, len(xt), batch_size):
        yield xt[i: i + batch_size]


@torch.inference_mode()
def predict_logits(model: nn.Module, x, batch_size: int = 2048, device: torch.device | str | None = None,
                   amp: bool = False) -> torch.Tensor:
    """Logits (N, C) of ``model`` on ``x`` in eval mode, batched; returned as float32 on CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    for xb in batches(x, batch_size):
        xb = xb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            outs.append(model(xb).float().cpu())
    model.train(was_training)
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def _evaluate(model, x, y, cfg, device, amp, epoch: int, desc: str) -> tuple[float, float]:
    if x is None or len(x) == 0:
        return float("nan"), float("nan")
    logits = predict_logits(model, x, cfg.eval_batch_size, device, amp)
    health.check_alive(logits, epoch, cfg, desc)
    yt = torch.as_tensor(y)
    return float(F.cross_entropy(logits, yt)), float((logits.argmax(1) == yt).float().mean())


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fit(model: nn.Module, x_train, y_train, x_val=None, y_val=None, cfg: TrainConfig | None = None, *,
        loss_fn: LossFn | None = None, sampler: Sampler | None = None, ckpt_dir: Path | None = None,
        resume: bool = False, run_key: str = "", progress: bool = True, desc: str = "train",
        on_epoch: Callable[[int], None] | None = None, check_classes: list[int] | None = None) -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best validation epoch.

    Args:
        x_train, y_train: training arrays (N, C, H, W) float32 and (N,) int64; y may be None
            when ``loss_fn`` needs no labels (distillation on an unlabeled set).
        x_val, y_val: validation arrays for early stopping (validation cross-entropy).
        cfg: optimisation settings.
        loss_fn: ``loss_fn(logits, xb, yb, idx) -> scalar``; default cross-entropy on yb.
            ``idx`` are the batch's row indices into x_train (for cached soft targets) and
            ``xb`` is the batch as the model saw it (after --augment and jitter, for online teachers).
        sampler: ``sampler(epoch, generator) -> iterable of index batches``; default a
            seeded shuffle split into ``batch_size`` chunks.
        ckpt_dir: folder for ``checkpoint.pt``, written after every epoch.
        resume: continue from ``ckpt_dir/checkpoint.pt``; the result equals an
            uninterrupted run with the same settings.
        run_key: fingerprint of everything that determines the run; a checkpoint made
            under another key is refused rather than silently continued.
        progress: show progress (rank 0 only; ``kdens.progress``: bars on a terminal, lines in a log).
        desc: the run's name in progress and in error messages.
        on_epoch: called with the 0-based epoch before each epoch's first step (also after a
            resume), for losses whose weights follow a schedule (a warmup, an annealed weight).
        check_classes: the classes the after-training check judges (``kdens.health.check_learned``);
            None: all of them.

    Raises:
        TrainingFailed: the loss became NaN, the units died, or the kept weights are at chance
            (``kdens.health``); the checkpoint is removed, since nothing can continue from it.
    """
    cfg = cfg or TrainConfig()
    device = resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    rank, world = distributed()
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model.to(device)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # in memory, the whole set moves to the device once; memory-mapped, each batch is read when drawn
    mapped = isinstance(x_train, MappedRows)
    xt = x_train if mapped else torch.as_tensor(x_train).to(device)
    yt = torch.as_tensor(y_train).to(device) if y_train is not None else None
    if loss_fn is None:
        if yt is None:
            raise ConfigError("training without labels needs a loss_fn (e.g. distillation with --alpha 0)")
        loss_fn = lambda logits, xb, yb, idx: F.cross_entropy(logits, yb)  # noqa: E731
    n = len(xt)
    sampler = sampler or default_sampler(n, cfg.batch_size)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.seed)
    opt = _make_optimizer(model, cfg)
    steps_per_epoch = sum(1 for _ in sampler(0, torch.Generator(device=device).manual_seed(cfg.seed)))
    mix = mixup_alpha(cfg.augment)

    result = TrainResult()
    best_state = _state_copy(model)
    bad_epochs, start_epoch = 0, 0
    ckpt_path = Path(ckpt_dir) / CHECKPOINT if ckpt_dir else None
    if resume and ckpt_path and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck.get("run_key", "") != run_key:
            raise TrainingError(
                f"{ckpt_path} was written by a run with other settings; delete it or use a new --out "
                "to start over"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["gen_state"].to("cpu") if device.type == "cpu" else ck["gen_state"].cpu())
        torch.set_rng_state(ck["cpu_rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu())
        best_state = ck["best_state"]
        bad_epochs = int(ck["bad_epochs"])
        start_epoch = int(ck["epoch"])
        result.history = list(ck["history"])
        result.best_epoch = int(ck["best_epoch"])
        result.best_val_loss = float(ck["best_val_loss"])
        result.resumed_from_epoch = start_epoch
        result.seconds = float(ck["seconds"])
        if ck.get("stopped", False):
            result.stopped_early = start_epoch < cfg.run_epochs
            start_epoch = cfg.run_epochs

    E = cfg.run_epochs
    shown = Progress(desc, E, min(start_epoch, E), steps_per_epoch, enabled=progress and rank == 0)
    check_every = 1 if device.type == "cpu" else 50  # each check syncs the GPU
    try:
        for epoch in range(start_epoch, E):
            t_epoch = time.perf_counter()
            if on_epoch is not None:
                on_epoch(epoch)
            shown.start_epoch(epoch)
            net.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            pending: list[tuple[int, torch.Tensor]] = []
            for step, idx in enumerate(sampler(epoch, gen)):
                idx = idx.to(device)
                if world > 1:
                    if len(idx) < world:
                        continue
                    idx = idx[rank::world]
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, epoch, step, steps_per_epoch)
                xb = torch.from_numpy(xt.take(idx.cpu().numpy())).to(device) if mapped else xt[idx]
                xb = jitter_batch(augment_batch(xb, cfg.augment, gen), cfg.jitter, gen)
                yb = yt[idx] if yt is not None else None
                if mix is not None:
                    lam, perm = mixup_draw(len(idx), mix, gen)
                    perm = perm.to(xb.device)
                    xb = lam * xb + (1.0 - lam) * xb[perm]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = net(xb)
                if mix is None:
                    loss = loss_fn(logits.float(), xb, yb, idx)
                else:
                    loss = mixup_loss(loss_fn, logits.float(), xb, yb, idx, lam, perm)
                    if yb is not None and lam < 0.5:
                        yb = yb[perm]  # train accuracy counts the label that dominates the blend
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                if cfg.max_norm:
                    apply_max_norm(model, cfg.max_norm)
                d = loss.detach()
                pending.append((step, d))
                if len(pending) >= check_every:
                    health.check_finite(pending, epoch, cfg, desc)
                    pending.clear()
                loss_sum += d * len(idx)
                if yb is not None:
                    correct += (logits.detach().argmax(1) == yb).sum()
                seen += len(idx)
                shown.step(step)
            health.check_finite(pending, epoch, cfg, desc)
            val_loss, val_acc = _evaluate(model, x_val, y_val, cfg, device, amp, epoch, desc)
            rec = {
                "epoch": epoch + 1,
                "train_loss": float(loss_sum) / max(1, seen),
                "train_accuracy": float(correct) / max(1, seen) if yt is not None else None,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t_epoch,
            }
            result.history.append(rec)
            improved = math.isnan(val_loss) or not (val_loss >= result.best_val_loss)
            if improved:
                result.best_val_loss, result.best_epoch, bad_epochs = val_loss, epoch + 1, 0
                best_state = _state_copy(model)
            else:
                bad_epochs += 1
            # early stopping ends a run before its last epoch; at the last one it ended anyway
            stop = (cfg.patience is not None and not math.isnan(val_loss) and bad_epochs >= cfg.patience
                    and epoch + 1 < E)
            result.seconds += rec["seconds"]
            if ckpt_path and rank == 0:
                _save_checkpoint(ckpt_path, model, opt, gen, best_state, bad_epochs, epoch + 1, result,
                                 run_key, stop, device)
            shown.end_epoch(rec)
            if stop:
                result.stopped_early = True
                break
        model.load_state_dict(best_state)
        if x_val is not None and y_val is not None and len(x_val):
            logits = predict_logits(model, x_val, cfg.eval_batch_size, device, amp)
            result.health = health.check_learned(logits, y_val, result.history, cfg, desc, check_classes)
        else:
            result.health = {"checked": False, "reason": "no validation split"}
    except TrainingFailed:
        if ckpt_path and rank == 0:
            ckpt_path.unlink(missing_ok=True)
        raise
    finally:
        shown.close()
    if world > 1:
        torch.distributed.barrier()
    return result


def _save_checkpoint(path: Path, model, opt, gen, best_state, bad_epochs, epoch, result: TrainResult,
                     run_key: str, stopped: bool, device: torch.device) -> None:
    ck = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "gen_state": gen.get_state(),
        "cpu_rng": torch.get_rng_state(),
        "best_state": best_state,
        "bad_epochs": bad_epochs,
        "epoch": epoch,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "seconds": result.seconds,
        "run_key": run_key,
        "stopped": stopped,
    }
    if device.type == "cuda":
        ck["cuda_rng"] = torch.cuda.get_rng_state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)
