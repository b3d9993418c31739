"""ResNet-18/34/50 (He et al. 2016) with BasicBlock and Bottleneck, configurable in width and depth."""

from __future__ import annotations

from typing import Sequence

import kiln.nn as nn
from kiln.frontend.dsl import functional as F
from kiln.frontend.dsl.tensor import Tensor


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, padded to keep the size at stride 1."""
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 3, stride, dilation)
        self.conv2 = conv_bn(width, cout, 3, 1, dilation)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        skip = self.downsample(x) if self.downsample is not None else x
        return F.relu(self.conv2(F.relu(self.conv1(x))) + skip)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn(cin, width, 1)
        self.conv2 = conv_bn(width, width, 3, stride, dilation)
        self.conv3 = conv_bn(width, cout, 1)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        skip = self.downsample(x) if self.downsample is not None else x
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(y) + skip)


class ResNetBackbone(nn.Module):
    """The stem and four stages; ``dilate`` replaces the stride of stages 3/4 with dilation
    (output stride 16 or 8, as DeepLab's atrous backbone wants)."""

    def __init__(self, block, layers: Sequence[int], width: int = 64, in_channels: int = 3, dilate: Sequence[bool] = (False, False, False)):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(in_channels, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        cin, dilation = width, 1
        stages = []
        for i, count in enumerate(layers):
            stride = 1 if i == 0 else 2
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * stride, 1
            w = width * 2**i
            blocks = [block(cin, w, stride, dilation)]
            cin = w * block.expansion
            blocks += [block(cin, w, 1, dilation) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = cin

    def forward(self, x: Tensor) -> list[Tensor]:
        """The feature maps after each stage (strides 4, 8, 16, 32 without dilation)."""
        x = self.stem(x)
        feats = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        return feats


class ResNet(nn.Module):
    def __init__(self, block, layers: Sequence[int], num_classes: int = 1000, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.backbone = ResNetBackbone(block, layers, width, in_channels)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        x = self.backbone(input)[-1]
        return self.fc(F.flatten(F.adaptive_avg_pool2d(x, 1)))


def resnet18(num_classes: int = 1000, width: int = 64, in_channels: int = 3, layers: Sequence[int] = (2, 2, 2, 2)) -> ResNet:
    return ResNet(BasicBlock, layers, num_classes, width, in_channels)


def resnet34(num_classes: int = 1000, width: int = 64, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3)) -> ResNet:
    return ResNet(BasicBlock, layers, num_classes, width, in_channels)


def resnet50(num_classes: int = 1000, width: int = 64, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3)) -> ResNet:
    return ResNet(Bottleneck, layers, num_classes, width, in_channels)
