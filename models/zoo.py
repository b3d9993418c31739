"""The zoo's registry: every model family kiln claims, buildable by name at a standard size.

``kiln compile resnet18 --shape input=1x3x112x112`` and ``kiln.compile("unet")`` find the
model here; it is built (seeded weights), put in eval mode, traced at the requested input
shape and exported to ONNX, so the CLI, the benchmark peers and users all see the same model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from kiln.errors import KilnError
from kiln.ir.graph import Graph
from kiln.models.classic import lenet5, mlp
from kiln.models.mobilenet import mobilenet_v2
from kiln.models.resnet import resnet18, resnet34, resnet50
from kiln.models.rnn import gru_classifier, lstm_classifier
from kiln.models.segmentation import deeplabv3, fcn, unet
from kiln.models.transformer import transformer_classifier


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: its builder, the standard input shape, and a small configuration for tests."""

    name: str
    build: Callable[..., Any]
    input_shape: tuple[int, ...]
    description: str
    small_kwargs: Mapping[str, Any] = field(default_factory=dict)
    small_shape: tuple[int, ...] = ()


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("mlp", mlp, (1, 784), "MLP 784-256-128-10", {"in_features": 48, "hidden": (32, 16)}, (2, 48)),
        ZooModel("lenet5", lenet5, (1, 1, 32, 32), "LeNet-5, 32x32 grey images", {"input_size": 16}, (2, 1, 16, 16)),
        ZooModel("resnet18", resnet18, (1, 3, 224, 224), "ResNet-18 (BasicBlock), ImageNet size",
                 {"num_classes": 10, "width": 8}, (1, 3, 32, 32)),
        ZooModel("resnet34", resnet34, (1, 3, 224, 224), "ResNet-34 (BasicBlock), ImageNet size",
                 {"num_classes": 10, "width": 8, "layers": (1, 2, 2, 1)}, (1, 3, 32, 32)),
        ZooModel("resnet50", resnet50, (1, 3, 224, 224), "ResNet-50 (Bottleneck), ImageNet size",
                 {"num_classes": 10, "width": 8, "layers": (1, 2, 2, 1)}, (1, 3, 32, 32)),
        ZooModel("mobilenet_v2", mobilenet_v2, (1, 3, 224, 224), "MobileNetV2 (inverted residuals, depthwise 3x3), ImageNet size",
                 {"num_classes": 10, "width": 0.25, "stages": ((1, 8, 1, 1), (6, 16, 2, 2), (6, 24, 2, 2)), "last_channels": 64}, (1, 3, 32, 32)),
        ZooModel("lstm_classifier", lstm_classifier, (1, 32, 64), "2-layer LSTM (128 hidden) over 32 steps",
                 {"input_size": 8, "hidden_size": 16, "bidirectional": True}, (2, 5, 8)),
        ZooModel("gru_classifier", gru_classifier, (1, 32, 64), "2-layer GRU (128 hidden) over 32 steps",
                 {"input_size": 8, "hidden_size": 16, "bidirectional": True}, (2, 5, 8)),
        ZooModel("transformer_classifier", transformer_classifier, (1, 64, 64), "2-block transformer encoder (width 256, 4 heads) over 64 steps",
                 {"input_size": 8, "width": 16, "heads": 2, "feed_forward": 32, "num_layers": 1}, (2, 5, 8)),
        ZooModel("fcn", fcn, (1, 3, 224, 224), "FCN-8s on a VGG-style backbone, 21 classes",
                 {"num_classes": 3, "width": 4}, (1, 3, 32, 32)),
        ZooModel("unet", unet, (1, 3, 256, 256), "U-Net, 4 levels, width 64, 2 classes",
                 {"width": 4, "depth": 2}, (1, 3, 16, 16)),
        ZooModel("deeplabv3", deeplabv3, (1, 3, 224, 224), "DeepLabv3, dilated ResNet-34 backbone (OS 16), ASPP 6/12/18",
                 {"num_classes": 3, "width": 4, "layers": (1, 1, 1, 1)}, (1, 3, 32, 32)),
    ]
}
INPUT_NAME = "input"


def zoo_model(name: str) -> ZooModel:
    try:
        return ZOO[name]
    except KeyError:
        raise KilnError(f"no zoo model {name!r}; the zoo has {', '.join(ZOO)}") from None


def build(name: str, seed: int = 0, **kwargs: Any):
    """The zoo model ``name`` with weights drawn from ``seed``, in eval mode."""
    from kiln.frontend.dsl import init

    init.seed(seed)
    return zoo_model(name).build(**kwargs).eval()


def zoo_graph(name: str, shape: Sequence[int] | None = None, seed: int = 0, **kwargs: Any) -> Graph:
    """The traced inference graph of zoo model ``name`` at input ``shape`` (standard if None)."""
    from kiln.frontend.dsl.trace import trace

    entry = zoo_model(name)
    shape = tuple(shape) if shape is not None else entry.input_shape
    example = np.zeros(shape, np.float32)
    return trace(build(name, seed, **kwargs), [example], input_names=[INPUT_NAME], name=name)


def zoo_onnx(name: str, shapes: Mapping[str, Sequence[int]] | None = None) -> onnx.ModelProto:
    """The ONNX export of zoo model ``name``; ``shapes`` may set ``input``'s shape."""
    from kiln.frontend.onnx.export import graph_to_onnx

    shapes = dict(shapes or {})
    unknown = set(shapes) - {INPUT_NAME}
    if unknown:
        raise KilnError(f"zoo model {name!r} has one input, {INPUT_NAME!r}; --shape names {sorted(unknown)}")
    return graph_to_onnx(zoo_graph(name, shapes.get(INPUT_NAME)))
