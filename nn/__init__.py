"""``kiln.nn``: layers, ``Module``, ``functional`` and ``init`` of the Python DSL.

    import kiln, kiln.nn as nn
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    y = model(kiln.Tensor(x))                    # eager: runs each op's reference now
    graph = kiln.trace(model, [x])               # a kiln.ir.Graph
    fast = kiln.jit(model)                        # traced and compiled on first call

The implementation lives in ``kiln.frontend.dsl``; this package is its public face.
"""

from kiln.frontend.dsl import functional, init
from kiln.frontend.dsl.attention import MultiheadAttention, TransformerEncoderLayer
from kiln.frontend.dsl.layers import (
    GELU,
    GRU,
    LSTM,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Embedding,
    Flatten,
    GroupNorm,
    Identity,
    LayerNorm,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
    Upsample,
)
from kiln.frontend.dsl.module import Module, ModuleList, Parameter, Sequential

__all__ = [
    "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm2d", "Conv2d", "ConvTranspose2d", "Dropout",
    "Embedding", "Flatten", "GELU", "GRU", "GroupNorm", "Identity", "LSTM", "LayerNorm",
    "LeakyReLU", "Linear", "MaxPool2d", "Module", "ModuleList", "MultiheadAttention", "Parameter", "ReLU", "ReLU6",
    "Sequential", "SiLU", "Sigmoid", "Softmax", "Tanh", "TransformerEncoderLayer", "Upsample", "functional", "init",
]
