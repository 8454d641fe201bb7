"""``kdens distill`` settings: a typed dataclass built from defaults < [distill] table < flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distill.losses import LOSSES
from distill.transfer import TransferSpec, parse_transfer
from kdens.errors import ConfigError
from kdens.train import TrainConfig


@dataclass
class DistillConfig:
    """``kdens distill``: train a student on a teacher's soft targets (Hinton et al. 2015)."""

    teacher: str
    """Teacher run folder (generalist, student, ensemble, specialists), or several joined by commas."""
    model: str
    """Student registry name (mlp, cnn, lenet5) or package.module:factory."""
    model_args: dict = field(default_factory=dict)
    """Student keyword arguments, e.g. {hidden = [800, 800]}."""
    data: str | None = None
    """Dataset spec; default: the data the (first) teacher was trained on."""
    val_fraction: float | None = None
    """Validation share of the training split; default: the teacher's."""
    split_seed: int | None = None
    """Seed of the validation split and of fraction=F; default: the teacher's."""
    layout: str | None = None
    """--layout (auto, nchw, nhwc, features); default: the teacher's."""
    label_column: str | None = None
    """--label-column of a CSV; default: the teacher's."""
    test_fraction: float | None = None
    """--test-fraction of a CSV or image folder; default: the teacher's."""
    image_size: str | None = None
    """--image-size H,W of an image folder; default: the teacher's."""
    temperature: float = 4.0
    """Softening temperature T > 0 applied to teacher and student logits in the soft term."""
    alpha: float = 0.1
    """Weight of the hard-label cross-entropy in [0, 1]; the soft term gets 1 - alpha."""
    loss: str = "kd"
    """'kd' (alpha*CE + (1-alpha)*T^2*KL), 'soft' (T^2*KL only) or 'logits' (Ba & Caruana L2)."""
    transfer: str = "train"
    """Transfer set: train | val | fraction=F | omit=C1,C2 | unlabeled=PATH | munge=N[,p=P,s=S]."""
    fix_bias: bool = False
    """After omit=: shift the omitted classes' output biases by one scalar fitted on validation."""
    baseline: str | None = None
    """A hard-label run of the same student, to report the share of the teacher gap recovered."""
    cache_dir: str | None = None
    """Soft-target cache folder; default: a 'soft_targets' folder beside --out."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings (flat keys: epochs, lr, jitter, ...)."""

    def __post_init__(self):
        from kdens.data import resolve_spec

        self.data = resolve_spec(self.data) if self.data is not None else None
        if not str(self.teacher).strip():
            raise ConfigError("--teacher is empty; give a run folder (or several, comma-separated)")
        t = float(self.temperature)
        if not math.isfinite(t) or t <= 0:
            raise ConfigError(f"--temperature {self.temperature} must be a finite number > 0 (the paper uses 1..20)")
        a = float(self.alpha)
        if not math.isfinite(a) or not 0.0 <= a <= 1.0:
            raise ConfigError(f"--alpha {self.alpha} must lie in [0, 1] (weight of the hard-label loss)")
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss {self.loss!r} unknown; valid: {', '.join(sorted(LOSSES))}")
        if self.loss == "soft" and a != 0:
            raise ConfigError(f"--loss soft has no hard-label term, so --alpha must be 0 (got {self.alpha}); "
                              "use --loss kd to mix in cross-entropy")
        spec = parse_transfer(self.transfer)  # raises ConfigError listing the valid forms
        if self.fix_bias and spec.kind != "omit":
            raise ConfigError(f"--fix-bias needs --transfer omit=C1,... (got --transfer {self.transfer}): "
                              "only omitted classes have a bias to fix")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.fix_bias and self.val_fraction == 0.0:
            raise ConfigError("--fix-bias fits the shift on the validation split; --val-fraction must be > 0")

    @property
    def transfer_spec(self) -> TransferSpec:
        """The parsed ``transfer`` value."""
        return parse_transfer(self.transfer)
