"""A user model plugged into kdens as ``package.module:factory`` (see examples/user-model.toml).

A factory takes ``(num_classes, input_shape, **model_args)`` and returns an ``nn.Module``
mapping float images (B, C, H, W) to logits (B, num_classes). Ending in an ``nn.Linear``
named ``head`` lets specialists copy its output rows; keeping to Conv2d / ReLU / pooling /
Linear keeps it exportable to ONNX, TFLite and int8. ``kdens run`` puts the config file's
folder on the import path, so this module is found as ``mymodels`` from examples/*.toml;
plain ``kdens`` commands need ``PYTHONPATH=examples``.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseNet(nn.Module):
    """A MobileNet-flavoured student: a stem conv, then depthwise-separable blocks each halving H and W."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 16, blocks: int = 2):
        super().__init__()
        channels = int(input_shape[0])
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),  # depthwise
                       nn.Conv2d(width, 2 * width, 1), nn.ReLU(),                       # pointwise
                       nn.MaxPool2d(2)]  # one module per use: PT2E int8 export needs that (docs/toolchain.md)
            width *= 2
        self.body = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        with torch.no_grad():
            features = self.body(torch.zeros(1, *input_shape)).numel()
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.body(x)))  # (B, num_classes)


def depthwise_net(num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """``model = "mymodels:depthwise_net"``; model_args: width (16), blocks (2)."""
    return DepthwiseNet(num_classes, input_shape, **kwargs)
