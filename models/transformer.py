"""A transformer encoder classifier (BERT-style, post-norm): features of each step projected to
the model width, encoder blocks of multi-head self-attention and a GELU feed-forward, each
with a residual and LayerNorm, then the steps' mean through a linear head."""

from __future__ import annotations

import kiln.nn as nn
import kiln.nn.functional as F
from kiln.frontend.dsl.tensor import Tensor


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, feed_forward: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} does not split into {heads} heads")
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, feed_forward), nn.Linear(feed_forward, width)
        self.act = nn.GELU()

    def attention(self, x: Tensor) -> Tensor:
        batch, steps, width = x.shape
        size = width // self.heads

        def split(t: Tensor) -> Tensor:  # (batch, heads, steps, size)
            return F.permute(F.reshape(t, batch, steps, self.heads, size), 0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        weights = F.softmax((q @ F.permute(k, 0, 1, 3, 2)) * (1.0 / size**0.5), axis=-1)
        return self.out(F.reshape(F.permute(weights @ v, 0, 2, 1, 3), batch, steps, width))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.down(self.act(self.up(x))))


class TransformerClassifier(nn.Module):
    def __init__(self, input_size: int, width: int, heads: int, feed_forward: int, num_layers: int, num_classes: int):
        super().__init__()
        self.embed = nn.Linear(input_size, width)
        self.blocks = nn.Sequential(*(EncoderBlock(width, heads, feed_forward) for _ in range(num_layers)))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (the graph input's name)
        return self.fc(F.reduce_mean(self.blocks(self.embed(input)), axes=[1], keepdims=0))


def transformer_classifier(input_size: int = 64, width: int = 256, heads: int = 4, feed_forward: int = 1024, num_layers: int = 2, num_classes: int = 10) -> TransformerClassifier:
    return TransformerClassifier(input_size, width, heads, feed_forward, num_layers, num_classes)
