"""Reductions along axes: Reduce*, ArgMax/ArgMin, CumSum, TopK, Softmax/LogSoftmax/Hardmax.

``axes=None`` reduces every axis; the importer resolves ONNX's ``noop_with_empty_axes``.
Softmax-family ops use opset-13 semantics (one axis); older opsets are rewritten on import.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.dtypes import DType, FLOATS, NUMERIC
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.ops.rules import check_dtype, fail, norm_axes, norm_axis, present
from kiln.ir.types import TensorType


def _axes(attrs, rank: int) -> tuple[int, ...]:
    axes = attrs["axes"]
    return tuple(range(rank)) if axes is None else tuple(norm_axes(axes, rank))


def _reduce_infer(dtypes):
    def infer(attrs, types):
        x = present(types, 0, "data")
        check_dtype(x, dtypes)
        axes = _axes(attrs, x.rank)
        if attrs["keepdims"]:
            shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
        else:
            shape = [d for i, d in enumerate(x.shape) if i not in axes]
        return [x.with_shape(shape)]

    return infer


def reduction(name: str, fn: Callable, dtypes=NUMERIC) -> OpDef:
    def eager(a, x):
        axes = _axes(a, x.ndim)
        return np.asarray(fn(x, axes, bool(a["keepdims"])), dtype=x.dtype)

    return register(OpDef(name, OpKind.REDUCTION, _reduce_infer(frozenset(dtypes)), eager, {"axes": None, "keepdims": 1}))


def _wide(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if x.dtype.kind == "f" else x


def _extreme(fn, empty):
    def run(x, axes, keep):
        if x.size == 0 or any(x.shape[a] == 0 for a in axes):
            if x.dtype.kind == "f":
                fill = empty
            elif x.dtype.kind == "b":
                fill = empty > 0  # max of nothing is False, min of nothing is True
            else:
                info = np.iinfo(x.dtype)
                fill = info.min if empty < 0 else info.max
            shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else [
                d for i, d in enumerate(x.shape) if i not in axes
            ]
            return np.full(shape, fill, dtype=x.dtype)
        return fn(x, axis=axes, keepdims=keep)

    return run


reduction("ReduceSum", lambda x, ax, k: np.sum(_wide(x), axis=ax, keepdims=k))
reduction("ReduceMean", lambda x, ax, k: np.mean(_wide(x), axis=ax, keepdims=k))
reduction("ReduceProd", lambda x, ax, k: np.prod(_wide(x), axis=ax, keepdims=k))
reduction("ReduceMax", _extreme(np.max, -np.inf), NUMERIC | {DType.bool})
reduction("ReduceMin", _extreme(np.min, np.inf), NUMERIC | {DType.bool})
reduction("ReduceL1", lambda x, ax, k: np.sum(np.abs(_wide(x)), axis=ax, keepdims=k))
reduction("ReduceL2", lambda x, ax, k: np.sqrt(np.sum(np.square(_wide(x)), axis=ax, keepdims=k)))
reduction("ReduceSumSquare", lambda x, ax, k: np.sum(np.square(_wide(x)), axis=ax, keepdims=k))
reduction("ReduceLogSum", lambda x, ax, k: np.log(np.sum(_wide(x), axis=ax, keepdims=k)), FLOATS)


def _logsumexp(x, axes, keep):
    x64 = x.astype(np.float64)
    if x64.size == 0 or any(x64.shape[a] == 0 for a in axes):
        return np.log(np.sum(np.exp(x64), axis=axes, keepdims=keep))
    m = np.max(x64, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x64 - m), axis=axes, keepdims=True)) + m
    return out if keep else np.squeeze(out, axis=axes)


reduction("ReduceLogSumExp", _logsumexp, FLOATS)


# -- ArgMax / ArgMin -------------------------------------------------------------------------
def _arg_infer(attrs, types):
    x = present(types, 0, "data")
    check_dtype(x, NUMERIC)
    axis = norm_axis(attrs["axis"], x.rank)
    shape = list(x.shape)
    if attrs["keepdims"]:
        shape[axis] = 1
    else:
        del shape[axis]
    return [TensorType(tuple(shape), DType.int64)]


def _arg(fn):
    def eager(a, x):
        axis = a["axis"] % x.ndim
        if a["select_last_index"]:
            flipped = np.flip(x, axis)
            out = x.shape[axis] - 1 - fn(flipped, axis=axis)
        else:
            out = fn(x, axis=axis)
        if a["keepdims"]:
            out = np.expand_dims(out, axis)
        return out.astype(np.int64)

    return eager


for _name, _fn in (("ArgMax", np.argmax), ("ArgMin", np.argmin)):
    register(
        OpDef(_name, OpKind.REDUCTION, _arg_infer, _arg(_fn), {"axis": 0, "keepdims": 1, "select_last_index": 0})
    )


# -- CumSum / TopK ---------------------------------------------------------------------------
def _cumsum_infer(attrs, types):
    x = present(types, 0, "x")
    check_dtype(x, NUMERIC)
    norm_axis(attrs["axis"], x.rank)
    return [x]


def _cumulative(ufunc: np.ufunc):
    def eager(a, x):
        axis = a["axis"] % x.ndim
        y = np.flip(x, axis) if a["reverse"] else x
        if a["exclusive"]:
            # shift by one along the axis, starting from the operation's identity
            head = np.full_like(np.take(y, [0], axis=axis), ufunc.identity)
            y = np.concatenate([head, np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
        out = ufunc.accumulate(y, axis=axis, dtype=x.dtype)
        return np.flip(out, axis) if a["reverse"] else out

    return eager


for _name, _ufunc in (("CumSum", np.add), ("CumProd", np.multiply)):
    register(
        OpDef(_name, OpKind.REDUCTION, _cumsum_infer, _cumulative(_ufunc), {"axis": REQUIRED, "exclusive": 0, "reverse": 0})
    )


def _topk_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, NUMERIC)
    axis = norm_axis(attrs["axis"], x.rank)
    k = int(attrs["k"])
    if not 0 <= k <= x.shape[axis]:
        raise fail(f"k={k} is outside [0, {x.shape[axis]}] on axis {axis}")
    shape = list(x.shape)
    shape[axis] = k
    return [x.with_shape(shape), TensorType(tuple(shape), DType.int64)]


def _topk(a, x):
    axis, k = a["axis"] % x.ndim, a["k"]
    # stable sort on (value, index): ties keep the lower index first, as ONNX requires
    key = -x if a["largest"] else x
    if x.dtype.kind == "u" and a["largest"]:
        key = np.iinfo(x.dtype).max - x
    order = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)


register(
    OpDef(
        "TopK",
        OpKind.OPAQUE,
        _topk_infer,
        _topk,
        {"k": REQUIRED, "axis": -1, "largest": 1, "sorted": 1},
        num_outputs=(1, 2),
    )
)


# -- Softmax family (opset 13: along one axis) -----------------------------------------------
def _softmax_infer(attrs, types):
    x = present(types, 0, "input")
    check_dtype(x, FLOATS)
    norm_axis(attrs["axis"], x.rank)
    return [x]


def _softmax(a, x):
    if x.dtype == np.float16:  # the spec's float16 steps: each exponential rounded, summed as numpy sums float16
        e = np.exp(x - np.max(x, axis=a["axis"], keepdims=True))
        return e / np.sum(e, axis=a["axis"], keepdims=True)
    x64 = x.astype(np.float64)
    e = np.exp(x64 - np.max(x64, axis=a["axis"], keepdims=True))
    return (e / np.sum(e, axis=a["axis"], keepdims=True)).astype(x.dtype)


def _log_softmax(a, x):
    x64 = x.astype(np.float64)
    shifted = x64 - np.max(x64, axis=a["axis"], keepdims=True)
    return (shifted - np.log(np.sum(np.exp(shifted), axis=a["axis"], keepdims=True))).astype(x.dtype)


def _hardmax(a, x):
    axis = a["axis"] % x.ndim
    idx = np.expand_dims(np.argmax(x, axis=axis), axis)
    out = np.zeros_like(x)
    np.put_along_axis(out, idx, 1, axis=axis)
    return out


register(OpDef("Softmax", OpKind.REDUCTION, _softmax_infer, _softmax, {"axis": -1}))
register(OpDef("LogSoftmax", OpKind.REDUCTION, _softmax_infer, _log_softmax, {"axis": -1}))
register(OpDef("Hardmax", OpKind.REDUCTION, _softmax_infer, _hardmax, {"axis": -1}))
