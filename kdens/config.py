"""Typed stage configs and how they are built: defaults < config file (TOML) < CLI flags.

Config-file keys mirror the flags (``model-arg`` / ``model_args``, ``batch-size`` /
``batch_size``); unknown keys are an error that lists the valid ones, which are exactly
the flags (settings without a flag, marked ``INTERNAL``, cannot be set from a file). A file may hold
the keys at top level or in a table named after the command (``[train-generalist]``)
or the stage (``[generalist]``), so one pipeline file can serve every command.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from kdens.errors import ConfigError
from kdens.models import parse_model_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


EPOCHS_CAP_ENV = "KDENS_EPOCHS_CAP"
"""Smoke-test knob: every run trains at most this many epochs (README, "Docs that run")."""
INTERNAL = {"internal": True}
"""Field metadata: a setting with no flag; config files cannot set it and errors do not list it."""


def _epochs_cap_from_env() -> int | None:
    raw = os.environ.get(EPOCHS_CAP_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{EPOCHS_CAP_ENV}={raw!r} must be a positive whole number of epochs, or unset")
    return int(raw)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage."""

    epochs: int = 20
    """Number of passes over the training data."""
    batch_size: int = 128
    """Examples per optimisation step (global, summed over DDP ranks)."""
    optimizer: str = "sgd"
    """'sgd' (Nesterov momentum) or 'adamw'."""
    lr: float | None = None
    """Peak learning rate; default 0.05 for sgd, 1e-3 for adamw."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float | None = None
    """L2 / decoupled weight decay; default 5e-4 for sgd, 1e-2 for adamw."""
    schedule: str = "cosine"
    """'cosine' (per step, to zero), 'step' (x gamma every step_size epochs) or 'none'."""
    step_size: int = field(default=10, metadata=INTERNAL)
    """Epochs between decays for schedule='step'."""
    gamma: float = field(default=0.1, metadata=INTERNAL)
    """Decay factor for schedule='step'."""
    max_norm: float | None = None
    """If set, clip each unit's incoming weight vector to this L2 norm after every step."""
    grad_clip: float | None = None
    """If set, clip the global gradient L2 norm to this before every step. Distillation at
    high T needs it: the T^2-scaled soft gradient is T * (q_T - p_T), up to T times a
    cross-entropy gradient once student logits grow (seen: NaN at T=20, lr 0.05)."""
    jitter: int = 0
    """Random translation of up to this many pixels per example (the paper's +-2 px)."""
    augment: list[str] = field(default_factory=list)
    """Augmentations (``--augment crop,flip,mixup``): ``crop`` pads by reflection and crops back
    (``kdens.train.crop_padding``), ``flip`` mirrors left-right with probability 1/2 (images
    only); ``mixup`` or ``mixup=A`` blends each batch with a shuffled copy of itself by
    lambda ~ Beta(A, A) (A = 1: uniform) and weights the hard-label loss of the two labels by
    lambda and 1 - lambda (Zhang et al. 2018), images or features. Stored as ``mixup=A``."""
    patience: int | None = None
    """Stop after this many epochs without a lower validation loss. Off by default: the whole
    schedule runs and the best validation epoch's weights are kept, because stopping fights a
    cosine schedule (a 150-epoch run stopped at epoch 34 with the learning rate barely decayed,
    and specialists built on it showed twice their real gain). A stop is said on the result line."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    seed: int = 0
    """Seed for initialisation, shuffling, jitter and dropout."""
    eval_batch_size: int = field(default=2048, metadata=INTERNAL)
    """Batch size for validation passes."""
    epochs_cap: int | None = field(default=None, metadata=INTERNAL)
    """At most this many epochs are run (``run_epochs``); taken from $KDENS_EPOCHS_CAP when unset.
    A smoke-test setting: it enters the manifest's config (so a capped run is never reused as
    a real one) and is left out of it when off (``without_unset_cap``)."""

    def __post_init__(self):
        if self.epochs_cap is None:
            self.epochs_cap = _epochs_cap_from_env()
        if self.epochs_cap is not None and self.epochs_cap < 1:
            raise ConfigError(f"epochs_cap {self.epochs_cap} must be >= 1 (or unset)")
        if self.epochs < 1:
            raise ConfigError(f"--epochs {self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be >= 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--optimizer {self.optimizer!r} unknown; valid: sgd, adamw")
        if self.schedule not in ("cosine", "step", "none"):
            raise ConfigError(f"--schedule {self.schedule!r} unknown; valid: cosine, step, none")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr {self.lr} must be > 0")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay} must be >= 0")
        if self.max_norm is not None and not self.max_norm > 0:
            raise ConfigError(f"--max-norm {self.max_norm} must be > 0")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"--grad-clip {self.grad_clip} must be > 0")
        if self.jitter < 0:
            raise ConfigError(f"--jitter {self.jitter} must be >= 0 pixels")
        self.augment = parse_augment(self.augment)
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"--patience {self.patience} must be >= 1 (or unset to disable)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r} unknown; valid: auto, cpu, cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available here; use --device cpu or auto")

    @property
    def run_epochs(self) -> int:
        """Epochs actually run: ``epochs``, cut to ``epochs_cap`` when a cap is set."""
        return min(self.epochs, self.epochs_cap) if self.epochs_cap is not None else self.epochs

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.05 if self.optimizer == "sgd" else 1e-3)

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 1e-2

    def to_dict(self) -> dict:
        return without_unset_cap(asdict(self))


AUGMENTATIONS = ("crop", "flip", "mixup")
PIXEL_AUGMENTATIONS = ("crop", "flip")
"""The augmentations that move pixels (refused for feature vectors); mixup blends whole inputs."""


def parse_augment(value) -> list[str]:
    """``"crop,flip,mixup=0.2"`` (a flag) or ``["crop", "flip"]`` (a config file) -> the names, in
    the fixed order they are applied (crop, flip, then mixup), each once; mixup as ``mixup=A``."""
    if value is None:
        return []
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n and n != "none"]
    bad = [n for n in names if n.split("=", 1)[0] not in AUGMENTATIONS or ("=" in n and not n.startswith("mixup="))]
    if bad:
        raise ConfigError(f"--augment {','.join(bad)} unknown; valid: crop, flip, mixup or mixup=A "
                          "(comma-separated, e.g. --augment crop,flip or --augment mixup=0.2)")
    out = [a for a in PIXEL_AUGMENTATIONS if a in names]
    mix = [n for n in names if n.split("=", 1)[0] == "mixup"]
    if mix:
        out.append(f"mixup={_mixup_alpha(mix[-1]):g}")
    return out


def _mixup_alpha(name: str) -> float:
    if "=" not in name:
        return 1.0
    raw = name.split("=", 1)[1]
    try:
        a = float(raw)
    except ValueError:
        a = float("nan")
    if not (math.isfinite(a) and a > 0):
        raise ConfigError(f"--augment {name}: A of mixup=A is the Beta(A, A) shape, a number > 0 "
                          f"(1: lambda uniform on [0, 1]; 0.2: mostly light blends), got {raw!r}")
    return a


def mixup_alpha(augment: list[str]) -> float | None:
    """The Beta shape A of ``mixup=A`` in a parsed ``augment`` list, or None without mixup."""
    return next((float(n.split("=", 1)[1]) for n in augment if n.startswith("mixup=")), None)


def pixel_augments(augment: list[str]) -> list[str]:
    """The names in ``augment`` that move pixels (crop, flip)."""
    return [n for n in augment if n in PIXEL_AUGMENTATIONS]


def without_unset_cap(train: dict) -> dict:
    """A TrainConfig as data, without ``epochs_cap`` when it is off and without ``augment`` when
    empty: runs keyed before these settings existed keep their keys (reused by ``kdens run``,
    resumable from their checkpoints)."""
    if train.get("epochs_cap", 0) is None:
        train = {k: v for k, v in train.items() if k != "epochs_cap"}
    if "augment" in train and not train["augment"]:
        train = {k: v for k, v in train.items() if k != "augment"}
    return train


def load_toml(path: Path) -> dict:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: invalid TOML ({e})") from None


def section(doc: dict, names: tuple[str, ...]) -> dict:
    """The keys for one command: its own table if present, else the top-level scalars."""
    for name in names:
        if isinstance(doc.get(name), dict):
            return dict(doc[name])
    return {k: v for k, v in doc.items()
            if not isinstance(v, dict) or k in ("model_args", "model-arg", "model-args", "method_args", "method-args")}


def norm_key(key: str) -> str:
    """A config key as its field name: ``batch-size`` -> ``batch_size``, ``model-arg`` -> ``model_args``."""
    key = key.replace("-", "_")
    return {"model_arg": "model_args", "method_arg": "method_args"}.get(key, key)


# dict-valued keys given as repeated KEY=VALUE flags or a TOML table; layers merge key by key
_KEY_VALUE_KEYS = {"model_args": ("--model-arg", "hidden=800,800"),
                   "method_args": ("--method-arg", "beta=8")}


def _coerce(cls_name: str, f: dataclasses.Field, value: Any) -> Any:
    """Light type checks so a config typo fails here, naming the key, not deep in training."""
    t = str(f.type)
    if value is None:
        return None
    if t.startswith("int") and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif t.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif t.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif t.startswith("str"):
        if isinstance(value, (str, Path)):
            return str(value)
    else:
        return value
    raise ConfigError(f"{cls_name}: {f.name.replace('_', '-')}={value!r} should be of type {t}")


def settable(cls) -> dict[str, dataclasses.Field]:
    """The fields of ``cls`` a config file or flag may set: all but ``INTERNAL`` ones and ``train``."""
    return {f.name: f for f in fields(cls) if not f.metadata.get("internal") and f.name != "train"}


def key_name(field_name: str) -> str:
    """How ``--help`` spells a field: ``batch_size`` -> ``batch-size``, ``model_args`` -> ``model-arg``."""
    return {"model_args": "model-arg", "method_args": "method-arg"}.get(field_name, field_name.replace("_", "-"))


def build(cls, *layers: dict) -> Any:
    """Build dataclass ``cls`` from dict layers (later wins); a ``train`` field takes TrainConfig keys."""
    own = settable(cls)
    train_keys = settable(TrainConfig) if any(f.name == "train" for f in fields(cls)) else {}
    kw: dict[str, Any] = {}
    tkw: dict[str, Any] = {}
    for layer in layers:
        for raw_key, value in (layer or {}).items():
            key = norm_key(raw_key)
            if key in own and key != "train":
                if key in _KEY_VALUE_KEYS:
                    value = parse_model_args(value, *_KEY_VALUE_KEYS[key])
                    kw[key] = {**kw.get(key, {}), **value}
                else:
                    kw[key] = _coerce(cls.__name__, own[key], value)
            elif key in train_keys:
                tkw[key] = _coerce("train", train_keys[key], value)
            else:
                valid = sorted(key_name(k) for k in list(own) + list(train_keys))
                raise ConfigError(f"unknown config key {raw_key!r}; valid keys: {', '.join(valid)}")
    if train_keys:
        kw["train"] = TrainConfig(**tkw)
    missing = [f.name for f in fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kw]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join('--' + key_name(m) for m in missing)}")
    return cls(**kw)


def to_dict(cfg) -> dict:
    """A config as plain data (manifests, ``kdens run`` keys); an unset epochs cap is left out."""
    d = dataclasses.asdict(cfg)
    if isinstance(d.get("train"), dict):
        d["train"] = without_unset_cap(d["train"])
    return without_unset_cap(d) if isinstance(cfg, TrainConfig) else d


@dataclass
class GeneralistConfig:
    """``kdens train-generalist``: one supervised model on hard labels."""

    model: str
    """Registry name (mlp, cnn, lenet5) or package.module:factory."""
    data: str = "digits"
    """'digits', 'mnist', 'fashion-mnist', an IDX folder, an image folder, an .npz or a CSV file."""
    model_args: dict = field(default_factory=dict)
    """Model keyword arguments, e.g. {hidden = [1200, 1200], dropout = 0.5}."""
    train_fraction: float = 1.0
    """Train on a seeded, class-stratified fraction of the training split."""
    val_fraction: float = 0.1
    """Share of the training set held out (stratified) for validation."""
    split_seed: int = 0
    """Seed of the validation split and train-fraction subset (fixed across stages)."""
    layout: str = "auto"
    """--layout: auto, nchw, nhwc or features: how the arrays are laid out (auto decides only unambiguous shapes)."""
    label_column: str | None = None
    """--label-column: a CSV's label column (default: the last one)."""
    test_fraction: float = 0.2
    """--test-fraction: test share carved (seeded, stratified) from a CSV or image folder without a test split."""
    image_size: str | None = None
    """--image-size: H,W to resize an image folder's images to."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings (flat keys: epochs, lr, jitter, ...)."""

    def __post_init__(self):
        from kdens.data import resolve_spec

        self.data = resolve_spec(self.data)
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"--train-fraction {self.train_fraction} must be in (0, 1]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
