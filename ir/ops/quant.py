"""Linear quantization: QuantizeLinear and DequantizeLinear, per tensor, per axis or blocked;
the integer products MatMulInteger and ConvInteger (int32 results) and the quantized ones
QLinearMatMul and QLinearConv (8-bit in, 8-bit out), as ONNX's QOperator models use them.

``scale`` and ``zero_point`` are a scalar (per tensor), a 1-D tensor along ``axis`` (per
channel), or a tensor of the input's rank whose ``axis`` has one entry per ``block_size``
elements (blocked). The products subtract the zero points, multiply and sum exactly in
integers, then (QLinear*) scale by ``a_scale * b_scale / y_scale`` in float64, add the output
zero point, round half to even and saturate, as ONNX's reference does.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.dtypes import DType, FLOATS, INTS
from kiln.ir.opdef import OpDef, OpKind, register
from kiln.ir.ops.linalg import matmul_shape
from kiln.ir.ops.nn import CONV_ATTRS, _conv, _conv_infer, channels_last, conv_weight_to_first
from kiln.ir.ops.rules import check_dtype, fail, norm_axis, present
from kiln.ir.types import TensorType

QUANT_ATTRS = {"axis": 1, "block_size": 0, "output_dtype": None}


def _check_param(attrs, x: TensorType, p: TensorType | None, what: str) -> None:
    if p is None or p.numel == 1 and p.rank <= 1:
        return
    axis = norm_axis(attrs["axis"], x.rank)
    if attrs["block_size"]:
        expected = list(x.shape)
        expected[axis] = -(-x.shape[axis] // attrs["block_size"])
        if list(p.shape) != expected:
            raise fail(f"{what} {p} must have shape {expected} for block_size {attrs['block_size']} on axis {axis}")
    elif p.shape != (x.shape[axis],):
        raise fail(f"{what} {p} must be a scalar or have shape ({x.shape[axis]},) along axis {axis}")


def _expand(param: np.ndarray, shape: tuple[int, ...], attrs) -> np.ndarray:
    """``param`` broadcast against an input of ``shape``."""
    if param.size == 1 and param.ndim <= 1:
        return param.reshape(())
    axis = attrs["axis"] % len(shape)
    if attrs["block_size"]:
        return np.take(np.repeat(param, attrs["block_size"], axis=axis), np.arange(shape[axis]), axis=axis)
    return param.reshape([-1 if i == axis else 1 for i in range(len(shape))])


def _quantize_infer(attrs, types):
    x, scale = present(types, 0, "x"), present(types, 1, "y_scale")
    check_dtype(x, FLOATS | {DType.int32}, "x")
    zp = types[2] if len(types) > 2 else None
    _check_param(attrs, x, scale, "y_scale")
    _check_param(attrs, x, zp, "y_zero_point")
    out = DType.parse(attrs["output_dtype"]) if attrs["output_dtype"] else (zp.dtype if zp is not None else DType.uint8)
    check_dtype(TensorType((), out), INTS, "output")
    return [x.with_dtype(out)]


def _quantize(a, x, scale, zp=None):
    out = np.dtype(DType.parse(a["output_dtype"]).numpy if a["output_dtype"] else (zp.dtype if zp is not None else np.uint8))
    # divide in the input's precision, as ONNX's reference does: ties then round alike
    work = x.dtype if x.dtype.kind == "f" else np.float64
    q = np.rint(x.astype(work) / _expand(scale, x.shape, a).astype(work)).astype(np.float64)  # half to even
    if zp is not None:
        q = q + _expand(zp, x.shape, a).astype(np.float64)
    info = np.iinfo(out)
    return np.clip(q, info.min, info.max).astype(out)


def _dequantize_infer(attrs, types):
    x, scale = present(types, 0, "x"), present(types, 1, "x_scale")
    check_dtype(x, INTS, "x")
    check_dtype(scale, FLOATS, "x_scale")
    zp = types[2] if len(types) > 2 else None
    _check_param(attrs, x, scale, "x_scale")
    _check_param(attrs, x, zp, "x_zero_point")
    if zp is not None and zp.dtype != x.dtype:
        raise fail(f"x_zero_point {zp} must have x's dtype {x.dtype.short}")
    return [x.with_dtype(DType.parse(attrs["output_dtype"]) if attrs["output_dtype"] else scale.dtype)]


def _dequantize(a, x, scale, zp=None):
    out = DType.parse(a["output_dtype"]).numpy if a["output_dtype"] else scale.dtype
    v = x.astype(np.float64)
    if zp is not None:
        v = v - _expand(zp, x.shape, a).astype(np.float64)
    return (v * _expand(scale, x.shape, a).astype(np.float64)).astype(out)


def dynamic_quantized(a: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """onnxruntime's dynamic quantization of a float tensor to uint8, in float32: the range
    [min(a, 0), max(a, 0)] over 255 steps (scale 1 where it is empty: ONNX's function body
    divides by 0 there), the zero point that range's rounded image of 0. Returns (the bytes,
    the scale, the zero point)."""
    a = a.astype(np.float32)
    lo, hi = np.float32(min(a.min(initial=0), 0)), np.float32(max(a.max(initial=0), 0))
    scale = np.float32(1) if hi == lo else np.float32((hi - lo) / np.float32(255))
    zero = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255)).astype(np.float32)
    return np.clip(np.rint(a / scale) + zero, 0, 255).astype(np.uint8), scale, zero


def _dynamic_quantize_infer(attrs, types):
    x = present(types, 0, "x")
    check_dtype(x, {DType.float32}, "x")
    return [x.with_dtype(DType.uint8), TensorType((), DType.float32), TensorType((), DType.uint8)]


def _dynamic_quantize(attrs, x):
    q, scale, zero = dynamic_quantized(x)
    return q, np.array(scale, np.float32), np.array(zero, np.uint8)


register(OpDef("QuantizeLinear", OpKind.ELEMENTWISE, _quantize_infer, _quantize, QUANT_ATTRS, num_inputs=(2, 3)))
register(OpDef("DequantizeLinear", OpKind.ELEMENTWISE, _dequantize_infer, _dequantize, QUANT_ATTRS, num_inputs=(2, 3), folds_any_size=True))
# x -> (uint8 x, its scale, its zero point): the range, then the quantization (llvm: one kernel)
register(OpDef("DynamicQuantizeLinear", OpKind.OPAQUE, _dynamic_quantize_infer, _dynamic_quantize, num_inputs=(1, 1), num_outputs=(3, 3)))


# -- integer and quantized products ----------------------------------------------------------
BYTES = frozenset({DType.int8, DType.uint8})


def _check_bytes(t: TensorType, what: str) -> None:
    check_dtype(t, BYTES, what)


def _check_per(t: TensorType | None, what: str, length: int, along: str) -> None:
    """A scale or zero point: a scalar, or (where ``length`` is given) one entry per ``along``."""
    if t is None or t.numel == 1 and t.rank <= 1:
        return
    if length < 0 or t.shape != (length,):
        raise fail(f"{what} {t} must be a scalar" + (f" or have shape ({length},), one per {along}" if length >= 0 else ""))


def _check_zero_point(t: TensorType | None, data: TensorType, what: str, length: int = -1, along: str = "") -> None:
    if t is not None and t.dtype != data.dtype:
        raise fail(f"{what} {t} must have its input's dtype {data.dtype.short}")
    _check_per(t, what, length, along)


def _shifted(x: np.ndarray, zp: np.ndarray | None, per: tuple[int, ...] = ()) -> np.ndarray:
    """``x - zero point`` in int64 (exact); a zero point of several entries is shaped ``per``."""
    out = x.astype(np.int64)
    if zp is None:
        return out
    return out - zp.astype(np.int64).reshape(per if zp.size > 1 else ())


def _requantize(acc: np.ndarray, ratio: np.ndarray, zp: np.ndarray | None, out: np.dtype) -> np.ndarray:
    """``acc * ratio + zero point`` in float64, rounded half to even and saturated to ``out``."""
    d = acc.astype(np.float64) * ratio.astype(np.float64)
    if zp is not None:
        d = d + zp.astype(np.float64)
    info = np.iinfo(out)
    return np.clip(np.rint(d), info.min, info.max).astype(out)


def integer_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The exact product of two zero-point-shifted 8-bit operands, through float64 BLAS: every
    product is below 2^17 in size, so sums of fewer than 2^36 of them are exact (numpy's own
    int64 matmul has no BLAS and is ~100x slower)."""
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)


def _matmul_integer_infer(attrs, types):
    a, b = present(types, 0, "A"), present(types, 1, "B")
    _check_bytes(a, "A")
    _check_bytes(b, "B")
    _check_zero_point(types[2] if len(types) > 2 else None, a, "a_zero_point")
    _check_zero_point(types[3] if len(types) > 3 else None, b, "b_zero_point", b.shape[-1], "column of B")
    return [TensorType(matmul_shape(a.shape, b.shape), DType.int32)]


def _matmul_integer(attrs, a, b, a_zp=None, b_zp=None):
    return integer_matmul(_shifted(a, a_zp), _shifted(b, b_zp, (-1,))).astype(np.int32)


def _check_qlinear(types, names: tuple[str, ...], per: Callable[[TensorType], int], along: str) -> tuple[TensorType, TensorType, TensorType]:
    """The eight inputs of a QLinear product: 8-bit operands and output zero point, float
    scales, every scale and zero point a scalar but the second operand's, which may have one
    entry per ``along`` (``per(second operand)`` of them). Returns (first, second, y_zero_point)."""
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (present(types, i, what) for i, what in enumerate(names))
    for t, what in ((x, names[0]), (w, names[3]), (y_zp, names[7])):
        _check_bytes(t, what)
    for t, what in ((x_scale, names[1]), (w_scale, names[4]), (y_scale, names[6])):
        check_dtype(t, FLOATS, what)
    count = per(w)
    _check_per(x_scale, names[1], -1, "")
    _check_per(w_scale, names[4], count, along)
    _check_per(y_scale, names[6], -1, "")
    _check_zero_point(x_zp, x, names[2])
    _check_zero_point(w_zp, w, names[5], count, along)
    _check_per(y_zp, names[7], -1, "")
    return x, w, y_zp


def _qlinear_matmul_infer(attrs, types):
    names = ("a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point")
    a, b, y_zp = _check_qlinear(types, names, lambda b: b.shape[-1], "column of b")
    return [TensorType(matmul_shape(a.shape, b.shape), y_zp.dtype)]


def _qlinear_matmul(attrs, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp):
    acc = integer_matmul(_shifted(a, a_zp), _shifted(b, b_zp, (-1,)))
    return _requantize(acc, a_scale.reshape(()) * b_scale.reshape(-1) / y_scale.reshape(()), y_zp.reshape(()), y_zp.dtype)


def _as_float_conv(attrs, x: TensorType, w: TensorType) -> TensorType:
    """The output shape, by Conv's own rule."""
    (y,) = _conv_infer(attrs, [x.with_dtype(DType.float64), w.with_dtype(DType.float64)])
    return y


def _conv_integer_infer(attrs, types):
    x, w = present(types, 0, "x"), present(types, 1, "w")
    _check_bytes(x, "x")
    _check_bytes(w, "w")
    _check_zero_point(types[2] if len(types) > 2 else None, x, "x_zero_point")
    _check_zero_point(types[3] if len(types) > 3 else None, w, "w_zero_point", w.shape[0], "output channel")
    return [_as_float_conv(attrs, x, w).with_dtype(DType.int32)]


def _integer_conv(attrs, x, w, x_zp, w_zp, bias=None) -> np.ndarray:
    """The exact integer convolution (float64 holds every sum of 8-bit products exactly)."""
    per_channel = (-1,) + (1,) * (w.ndim - 1)
    xs, ws = _shifted(x, x_zp).astype(np.float64), _shifted(w, w_zp, per_channel).astype(np.float64)
    return _conv(attrs, xs, ws, None if bias is None else bias.astype(np.float64))


def _conv_integer(attrs, x, w, x_zp=None, w_zp=None):
    return _integer_conv(attrs, x, w, x_zp, w_zp).astype(np.int32)


def _qlinear_conv_infer(attrs, types):
    names = ("x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point")
    x, w, y_zp = _check_qlinear(types, names, lambda w: w.shape[0], "output channel")
    bias = types[8] if len(types) > 8 else None
    if bias is not None and (bias.dtype != DType.int32 or bias.shape != (w.shape[0],)):
        raise fail(f"B {bias} must be i32[{w.shape[0]}]")
    return [_as_float_conv(attrs, x, w).with_dtype(y_zp.dtype)]


def _qlinear_conv(attrs, x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None):
    acc = _integer_conv(attrs, x, w, x_zp, w_zp, bias)
    ratio = (x_scale.reshape(()) * w_scale.reshape(-1) / y_scale.reshape(())).reshape((1, -1) + (1,) * (x.ndim - 2))
    return _requantize(acc, ratio, y_zp.reshape(()), y_zp.dtype)


register(OpDef("MatMulInteger", OpKind.HEAVY, _matmul_integer_infer, _matmul_integer, num_inputs=(2, 4)))
register(OpDef("QLinearMatMul", OpKind.HEAVY, _qlinear_matmul_infer, _qlinear_matmul, num_inputs=(8, 8)))
# channels-last too (``layout="NHWC"``, weight (*kernel, C, M)): the integer_products pass makes it
register(OpDef("ConvInteger", OpKind.HEAVY, *channels_last(_conv_integer_infer, _conv_integer, conv_weight_to_first), {**CONV_ATTRS, "layout": "NCHW"}, num_inputs=(2, 4)))
register(OpDef("QLinearConv", OpKind.HEAVY, _qlinear_conv_infer, _qlinear_conv, dict(CONV_ATTRS), num_inputs=(8, 9)))
