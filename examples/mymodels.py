"""A user model plugged into kdens as ``package.module:factory`` (see examples/user-model.toml).

A factory takes ``(num_classes, input_shape, **model_args)`` and returns an ``nn.Module``
mapping float images (B, C, H, W) to logits (B, num_classes). Ending in an ``nn.Linear``
named ``head`` lets specialists copy its output rows; keeping to Conv2d / BatchNorm / ReLU /
pooling / Linear keeps it exportable to ONNX, TFLite and int8. ``kdens run`` puts the config file's
folder on the import path, so this module is found as ``mymodels`` from examples/*.toml;
plain ``kdens`` commands need ``PYTHONPATH=examples``.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthwiseNet(nn.Module):
    """A MobileNet-flavoured student: a stem conv, then depthwise-separable blocks each halving H and W.

    Every convolution is followed by BatchNorm, as in MobileNet: without it this net's output
    barely depended on its input at initialization, and some seeds never learned (ended at
    chance) while others had their units die after one large step. ONNX and TFLite exports
    fold each BatchNorm into the convolution before it.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 16, blocks: int = 2):
        super().__init__()
        channels = int(input_shape[0])
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU()]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),  # depthwise
                       nn.BatchNorm2d(width), nn.ReLU(),
                       nn.Conv2d(width, 2 * width, 1, bias=False),                       # pointwise
                       nn.BatchNorm2d(2 * width), nn.ReLU(),
                       nn.MaxPool2d(2)]  # one module per use: PT2E int8 export needs that (docs/toolchain.md)
            width *= 2
        self.body = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.body.eval()  # sizing pass: leave BatchNorm's running statistics untouched
        with torch.no_grad():
            features = self.body(torch.zeros(1, *input_shape)).numel()
        self.body.train()
        self.head = nn.Linear(features, num_classes)
        for m in self.modules():  # He init for ReLU nets (PyTorch's default conv init is smaller)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.body(x)))  # (B, num_classes)


def depthwise_net(num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """``model = "mymodels:depthwise_net"``; model_args: width (16), blocks (2)."""
    return DepthwiseNet(num_classes, input_shape, **kwargs)
