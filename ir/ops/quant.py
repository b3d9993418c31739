"""Linear quantization: QuantizeLinear and DequantizeLinear, per tensor, per axis or blocked.

``scale`` and ``zero_point`` are a scalar (per tensor), a 1-D tensor along ``axis`` (per
channel), or a tensor of the input's rank whose ``axis`` has one entry per ``block_size``
elements (blocked).
"""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import DType, FLOATS, INTS
from kiln.ir.opdef import OpDef, OpKind, register
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


register(OpDef("QuantizeLinear", OpKind.ELEMENTWISE, _quantize_infer, _quantize, QUANT_ATTRS, num_inputs=(2, 3)))
register(OpDef("DequantizeLinear", OpKind.ELEMENTWISE, _dequantize_infer, _dequantize, QUANT_ATTRS, num_inputs=(2, 3)))
