"""TE lowerings of the heavy ops (convolutions, pools, matrix products) and the normalizations.

Convolutions and pools are written once for any number of spatial dims; a matrix product's
reduction stays a block of its own (its epilogue after it) so GPU schedules recognize it.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te
from tvm import tirx as tir

from kiln.backends.tvm.lower import broadcast_read, lowering
from kiln.backends.tvm.scalar import dtype_of
from kiln.backends.tvm.te_tensor import lowest, reduce, rounded, shape_of, wide
from kiln.errors import KilnError
from kiln.ir.ops.nn import _pool_geometry, _spatial_attrs


def _channels_first(node) -> None:
    if node.attrs.get("layout", "NCHW") != "NCHW":
        raise KilnError(f"node {node.name!r}: the TVM backend lowers channels-first (NCHW) {node.op.name} only")


def _all(conds):
    return tir.all(*conds) if len(conds) > 1 else conds[0]


# -- convolutions ----------------------------------------------------------------------------
@lowering("Conv")
def conv(ctx, node, ins):
    _channels_first(node)
    x, w, b = (list(ins) + [None])[:3]
    nd = len(x.shape) - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    g = node.attrs["group"]
    (n, c, *spatial), (m, cg, *kernel) = shape_of(x), shape_of(w)
    mg = m // g
    if any(pads):
        x = te.compute(
            [n, c, *[d + pads[i] + pads[i + nd] for i, d in enumerate(spatial)]],
            lambda bi, ci, *s: tir.if_then_else(
                _all([tir.And(s[i] >= pads[i], s[i] < pads[i] + spatial[i]) for i in range(nd)]),
                x(bi, ci, *[s[i] - pads[i] for i in range(nd)]),
                tir.const(0, dtype_of(x)),
            ),
            name="pad",
        )
    rc = te.reduce_axis((0, cg), "rc")
    rk = [te.reduce_axis((0, k), f"rk{i}") for i, k in enumerate(kernel)]
    out = node.outputs[0].type.shape

    def body(bi, mi, *o):
        ci = rc if g == 1 else (mi // mg) * cg + rc
        taps = [o[i] * strides[i] + rk[i] * dilations[i] for i in range(nd)]
        return te.sum(wide(x(bi, ci, *taps)) * wide(w(mi, rc, *rk)), axis=[rc, *rk])

    y = rounded(te.compute(out, body, name="conv"), dtype_of(x), "conv_rounded")
    if b is None:
        return y
    return te.compute(out, lambda *i: y(*i) + b(i[1]), name="bias")


@lowering("ConvTranspose")
def conv_transpose(ctx, node, ins):
    _channels_first(node)
    x, w, b = (list(ins) + [None])[:3]
    nd = len(x.shape) - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    g = node.attrs["group"]
    (_, c, *spatial), (_, mg, *kernel) = shape_of(x), shape_of(w)
    cg = c // g
    rc = te.reduce_axis((0, cg), "rc")
    rk = [te.reduce_axis((0, k), f"rk{i}") for i, k in enumerate(kernel)]
    out = node.outputs[0].type.shape

    def body(bi, mi, *o):
        ci = rc if g == 1 else (mi // mg) * cg + rc
        full = [o[i] + pads[i] - rk[i] * dilations[i] for i in range(nd)]  # = input index * stride
        hit = _all([tir.all(f >= 0, tir.floormod(f, s) == 0, tir.floordiv(f, s) < d) for f, s, d in zip(full, strides, spatial)])
        read = x(bi, ci, *[tir.floordiv(f, s) for f, s in zip(full, strides)]) * w(ci, tir.floormod(mi, mg), *rk)
        return te.sum(tir.if_then_else(hit, read, tir.const(0, dtype_of(x))), axis=[rc, *rk])

    y = te.compute(out, body, name="conv_transpose")
    if b is None:
        return y
    return te.compute(out, lambda *i: y(*i) + b(i[1]), name="bias")


# -- pools -----------------------------------------------------------------------------------
def _windows(node, x):
    kernel, strides, dilations, pads, out = _pool_geometry(node.attrs, node.inputs[0].type)
    nd = len(kernel)
    spatial = shape_of(x)[2:]
    rk = [te.reduce_axis((0, k), f"rk{i}") for i, k in enumerate(kernel)]

    def taps(o):
        coords = [o[i] * strides[i] - pads[i] + rk[i] * dilations[i] for i in range(nd)]
        inside = _all([tir.And(t >= 0, t < d) for t, d in zip(coords, spatial)])
        return coords, inside

    return rk, taps, (kernel, strides, dilations, pads, out)


@lowering("MaxPool")
def max_pool(ctx, node, ins):
    _channels_first(node)
    x = ins[0]
    rk, taps, (kernel, strides, dilations, pads, _) = _windows(node, x)

    def body(bi, ci, *o):
        coords, inside = taps(o)
        return te.max(tir.if_then_else(inside, x(bi, ci, *coords), lowest(dtype_of(x))), axis=rk)

    out = node.outputs[0].type.shape
    y = te.compute(out, body, name="max_pool")
    if len(node.outputs) == 1:
        return y
    # Indices: the first tap (in window order) holding the maximum (the first NaN where the
    # maximum is NaN), as a flat index into the channels-first input (storage_order 1: the
    # spatial axes column-major)
    spatial = shape_of(x)[2:]
    nd = len(spatial)
    column_major = node.attrs.get("storage_order", 0)
    place = [math.prod(spatial[:i]) if column_major else math.prod(spatial[i + 1 :]) for i in range(nd)]
    rk2, taps2, _ = _windows(node, x)  # reduce axes of its own for the second reduction

    def first_tap(bi, ci, *o):  # the tap's number in row-major window order
        coords, inside = taps2(o)
        v, top = x(bi, ci, *coords), y(bi, ci, *o)
        hit = v == top
        if dtype_of(x).startswith("float"):
            hit = tir.Or(hit, tir.And(tir.isnan(v), tir.isnan(top)))
        number = 0
        for i in range(nd):
            number = number * kernel[i] + rk2[i]
        return te.min(tir.if_then_else(tir.And(inside, hit), number.astype("int64"), tir.const(math.prod(kernel), "int64")), axis=rk2)

    tap = te.compute(out, first_tap, name="max_pool_tap")

    def index(bi, ci, *o):
        number, flat = tap(bi, ci, *o), (bi * shape_of(x)[1] + ci).astype("int64") * math.prod(spatial)
        for i in range(nd):
            k = tir.floormod(tir.floordiv(number, math.prod(kernel[i + 1 :])), kernel[i])
            coord = o[i] * strides[i] - pads[i] + k * dilations[i]
            flat = flat + coord.astype("int64") * place[i]
        return flat

    return [y, te.compute(out, index, name="max_pool_indices")]


@lowering("AveragePool", "LpPool")
def average_pool(ctx, node, ins):
    _channels_first(node)
    x = ins[0]
    rk, taps, (kernel, strides, dilations, pads, out) = _windows(node, x)
    lp = node.op.name == "LpPool"
    p = node.attrs.get("p", 1)

    def body(bi, ci, *o):
        coords, inside = taps(o)
        v = x(bi, ci, *coords)
        if lp:
            v = tir.pow(tir.abs(v), tir.const(float(p), dtype_of(x)))
        return te.sum(tir.if_then_else(inside, v, tir.const(0, dtype_of(x))), axis=rk)

    total = te.compute(node.outputs[0].type.shape, body, name="window_sum")
    if lp:
        return te.compute(total.shape, lambda *i: tir.pow(total(*i), tir.const(1.0 / p, dtype_of(x))), name="lp_pool")
    counts = ctx.constant(_window_counts(shape_of(x)[2:], kernel, strides, dilations, pads, out, node.attrs["count_include_pad"]).astype(dtype_of(x)), "counts")
    return te.compute(total.shape, lambda bi, ci, *o: total(bi, ci, *o) / counts(*o), name="average_pool")


def _window_counts(spatial, kernel, strides, dilations, pads, out, include_pad) -> np.ndarray:
    """How many taps of each window the divisor counts (a product over the dims)."""
    nd = len(spatial)
    per_dim = []
    for i in range(nd):
        lo, hi = (-pads[i], spatial[i] + pads[i + nd]) if include_pad else (0, spatial[i])
        starts = np.arange(out[i]) * strides[i] - pads[i]
        taps = starts[:, None] + np.arange(kernel[i])[None, :] * dilations[i]
        per_dim.append(((taps >= lo) & (taps < hi)).sum(axis=1))
    counts = per_dim[0]
    for more in per_dim[1:]:
        counts = np.multiply.outer(counts, more)
    return np.maximum(counts, 1)


@lowering("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def global_pool(ctx, node, ins):
    x = ins[0]
    axes = list(range(2, len(x.shape)))
    if node.op.name == "GlobalMaxPool":
        return reduce(x, axes, te.max, name="global_max")
    if node.op.name == "GlobalLpPool":
        p = float(node.attrs["p"])
        total = reduce(x, axes, te.sum, lambda v: tir.pow(tir.abs(v), tir.const(p, dtype_of(x))))
        return te.compute(total.shape, lambda *i: tir.pow(total(*i), tir.const(1 / p, dtype_of(x))), name="global_lp")
    total = reduce(x, axes, te.sum)
    count = math.prod(shape_of(x)[2:])
    return te.compute(total.shape, lambda *i: total(*i) / tir.const(count, dtype_of(x)), name="global_average")


# -- matrix products -------------------------------------------------------------------------
@lowering("Gemm")
def gemm(ctx, node, ins):
    a_, b_, c_ = (list(ins) + [None])[:3]
    at, bt = node.attrs["transA"], node.attrs["transB"]
    alpha, beta = node.attrs["alpha"], node.attrs["beta"]
    k_dim = shape_of(a_)[0 if at else 1]
    k = te.reduce_axis((0, k_dim), "k")
    out = node.outputs[0].type.shape
    y = te.compute(out, lambda i, j: te.sum(wide(a_[k, i] if at else a_[i, k]) * wide(b_[j, k] if bt else b_[k, j]), axis=k), name="gemm")
    y = rounded(y, dtype_of(a_), "gemm_rounded")
    if alpha == 1.0 and (c_ is None or beta == 0.0):
        return y
    dtype = dtype_of(y)

    def epilogue(i, j):
        v = y[i, j] if alpha == 1.0 else y[i, j] * tir.const(alpha, dtype)
        if c_ is not None and beta != 0.0:
            bias = broadcast_read(c_, (i, j))
            v = v + (bias if beta == 1.0 else bias * tir.const(beta, dtype))
        return v

    return te.compute(out, epilogue, name="gemm_epilogue")


@lowering("MatMul")
def matmul(ctx, node, ins):
    a_, b_ = ins
    ra, rb = len(a_.shape), len(b_.shape)
    k = te.reduce_axis((0, shape_of(a_)[-1]), "k")
    out = node.outputs[0].type.shape

    def batch(t, index):
        dims = shape_of(t)[:-2]
        tail = index[len(index) - len(dims) :] if dims else ()
        return [0 if d == 1 else i for d, i in zip(dims, tail)]

    def body(*o):
        if ra == 1 and rb == 1:
            return te.sum(wide(a_[k]) * wide(b_[k]), axis=k)
        if ra == 1:
            *bi, j = o
            return te.sum(wide(a_[k]) * wide(b_(*batch(b_, bi), k, j)), axis=k)
        if rb == 1:
            *bi, i = o
            return te.sum(wide(a_(*batch(a_, bi), i, k)) * wide(b_[k]), axis=k)
        *bi, i, j = o
        return te.sum(wide(a_(*batch(a_, bi), i, k)) * wide(b_(*batch(b_, bi), k, j)), axis=k)

    return rounded(te.compute(out, body, name="matmul"), dtype_of(a_), "matmul_rounded")


# -- normalizations --------------------------------------------------------------------------
def _moments(x: te.Tensor, axes, name: str):
    """Mean and (population) variance over ``axes``, kept as size-1 dims."""
    count = math.prod(shape_of(x)[a] for a in axes)
    inv = tir.const(1.0 / count, dtype_of(x))
    total = reduce(x, axes, te.sum, name=f"{name}_sum")
    mean = te.compute(total.shape, lambda *i: total(*i) * inv, name=f"{name}_mean")
    at = lambda t, i: t(*[0 if k in axes else v for k, v in enumerate(i)])  # noqa: E731
    centered = te.compute(x.shape, lambda *i: x(*i) - at(mean, i), name=f"{name}_centered")
    square = reduce(centered, axes, te.sum, lambda v: v * v, name=f"{name}_square")
    var = te.compute(square.shape, lambda *i: square(*i) * inv, name=f"{name}_var")
    return mean, var, at


@lowering("BatchNormalization")
def batch_norm(ctx, node, ins):
    x, scale, bias, mean, var = ins
    eps = tir.const(node.attrs["epsilon"], dtype_of(x))
    if not node.attrs["training_mode"]:
        return te.compute(x.shape, lambda *i: (x(*i) - mean(i[1])) * (scale(i[1]) / tir.sqrt(var(i[1]) + eps)) + bias(i[1]), name="batch_norm")
    axes = [0, *range(2, len(x.shape))]
    batch_mean, batch_var, at = _moments(x, axes, "batch")
    y = te.compute(x.shape, lambda *i: (x(*i) - at(batch_mean, i)) / tir.sqrt(at(batch_var, i) + eps) * scale(i[1]) + bias(i[1]), name="batch_norm")
    m = node.attrs["momentum"]
    rank = len(x.shape)
    stat = lambda t, c: t(*[0 if k != 1 else c for k in range(rank)])  # noqa: E731
    keep, take = tir.const(m, dtype_of(mean)), tir.const(1 - m, dtype_of(mean))
    running_mean = te.compute(mean.shape, lambda c: mean[c] * keep + stat(batch_mean, c) * take, name="running_mean")
    running_var = te.compute(var.shape, lambda c: var[c] * keep + stat(batch_var, c) * take, name="running_var")
    return [y, running_mean, running_var]


@lowering("InstanceNormalization", "GroupNormalization")
def instance_norm(ctx, node, ins):
    x, scale, bias = ins
    eps = tir.const(node.attrs["epsilon"], dtype_of(x))
    n, c, *spatial = shape_of(x)
    g = node.attrs.get("num_groups", c)
    grouped = te.compute([n, g, (c // g) * math.prod(spatial)], lambda bi, gi, j: x(bi, gi * (c // g) + j // math.prod(spatial), *_unravel(j % math.prod(spatial), spatial)), name="grouped")
    mean, var, at = _moments(grouped, [2], "group")

    def body(bi, ci, *s):
        gi = ci // (c // g)
        v = (x(bi, ci, *s) - mean[bi, gi, 0]) / tir.sqrt(var[bi, gi, 0] + eps)
        return v * scale[ci] + bias[ci]

    return te.compute(x.shape, body, name="normalize")


def _unravel(j, dims):
    out = []
    for d in reversed(dims):
        out.append(j % d)
        j = j // d
    return list(reversed(out))


@lowering("LayerNormalization")
def layer_norm(ctx, node, ins):
    x, scale, bias = (list(ins) + [None])[:3]
    rank = len(x.shape)
    axis = node.attrs["axis"] % rank
    axes = list(range(axis, rank))
    eps = tir.const(node.attrs["epsilon"], dtype_of(x))
    mean, var, at = _moments(x, axes, "layer")
    inv_std = te.compute(var.shape, lambda *i: tir.const(1.0, dtype_of(x)) / tir.sqrt(var(*i) + eps), name="inv_std")

    def body(*i):
        v = (x(*i) - at(mean, i)) * at(inv_std, i) * broadcast_read(scale, i)
        return v + broadcast_read(bias, i) if bias is not None else v

    y = te.compute(x.shape, body, name="layer_norm")
    stat_dtype = node.outputs[1].type.dtype.name if len(node.outputs) > 1 else dtype_of(x)
    cast = lambda t, name: te.compute(t.shape, lambda *i: t(*i).astype(stat_dtype), name=name)  # noqa: E731
    return [y, cast(mean, "mean"), cast(inv_std, "inv_std_dev")][: len(node.outputs)]


@lowering("RMSNormalization")
def rms_norm(ctx, node, ins):
    x, scale = ins
    rank = len(x.shape)
    axes = list(range(node.attrs["axis"] % rank, rank))
    count = math.prod(shape_of(x)[a] for a in axes)
    square = reduce(x, axes, te.sum, lambda v: v * v, name="square")
    eps = tir.const(node.attrs["epsilon"], dtype_of(x))
    at = lambda t, i: t(*[0 if k in axes else v for k, v in enumerate(i)])  # noqa: E731
    return te.compute(x.shape, lambda *i: x(*i) / tir.sqrt(at(square, i) / tir.const(count, dtype_of(x)) + eps) * broadcast_read(scale, i), name="rms_norm")


@lowering("MeanVarianceNormalization")
def mean_variance_norm(ctx, node, ins):
    x = ins[0]
    axes = [a % len(x.shape) for a in node.attrs["axes"]]
    mean, var, at = _moments(x, axes, "mvn")
    return te.compute(x.shape, lambda *i: (x(*i) - at(mean, i)) / tir.sqrt(at(var, i) + tir.const(1e-9, dtype_of(x))), name="mvn")


@lowering("LpNormalization")
def lp_norm(ctx, node, ins):
    x = ins[0]
    axis = node.attrs["axis"] % len(x.shape)
    p = node.attrs["p"]
    value = tir.abs if p == 1 else (lambda v: v * v)
    total = reduce(x, [axis], te.sum, value, name="norm")
    at = lambda i: total(*[0 if k == axis else v for k, v in enumerate(i)])  # noqa: E731

    def body(*i):
        norm = at(i) if p == 1 else tir.sqrt(at(i))
        return x(*i) / tir.Select(norm == tir.const(0, dtype_of(x)), tir.const(1, dtype_of(x)), norm)

    return te.compute(x.shape, body, name="lp_normalize")


@lowering("LRN")
def lrn(ctx, node, ins):
    x = ins[0]
    a = node.attrs
    size = a["size"]
    c = shape_of(x)[1]
    lo = (size - 1) // 2
    r = te.reduce_axis((0, size), "r")

    def window(bi, ci, *s):
        j = ci - lo + r
        v = x(bi, tir.max(tir.min(j, c - 1), 0), *s)
        return te.sum(tir.if_then_else(tir.And(j >= 0, j < c), v * v, tir.const(0, dtype_of(x))), axis=r)

    square = te.compute(x.shape, window, name="square_sum")
    k = tir.const(a["alpha"] / size, dtype_of(x))
    return te.compute(x.shape, lambda *i: x(*i) / tir.pow(tir.const(a["bias"], dtype_of(x)) + k * square(*i), tir.const(a["beta"], dtype_of(x))), name="lrn")
