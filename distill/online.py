"""Training a student with a feature method: hooks on both networks, adapters, phases.

The teacher answers each batch online, or from its logits and hint features computed once
over the transfer set when no augmentation changes the inputs (``distill.feature_cache``).

``prepare`` resolves the ``--hint`` points on both networks (a ConfigError naming the
module otherwise), runs one probe batch to learn the shapes there, lets the method refuse
shapes it cannot compare, and builds its adapters (FitNets' regressors) beside the student
in a ``Trainee``. ``train`` runs the method's phases through ``kdens.train.fit``: every phase
optimises the whole trainee, but a loss only reaches the parameters it depends on (the
output layer gets no gradient while hints are fitted; adapters none after). Earlier
phases checkpoint in ``phase-K-NAME/`` folders of the run, removed once the student is
finished; the last phase checkpoints in the run folder itself, as every student does.
Only ``trainee.student`` is saved: adapters never enter ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill.feature_cache import FeatureStore
from distill.methods import FeatureBatch, FeatureMethod, Phase
from distill.methods.hints import Hint, Tap, parse_hints
from kdens.errors import ArtifactError
from kdens.train import CHECKPOINT, TrainConfig, TrainResult, fit


class Trainee(nn.Module):
    """The student and the method's adapters: what ``fit`` optimises and checkpoints."""

    def __init__(self, student: nn.Module, adapters: nn.ModuleList):
        super().__init__()
        self.student = student
        self.adapters = adapters

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)  # (B, C)


@dataclass
class FeatureSetup:
    """Everything ``train`` needs, made before the first write."""

    hints: list[Hint]
    teacher: nn.Module
    trainee: Trainee
    teacher_tap: Tap
    student_tap: Tap
    teacher_shapes: list[tuple]
    student_shapes: list[tuple]
    teacher_classes: int
    """Width of the teacher's logits (the feature cache holds them beside the hints)."""

    def describe(self) -> dict:
        return {"hints": [str(h) for h in self.hints],
                "teacher_shapes": [list(s) for s in self.teacher_shapes],
                "student_shapes": [list(s) for s in self.student_shapes],
                "adapter_params": sum(p.numel() for p in self.trainee.adapters.parameters())}

    def close(self) -> None:
        self.teacher_tap.remove()
        self.student_tap.remove()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def prepare(method: FeatureMethod, teacher: nn.Module, student: nn.Module, hint_specs: list[str],
            probe: np.ndarray, input_shape: tuple, seed: int) -> FeatureSetup:
    """Resolve the hints on both networks, probe their shapes, build the adapters.

    Args:
        method: a feature method.
        teacher: the teacher network (eval mode).
        student: the freshly initialised student.
        hint_specs: the ``--hint`` values (empty: the default, the last hidden layers).
        probe: a few training inputs (N, ...) for the shape probe.
        input_shape: the data's input shape (FSP's first point is the input).
        seed: seeds the adapters' initial weights (the student's are already drawn).
    """
    hints = parse_hints(hint_specs)
    t_tap = Tap(teacher, [h.teacher for h in hints], "teacher")
    s_tap = Tap(student, [h.student for h in hints], "student")
    x = torch.as_tensor(np.ascontiguousarray(probe[:2]), dtype=torch.float32)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        t_logits = teacher(x.to(_device(teacher)))
        student(x.to(_device(student)))
    student.train(was_training)
    t_shapes = [tuple(t.shape[1:]) for t in t_tap.take()]
    s_shapes = [tuple(t.shape[1:]) for t in s_tap.take()]
    method.check_shapes(hints, t_shapes, s_shapes, tuple(input_shape))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # adapters draw from their own stream: the student's init is unchanged
        adapters = method.adapters(t_shapes, s_shapes)
    return FeatureSetup(hints, teacher, Trainee(student, adapters), t_tap, s_tap, t_shapes, s_shapes,
                        int(t_logits.shape[1]))


def phase_dirs(run_dir: Path, phases: list[Phase]) -> list[Path]:
    """Checkpoint folder of each phase: ``phase-K-NAME/`` for all but the last, the run folder for it."""
    return [Path(run_dir) / f"phase-{i + 1}-{p.name}" for i, p in enumerate(phases[:-1])] + [Path(run_dir)]


def check_interrupted(run_dir: Path, phases: list[Phase], resume: bool, force: bool) -> None:
    """Refuse (like ``prepare_run_dir``) an interrupted earlier phase unless resuming or forcing; clear on force."""
    for d in phase_dirs(run_dir, phases)[:-1]:
        if (d / CHECKPOINT).exists() and not (resume or force):
            raise ArtifactError(f"{run_dir} holds an interrupted student ({d.name}/{CHECKPOINT}); pass --resume "
                                "to continue it or --force to start over")
        if force and not resume:
            shutil.rmtree(d, ignore_errors=True)


def _loss_fn(method: FeatureMethod, phase: Phase, setup: FeatureSetup, store: FeatureStore | None = None):
    teacher_device = _device(setup.teacher)

    def loss_fn(logits: Tensor, xb: Tensor, yb: Tensor | None, idx: Tensor) -> Tensor:
        # what the student's forward on xb left at the hints; bf16 under CUDA autocast, upcast like the logits
        student_feats = [f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
                         for f in setup.student_tap.take()]
        teacher_logits, teacher_feats = None, []
        if phase.needs_teacher and store is not None:  # no augmentation: rows of the features computed once
            teacher_logits, teacher_feats = store.rows(idx)
        elif phase.needs_teacher:
            with torch.no_grad():  # the teacher sees the batch the student saw (after augment, jitter)
                teacher_logits = setup.teacher(xb.to(teacher_device)).float().to(logits.device)  # (B, C)
            teacher_feats = [t.to(logits.device) for t in setup.teacher_tap.take()]
        batch = FeatureBatch(xb, logits, teacher_logits, yb, student_feats, teacher_feats)
        return method.feature_loss(phase.name, batch, setup.trainee.adapters)

    return loss_fn


def train(method: FeatureMethod, setup: FeatureSetup, x_tr, y_tr, x_val, y_val, cfg: TrainConfig, run_dir: Path,
          *, resume: bool, run_key: str, progress: bool,
          store: FeatureStore | None = None, check_classes: list[int] | None = None) -> tuple[TrainResult, list[dict]]:
    """Run the method's phases; the student (``setup.trainee.student``) ends with the last phase's best weights.

    ``store`` holds the teacher's logits and hint features over ``x_tr`` (``distill.feature_cache``);
    None runs the teacher online on every batch.

    Returns:
        (the last phase's TrainResult, one summary per phase: name, epochs, epochs run, seconds).
    """
    phases = method.phases(cfg.epochs)
    dirs = phase_dirs(run_dir, phases)
    summaries, result = [], None
    for i, (phase, ckpt) in enumerate(zip(phases, dirs)):
        pcfg = dataclasses.replace(cfg, epochs=phase.epochs, patience=cfg.patience if phase.validate else None)
        method.set_phase(phase.name)
        result = fit(setup.trainee, x_tr, y_tr, x_val if phase.validate else None,
                     y_val if phase.validate else None, pcfg, loss_fn=_loss_fn(method, phase, setup, store),
                     ckpt_dir=ckpt, resume=resume, run_key=f"{run_key}:{i}:{phase.name}", progress=progress,
                     desc=f"student ({phase.name})" if len(phases) > 1 else "student",
                     on_epoch=lambda e, n=phase.epochs: method.set_epoch(e, n), check_classes=check_classes)
        summaries.append({"phase": phase.name, "epochs": phase.epochs, "epochs_run": len(result.history),
                          "seconds": round(result.seconds, 3), "validated": phase.validate,
                          "final_train_loss": result.history[-1]["train_loss"] if result.history else None})
    setup.close()
    return result, summaries


def finish(run_dir: Path, method: FeatureMethod, epochs: int) -> None:
    """Remove the earlier phases' checkpoint folders once the student is written."""
    for d in phase_dirs(run_dir, method.phases(epochs))[:-1]:
        shutil.rmtree(d, ignore_errors=True)
