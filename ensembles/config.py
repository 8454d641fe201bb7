"""``kdens train-ensemble`` settings: a typed dataclass built from defaults < [train-ensemble] table < flags.

Members differ by seed (member k trains with ``seed + k``) and, with
``member_models``, by architecture: a list of model specs cycled over the members.
A spec is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``; a comma-separated value belongs to
the key before it, so ``mlp:hidden=64,64,dropout=0.5`` means hidden=[64, 64],
dropout=0.5. On the command line specs are joined by ``;``; in a config file they may
also be a TOML list of strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ensembles.combine import METHODS
from kdens.config import GeneralistConfig
from kdens.errors import ConfigError
from kdens.models import MODELS, parse_model_arg_value
from kdens.train import TrainConfig


def parse_member_spec(text: str) -> tuple[str, dict]:
    """``"mlp:hidden=64,64,dropout=0.5"`` -> ``("mlp", {"hidden": [64, 64], "dropout": 0.5})``.

    A user factory ``package.module:factory`` holds a colon of its own: the part after
    the last colon is read as arguments when it contains ``=`` or follows a registry name.

    Raises:
        ConfigError: an empty name, or an argument list that does not start with ``KEY=``.
    """
    text = text.strip()
    name, args = text, ""
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        if "=" in tail or not tail.strip() or head.strip() in MODELS:
            name, args = head.strip(), tail.strip()
    if not name:
        raise ConfigError(f"--member-models entry {text!r} has no model name; write e.g. mlp:hidden=64")
    kwargs: dict = {}
    key = None
    for token in (t.strip() for t in args.split(",")):
        if not token:
            continue
        if "=" in token:
            key, value = (s.strip() for s in token.split("=", 1))
            if not key:
                raise ConfigError(f"--member-models entry {text!r}: {token!r} has no key")
            kwargs[key.replace("-", "_")] = [value]
        elif key is None:
            raise ConfigError(f"--member-models entry {text!r}: arguments must look like key=value "
                              f"(got {token!r}), e.g. mlp:hidden=64,64,dropout=0.5")
        else:
            kwargs[key.replace("-", "_")].append(token)
    # one value stays a scalar, several make a list: the same rule as --model-arg
    return name, {k: parse_model_arg_value(",".join(v)) for k, v in kwargs.items()}


@dataclass
class EnsembleConfig:
    """``kdens train-ensemble``: K supervised members combined into one teacher (Hinton et al. 2015, sec. 3)."""

    members: int
    """Number of members K >= 2; member k trains with seed + k."""
    model: str | None = None
    """Registry name (mlp, cnn, lenet5) or package.module:factory of every member (or use member_models)."""
    model_args: dict = field(default_factory=dict)
    """Keyword arguments of --model, e.g. {hidden = [1200, 1200], dropout = 0.5}."""
    member_models: list | str | None = None
    """Architectures cycled over the members: "mlp:hidden=64;cnn:size=small" or a list of such specs."""
    data: str = "digits"
    """'digits', 'mnist', 'fashion-mnist', an IDX folder, an image folder, an .npz or a CSV file."""
    val_fraction: float = 0.1
    """Share of the training set held out (stratified) for validation and early stopping."""
    split_seed: int = 0
    """Seed of the validation split (the same for every member and later stages)."""
    layout: str = "auto"
    """--layout: auto, nchw, nhwc or features: how the arrays are laid out (auto decides only unambiguous shapes)."""
    label_column: str | None = None
    """--label-column: a CSV's label column (default: the last one)."""
    test_fraction: float = 0.2
    """--test-fraction: test share carved (seeded, stratified) from a CSV or image folder without a test split."""
    image_size: str | None = None
    """--image-size: H,W to resize an image folder's images to."""
    combine: str = "arithmetic"
    """'arithmetic' (mean of the members' probabilities) or 'geometric' (normalized product)."""
    temperature: float = 1.0
    """Temperature T of the reported ensemble and member metrics (NLL, ECE); not of distillation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation settings of every member (flat keys: epochs, lr, jitter, seed, ...)."""

    def __post_init__(self):
        from kdens.data import resolve_spec

        self.data = resolve_spec(self.data)
        if isinstance(self.members, bool) or not isinstance(self.members, int) or self.members < 2:
            raise ConfigError(f"--members {self.members!r} must be an integer >= 2 (an ensemble of one is a "
                              "generalist: use kdens train-generalist)")
        if self.combine not in METHODS:
            raise ConfigError(f"--combine {self.combine!r} unknown; valid: {', '.join(METHODS)}")
        t = float(self.temperature)
        if not math.isfinite(t) or t <= 0:
            raise ConfigError(f"--temperature {self.temperature} must be a finite number > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction} must be in [0, 1)")
        if self.member_models is not None:
            if self.model is not None or self.model_args:
                raise ConfigError("give either --model (with --model-arg) or --member-models, not both; "
                                  "put each member's arguments into its --member-models entry")
            self.architectures()  # raises on a malformed list
        elif not self.model:
            raise ConfigError("--model is required (or --member-models for members of several architectures)")

    def architectures(self) -> list[tuple[str, dict]]:
        """The distinct (model name, kwargs) specs, in the order they are cycled."""
        if self.member_models is None:
            return [(str(self.model), dict(self.model_args))]
        items = self.member_models
        if isinstance(items, str):
            items = items.split(";")
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"--member-models {self.member_models!r} must be a string "
                              '"mlp:hidden=64;cnn:size=small" or a list of such strings')
        specs = [parse_member_spec(s) for s in items if s.strip()]
        if not specs:
            raise ConfigError(f"--member-models {self.member_models!r} names no model")
        return specs

    def member(self, k: int) -> GeneralistConfig:
        """Member k as the generalist it is: architecture ``k mod len(specs)``, seed ``seed + k``.

        Its manifest carries this config, so a member can be evaluated, distilled or
        deployed on its own, or retrained with ``kdens train-generalist``.
        """
        name, kwargs = self.architectures()[k % len(self.architectures())]
        return GeneralistConfig(model=name, data=self.data, model_args=kwargs, val_fraction=self.val_fraction,
                                split_seed=self.split_seed, layout=self.layout, label_column=self.label_column,
                                test_fraction=self.test_fraction, image_size=self.image_size, train=replace(self.train, seed=self.train.seed + k))
