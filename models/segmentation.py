"""Segmentation nets: FCN-8s, U-Net and DeepLabv3; each maps (N, C, H, W) to (N, classes, H, W)."""

from __future__ import annotations

from typing import Sequence

import kiln.nn as nn
from kiln.frontend.dsl import functional as F
from kiln.frontend.dsl.tensor import Tensor
from kiln.models.resnet import BasicBlock, ResNetBackbone


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, 1, pad, dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class FCN8s(nn.Module):
    """Long et al. 2015 on a small VGG-style backbone: class scores at strides 32, 16 and 8,
    each upsampled 2x by a transposed conv and added to the next, then 8x to the input size."""

    def __init__(self, num_classes: int = 21, width: int = 32, in_channels: int = 3):
        super().__init__()
        stages, cin = [], in_channels
        for i in range(5):
            cout = width * min(2**i, 8)
            stages.append(nn.Sequential(conv_bn_relu(cin, cout), conv_bn_relu(cout, cout), nn.MaxPool2d(2)))
            cin = cout
        self.stage1, self.stage2, self.stage3, self.stage4, self.stage5 = stages
        c3, c4 = width * 4, width * 8
        self.score32 = nn.Conv2d(cin, num_classes, 1)
        self.score16 = nn.Conv2d(c4, num_classes, 1)
        self.score8 = nn.Conv2d(c3, num_classes, 1)
        self.up32 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, 1, bias=False)
        self.up16 = nn.ConvTranspose2d(num_classes, num_classes, 4, 2, 1, bias=False)
        self.up8 = nn.ConvTranspose2d(num_classes, num_classes, 16, 8, 4, bias=False)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        p3 = self.stage3(self.stage2(self.stage1(input)))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        x = self.up32(self.score32(p5)) + self.score16(p4)
        x = self.up16(x) + self.score8(p3)
        return self.up8(x)


def fcn(num_classes: int = 21, width: int = 32, in_channels: int = 3) -> FCN8s:
    """FCN-8s; the input side must be a multiple of 32."""
    return FCN8s(num_classes, width, in_channels)


class UNet(nn.Module):
    """Ronneberger et al. 2015 with padded convs: ``depth`` poolings down, transposed convs up,
    skip connections concatenated at each level."""

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 64, depth: int = 4):
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for i in range(depth):
            self.down.append(nn.Sequential(conv_bn_relu(cin, width * 2**i), conv_bn_relu(width * 2**i, width * 2**i)))
            cin = width * 2**i
        bottom = width * 2**depth
        self.bottom = nn.Sequential(conv_bn_relu(cin, bottom), conv_bn_relu(bottom, bottom))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        cin = bottom
        for i in reversed(range(depth)):
            c = width * 2**i
            self.up.append(nn.ConvTranspose2d(cin, c, 2, 2))
            self.merge.append(nn.Sequential(conv_bn_relu(2 * c, c), conv_bn_relu(c, c)))
            cin = c
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        skips, x = [], input
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(F.concat([skip, up(x)], axis=1))
        return self.head(x)


def unet(in_channels: int = 3, num_classes: int = 2, width: int = 64, depth: int = 4) -> UNet:
    """U-Net; the input side must be a multiple of 2**depth."""
    return UNet(in_channels, num_classes, width, depth)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, three dilated 3x3 convs and image pooling."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool_conv = conv_bn_relu(cin, cout, 1)
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_conv(F.adaptive_avg_pool2d(x, 1))
        outs.append(F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=False))
        return self.project(F.concat(outs, axis=1))


class DeepLabV3(nn.Module):
    """Chen et al. 2017: a dilated ResNet backbone (output stride 8 or 16), ASPP with rates
    6/12/18 (doubled at output stride 8) and image pooling, bilinear upsampling to the input."""

    def __init__(self, num_classes: int = 21, width: int = 64, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3), output_stride: int = 16, aspp_channels: int = 256):
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"deeplabv3: output_stride must be 8 or 16, got {output_stride}")
        dilate = (False, True, True) if output_stride == 8 else (False, False, True)
        self.backbone = ResNetBackbone(BasicBlock, layers, width, in_channels, dilate)
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        self.aspp = ASPP(self.backbone.out_channels, aspp_channels, rates)
        self.head = nn.Sequential(conv_bn_relu(aspp_channels, aspp_channels), nn.Conv2d(aspp_channels, num_classes, 1))

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        x = self.backbone(input)[-1]
        x = self.head(self.aspp(x))
        return F.interpolate(x, size=input.shape[2:], mode="bilinear", align_corners=False)


def deeplabv3(num_classes: int = 21, width: int = 64, in_channels: int = 3, layers: Sequence[int] = (3, 4, 6, 3), output_stride: int = 16) -> DeepLabV3:
    """DeepLabv3 on a ResNet-34-style dilated backbone (``layers``/``width`` shrink it)."""
    return DeepLabV3(num_classes, width, in_channels, layers, output_stride)
