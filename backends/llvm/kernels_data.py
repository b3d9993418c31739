"""Data-movement kernels: copies through strided views (reshape, transpose, expand, slice,
concat, split, pad, tile), gathers and constant fills."""

from __future__ import annotations

import math

import llvmlite.ir as ir
import numpy as np

from kiln.backends.llvm.codegen import KernelContext, kernel
from kiln.backends.llvm.emit import I64, L1_WAYS, LLVMScalarOps, View, const_i64, entry_alloca, for_range, llvm_type, loop_nest, rows_per_l1_set
from kiln.backends.llvm.kernels_elementwise import PARALLEL_WORK, coalesce, emit_pointwise
from kiln.backends.llvm.kernels_nn import _unflatten
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.ops.resize import axis_taps, resized_axes


def copy(ctx: KernelContext, out: View, src: View) -> None:
    emit_pointwise(ctx.b, ctx.module, out, [src], lambda E, xs: xs[0])


def _dense_as(view: View, shape) -> View:
    return View.dense(view.ptr, view.dtype, shape)


@kernel("BitCast")
def bitcast(ctx: KernelContext) -> None:
    """The input's bytes as the output type: copied as unsigned integers of the same width, so
    every bit pattern (NaN payloads, bools) survives."""
    out = ctx.outputs[0]
    raw = _UNSIGNED[out.dtype.itemsize]
    copy(ctx, View.dense(out.ptr, raw, out.shape), View.dense(ctx.inputs[0].ptr, raw, out.shape))


_UNSIGNED = {1: DType.uint8, 2: DType.uint16, 4: DType.uint32, 8: DType.uint64}


@kernel("Reshape", "Identity")
def reshape(ctx: KernelContext) -> None:
    out = ctx.outputs[0]
    copy(ctx, out, _dense_as(ctx.inputs[0], out.shape))


TILE = 32  # a transpose tile: 32 rows of the source and 32 of the output stay in L1 ...


def _output_rows(pitch: int) -> int:
    """... but the output rows, ``pitch`` bytes apart, at most half an L1 set's ways each (a
    (1024, 256) float transpose writes rows 4 KB apart, every one in the same set: 0.39 ->
    0.046 ms; the source rows read crowding sets too cost less than narrower tiles)."""
    return next(t for t in (TILE, 16, 8, 4) if rows_per_l1_set(t, pitch) <= L1_WAYS // 2 or t == 4)


@kernel("Transpose")
def transpose(ctx: KernelContext) -> None:
    emit_transpose(ctx, ctx.outputs[0], ctx.inputs[0].permuted(ctx.node.attrs["perm"]))


def emit_transpose(ctx, out: View, src: View) -> None:
    """``out`` = ``src`` (a permuted view). When the output's contiguous axis is not the
    source's, the two axes are walked in TILE x TILE tiles, so both sides read and write whole
    cache lines (a plain loop would miss the cache on every element of one side). Large
    transposes split the source-contiguous axis's tiles over the worker pool."""
    shape, (o, x) = coalesce(out.shape, [out, src])
    inner = [a for a in range(len(shape) - 1) if x.strides[a] == 1]
    if len(shape) < 2 or x.strides[-1] == 1 or not inner or shape[inner[0]] < TILE or shape[-1] < TILE:
        copy(ctx, out, src)
        return
    a, last = inner[0], len(shape) - 1
    outer = [d for i, d in enumerate(shape) if i not in (a, last)]
    rows, cols = _output_rows(o.strides[a] * o.dtype.itemsize), TILE  # a tile's rows: output rows along ``a``

    def tiles(emitting, ptrs, lo, hi, _):
        """The tiles of rows [lo, hi) of axis ``a`` (lo a multiple of TILE)."""
        b = emitting.b
        ov, xv = o.on(ptrs[0]), x.on(ptrs[1])
        with loop_nest(b, outer, name="o") as rest:
            with for_range(b, -(-hi // rows), start=lo // rows, name="ta") as ta, for_range(b, -(-shape[last] // cols), name="tl") as tl:
                a0, l0 = b.mul(ta, const_i64(rows)), b.mul(tl, const_i64(cols))
                a1 = _smaller(b, b.add(a0, const_i64(rows)), hi)
                l1 = _smaller(b, b.add(l0, const_i64(cols)), shape[last])
                with for_range(b, a1, start=a0, name="ia") as ia, for_range(b, l1, start=l0, name="il") as il:
                    index = list(rest)
                    index.insert(a, ia)
                    index.append(il)
                    ov.store(b, index, xv.load(b, index))

    threads = min(num_threads(), shape[a] // TILE)
    if threads > 1 and math.prod(shape) >= PARALLEL_WORK:
        parallel_rows(ctx, shape[a], threads, [o.ptr, x.ptr], tiles, align=TILE)
    else:
        tiles(ctx, [o.ptr, x.ptr], 0, shape[a], 0)


def _smaller(b, value: ir.Value, limit: int) -> ir.Value:
    return b.select(b.icmp_signed("<", value, const_i64(limit)), value, const_i64(limit))


@kernel("Expand")
def expand(ctx: KernelContext) -> None:
    copy(ctx, ctx.outputs[0], ctx.inputs[0])  # emit_pointwise broadcasts


@kernel("Slice")
def slice_(ctx: KernelContext) -> None:
    from kiln.ir.ops.shape import _slices

    x = ctx.inputs[0]
    offset, strides = x.offset, list(x.strides)
    for axis, s in enumerate(_slices(ctx.node.attrs, x.shape)):
        start, _, step = s.indices(x.shape[axis])
        offset += start * strides[axis]
        strides[axis] *= step
    copy(ctx, ctx.outputs[0], View(x.ptr, x.dtype, ctx.outputs[0].shape, tuple(strides), offset))


def _sub_view(view: View, axis: int, start: int, size: int) -> View:
    shape = list(view.shape)
    shape[axis] = size
    return View(view.ptr, view.dtype, tuple(shape), view.strides, view.offset + start * view.strides[axis])


@kernel("Concat")
def concat(ctx: KernelContext) -> None:
    out = ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(out.shape)
    start = 0
    for x in ctx.inputs:
        copy(ctx, _sub_view(out, axis, start, x.shape[axis]), x)
        start += x.shape[axis]


@kernel("Split")
def split(ctx: KernelContext) -> None:
    x = ctx.inputs[0]
    axis = ctx.node.attrs["axis"] % len(x.shape)
    start = 0
    for out, size in zip(ctx.outputs, ctx.node.attrs["split"]):
        copy(ctx, out, _sub_view(x, axis, start, size))
        start += size


def fill(ctx: KernelContext, out: View, value) -> None:
    emit_pointwise(ctx.b, ctx.module, out, [], lambda E, xs: E.constant(value, out.dtype))


@kernel("ConstantOfShape")
def constant_of_shape(ctx: KernelContext) -> None:
    fill(ctx, ctx.outputs[0], ctx.node.attrs["value"])


def _nonnegative_mod(b: ir.IRBuilder, i: ir.Value, period: int) -> ir.Value:
    return b.srem(b.add(b.srem(i, const_i64(period)), const_i64(period)), const_i64(period))


def _pad_source(b: ir.IRBuilder, mode: str, i: ir.Value, size: int) -> ir.Value:
    """The input index an output index ``i`` (already shifted by the begin pad) reads."""
    if mode == "edge" or size == 1:
        return b.select(b.icmp_signed("<", i, const_i64(0)), const_i64(0), b.select(b.icmp_signed(">=", i, const_i64(size)), const_i64(size - 1), i))
    if mode == "wrap":
        return _nonnegative_mod(b, i, size)
    period = 2 * (size - 1)  # reflect: ... 2 1 [0 1 2 3] 2 1 0 1 ..., repeated as numpy does
    m = _nonnegative_mod(b, i, period)
    return b.select(b.icmp_signed(">=", m, const_i64(size)), b.sub(const_i64(period), m), m)


@kernel("Pad")
def pad(ctx: KernelContext) -> None:
    node = ctx.node
    if node.attrs["mode"] != "constant":
        x, out, pads = ctx.inputs[0], ctx.outputs[0], node.attrs["pads"]
        b = ctx.b
        with loop_nest(b, out.shape, name="p") as index:
            src = [_pad_source(b, node.attrs["mode"], b.sub(i, const_i64(pads[axis])), x.shape[axis]) for axis, i in enumerate(index)]
            out.store(b, index, x.load(b, src))
        return
    x, out = ctx.inputs[0], ctx.outputs[0]
    rank, pads = len(x.shape), node.attrs["pads"]
    if len(ctx.inputs) > 1 and ctx.inputs[1] is not None:
        value_view = View(ctx.inputs[1].ptr, x.dtype, (), ())
        emit_pointwise(ctx.b, ctx.module, out, [value_view], lambda E, xs: xs[0])
    else:
        fill(ctx, out, 0)
    # the kept part of x (negative pads crop) goes to its place in out
    src, dst = x, out
    for axis in range(rank):
        begin, end = pads[axis], pads[axis + rank]
        lo, hi = max(-begin, 0), x.shape[axis] - max(-end, 0)
        src = _sub_view(src, axis, lo, hi - lo)
        dst = _sub_view(dst, axis, max(begin, 0), hi - lo)
    copy(ctx, dst, src)


@kernel("Tile")
def tile(ctx: KernelContext) -> None:
    x, out = ctx.inputs[0], ctx.outputs[0]
    reps = ctx.node.attrs["repeats"]
    # out viewed as (r0, d0, r1, d1, ...): each (repeat, index) pair reads x[index]
    shape, out_strides, in_strides = [], [], []
    for d, r, os, xs in zip(x.shape, reps, out.strides, x.strides):
        shape += [r, d]
        out_strides += [d * os, os]
        in_strides += [0, xs]
    copy(ctx, View(out.ptr, out.dtype, tuple(shape), tuple(out_strides)), View(x.ptr, x.dtype, tuple(shape), tuple(in_strides)))


def _global_table(ctx: KernelContext, values: np.ndarray, element: ir.Type, name: str) -> ir.GlobalVariable:
    """A read-only table in the module (index and weight tables computed at compile time)."""
    flat = values.reshape(-1)
    array_type = ir.ArrayType(element, len(flat))
    table = ir.GlobalVariable(ctx.module, array_type, ctx.module.get_unique_name(name))
    cast = int if isinstance(element, ir.IntType) else float
    table.initializer = ir.Constant(array_type, [cast(v) for v in flat])
    table.global_constant = True
    table.linkage = "internal"
    return table


def _resize_scratch(node) -> int:
    t = node.inputs[0].type
    sizes = list(t.shape)
    biggest = math.prod(sizes)  # the input, converted to float64
    for axis in resized_axes(node.attrs, t.shape):
        sizes[axis] = node.attrs["sizes"][axis]
        biggest = max(biggest, math.prod(sizes))
    return 2 * biggest * (8 if t.dtype.is_float else t.dtype.itemsize)


@kernel("Resize", scratch=_resize_scratch)
def resize(ctx: KernelContext) -> None:
    """One pass per resized axis through scratch: out[..o..] = sum_t w[o,t] * in[..idx[o,t]..],
    with the tap tables computed at compile time by the op's own ``axis_taps``. Float inputs are
    resized in float64, as the reference does; the last pass rounds as it stores the output."""
    node = ctx.node
    attrs = node.attrs
    x, y = ctx.inputs[0], ctx.outputs[0]
    nearest = attrs["mode"] == "nearest"
    if not nearest and not x.dtype.is_float:
        raise KilnError(f"node {node.name!r}: {attrs['mode']} Resize of {x.dtype.short} has no LLVM kernel yet")
    axes = resized_axes(attrs, x.shape)
    b = ctx.b
    work = x.dtype if nearest else DType.float64
    half = _resize_scratch(node) // 2
    current = x if nearest or x.dtype is DType.float64 else None
    if current is None:  # compute in float64, as the reference does
        current = View.dense(ctx.scratch, DType.float64, x.shape)
        emit_pointwise(b, ctx.module, current, [x], lambda E, xs: E.cast(xs[0], DType.float64))
        ping = 1
    else:
        ping = 0
    shape = list(x.shape)
    for step, axis in enumerate(axes):
        indices, weights, _ = axis_taps(attrs, axis, x.shape[axis], attrs["sizes"][axis])
        shape[axis] = attrs["sizes"][axis]
        if step == len(axes) - 1:
            target = y
        else:
            target = View.dense(b.gep(ctx.scratch, [const_i64(half * ping)], source_etype=ir.IntType(8)), work, shape)
            ping ^= 1
        tables = (_global_table(ctx, indices, I64, "resize_idx"), None if nearest else _global_table(ctx, weights, llvm_type(DType.float64), "resize_w"))
        _resize_axis(ctx, current, target, axis, tables, indices.shape[1])
        current = target
    if not axes:
        emit_pointwise(b, ctx.module, y, [current], lambda E, xs: E.cast(xs[0], y.dtype))
    if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize":
        _extrapolate(ctx, axes)


def _resize_axis(ctx: KernelContext, source: View, target: View, axis: int, tables: tuple, taps: int) -> None:
    """target = source resized along ``axis`` by the tap tables (index, weight; no weights:
    nearest), the rows (every axis but the last) split over the pool when large enough."""
    idx_table, w_table = tables
    outer, inner = target.shape[:-1], target.shape[-1]

    def rows(emitting, ptrs, lo, hi, _):
        b = emitting.b
        E = LLVMScalarOps(b, emitting.module)
        src, dst = source.on(ptrs[0]), target.on(ptrs[1])
        with for_range(b, hi, start=lo, name="rr") as r, for_range(b, inner, name="ri") as i:
            index = [*_unflatten(b, r, outer), i]
            o = index[axis]
            total = None
            for t in range(taps):
                slot = b.add(b.mul(o, const_i64(taps)), const_i64(t))
                src_index = list(index)
                src_index[axis] = b.load(b.gep(idx_table, [const_i64(0), slot], source_etype=idx_table.value_type), typ=I64)
                value = E.typed(src.load(b, src_index), src.dtype)
                if w_table is not None:
                    w = E.typed(b.load(b.gep(w_table, [const_i64(0), slot], source_etype=w_table.value_type), typ=llvm_type(DType.float64)), DType.float64)
                    value = E.mul(w, value)
                total = value if total is None else E.add(total, value)
            dst.store(b, index, E.cast(total, dst.dtype) if dst.dtype != src.dtype else total)

    count = math.prod(outer)
    threads = min(num_threads(), count, int(2 * math.prod(target.shape) * taps) // PARALLEL_WORK) if count > 1 else 1
    parallel_rows(ctx, count, threads, [source.ptr, target.ptr], rows)


def _extrapolate(ctx: KernelContext, axes: list[int]) -> None:
    """tf_crop_and_resize: every output whose source coordinate on some axis falls outside the
    input becomes ``extrapolation_value`` (per-axis tables of those rows, made at compile time)."""
    attrs = ctx.node.attrs
    x, y = ctx.inputs[0], ctx.outputs[0]
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    tables = {axis: _global_table(ctx, axis_taps(attrs, axis, x.shape[axis], attrs["sizes"][axis])[2], ir.IntType(8), "resize_outside") for axis in axes}
    fill = E.constant(attrs["extrapolation_value"], y.dtype)
    with loop_nest(b, y.shape, name="x") as index:
        outside = ir.Constant(ir.IntType(1), 0)
        for axis, table in tables.items():
            flag = b.load(b.gep(table, [const_i64(0), index[axis]], source_etype=table.value_type), typ=ir.IntType(8))
            outside = b.or_(outside, b.icmp_unsigned("!=", flag, ir.Constant(ir.IntType(8), 0)))
        with b.if_then(outside):
            y.store(b, index, fill)


@kernel("Trilu")
def trilu(ctx: KernelContext) -> None:
    """Keep the upper (j - i >= k) or lower (j - i <= k) triangle of the last two dims."""
    x, out = ctx.inputs[0], ctx.outputs[0]
    k, upper = ctx.node.attrs["k"], ctx.node.attrs["upper"]
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    with loop_nest(b, out.shape) as index:
        diagonal = b.sub(index[-1], index[-2])
        keep = b.icmp_signed(">=" if upper else "<=", diagonal, const_i64(k))
        value = E.typed(x.load(b, index), x.dtype)
        out.store(b, index, E.select(E.typed(keep, DType.bool), value, E.constant(0, x.dtype)))


@kernel("CumSum", "CumProd")
def cumulative(ctx: KernelContext) -> None:
    """A running sum (product) along ``axis``: one accumulator walks each line, forwards or in
    ``reverse``; ``exclusive`` stores it before adding the element."""
    node = ctx.node
    x, out = ctx.inputs[0], ctx.outputs[0]
    rank = len(x.shape)
    axis = node.attrs["axis"] % rank
    size = x.shape[axis]
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    ty = llvm_type(out.dtype)
    product = node.op.name == "CumProd"
    acc = entry_alloca(b, ty)
    outer = [d for k, d in enumerate(x.shape) if k != axis]
    with loop_nest(b, outer, name="line") as index:
        b.store(E.constant(1 if product else 0, out.dtype), acc)
        with for_range(b, size, name="step") as step:
            at = b.sub(const_i64(size - 1), step) if node.attrs["reverse"] else step
            where = [*index[:axis], at, *index[axis:]]
            current = E.typed(b.load(acc, typ=ty), out.dtype)
            value = E.typed(x.load(b, where), x.dtype)
            updated = E.mul(current, value) if product else E.add(current, value)
            out.store(b, where, current if node.attrs["exclusive"] else updated)
            b.store(updated, acc)
