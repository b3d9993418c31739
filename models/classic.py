"""Small classifiers: a multi-layer perceptron and LeNet-5."""

from __future__ import annotations

from typing import Sequence

import kiln.nn as nn
from kiln.frontend.dsl.tensor import Tensor


class MLP(nn.Module):
    """Fully connected layers with ReLU between them (flattening any image-shaped input)."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        return self.layers(input)


def mlp(in_features: int = 784, hidden: Sequence[int] = (256, 128), num_classes: int = 10, dropout: float = 0.0) -> MLP:
    return MLP(in_features, hidden, num_classes, dropout)


class LeNet5(nn.Module):
    """LeCun et al. 1998 with ReLU and max pooling: conv5-pool-conv5-pool-fc120-fc84-fc."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 32, width: int = 6):
        super().__init__()
        c1, c2 = width, width * 16 // 6
        # the classic net wants 32x32; smaller inputs (MNIST 28x28, digits 8x8) pad the convs
        pad1, pad2 = (2 if input_size < 32 else 0), (2 if input_size < 16 else 0)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = ((input_size + 2 * pad1 - 4) // 2 + 2 * pad2 - 4) // 2
        if side < 1:
            raise ValueError(f"lenet5: input_size {input_size} is too small (needs >= 4)")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
        )

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return self.classifier(self.features(input))


def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 32, width: int = 6) -> LeNet5:
    """LeNet-5; inputs below 32x32 (scikit-learn's 8x8 digits, MNIST's 28x28) get padded convs."""
    return LeNet5(in_channels, num_classes, input_size, width)
