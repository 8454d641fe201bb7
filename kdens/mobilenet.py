"""``mobilenet``: a MobileNetV2-style student (Sandler et al. 2018) for small images.

Inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1 linear projection; a residual
add where shapes allow), ReLU6, BatchNorm, global average pooling, and a width multiplier.
The stage plan is MobileNetV2's, shortened for 8x8 to 64x64 inputs: the stem does not
downsample below 64 pixels, and a block strides only while there is something to halve.
Every activation is its own module: PT2E int8 export fails on a module called twice
(docs/toolchain.md, "TFLite").
"""

from __future__ import annotations

import torch
from torch import nn

from kdens.errors import ModelError

# (expansion t, output channels c, repeats n, first stride s), as in MobileNetV2's Table 2
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))


def _divisible(v: float, by: int = 8) -> int:
    """Channels rounded to a multiple of 8 (never more than 10% below ``v``), as MobileNetV2 does."""
    out = max(by, int(v + by / 2) // by * by)
    return out + by if out < 0.9 * v else out


def _conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expand (t x) -> 3x3 depthwise (stride s) -> 1x1 linear projection, + input when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        layers = _conv_bn(c_in, hidden, 1, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, c_out, 1, 1, act=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)  # (B, c_out, H', W')
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """A MobileNetV2-style classifier for (C, H, W) images; ends in ``head: nn.Linear``."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, last: int = 256,
                 dropout: float = 0.2):
        super().__init__()
        if len(input_shape) != 3:
            raise ModelError(f"mobilenet needs images (C, H, W), got inputs shaped {tuple(input_shape)}; "
                             "for feature vectors use --model mlp")
        if not width > 0 or last < 1 or not 0.0 <= dropout < 1.0:
            raise ModelError(f"mobilenet: width={width} must be > 0, last={last} >= 1, dropout={dropout} in [0, 1)")
        c, h, w = input_shape
        side = min(h, w)
        stem_stride = 2 if side > 64 else 1
        ch = _divisible(32 * width)
        layers: list[nn.Module] = _conv_bn(c, ch, 3, stem_stride)
        side //= stem_stride
        for t, c_out, n, s in STAGES:
            out = _divisible(c_out * width)
            for i in range(n):
                stride = s if i == 0 and side >= 2 else 1  # stop halving at 1 pixel
                side //= stride
                layers.append(InvertedResidual(ch, out, stride, t))
                ch = out
        last_ch = _divisible(last * max(1.0, width))
        layers += _conv_bn(ch, last_ch, 1, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(last_ch, num_classes)
        for m in self.modules():  # MobileNetV2's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.flatten(self.pool(self.features(x)))))  # (B, C)
