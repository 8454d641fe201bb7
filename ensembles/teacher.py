"""An ``ensemble`` run folder as a teacher: the members' combined distribution.

``teacher(x)`` answers the combined log-probabilities at T = 1 (the interface every
teacher shares); ``teacher.soft_scores(x, T)`` answers scores ``s`` whose
``softmax(s / T)`` is the ensemble's soft target at T as docs/architecture.md defines it (Hinton,
Vinyals & Dean 2015, section 3):

* arithmetic: ``p_T = 1/K sum_k softmax(z_k / T)``, so ``s = T * log p_T``. This depends
  on T: softening the T = 1 mixture instead (``softmax(log p_1 / T)``) is a different
  distribution, because a mean of softmaxes is not a softmax of a mean.
* geometric: ``p_T ∝ prod_k softmax(z_k / T)^(1/K) = softmax(mean_k z_k / T)``, so
  ``s = log_softmax(mean_k z_k)`` serves every T (and equals ``teacher(x)``).

An optional calibration temperature ``tau`` (``load_teacher(..., temperature=tau)``)
divides every member's logits first: the teacher then answers ``z_k / tau`` in place of
``z_k`` throughout (T = 1 means ``tau``; soft targets at T use ``tau * T``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ensembles.combine import METHODS, combine_log_probs
from kdens.artifacts import MANIFEST, read_manifest, sha256_file
from kdens.errors import ArtifactError, ConfigError
from kdens.models import load_model
from kdens.runs import data_config


class EnsembleTeacher:
    """The members of a finished ``kdens train-ensemble`` run, combined."""

    stage = "ensemble"

    def __init__(self, run_dir: Path, device: str | torch.device = "cpu", temperature: float | None = None,
                 method: str | None = None):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir, "ensemble")
        cfg = manifest.get("config", {})
        self.method = method if method is not None else cfg.get("combine", "arithmetic")
        if self.method not in METHODS:
            raise ConfigError(f"ensemble combination method {self.method!r} unknown; valid: {', '.join(METHODS)}")
        self.tau = 1.0 if temperature is None else float(temperature)
        if not math.isfinite(self.tau) or self.tau <= 0:
            raise ConfigError(f"ensemble teacher temperature {temperature!r} must be a finite number > 0")
        names = manifest.get("members") or [f"member-{k:02d}" for k in range(int(cfg.get("members", 0)))]
        if len(names) < 2:
            raise ArtifactError(f"{run_dir}/manifest.json lists {len(names)} members; rerun kdens train-ensemble")
        self.device = torch.device(device)
        self.run_dir = run_dir
        self.models, self._specs, hashes = [], [], []
        for name in names:
            mdir = run_dir / name
            read_manifest(mdir, "generalist")
            model, spec = load_model(mdir, self.device)
            self.models.append(model)
            self._specs.append((name, spec))
            hashes.append(sha256_file(mdir / MANIFEST))
        first = self._specs[0][1]
        for name, spec in self._specs[1:]:
            if spec["num_classes"] != first["num_classes"] or spec["input_shape"] != first["input_shape"]:
                raise ArtifactError(f"{run_dir}/{name} predicts {spec['num_classes']} classes of "
                                    f"{spec['input_shape']}, unlike {self._specs[0][0]}; retrain the ensemble")
        self.num_classes = int(first["num_classes"])
        self.input_shape = tuple(first["input_shape"])
        self.class_names = list(manifest.get("data", {}).get("class_names")
                                or [str(c) for c in range(self.num_classes)])
        self.manifest_hashes = [sha256_file(run_dir / MANIFEST), *hashes]
        self.data_config = data_config(manifest)
        self.data_fingerprint = manifest.get("data_fingerprint")
        # a mixture of softened members is not the softened mixture; a product of experts is
        self.soft_scores_depend_on_temperature = self.method == "arithmetic"

    @torch.inference_mode()
    def member_logits(self, x: Tensor) -> Tensor:
        """Every member's logits divided by tau, (K, B, C) float32 on the teacher's device."""
        x = x.to(self.device, non_blocking=True)
        return torch.stack([m(x).float() for m in self.models]) / self.tau  # (K, B, C)

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        return combine_log_probs(self.member_logits(x), self.method, 1.0)  # (B, C)

    @torch.inference_mode()
    def soft_scores(self, x: Tensor, temperature: float) -> Tensor:
        """Scores s (B, C) with ``softmax(s / T)`` = the ensemble's soft targets at T (module docstring)."""
        z = self.member_logits(x)  # (K, B, C)
        if self.method == "arithmetic":
            return temperature * combine_log_probs(z, "arithmetic", temperature)  # (B, C)
        return combine_log_probs(z, "geometric", 1.0)  # (B, C), the same for every T

    def describe(self) -> dict:
        return {"stage": self.stage, "run": str(self.run_dir), "combine": self.method, "temperature": self.tau,
                "members": [{"run": name, "model": spec["name"], "model_args": spec["kwargs"],
                             "params": spec.get("params")} for name, spec in self._specs]}


def load_teacher(run_dir: Path, device: str | torch.device = "cpu", temperature: float | None = None,
                 method: str | None = None) -> EnsembleTeacher:
    """Load an ensemble run as a teacher.

    Args:
        run_dir: a finished ``kdens train-ensemble`` folder.
        device: where the members compute.
        temperature: calibration temperature tau dividing every member's logits; None: 1.
            (The run's own ``--temperature`` only sets the T of its reported metrics.)
        method: 'arithmetic' or 'geometric'; None: the run's ``--combine``.

    Raises:
        ArtifactError: the folder or a member is missing or unfinished.
        ConfigError: unknown method or bad temperature.
    """
    return EnsembleTeacher(run_dir, device, temperature, method)
