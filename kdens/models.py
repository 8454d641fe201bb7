"""Model registry: ``mlp``, ``cnn``, ``lenet5``, ``mobilenet`` and user factories ``package.module:factory``.

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
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pool; 'same' padding fits 8x8 and 28x28.

    ``width`` scales the convolutions' filters (6 and 16): ``width=0.5`` is LeNet-5-Half, the
    student of Nayak et al. (2019, zero-shot KD), with half the filters in each convolution.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0):
        super().__init__()
        if not 0 < float(width) <= 8:
            raise ModelError(f"lenet5: width={width} must lie in (0, 8], e.g. width=0.5 for LeNet-5-Half")
        c, h, w = input_shape
        c1, c2 = max(1, round(6 * width)), max(1, round(16 * width))
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.body = nn.Sequential(nn.Linear(c2 * (h // 4) * (w // 4), 120), nn.ReLU(),
                                  nn.Linear(120, 84), nn.ReLU())
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.flatten(self.features(x))))  # (B, C)


def mobilenet(num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """``mobilenet``: the MobileNetV2-style student of :mod:`kdens.mobilenet` (``width=``, ``last=``, ``dropout=``)."""
    from kdens.mobilenet import MobileNetV2

    return MobileNetV2(num_classes, input_shape, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": cnn, "lenet5": LeNet5, "mobilenet": mobilenet}


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


class Standardized(nn.Module):
    """``(x - mean) / std`` per feature or per channel, then the model.

    The normalization fitted on a run's training split lives inside the model (as buffers in
    its safetensors), so every stage, every teacher and every exported artifact takes the
    inputs as the user has them.
    """

    def __init__(self, core: nn.Module, mean: list[float], std: list[float], per: str):
        super().__init__()
        self.core = core
        shape = (1, -1) if per == "feature" else (1, -1, 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).reshape(shape))

    @property
    def head(self) -> nn.Linear:
        """The wrapped model's output layer (specialists copy rows from it)."""
        return self.core.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.core((x - self.mean) * self.inv_std)  # (B, C)


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], *, input_norm: dict | None = None,
                **kwargs) -> nn.Module:
    """Build a registry model or a user factory ``f(num_classes, input_shape, **kwargs)``, checked.

    A probe forward on two zero inputs must give ``(2, num_classes)`` logits, so a factory that
    raises or answers the wrong width stops here, naming it, not after training. With
    ``input_norm`` (a dataset's ``normalization``) the model is wrapped in :class:`Standardized`.
    """
    factory = _resolve(name)
    try:
        model = factory(num_classes, tuple(input_shape), **kwargs)
    except ModelError:
        raise
    except TypeError as e:
        raise ModelError(f"--model {name}: bad --model-arg ({e})") from None
    except Exception as e:  # a user's factory: anything it raises is bad input, named
        raise ModelError(f"--model {name}: the factory raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model {name}: factory returned {type(model).__name__}, not an nn.Module")
    if input_norm:
        model = Standardized(model, input_norm["mean"], input_norm["std"], input_norm.get("per", "channel"))
    _probe(model, name, num_classes, tuple(input_shape))
    return model


def _probe(model: nn.Module, name: str, num_classes: int, input_shape: tuple[int, ...]) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise ModelError(f"--model {name}: a forward pass on inputs of shape {(2, *input_shape)} failed "
                         f"({type(e).__name__}: {e}); the model must take this data's inputs") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"--model {name}: its output for 2 inputs is {got}, expected (2, {num_classes}) "
                         f"logits, one per class of this data")


def model_spec(name: str, num_classes: int, input_shape, kwargs: dict, input_norm: dict | None = None) -> dict:
    """The JSON description stored as ``model.json``; enough to rebuild the module."""
    spec = {"name": name, "num_classes": int(num_classes), "input_shape": list(input_shape), "kwargs": dict(kwargs)}
    if input_norm:
        spec["input_norm"] = input_norm
    return spec


def build_for_data(name: str, data, model_args: dict) -> tuple[nn.Module, dict]:
    """(model, spec) of ``name`` for ``data``: its classes, input shape and normalization."""
    norm = getattr(data, "normalization", None)
    model = build_model(name, data.num_classes, data.input_shape, input_norm=norm, **model_args)
    return model, model_spec(name, data.num_classes, data.input_shape, model_args, norm)


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
    """Rebuild a model from ``model.json`` and load ``model.safetensors`` into it (eval mode).

    An imported ONNX file (``"format": "onnx"``) comes back as :class:`kdens.imported.OnnxModel`.
    """
    from safetensors.torch import load_file

    from kdens.artifacts import read_json, require_files

    run_dir = Path(run_dir)
    require_files(run_dir, ["model.json"], ("generalist", "student"))
    spec = read_json(run_dir / "model.json")
    if spec.get("format") == "onnx":  # an imported ONNX teacher (kdens import-model): run by ONNX Runtime
        from kdens.imported import ONNX_FILE, OnnxModel

        require_files(run_dir, [ONNX_FILE], "generalist")
        return OnnxModel(run_dir / ONNX_FILE, spec).eval(), spec
    require_files(run_dir, ["model.safetensors"], ("generalist", "student"))
    model = build_model(spec["name"], spec["num_classes"], tuple(spec["input_shape"]),
                        input_norm=spec.get("input_norm"), **spec["kwargs"])
    try:
        model.load_state_dict(load_file(run_dir / "model.safetensors", device=str(device)))
    except (RuntimeError, OSError) as e:
        raise ModelError(f"{run_dir}/model.safetensors does not fit model.json ({e})") from None
    return model.to(device).eval(), spec
