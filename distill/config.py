"""``kdens distill`` settings: a typed dataclass built from defaults < [distill] table < flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

from distill import trees
from distill.feature_cache import parse_budget
from distill.methods import LOSS_ALIASES, method_class
from distill.methods.hints import parse_hints
from distill.transfer import TransferSpec, parse_transfer
from kdens.config import mixup_alpha
from kdens.errors import ConfigError
from kdens.train import TrainConfig

TREE_METHODS = ("kd", "soft")
"""The methods a tree student takes: their soft targets (T) and hard-label weight (alpha) define its targets."""


@dataclass
class DistillConfig:
    """``kdens distill``: train a student on a teacher's soft targets (Hinton et al. 2015) or by another method."""

    teacher: str | None = None
    """Teacher run folder (generalist, student, ensemble, specialists, generations), or several joined by
    commas; not needed by --method tfkd-virtual."""
    model: str | None = None
    """Student registry name (mlp, cnn, lenet5), package.module:factory, or a tree student (tree, gbt:
    distill/trees.py); default: the teacher's architecture when the teacher is a single model."""
    model_args: dict = field(default_factory=dict)
    """Student keyword arguments, e.g. {hidden = [800, 800]}."""
    data: str | None = None
    """Dataset spec; default: the data the (first) teacher was trained on (digits without a teacher)."""
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
    method: str | None = None
    """Distillation method (distill.methods.METHODS); default kd."""
    method_args: dict = field(default_factory=dict)
    """The method's own settings (docs/methods.md); resolved with the paper's defaults."""
    temperature: float | None = None
    """Softening temperature T > 0; default the method's (4 for kd). Sets method_args.temperature."""
    alpha: float | None = None
    """Weight of the hard-label cross-entropy in [0, 1] for kd / soft / logits (0.1; 0 for soft)."""
    loss: str | None = None
    """Alias of method for 'kd' (alpha*CE + (1-alpha)*T^2*KL), 'soft' (T^2*KL only), 'logits' (Ba & Caruana L2)."""
    hint: list = field(default_factory=list)
    """Feature methods: TEACHER_MODULE:STUDENT_MODULE points (default head/in:head/in, the last hidden layers)."""
    generations: int | None = None
    """Born-again generations: train gen-01..gen-N, each from the one before, into folders under --out."""
    transfer: str = "train"
    """Transfer set: train | val | fraction=F | omit=C1,C2 | unlabeled=PATH | munge=N[,p=P,s=S] |
    impressions=N[,beta=B1:B2,t=T,iters=I,lr=LR,batch=B,l2=W,clip=step|end] (data-free, from the teacher's weights)."""
    fix_bias: bool = False
    """After omit=: shift the omitted classes' output biases by one scalar fitted on validation."""
    baseline: str | None = None
    """A hard-label run of the same student, to report the share of the teacher gap recovered."""
    cache_dir: str | None = None
    """Soft-target cache folder; default: a 'soft_targets' folder beside --out."""
    feature_cache_mb: Union[float, str] = "auto"  # noqa: UP007 (config.build type-checks 'float ...' / 'str ...')
    """Feature methods: memory budget (MB) for the teacher's logits and hint features, computed once when there is
    no --jitter: held in memory when they fit, else a memory-mapped .npy in --cache-dir; 0 runs the teacher online
    every batch; 'auto' is a quarter of the free memory."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings (flat keys: epochs, lr, jitter, ...)."""

    def __post_init__(self):
        from kdens.data import resolve_spec

        self.data = resolve_spec(self.data) if self.data is not None else None
        self._resolve_method()
        if self.teacher is not None and not str(self.teacher).strip():
            raise ConfigError("--teacher is empty; give a run folder (or several, comma-separated)")
        if self.teacher is None and method_class(self.method).teacher != "none":
            raise ConfigError(f"--method {self.method} needs --teacher (a run folder, or several joined by commas); "
                              "only tfkd-virtual trains without one")
        self._resolve_hints()
        # a number from a config file, a string from the flag, None when unset
        self.feature_cache_mb = parse_budget("auto" if self.feature_cache_mb is None else self.feature_cache_mb)
        if self.generations is not None:
            if isinstance(self.generations, bool) or int(self.generations) < 1:
                raise ConfigError(f"--generations {self.generations} must be an integer >= 1")
            if method_class(self.method).teacher == "none":
                raise ConfigError(f"--generations trains each generation from the one before; --method "
                                  f"{self.method} uses no teacher, so there is nothing to chain")
        if mixup_alpha(self.train.augment) is not None and method_class(self.method).features:
            raise ConfigError(f"--augment mixup does not apply to --method {self.method}: a feature method reads "
                              "the hidden layers of one forward pass per batch, and mixup's loss weighs two labels "
                              "on it; use mixup with a logit method (kd, soft, logits, dkd, dist, lskd, ...)")
        spec = parse_transfer(self.transfer)  # raises ConfigError listing the valid forms
        if self.fix_bias and spec.kind != "omit":
            raise ConfigError(f"--fix-bias needs --transfer omit=C1,... (got --transfer {self.transfer}): "
                              "only omitted classes have a bias to fix")
        if trees.is_tree(self.model):
            self._check_tree()
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.fix_bias and self.val_fraction == 0.0:
            raise ConfigError("--fix-bias fits the shift on the validation split; --val-fraction must be > 0")

    def _resolve_method(self) -> None:
        """method / --loss alias, and --temperature / --alpha folded into method_args with the defaults."""
        if self.loss is not None and self.loss not in LOSS_ALIASES:
            raise ConfigError(f"--loss {self.loss!r} unknown; valid: {', '.join(sorted(LOSS_ALIASES))} "
                              "(other methods: --method)")
        if self.method is None:
            self.method = self.loss or "kd"
        cls = method_class(self.method)  # ConfigError listing the valid names
        if self.loss is not None and self.loss != self.method:
            raise ConfigError(f"--loss {self.loss} and --method {self.method} disagree; --loss is an alias of "
                              "--method for kd, soft and logits: give one of them")
        args = {str(k).replace("-", "_"): v for k, v in dict(self.method_args or {}).items()}
        if self.temperature is not None:
            t = _finite(self.temperature)
            if t is None or t <= 0:
                raise ConfigError(f"--temperature {self.temperature} must be a finite number > 0 "
                                  "(the paper uses 1..20)")
            if "temperature" not in cls.params:
                raise ConfigError(f"--temperature does not apply to --method {self.method}: it softens no "
                                  "distribution (see docs/methods.md)")
            _fold(args, "temperature", t, "--temperature", cls)
        if self.alpha is not None:
            a = _finite(self.alpha)
            if a is None or not 0.0 <= a <= 1.0:
                raise ConfigError(f"--alpha {self.alpha} must lie in [0, 1] (weight of the hard-label loss)")
            if self.method not in LOSS_ALIASES:
                raise ConfigError(f"--alpha (kdens' hard-label weight for kd, soft and logits) does not apply to "
                                  f"--method {self.method}; set its own weights with --method-arg KEY=VALUE "
                                  f"(keys: {', '.join(cls.params)})")
            _fold(args, "alpha", a, "--alpha", cls)
        self.method_args = cls.resolve(args)
        self.temperature = self.method_args.get("temperature")
        self.alpha = self.method_args.get("alpha") if self.method in LOSS_ALIASES else None
        self.loss = self.method if self.method in LOSS_ALIASES else None

    def _check_tree(self) -> None:
        """A tree student (distill/trees.py) is fitted once to soft targets: refuse what only a network does."""
        m = self.model
        if self.method not in TREE_METHODS:
            raise ConfigError(f"--model {m} is fitted to the teacher's soft targets by regression; --method "
                              f"{self.method} is a loss for networks: use --method {' or '.join(TREE_METHODS)}")
        refusals = [(self.train.jitter > 0, f"--jitter {self.train.jitter:g}",
                     "a tree sees each input once; jittered copies need the teacher online every step"),
                    (bool(self.train.augment), f"--augment {','.join(self.train.augment)}",
                     "a tree sees each input once; augmented views need the teacher online every step"),
                    (self.generations is not None, f"--generations {self.generations}",
                     "born-again chains train networks from networks"),
                    (self.fix_bias, "--fix-bias", "it shifts a network's output bias"),
                    (self.baseline is not None, f"--baseline {self.baseline}",
                     "the hard-label twin (same tree settings on hard labels) is fitted in the same run")]
        for bad, flag, why in refusals:
            if bad:
                raise ConfigError(f"{flag} does not apply to --model {m}: {why}; drop it")
        self.model_args = trees.resolve_args(m, dict(self.model_args or {}))

    def _resolve_hints(self) -> None:
        hints = self.hint
        if hints is None:
            hints = []
        elif isinstance(hints, str):
            hints = [hints]
        hints = [str(h) for h in hints]
        if hints and not method_class(self.method).features:
            raise ConfigError(f"--hint names hidden layers for the feature methods (fitnets, fsp, rkd); "
                              f"--method {self.method} reads only the outputs")
        parse_hints(hints)  # ConfigError naming a malformed value
        self.hint = hints

    @property
    def twin_in_run(self) -> bool:
        """Whether the student fits its own hard-label twin (tree students) instead of a separate baseline run."""
        return trees.is_tree(self.model)

    @property
    def transfer_spec(self) -> TransferSpec:
        """The parsed ``transfer`` value."""
        return parse_transfer(self.transfer)


def _finite(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fold(args: dict, key: str, value: float, flag: str, cls) -> None:
    """Put a flag's value into method_args; a different --method-arg for the same key is an error."""
    if key in args and cls.params[key].coerce(cls.name, key, args[key]) != value:
        raise ConfigError(f"{flag} {value:g} and --method-arg {key}={args[key]} disagree; give one of them")
    args[key] = value
