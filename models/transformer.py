"""A transformer encoder classifier (BERT-style, post-norm): features of each step projected to
the model width, ``kiln.nn.TransformerEncoderLayer`` blocks (multi-head self-attention and a
GELU feed-forward, each with a residual and LayerNorm), then the steps' mean through a linear
head."""

from __future__ import annotations

import kiln.nn as nn
import kiln.nn.functional as F
from kiln.frontend.dsl.tensor import Tensor


class TransformerClassifier(nn.Module):
    def __init__(self, input_size: int, width: int, heads: int, feed_forward: int, num_layers: int, num_classes: int):
        super().__init__()
        self.embed = nn.Linear(input_size, width)
        block = lambda: nn.TransformerEncoderLayer(width, heads, feed_forward, dropout=0.0, activation="gelu", batch_first=True)  # noqa: E731
        self.blocks = nn.Sequential(*(block() for _ in range(num_layers)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        return self.fc(F.reduce_mean(self.blocks(self.embed(input)), axes=[1], keepdims=0))


def transformer_classifier(input_size: int = 64, width: int = 256, heads: int = 4, feed_forward: int = 1024, num_layers: int = 2, num_classes: int = 10) -> TransformerClassifier:
    return TransformerClassifier(input_size, width, heads, feed_forward, num_layers, num_classes)
