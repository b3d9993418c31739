"""Normalization layers and Dropout. Statistics are computed in float64 and cast back."""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import DType, FLOATS
from kiln.ir.opdef import OpDef, OpKind, register
from kiln.ir.ops.rules import check_dtype, fail, norm_axis, present
from kiln.ir.types import TensorType


def _channel_param(t: TensorType | None, channels: int, what: str) -> None:
    if t is not None and t.shape != (channels,):
        raise fail(f"{what} {t} must have shape ({channels},)")


# -- BatchNormalization ----------------------------------------------------------------------
def _bn_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS)
    if x.rank < 2:
        raise fail(f"X {x} needs a channel axis")
    for i, what in enumerate(("scale", "B", "input_mean", "input_var"), 1):
        _channel_param(present(types, i, what), x.shape[1], what)
    stats = present(types, 3, "input_mean")
    if attrs["training_mode"]:
        return [x, stats, stats]
    return [x]


def _bn(a, x, scale, bias, mean, var):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x64 = x.astype(np.float64)
    if a["training_mode"]:
        axes = (0, *range(2, x.ndim))
        batch_mean = x64.mean(axis=axes)
        batch_var = x64.var(axis=axes)
        y = (x64 - batch_mean.reshape(shape)) / np.sqrt(batch_var.reshape(shape) + a["epsilon"])
        y = y * scale.reshape(shape) + bias.reshape(shape)
        m = a["momentum"]
        running_mean = mean * m + batch_mean * (1 - m)
        running_var = var * m + batch_var * (1 - m)
        return y.astype(x.dtype), running_mean.astype(mean.dtype), running_var.astype(var.dtype)
    y = (x64 - mean.reshape(shape)) / np.sqrt(var.astype(np.float64).reshape(shape) + a["epsilon"])
    return (y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype)


register(
    OpDef(
        "BatchNormalization",
        OpKind.HEAVY,
        _bn_infer,
        _bn,
        {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0},
        num_inputs=(5, 5),
        num_outputs=(1, 3),
    )
)


# -- Instance / Group / Layer normalization --------------------------------------------------
def _instance_infer(attrs, types):
    x = present(types, 0, "input")
    check_dtype(x, FLOATS)
    _channel_param(present(types, 1, "scale"), x.shape[1], "scale")
    _channel_param(present(types, 2, "B"), x.shape[1], "B")
    return [x]


def _normalize(x64: np.ndarray, axes, eps: float) -> np.ndarray:
    mean = x64.mean(axis=axes, keepdims=True)
    var = x64.var(axis=axes, keepdims=True)
    return (x64 - mean) / np.sqrt(var + eps)


def _instance(a, x, scale, bias):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = _normalize(x.astype(np.float64), tuple(range(2, x.ndim)), a["epsilon"])
    return (y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype)


register(
    OpDef("InstanceNormalization", OpKind.REDUCTION, _instance_infer, _instance, {"epsilon": 1e-5}, num_inputs=(3, 3))
)


def _group_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS)
    g = attrs["num_groups"]
    if g < 1 or x.shape[1] % g:
        raise fail(f"{x.shape[1]} channels do not split into num_groups={g}")
    _channel_param(present(types, 1, "scale"), x.shape[1], "scale")
    _channel_param(present(types, 2, "bias"), x.shape[1], "bias")
    return [x]


def _group(a, x, scale, bias):
    n, c = x.shape[:2]
    g = a["num_groups"]
    grouped = x.astype(np.float64).reshape(n, g, -1)
    y = _normalize(grouped, (2,), a["epsilon"]).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype)


register(
    OpDef(
        "GroupNormalization",
        OpKind.REDUCTION,
        _group_infer,
        _group,
        {"num_groups": 1, "epsilon": 1e-5},
        num_inputs=(3, 3),
        doc="scale and bias are per channel (opset-21 form; the importer expands opset-18 per-group ones)",
    )
)


def _layer_norm_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS)
    axis = norm_axis(attrs["axis"], x.rank)
    stats = TensorType(x.shape[:axis] + (1,) * (x.rank - axis), DType.float32 if x.dtype != DType.float64 else x.dtype)
    return [x, stats, stats]


def _layer_norm(a, x, scale, bias=None):
    axis = a["axis"] % x.ndim
    axes = tuple(range(axis, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    inv_std = 1 / np.sqrt(x64.var(axis=axes, keepdims=True) + a["epsilon"])
    y = (x64 - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    stat = np.float64 if x.dtype == np.float64 else np.float32
    return y.astype(x.dtype), mean.astype(stat), inv_std.astype(stat)


register(
    OpDef(
        "LayerNormalization",
        OpKind.REDUCTION,
        _layer_norm_infer,
        _layer_norm,
        {"axis": -1, "epsilon": 1e-5},
        num_inputs=(2, 3),
        num_outputs=(1, 3),
    )
)


def _rms_norm_infer(attrs, types):
    x, scale = present(types, 0, "X"), present(types, 1, "scale")
    check_dtype(x, FLOATS)
    axis = norm_axis(attrs["axis"], x.rank)
    if len(scale.shape) > x.rank - axis:
        raise fail(f"scale {scale} has more dims than the normalized axes {list(range(axis, x.rank))}")
    return [x]


def _rms_norm(a, x, scale):
    axes = tuple(range(a["axis"] % x.ndim, x.ndim))
    x64 = x.astype(np.float64)
    rms = np.sqrt(np.mean(np.square(x64), axis=axes, keepdims=True) + a["epsilon"])
    return (x64 / rms * scale).astype(x.dtype)


register(
    OpDef(
        "RMSNormalization",
        OpKind.REDUCTION,
        _rms_norm_infer,
        _rms_norm,
        {"axis": -1, "epsilon": 1e-5},
        num_inputs=(2, 2),
    )
)


def _same_float(attrs, types):
    x = present(types, 0, "input")
    check_dtype(x, FLOATS)
    return [x]


def _lrn(a, x):
    size = a["size"]
    x64 = x.astype(np.float64)
    sq = np.square(x64)
    c = x.shape[1]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    padded = np.pad(sq, [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    square_sum = sum(padded[:, i : i + c] for i in range(size))
    return (x64 / (a["bias"] + a["alpha"] / size * square_sum) ** a["beta"]).astype(x.dtype)


register(
    OpDef("LRN", OpKind.REDUCTION, _same_float, _lrn, {"size": 1, "alpha": 1e-4, "beta": 0.75, "bias": 1.0})
)


def _lp_norm(a, x):
    axis = a["axis"] % x.ndim
    x64 = x.astype(np.float64)
    norm = np.sum(np.abs(x64) ** a["p"], axis=axis, keepdims=True) ** (1 / a["p"])
    return (x64 / np.where(norm == 0, 1, norm)).astype(x.dtype)


register(OpDef("LpNormalization", OpKind.REDUCTION, _same_float, _lp_norm, {"axis": -1, "p": 2}))


def _mvn(a, x):
    return _normalize(x.astype(np.float64), tuple(a["axes"]), 1e-9).astype(x.dtype)


register(OpDef("MeanVarianceNormalization", OpKind.REDUCTION, _same_float, _mvn, {"axes": [0, 2, 3]}))


# -- Dropout ---------------------------------------------------------------------------------
def _dropout_infer(attrs, types):
    x = present(types, 0, "data")
    check_dtype(x, FLOATS)
    if not 0 <= attrs["ratio"] < 1:
        raise fail(f"ratio {attrs['ratio']} is outside [0, 1)")
    return [x, x.with_dtype(DType.bool)]


def dropout_mask(a, shape) -> np.ndarray:
    """The elements training-mode Dropout keeps: numpy's MT19937 stream seeded by ``seed``, the
    same mask ONNX's reference draws (the decomposition and the gradient rule use it too)."""
    return np.random.RandomState(a["seed"]).uniform(0.0, 1.0, shape) >= a["ratio"]


def _dropout(a, x):
    if not a["training_mode"] or a["ratio"] == 0:
        return x.copy(), np.ones(x.shape, dtype=bool)
    keep = dropout_mask(a, x.shape)
    scale = 1.0 / (1.0 - a["ratio"])
    return (x * keep * scale).astype(x.dtype), keep


register(
    OpDef(
        "Dropout",
        OpKind.ELEMENTWISE,
        _dropout_infer,
        _dropout,
        {"ratio": 0.5, "training_mode": 0, "seed": 0},
        num_outputs=(1, 2),
        deterministic=False,
        doc="In training mode draws the mask from numpy's MT19937 seeded by `seed`; otherwise identity.",
    )
)
