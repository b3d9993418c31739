"""TE lowerings of image sampling and of windows put back into an image: GridSample (linear,
nearest and cubic; zeros, border and reflection padding; any number of spatial axes: the
coordinates, weights and sum in float64 as eager, rounded back once), Col2Im (each pixel
gathers the column entries that land on it) and MaxUnpool (a scatter into zeros)."""

from __future__ import annotations

import itertools

import math

from tvm import te, topi
from tvm import tirx as tir

from kiln.backends.tvm.lower import lowering
from kiln.backends.tvm.scalar import dtype_of
from kiln.backends.tvm.te_tensor import shape_of
from kiln.ir.ops.nn import _col2im_geometry

F64 = "float64"


def _f(value: float):
    return tir.const(value, F64)


def _reflect(x, lo: float, hi: float):
    """``x`` folded back into [lo, hi] by mirroring at the borders (ir.ops.resize._reflect)."""
    span = hi - lo
    if span <= 0:
        return _f(lo)
    below = x < _f(lo)
    d = tir.Select(below, _f(lo) - x, x - _f(hi))
    n = tir.floor(d / _f(span))
    r = d - n * _f(span)
    even = n - tir.floor(n / _f(2.0)) * _f(2.0) == _f(0.0)
    inside = tir.Select(below, tir.Select(even, _f(lo) + r, _f(hi) - r), tir.Select(even, _f(hi) - r, _f(lo) + r))
    return tir.Select(tir.Or(below, x > _f(hi)), inside, x)


def _cubic(t, a: float = -0.75):
    """Keys' cubic convolution kernel (ir.ops.resize.cubic_kernel)."""
    t = tir.abs(t)
    near = ((_f(a + 2) * t - _f(a + 3)) * t * t) + _f(1.0)
    far = ((_f(a) * t - _f(5 * a)) * t + _f(8 * a)) * t - _f(4 * a)
    return tir.Select(t <= _f(1.0), near, tir.Select(t < _f(2.0), far, _f(0.0)))


def _clamp(i, length: int):
    return tir.max(tir.min(i, tir.const(length - 1, "int64")), tir.const(0, "int64"))


@lowering("GridSample")
def grid_sample(ctx, node, ins):
    x, grid = ins
    a = node.attrs
    mode, padding, align = a["mode"], a["padding_mode"], bool(a["align_corners"])
    n, c, *spatial = shape_of(x)
    nd = len(spatial)
    bounds = [(0.0, length - 1.0) if align else (-0.5, length - 0.5) for length in spatial]
    offsets = [0] if mode == "nearest" else [0, 1] if mode == "linear" else [-1, 0, 1, 2]
    out_shape = node.outputs[0].type.shape

    def coordinate(i: int, length: int):
        """Axis ``i``'s sampling coordinate of every output location, a tensor of its own (so
        the taps' expressions read it instead of repeating its formula)."""

        def at(b, *o):
            g = grid(b, *o, nd - 1 - i).astype(F64)  # the grid lists x (the last axis) first
            coord = (g + _f(1.0)) / _f(2.0) * _f(length - 1) if align else ((g + _f(1.0)) * _f(length) - _f(1.0)) / _f(2.0)
            if mode == "nearest":
                coord = tir.nearbyint(coord)
            lo, hi = bounds[i]
            outside = tir.Or(coord < _f(lo), coord > _f(hi))
            if padding == "border":
                coord = tir.Select(outside, tir.max(tir.min(coord, _f(length - 1)), _f(0.0)), coord)
            elif padding == "reflection":
                coord = tir.Select(outside, _reflect(coord, lo, hi), coord)
            return coord

        return te.compute([n, *out_shape[2:]], at, name=f"coord{i}")

    coordinates = [coordinate(i, length) for i, length in enumerate(spatial)]

    def body(b, ch, *o):
        coords = [t(b, *o) for t in coordinates]
        total = _f(0.0)
        for combo in itertools.product(offsets, repeat=nd):
            weight, valid, index = _f(1.0), None, []
            for i, k in enumerate(combo):
                length, coord = spatial[i], coords[i]
                pos = coord if mode == "nearest" else tir.floor(coord) + _f(k)
                if mode == "linear":
                    weight = weight * tir.max(_f(1.0) - tir.abs(pos - coord), _f(0.0))
                elif mode == "cubic":
                    weight = weight * _cubic(pos - coord)
                if padding == "reflection":
                    pos = tir.trunc(_reflect(pos, *bounds[i]))
                at = pos.astype("int64")
                if padding == "zeros":
                    ok = tir.And(at >= 0, at < length)
                    valid = ok if valid is None else tir.And(valid, ok)
                index.append(_clamp(at, length))
            value = x(b, ch, *index).astype(F64)
            if valid is not None:
                value = tir.Select(valid, value, _f(0.0))
            total = total + value * weight
        if not dtype_of(x).startswith("float"):
            total = tir.nearbyint(total)
        return total.astype(dtype_of(x))

    return te.compute(out_shape, body, name="grid_sample")


@lowering("Col2Im")
def col2im(ctx, node, ins):
    """y[n, c, *p] = the sum over kernel offsets k of the column entry whose block lands k
    there: block b_i = (p_i + pad_i - k_i * dilation_i) / stride_i, where that divides and is
    one of the blocks."""
    x = ins[0]
    image, block, strides, dilations, pads, blocks, c = _col2im_geometry(node.attrs, shape_of(x))
    nd = len(image)
    rk = [te.reduce_axis((0, k), f"k{i}") for i, k in enumerate(block)]

    def body(n, ch, *p):
        ok, row, col = [], ch, 0
        for i in range(nd):
            offset = p[i] + pads[i] - rk[i] * dilations[i]
            at = tir.floordiv(offset, strides[i])
            ok += [offset >= 0, tir.floormod(offset, strides[i]) == 0, at < blocks[i]]
            row = row * block[i] + rk[i]
            col = col * blocks[i] + tir.max(at, 0)
        value = x(n, row, tir.min(col, math.prod(blocks) - 1))
        return te.sum(tir.if_then_else(tir.all(*ok), value, tir.const(0, dtype_of(x))), axis=rk)

    return te.compute([shape_of(x)[0], c, *image], body, name="col2im")


@lowering("MaxUnpool")
def max_unpool(ctx, node, ins):
    """Zeros of the unpooled (N, C, *unpooled_shape) image with each value at its flat index,
    then padded with zeros (or cropped) at the end of each axis to the output shape."""
    x, idx = ins
    unpooled = [*shape_of(x)[:2], *node.attrs["unpooled_shape"]]
    zeros = te.compute([math.prod(unpooled)], lambda i: tir.const(0, dtype_of(x)), name="zeros")
    count = math.prod(shape_of(x))
    flat = topi.scatter_elements(zeros, topi.reshape(idx, [count]), topi.reshape(x, [count]), 0, "update")
    image = topi.reshape(flat, unpooled)
    out = node.outputs[0].type.shape

    def body(*i):
        inside = tir.all(*[i[k] < unpooled[k] for k in range(2, len(out))])
        return tir.if_then_else(inside, image(*[tir.min(i[k], unpooled[k] - 1) for k in range(len(out))]), tir.const(0, dtype_of(x)))

    return te.compute(out, body, name="max_unpool")
