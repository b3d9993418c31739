"""Synthetic training tasks with known answers, and a small ONNX model made without kiln: what
the training tests and ``benchmarks/train_convergence.py`` train on (no downloads).

- ``spike_sequences``: which of 4 channels holds the one spike in 12 noisy steps;
- ``shapes_segmentation``: per-pixel classes of one square and one brighter disc;
- ``bright_quadrants``: which of 3 quadrants of an 8x8 image is brighter;
- ``converter_style_cnn``: a CNN written with onnx.helper as a converter emits one.
"""

from __future__ import annotations

import numpy as np


def spike_sequences(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12, 4) noisy sequences with one spike each, and the channel it is in."""
    x = (0.3 * rng.standard_normal((n, 12, 4))).astype(np.float32)
    y = rng.integers(0, 4, n)
    x[np.arange(n), rng.integers(0, 12, n), y] += 2.0
    return x, y


def shapes_segmentation(rng: np.random.Generator, n: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Noisy (n, 1, size, size) images of one square (class 1) and one slightly brighter disc
    (class 2), and their (n, size, size) class maps."""
    x = np.zeros((n, 1, size, size), np.float32)
    y = np.zeros((n, size, size), np.int64)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for cls in (1, 2):
            r = rng.integers(4, 8)
            cy, cx = rng.integers(r, size - r, 2)
            inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if cls == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            y[i][inside] = cls
    x[:, 0] = (y > 0) + 0.5 * (y == 2) + 0.3 * rng.standard_normal((n, size, size))
    return x, y


def bright_quadrants(rng: np.random.Generator, n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 8, 8) noise images with one of the first 3 quadrants brightened, and which."""
    y = rng.integers(0, 3, n)
    x = (noise * rng.standard_normal((n, 1, 8, 8))).astype(np.float32)
    for i, cls in enumerate(y):
        x[i, 0, (cls // 2) * 4 : (cls // 2) * 4 + 4, (cls % 2) * 4 : (cls % 2) * 4 + 4] += 1.0
    return x, y


def converter_style_cnn(rng: np.random.Generator):
    """A small CNN for ``bright_quadrants`` written with onnx.helper the way a converter emits
    one (PyTorch's layout: Conv, BatchNormalization, Relu, MaxPool, Flatten, Gemm with transB;
    opset 17), its weights initializers; input ``image`` (batch, 1, 8, 8), output ``logits``."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [
        init("conv.w", rng.normal(0, 0.4, (4, 1, 3, 3))), init("conv.b", np.zeros(4)),
        init("bn.scale", np.ones(4)), init("bn.bias", np.zeros(4)), init("bn.mean", np.zeros(4)), init("bn.var", np.ones(4)),
        init("fc.w", rng.normal(0, 0.2, (3, 64))), init("fc.b", np.zeros(3)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "handwritten", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx.helper")


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of ``logits`` (n, classes) against class ``labels``, in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels]))
