"""Typed stage configs and how they are built: defaults < config file (TOML) < CLI flags.

Config-file keys mirror the flags (``model-arg`` / ``model_args``, ``batch-size`` /
``batch_size``); unknown keys are an error that lists the valid ones. A file may hold
the keys at top level or in a table named after the command (``[train-generalist]``)
or the stage (``[generalist]``), so one pipeline file can serve every command.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kdens.errors import ConfigError
from kdens.models import parse_model_args
from kdens.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


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


def _norm(key: str) -> str:
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


def build(cls, *layers: dict) -> Any:
    """Build dataclass ``cls`` from dict layers (later wins); a ``train`` field takes TrainConfig keys."""
    own = {f.name: f for f in fields(cls)}
    train_keys = {f.name: f for f in fields(TrainConfig)} if "train" in own else {}
    kw: dict[str, Any] = {}
    tkw: dict[str, Any] = {}
    for layer in layers:
        for raw_key, value in (layer or {}).items():
            key = _norm(raw_key)
            if key in own and key != "train":
                if key in _KEY_VALUE_KEYS:
                    value = parse_model_args(value, *_KEY_VALUE_KEYS[key])
                    kw[key] = {**kw.get(key, {}), **value}
                else:
                    kw[key] = _coerce(cls.__name__, own[key], value)
            elif key in train_keys:
                tkw[key] = _coerce("train", train_keys[key], value)
            else:
                valid = sorted(k.replace("_", "-") for k in list(own) + list(train_keys) if k != "train")
                raise ConfigError(f"unknown config key {raw_key!r}; valid keys: {', '.join(valid)}")
    if train_keys:
        kw["train"] = TrainConfig(**tkw)
    missing = [f.name for f in fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in kw]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**kw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


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
