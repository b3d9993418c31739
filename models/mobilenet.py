"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks of a 1x1 expansion, a 3x3
depthwise conv and a linear 1x1 projection, ReLU6 between, configurable in width and depth."""

from __future__ import annotations

from typing import Sequence

import kiln.nn as nn
from kiln.frontend.dsl import functional as F
from kiln.frontend.dsl.tensor import Tensor

# (expansion t, output channels c, repeats n, first stride s) per stage, as the paper's table 2
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _divisible(channels: float, by: int = 8) -> int:
    """``channels`` rounded to a multiple of ``by``, never below 90% of it (the reference rounding)."""
    rounded = max(by, int(channels + by / 2) // by * by)
    return rounded + by if rounded < 0.9 * channels else rounded


def conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [conv_bn_relu6(cin, hidden, 1)] if expansion != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.layers = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, stages: Sequence[tuple[int, int, int, int]] = STAGES, last_channels: int = 1280, dropout: float = 0.2):
        super().__init__()
        cin = _divisible(32 * width)
        last = _divisible(last_channels * max(1.0, width))
        blocks: list[nn.Module] = [conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in stages:
            cout = _divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        blocks.append(conv_bn_relu6(cin, last, 1))
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        x = F.adaptive_avg_pool2d(self.features(input), 1)
        return self.classifier(self.dropout(F.flatten(x, 1)))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, stages: Sequence[tuple[int, int, int, int]] = STAGES, last_channels: int = 1280, dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(num_classes, width, stages, last_channels, dropout)
