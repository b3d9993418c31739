"""Kernels that move pixels between an image and other positions: Col2Im sums columns of
blocks into an image, MaxUnpool scatters pooled values to the positions MaxPool's indices
name, GridSample reads an image at the points a grid gives."""

from __future__ import annotations

import itertools
import math

from kiln.backends.llvm.codegen import KernelContext, kernel
from kiln.backends.llvm.emit import LLVMScalarOps, View, const_i64, contiguous_strides, for_range, loop_nest
from kiln.backends.llvm.kernels_data import fill
from kiln.ir.dtypes import DType
from kiln.ir.ops.nn import _col2im_geometry


@kernel("Col2Im")
def col2im(ctx: KernelContext) -> None:
    """The input (N, C*prod(block), L) read as (N, C, *block, *blocks): each entry is added to
    the image pixel its block position and kernel offset land on (skipped in the padding)."""
    x, out = ctx.inputs[0], ctx.outputs[0]
    image, block, strides, dilations, pads, blocks, c = _col2im_geometry(ctx.node.attrs, x.shape)
    nd = len(image)
    fill(ctx, out, 0)
    shape = (x.shape[0], c, *block, *blocks)
    cols = View(x.ptr, x.dtype, shape, tuple(contiguous_strides(shape)), x.offset)
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    with loop_nest(b, shape, name="c") as index:
        offsets, positions = index[2 : 2 + nd], index[2 + nd :]
        inside = None
        where = []
        for i in range(nd):
            at = b.add(b.mul(positions[i], const_i64(strides[i])), b.sub(b.mul(offsets[i], const_i64(dilations[i])), const_i64(pads[i])))
            ok = b.and_(b.icmp_signed(">=", at, const_i64(0)), b.icmp_signed("<", at, const_i64(image[i])))
            inside = ok if inside is None else b.and_(inside, ok)
            where.append(at)
        with b.if_then(inside):
            pixel = [index[0], index[1], *where]
            total = E.add(E.typed(out.load(b, pixel), out.dtype), E.typed(cols.load(b, index), x.dtype))
            out.store(b, pixel, total)


@kernel("MaxUnpool")
def max_unpool(ctx: KernelContext) -> None:
    """Zeros, then each value at its flat index into the (N, C, *unpooled_shape) image; an
    output_shape larger than that image pads it at the end of each axis, so a pixel keeps its
    coordinates and indices outside the unpooled image are dropped."""
    x, idx = ctx.inputs
    out = ctx.outputs[0]
    unpooled = [*x.shape[:2], *ctx.node.attrs["unpooled_shape"]]
    place = contiguous_strides(unpooled)
    fill(ctx, out, 0)
    b = ctx.b
    with loop_nest(b, x.shape, name="u") as index:
        flat = idx.load(b, index)
        valid = b.and_(b.icmp_signed(">=", flat, const_i64(0)), b.icmp_signed("<", flat, const_i64(math.prod(unpooled))))
        coords = []
        for axis, step in enumerate(place):
            coord = b.sdiv(flat, const_i64(step))
            flat = b.srem(flat, const_i64(step))
            valid = b.and_(valid, b.icmp_signed("<", coord, const_i64(out.shape[axis])))
            coords.append(coord)
        with b.if_then(valid):
            out.store(b, coords, x.load(b, index))




def _reflect(E: LLVMScalarOps, x, lo: float, hi: float):
    """``x`` folded back into [lo, hi] by mirroring at the borders (the reference's _reflect)."""
    f64 = DType.float64
    span = hi - lo
    if span <= 0:
        return E.constant(lo, f64)
    low, high = E.constant(lo, f64), E.constant(hi, f64)
    below, above = E.lt(x, low), E.gt(x, high)
    d = E.select(below, E.sub(low, x), E.sub(x, high))
    n = E.call("floor", E.div(d, E.constant(span, f64)))
    r = E.sub(d, E.mul(n, E.constant(span, f64)))
    even = E.eq(E.rem(n, E.constant(2, f64)), E.constant(0, f64))
    up, down = E.add(low, r), E.sub(high, r)
    return E.select(below, E.select(even, up, down), E.select(above, E.select(even, down, up), x))


def _cubic(E: LLVMScalarOps, t, a: float = -0.75):
    f64 = DType.float64

    def c(v):
        return E.constant(v, f64)

    t = E.abs(t)
    near = E.add(E.mul(E.mul(E.sub(E.mul(c(a + 2), t), c(a + 3)), t), t), c(1))
    far = E.sub(E.mul(E.add(E.mul(E.sub(E.mul(c(a), t), c(5 * a)), t), c(8 * a)), t), c(4 * a))
    return E.select(E.le(t, c(1)), near, E.select(E.lt(t, c(2)), far, c(0)))


@kernel("GridSample")
def grid_sample(ctx: KernelContext) -> None:
    """Per output location, each spatial axis's source coordinate from the grid (unnormalized
    for ``align_corners``, folded or clamped by ``padding_mode``) and its taps (1 nearest, 2
    linear, 4 cubic) with their weights; then, per channel, the weighted sum over every
    combination of taps, in float64 as the reference. Out-of-image taps read 0 (zeros), the
    edge (border) or the mirror image (reflection)."""
    attrs = ctx.node.attrs
    x, grid = ctx.inputs
    out = ctx.outputs[0]
    spatial = x.shape[2:]
    nd = len(spatial)
    align, padding, mode = bool(attrs["align_corners"]), attrs["padding_mode"], attrs["mode"]
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    f64 = DType.float64

    def c(v):
        return E.constant(v, f64)

    with loop_nest(b, (out.shape[0], *out.shape[2:]), name="g") as where:
        taps = []  # per axis: [(index, weight, valid)]
        for i, length in enumerate(spatial):
            g = E.cast(E.typed(grid.load(b, [*where, const_i64(nd - 1 - i)]), grid.dtype), f64)
            if align:
                coord = E.mul(E.div(E.add(g, c(1)), c(2)), c(length - 1))
            else:
                coord = E.div(E.sub(E.mul(E.add(g, c(1)), c(length)), c(1)), c(2))
            lo, hi = (0.0, length - 1.0) if align else (-0.5, length - 0.5)
            if mode == "nearest":
                coord = E.call("round", coord)
            outside = E.logical_or(E.lt(coord, c(lo)), E.gt(coord, c(hi)))
            if padding == "border":
                coord = E.select(outside, E.min(E.max(coord, c(0)), c(length - 1)), coord)
            elif padding == "reflection":
                coord = E.select(outside, _reflect(E, coord, lo, hi), coord)
            if mode == "nearest":
                positions = [(coord, c(1))]
            else:
                base = E.call("floor", coord)
                offsets = (0, 1) if mode == "linear" else (-1, 0, 1, 2)
                positions = []
                for k in offsets:
                    pos = E.add(base, c(k))
                    t = E.sub(pos, coord)
                    weight = E.max(E.sub(c(1), E.abs(t)), c(0)) if mode == "linear" else _cubic(E, t)
                    positions.append((pos, weight))
            axis_taps = []
            for pos, weight in positions:
                if padding == "reflection":
                    pos = _reflect(E, pos, lo, hi)
                index = E.cast(pos, DType.int64)  # truncates, as the reference
                valid = E.logical_and(E.ge(index, E.constant(0, DType.int64)), E.lt(index, E.constant(length, DType.int64)))
                index = E.min(E.max(index, E.constant(0, DType.int64)), E.constant(length - 1, DType.int64))
                axis_taps.append((index, weight, valid if padding == "zeros" else None))
            taps.append(axis_taps)
        with for_range(b, x.shape[1], name="ch") as channel:
            total = c(0)
            for combo in itertools.product(*taps):
                weight, valid = c(1), None
                for _, w, ok in combo:
                    weight = E.mul(weight, w)
                    if ok is not None:
                        valid = ok if valid is None else E.logical_and(valid, ok)
                value = E.cast(E.typed(x.load(b, [where[0], channel, *[index for index, _, _ in combo]]), x.dtype), f64)
                if valid is not None:
                    value = E.select(valid, value, c(0))
                total = E.add(total, E.mul(value, weight))
            if not out.dtype.is_float:
                total = E.call("round", total)
            out.store(b, [where[0], channel, *where[1:]], E.cast(total, out.dtype))
