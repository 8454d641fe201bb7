"""Model registry: ``mlp``, ``cnn``, ``lenet5`` and user factories ``package.module:factory``.

Every model maps float images (B, C, H, W) to logits (B, num_classes) and ends in an
attribute ``head: nn.Linear`` — specialists copy the generalist's output rows from it.
Weights are stored as safetensors beside a JSON description (``model.json``), never pickled.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kdens.errors import ModelError


class MLP(nn.Module):
    """Fully connected net, the paper's MNIST teacher/student shape (e.g. 1200-1200, 800-800)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: list[int] = (800, 800),
                 dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        if isinstance(hidden, int):
            hidden = [hidden]
        _check_prob("dropout", dropout)
        _check_prob("input_dropout", input_dropout)
        if not hidden or any(h < 1 for h in hidden):
            raise ModelError(f"mlp: hidden={list(hidden)} must be positive layer sizes, e.g. hidden=800,800")
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(x)))  # (B, C)


class CNN(nn.Module):
    """Conv blocks (conv-ReLU[-BN] x k, then 2x2 max-pool) + one hidden FC layer.

    Each pooling step is its own module: PT2E quantization fails on a MaxPool2d module
    used twice (docs/toolchain.md).
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 32, depth: int = 2,
                 convs_per_block: int = 1, hidden: int = 128, dropout: float = 0.25,
                 batchnorm: bool = False):
        super().__init__()
        if width < 1 or depth < 1 or convs_per_block < 1 or hidden < 1:
            raise ModelError(f"cnn: width, depth, convs_per_block and hidden must be >= 1 "
                             f"(got {width}, {depth}, {convs_per_block}, {hidden})")
        _check_prob("dropout", dropout)
        c, h, w = input_shape
        layers: list[nn.Module] = []
        ch = c
        for b in range(depth):
            out = width * 2 ** b
            for _ in range(convs_per_block):
                layers.append(nn.Conv2d(ch, out, 3, padding=1))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                ch = out
            if min(h, w) >= 2:  # pool while there is something left to pool
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(nn.Linear(ch * h * w, hidden), nn.ReLU(),
                                  *( [nn.Dropout(dropout)] if dropout > 0 else []))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(self.features(x))))  # (B, C)


CNN_PRESETS = {
    "small": dict(width=16, depth=2, convs_per_block=1, hidden=64, dropout=0.25),
    "large": dict(width=32, depth=3, convs_per_block=2, hidden=256, dropout=0.4, batchnorm=True),
}


def cnn(num_classes: int, input_shape: tuple[int, ...], size: str = "small", **kwargs) -> CNN:
    """``cnn`` with ``size=small|large`` presets; any explicit argument overrides the preset."""
    if size not in CNN_PRESETS:
        raise ModelError(f"cnn: size={size!r} unknown; valid: {', '.join(CNN_PRESETS)}")
    return CNN(num_classes, input_shape, **{**CNN_PRESETS[size], **kwargs})


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pool; 'same' padding fits 8x8 and 28x28."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(),
                                  nn.Linear(120, 84), nn.ReLU())
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(self.features(x))))  # (B, C)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": cnn, "lenet5": LeNet5}


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= float(p) < 1.0:
        raise ModelError(f"{name}={p} must be in [0, 1)")


def parse_model_arg_value(text: str) -> Any:
    """'1200,1200' → [1200, 1200]; '0.5' → 0.5; '3' → 3; 'true' → True; else the string."""
    text = text.strip()
    if "," in text:
        return [parse_model_arg_value(t) for t in text.split(",") if t.strip()]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_model_args(items: list[str] | tuple[str, ...] | dict | None, flag: str = "--model-arg",
                     example: str = "hidden=800,800") -> dict[str, Any]:
    """Repeated ``key=value`` strings (or a dict from a config file) → kwargs.

    ``flag`` and ``example`` name the option in the error (``--method-arg`` uses this parser too).
    """
    if not items:
        return {}
    if isinstance(items, dict):
        return {k.replace("-", "_"): v for k, v in items.items()}
    if isinstance(items, str):
        items = [items]
    out = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ModelError(f"{flag} {item!r} must look like key=value, e.g. {example}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = parse_model_arg_value(v)
    return out


def _resolve(name: str) -> Callable[..., nn.Module]:
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        mod_name, fn_name = name.split(":", 1)
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelError(f"--model {name!r}: cannot import {mod_name} ({e}); is it on PYTHONPATH?") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise ModelError(f"--model {name!r}: {mod_name} has no callable {fn_name}")
        return fn
    raise ModelError(
        f"--model {name!r} is unknown; valid: {', '.join(MODELS)}, or package.module:factory"
    )


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build a registry model or a user factory ``f(num_classes, input_shape, **kwargs)``."""
    factory = _resolve(name)
    try:
        model = factory(num_classes, tuple(input_shape), **kwargs)
    except TypeError as e:
        raise ModelError(f"--model {name}: bad --model-arg ({e})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {name}: factory returned {type(model).__name__}, not an nn.Module")
    return model


def model_spec(name: str, num_classes: int, input_shape, kwargs: dict) -> dict:
    """The JSON description stored as ``model.json``; enough to rebuild the module."""
    return {"name": name, "num_classes": int(num_classes), "input_shape": list(input_shape),
            "kwargs": dict(kwargs)}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(run_dir: Path, model: nn.Module, spec: dict) -> list[Path]:
    """Write ``model.safetensors`` and ``model.json`` atomically; returns the paths."""
    from safetensors.torch import save

    from kdens.artifacts import atomic_write_bytes, atomic_write_json

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    run_dir = Path(run_dir)
    return [atomic_write_bytes(run_dir / "model.safetensors", save(state)),
            atomic_write_json(run_dir / "model.json", {**spec, "params": count_params(model)})]


def load_model(run_dir: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from ``model.json`` and load ``model.safetensors`` into it (eval mode)."""
    from safetensors.torch import load_file

    from kdens.artifacts import read_json, require_files

    run_dir = Path(run_dir)
    require_files(run_dir, ["model.json", "model.safetensors"], ("generalist", "student"))
    spec = read_json(run_dir / "model.json")
    model = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]), **spec["kwargs"])
    try:
        model.load_state_dict(load_file(run_dir / "model.safetensors", device=str(device)))
    except (RuntimeError, OSError) as e:
        raise ModelError(f"{run_dir}/model.safetensors does not fit model.json ({e})") from None
    return model.to(device).eval(), spec
