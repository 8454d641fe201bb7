"""The user's raw input, described and reproduced: what an exported artifact takes.

Inside kdens every model takes float32 features (N, D) or images (N, C, H, W), uint8 pixels
scaled to [0, 1] (:func:`kdens.data._to_model_input`). A deployed model should instead take
the arrays the user has: uint8 NHWC photos stay uint8 NHWC. :func:`describe` records how the
user's arrays looked (on the dataset, hence in every manifest), :func:`to_raw` turns model
inputs back into that form exactly (uint8 pixels survive the /255 and back), and
:class:`RawInput` puts the cast, the /255 and the transpose in front of a model so that an
exporter writes them into the artifact's graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def describe(x_train: np.ndarray, layout: str, channel_order: str | None = None) -> dict:
    """How the user's training arrays look: per-example shape, layout, dtype, value range.

    Args:
        x_train: The user's training array as loaded (before any conversion).
        layout: The resolved layout (nchw, nhwc or features).
        channel_order: "RGB" where the loader knows it (colour image folders), else None
            (one channel is always "grey").
    """
    uint8 = x_train.dtype == np.uint8 and layout != "features"
    if uint8:
        lo, hi = 0.0, 255.0
    elif x_train.size:  # in chunks: a memory-mapped .npy is read with file reads, never whole
        from kdens.mapped import row_chunks

        parts = [(float(c.min()), float(c.max())) for c in row_chunks(x_train)]
        lo, hi = min(p[0] for p in parts), max(p[1] for p in parts)
    else:
        lo, hi = 0.0, 0.0
    shape = list(x_train.shape[1:])
    if layout != "features" and len(shape) == 2:  # (N, H, W) grey: the models add the channel axis
        shape = [1, *shape]
    if layout == "features":
        channel_order = None
    elif (shape[-1] if layout == "nhwc" else shape[0]) == 1:
        channel_order = "grey"
    return {"shape": shape, "layout": layout, "dtype": "uint8" if uint8 else "float32",
            "range": [lo, hi], "range_from": "dtype" if uint8 else "training data",
            "channel_order": channel_order}


def to_raw(x: np.ndarray, spec: dict | None) -> np.ndarray:
    """Model inputs (float32, NCHW in [0, 1] for uint8 images) -> the user's form in ``spec``."""
    if not spec:
        return np.ascontiguousarray(x, dtype=np.float32)
    if spec["layout"] == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    if spec["dtype"] == "uint8":  # exact: the model inputs are u / 255 in float32
        return np.ascontiguousarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(x, dtype=np.float32)


def is_identity(spec: dict | None) -> bool:
    """True when the raw input already is the model input (float32 NCHW or features)."""
    return not spec or (spec["dtype"] == "float32" and spec["layout"] != "nhwc")


class Front(nn.Module):
    """Raw input -> model input: cast to float32, /255 for uint8, NHWC -> NCHW, then the
    training split's standardization when the model carries one (``kdens.models.Standardized``).

    Kept apart from the model's core so that the TFLite int8 path can quantize the core only:
    the input and its normalization stay float, and int8 starts where the values are
    standardized (quantizing raw-range features with one int8 scale erases the small ones).
    """

    def __init__(self, spec: dict | None, mean: torch.Tensor | None = None, inv_std: torch.Tensor | None = None):
        super().__init__()
        spec = spec or {}
        self.uint8 = spec.get("dtype") == "uint8"
        self.nhwc = spec.get("layout") == "nhwc"
        self.standardize = mean is not None
        if self.standardize:
            self.register_buffer("mean", mean.detach().clone())
            self.register_buffer("inv_std", inv_std.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.uint8:
            x = x / 255.0  # the same float32 division the loaders do
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        if self.standardize:
            x = (x - self.mean) * self.inv_std
        return x


class RawInput(nn.Module):
    """A model that takes the user's raw input (``spec``): :class:`Front`, then the model."""

    def __init__(self, model: nn.Module, spec: dict | None):
        super().__init__()
        self.spec = dict(spec or {})
        self.model = model
        self.prep = Front(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prep(x))  # (B, C)


def split_front(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(front, core): the float input handling of ``model`` and the layers after it.

    ``front`` is None when the model takes its inputs as they come (nothing to keep float).
    """
    from kdens.models import Standardized

    spec = model.spec if isinstance(model, RawInput) else None
    inner = model.model if isinstance(model, RawInput) else model
    if isinstance(inner, Standardized):
        return Front(spec, inner.mean, inner.inv_std).eval(), inner.core
    if is_identity(spec):
        return None, inner
    return Front(spec).eval(), inner


def artifact_input(spec: dict | None, dtype: str, shape: list, note: str | None = None) -> dict:
    """The ``input`` entry of a deploy report: exactly what the artifact file takes.

    Args:
        spec: The dataset's raw-input description (None: float32 model inputs).
        dtype: The artifact's input tensor type, read from the file.
        shape: Its shape with the batch axis first ("batch" when dynamic, else the sizes).
        note: Anything else the user must do to the raw data (e.g. quantize it).
    """
    spec = spec or {}
    out = {"shape": shape, "layout": spec.get("layout", "nchw"), "dtype": dtype,
           "range": spec.get("range"), "range_from": spec.get("range_from"),
           "channel_order": spec.get("channel_order")}
    if note:
        out["note"] = note
    return out
