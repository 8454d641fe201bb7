"""A ``specialists`` run folder as a teacher: the generalist and its active specialists, combined.

For a batch x: the generalist's probabilities p_g; the active specialists, those whose
group meets the generalist's top-n classes (``specialists.combine.active_specialists``);
each active specialist's distribution over its group plus dustbin (its saved weights
already carry the dustbin prior correction); and the combined q solving
``min_q KL(p_g || q) + sum_{m active} KL(p_m || q_m)`` (Hinton, Vinyals & Dean 2015,
section 5.4; ``specialists.combine.combine``, float64, tol 1e-6). ``teacher(x)`` answers
log q, the teacher interface's log-probabilities. The run's manifest lists the specialists
the combination uses: those that passed the stage's validation check (``specialists.check``);
a dropped one's group is the generalist's, and with every one dropped q is p_g.

Soft targets: the combined q is one distribution, not a mixture, so like a single model
its soft targets at T are ``softmax(log q / T)`` and ``soft_scores(x, T) = log q`` for
every T (``soft_scores_depend_on_temperature = False``; distill.teachers explains the
protocol). The paper never softened a combined q; this is the natural reading.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor, nn

from kdens.artifacts import MANIFEST, read_manifest, sha256_file
from kdens.errors import ArtifactError, ConfigError
from kdens.models import load_model
from kdens.runs import data_config
from kdens.train import batches
from specialists.combine import active_specialists, combine, kkt_residual

TOL = 1e-6  # the combination's tolerance: no q_k moves by more than this at the last iteration


class Combiner:
    """The generalist plus specialists as one function of x (no files; the stage and the teacher share it).

    Args:
        generalist: the C-class model.
        specialists: one model per group, with |S_m| + 1 outputs (dustbin last).
        groups: the specialists' classes.
        top_n: how many of the generalist's top classes select the active specialists.
        check_kkt: also track the largest KKT residual of the solutions (the optimum's
            certificate, ``specialists.combine.kkt_residual``; costs one more pass).
    """

    def __init__(self, generalist: nn.Module, specialists: list[nn.Module], groups: list[list[int]], top_n: int = 1,
                 check_kkt: bool = False):
        self.generalist = generalist.eval()
        self.specialists = [s.eval() for s in specialists]
        self.groups = [list(map(int, g)) for g in groups]
        self.top_n = int(top_n)
        self.iterations = 0  # the slowest example's solver iterations, over every call
        self.solver_seconds = 0.0
        self.check_kkt = check_kkt
        self.max_kkt_residual: float | None = None

    @torch.inference_mode()
    def parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(generalist log-probs (B, C), combined log q (B, C), active (B, M)), float64 on the models' device."""
        device = next(self.generalist.parameters()).device
        x = x.to(device, non_blocking=True)
        log_pg = torch.log_softmax(self.generalist(x).double(), 1)  # (B, C)
        p_g = log_pg.exp()
        active = active_specialists(p_g, self.groups, self.top_n)  # (B, M)
        if not self.groups:  # every specialist was dropped (specialists.check): the generalist alone
            return log_pg, log_pg.clone(), active
        probs = []
        for m, (g, model) in enumerate(zip(self.groups, self.specialists)):
            # only the rows where specialist m takes part are run; combine() ignores the others
            p_m = torch.full((len(x), len(g) + 1), 1.0 / (len(g) + 1), dtype=torch.float64, device=device)
            rows = active[:, m].nonzero().squeeze(1)
            if rows.numel():
                p_m[rows] = torch.softmax(model(x[rows]).double(), 1)  # (B_m, |S| + 1)
            probs.append(p_m)
        t0 = time.perf_counter()
        log_q, it = combine(p_g, probs, self.groups, active, tol=TOL)
        self.solver_seconds += time.perf_counter() - t0
        self.iterations = max(self.iterations, int(it))
        if self.check_kkt and len(x):
            res = float(kkt_residual(log_q, p_g, probs, self.groups, active).max())
            self.max_kkt_residual = max(self.max_kkt_residual or 0.0, res)
        return log_pg, log_q, active

    def scores(self, x, batch_size: int = 2048) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`parts` over a whole array in batches, concatenated on the CPU."""
        outs = [self.parts(xb) for xb in batches(x, batch_size)]
        return tuple(torch.cat([o[k].cpu() for o in outs]) for k in range(3))  # type: ignore[return-value]


def resolve_generalist(run_dir: Path, manifest: dict) -> Path:
    """The generalist folder a specialists run was made from: beside it (moved together) or where it was."""
    info = manifest.get("generalist", {})
    cands = []
    if info.get("relative_path"):
        cands.append(Path(run_dir) / info["relative_path"])  # the run tree was moved as a whole
    cands += [Path(p) for p in (info.get("path"), info.get("absolute_path")) if p]
    for p in cands:
        if (p / MANIFEST).exists():
            return p
    raise ArtifactError(f"{run_dir}: its generalist {info.get('path')!r} is gone; put it back or retrain the "
                        "specialists (kdens train-specialists --generalist RUN ...)")


class SpecialistsTeacher:
    """A finished ``kdens train-specialists`` run: generalist + specialists, combined (module docstring)."""

    stage = "specialists"
    soft_scores_depend_on_temperature = False  # log q serves every T, as for one model

    def __init__(self, run_dir: Path, device: str | torch.device = "cpu", top_n: int | None = None):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir, "specialists")
        cfg = manifest.get("config", {})
        gen_dir = resolve_generalist(run_dir, manifest)
        gen_hash = sha256_file(gen_dir / MANIFEST)
        if gen_hash != manifest.get("generalist", {}).get("manifest_sha256"):
            raise ArtifactError(f"{gen_dir} changed since the specialists in {run_dir} were trained from it "
                                "(its manifest.json differs); retrain them with kdens train-specialists --force")
        self.device = torch.device(device)
        self.run_dir = run_dir
        gen_model, self._gen_spec = load_model(gen_dir, self.device)
        names = manifest.get("specialists") or []
        groups = manifest.get("groups") or []
        if len(names) != len(groups) or not (names or manifest.get("dropped")):
            raise ArtifactError(f"{run_dir}/manifest.json lists {len(names)} specialists for {len(groups)} groups; "
                                "rerun kdens train-specialists")
        models, hashes, self._specs = [], [], []
        for name, g in zip(names, groups):
            sdir = run_dir / name
            read_manifest(sdir, "specialist")
            model, spec = load_model(sdir, self.device)
            if spec["num_classes"] != len(g) + 1:
                raise ArtifactError(f"{sdir} predicts {spec['num_classes']} classes, not its group's "
                                    f"{len(g)} + dustbin; retrain the specialists")
            models.append(model)
            hashes.append(sha256_file(sdir / MANIFEST))
            self._specs.append((name, g, spec))
        self.top_n = int(top_n if top_n is not None else cfg.get("top_n", 1))
        self.num_classes = int(self._gen_spec["num_classes"])
        if not 1 <= self.top_n <= self.num_classes:
            raise ConfigError(f"top_n {self.top_n} must lie in [1, {self.num_classes}]")
        self.combiner = Combiner(gen_model, models, groups, self.top_n)
        self.groups = self.combiner.groups
        self.input_shape = tuple(self._gen_spec["input_shape"])
        self.class_names = list(manifest.get("data", {}).get("class_names")
                                or [str(c) for c in range(self.num_classes)])
        self.manifest_hashes = [sha256_file(run_dir / MANIFEST), gen_hash, *hashes]
        self.data_config = data_config(read_manifest(gen_dir, "generalist"))
        self.data_fingerprint = manifest.get("data_fingerprint")

    def __call__(self, x: Tensor) -> Tensor:
        """Combined log q (B, C), float32, on the teacher's device."""
        return self.combiner.parts(x)[1].float()  # (B, C)

    def soft_scores(self, x: Tensor, temperature: float) -> Tensor:
        """log q for every T: ``softmax(log q / T)`` is the soft target at T."""
        return self(x)  # (B, C)

    def describe(self) -> dict:
        return {"stage": self.stage, "run": str(self.run_dir), "top_n": self.top_n, "tol": TOL,
                "generalist": {"model": self._gen_spec["name"], "model_args": self._gen_spec["kwargs"],
                               "params": self._gen_spec.get("params")},
                "specialists": [{"run": name, "group": list(g), "model": spec["name"],
                                 "params": spec.get("params")} for name, g, spec in self._specs]}


def load_teacher(run_dir: Path, device: str | torch.device = "cpu", top_n: int | None = None) -> SpecialistsTeacher:
    """Load a specialists run as a teacher.

    Args:
        run_dir: a finished ``kdens train-specialists`` folder.
        device: where the models and the combination compute.
        top_n: how many of the generalist's top classes activate specialists; None: the run's --top-n.

    Raises:
        ArtifactError: the folder, its generalist or a specialist is missing, unfinished or changed.
        ConfigError: top_n out of range.
    """
    return SpecialistsTeacher(run_dir, device, top_n)
