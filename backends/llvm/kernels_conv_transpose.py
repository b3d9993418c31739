"""ConvTranspose: the column GEMM (W^T times the input, one column per input position and
output (channel, tap)), then the output. A 2-D one sums each output row once from the taps that
land on it, starting from the bias (``_taps_landing``): channels over the pool for NCHW (where
the column matrix would leave the caches, it is made a channel at a time), output rows for
NHWC, whose channel rows add in vectors. Other ranks scatter-add into a zeroed output."""

from __future__ import annotations

import math

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext, kernel
from kiln.backends.llvm.emit import LLVMScalarOps, Vectors, View, const_i64, entry_alloca, for_range, llvm_type, loop_nest
from kiln.backends.llvm.kernels_nn import (
    PARALLEL_COPY,
    _fill_zero,
    _require_float,
    _row_major,
    _serial_gemm,
    _t,
    _tap_offset,
    _window,
    emit_gemm,
    micro_rows,
)
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.ops.nn import _spatial_attrs


def _conv_t_scratch(node) -> int:
    x, w = node.inputs[0].type, node.inputs[1].type
    if node.attrs["layout"] == "NHWC":  # columns (P_in, K * M)
        return math.prod(x.shape[1:-1]) * math.prod(w.shape[1:]) * x.dtype.itemsize
    if _batched(node):  # a chunk's input (C, images * P_in) and its columns (M * K, images * P_in)
        return (x.shape[1] + math.prod(w.shape[1:])) * _chunk_images(node) * math.prod(x.shape[2:]) * x.dtype.itemsize
    if _columns_per_channel(node):  # one channel's columns per thread
        return num_threads() * math.prod(w.shape[2:]) * math.prod(x.shape[2:]) * x.dtype.itemsize
    per_group_out = w.shape[1] * math.prod(w.shape[2:])
    return per_group_out * math.prod(x.shape[2:]) * x.dtype.itemsize


CHANNEL_COLUMNS = 1 << 22  # a column matrix above this (bytes) is made a channel at a time
SHARED_INPUT = 1 << 19  # ... when the input it multiplies, read again for every channel, is at most this


def _columns_per_channel(node) -> bool:
    """Whether a 2-D NCHW ConvTranspose makes its columns one output channel at a time, in
    each thread's scratch, just before summing them into that channel's plane: where the whole
    matrix would leave the caches (FCN-8s's 16x16 taps: 16.8 MB, written and read back from
    memory) and the input it multiplies is small enough to read again per channel."""
    x, w = node.inputs[0].type, node.inputs[1].type
    if node.attrs["layout"] != "NCHW" or x.rank != 4:
        return False
    taps, inner = math.prod(w.shape[2:]), math.prod(x.shape[2:])
    per_group_in = x.shape[1] // node.attrs["group"]
    return w.shape[1] * taps * inner * x.dtype.itemsize > CHANNEL_COLUMNS and taps >= 16 and per_group_in * inner * x.dtype.itemsize <= SHARED_INPUT


def _batched(node) -> bool:
    """A 2-D NCHW ConvTranspose with few input positions per image (a ResNet's input gradient
    in its last stage on small images, 2x2): one column GEMM per image would run nearly empty
    and read all of W per image (9.4 MB for 512 channels by 3x3), so the images of a chunk go
    side by side into one GEMM, as the batched conv does (``kernels_conv_batched``)."""
    from kiln.backends.llvm.kernels_conv_batched import BATCHED_POSITIONS

    x = node.inputs[0].type
    return node.attrs["group"] == 1 and x.rank == 4 and x.shape[0] > 1 and math.prod(x.shape[2:]) < BATCHED_POSITIONS and not _columns_per_channel(node)


def _chunk_images(node) -> int:
    from kiln.backends.llvm.kernels_conv_batched import CHUNK_COLUMNS

    x = node.inputs[0].type
    return max(1, min(x.shape[0], CHUNK_COLUMNS // math.prod(x.shape[2:])))


def _batched_conv_transpose(ctx: KernelContext) -> None:
    """Per chunk of images: their inputs side by side (C, images * P_in), one column GEMM by
    W^T, then each image's output planes from its columns (``_sum_taps_by_rows``)."""
    node = ctx.node
    x, w, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    strides, dilations, pads = _spatial_attrs(node.attrs, 2)
    n, c, in_sp = x.shape[0], x.shape[1], x.shape[2:]
    m, kernel_shape, out_sp = w.shape[1], w.shape[2:], y.shape[2:]
    rows, inner = m * math.prod(kernel_shape), math.prod(in_sp)
    per_chunk = _chunk_images(node)
    pitch = per_chunk * inner
    b = ctx.b
    ty = _t(y)
    inputs = ctx.scratch
    columns = b.gep(ctx.scratch, [const_i64(c * pitch)], source_etype=ty)
    wt = View(w.ptr, w.dtype, (rows, c), (1, rows))
    bias_ptr = b.gep(bias.ptr, [const_i64(bias.offset)], source_etype=_t(bias)) if bias is not None else None

    def chunk(img0: ir.Value, count: int) -> None:
        with loop_nest(b, (count, c, inner), name="bx") as (j, ch, q):  # x[img0 + j, ch, q]
            value = b.load(b.gep(x.ptr, [b.add(b.mul(b.add(b.mul(b.add(img0, j), const_i64(c)), ch), const_i64(inner)), q)], source_etype=_t(x)), typ=_t(x))
            b.store(value, b.gep(inputs, [b.add(b.add(b.mul(ch, const_i64(pitch)), b.mul(j, const_i64(inner))), q)], source_etype=ty))
        emit_gemm(ctx, wt, View(inputs, x.dtype, (c, count * inner), (pitch, 1)), View(columns, y.dtype, (rows, count * inner), (pitch, 1)))
        with for_range(b, count, name="bimg") as j:
            image_columns = b.gep(columns, [b.mul(j, const_i64(inner))], source_etype=ty)
            y_image = b.gep(y.ptr, [b.add(const_i64(y.offset), b.mul(b.add(img0, j), const_i64(m * math.prod(out_sp))))], source_etype=ty)
            _sum_taps_by_rows(ctx, image_columns, y_image, bias_ptr, y.dtype, m, kernel_shape, in_sp, out_sp, strides, dilations, pads, pitch=pitch)

    if n // per_chunk:
        with for_range(b, n // per_chunk, name="chunk") as index:
            chunk(b.mul(index, const_i64(per_chunk)), per_chunk)
    if n % per_chunk:
        chunk(const_i64(n - n % per_chunk), n % per_chunk)


@kernel("ConvTranspose", scratch=_conv_t_scratch)
def conv_transpose(ctx: KernelContext) -> None:
    """Columns = W_g^T @ x_g per image and group, then the output from them (the module docstring)."""
    _require_float(ctx)
    node = ctx.node
    if node.attrs["layout"] == "NHWC":
        _nhwc_conv_transpose(ctx)
        return
    if _batched(node):
        _batched_conv_transpose(ctx)
        return
    x, w, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    nd = len(x.shape) - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    groups = node.attrs["group"]
    n, c, in_sp = x.shape[0], x.shape[1], x.shape[2:]
    cg, mg, kernel_shape = c // groups, w.shape[1], w.shape[2:]
    out_sp = y.shape[2:]
    rows, inner = mg * math.prod(kernel_shape), math.prod(in_sp)
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    cols = View(ctx.scratch, y.dtype, (rows, inner), (inner, 1))
    gathered = nd == 2  # each output row summed once from its taps' column rows, channels over the pool
    per_channel = _columns_per_channel(node)
    if not gathered:
        _fill_zero(ctx, y)
    with for_range(b, n, name="img") as img:
        with for_range(b, groups, name="grp") as g:
            x_base = b.add(b.mul(img, const_i64(c * inner)), b.mul(g, const_i64(cg * inner)))
            xg = View(b.gep(x.ptr, [x_base], source_etype=_t(x)), x.dtype, (cg, inner), (inner, 1))
            w_base = b.mul(g, const_i64(cg * rows))
            wt = View(b.gep(w.ptr, [w_base], source_etype=_t(w)), w.dtype, (rows, cg), (1, rows))
            if not per_channel:
                emit_gemm(ctx, wt, xg, cols)
            y_base = b.add(b.mul(img, const_i64(groups * mg * math.prod(out_sp))), b.mul(g, const_i64(mg * math.prod(out_sp))))
            if gathered:
                y_group = b.gep(y.ptr, [b.add(const_i64(y.offset), y_base)], source_etype=_t(y))
                bias_group = b.gep(bias.ptr, [b.add(const_i64(bias.offset), b.mul(g, const_i64(mg)))], source_etype=_t(bias)) if bias is not None else None
                _sum_taps_by_rows(ctx, cols.ptr, y_group, bias_group, y.dtype, mg, kernel_shape, in_sp, out_sp, strides, dilations, pads, (wt, xg) if per_channel else None)
            else:
                with loop_nest(b, (mg, *kernel_shape, *in_sp), name="sc") as index:
                    ch, ks, pos = index[0], index[1 : 1 + nd], index[1 + nd :]
                    flat, inside, row, col = _window(b, y_base, ch, ks, pos, out_sp, in_sp, kernel_shape, strides, dilations, pads)
                    target = b.gep(y.ptr, [flat], source_etype=_t(y))
                    current = E.typed(b.load(target, typ=_t(y)), y.dtype)
                    added = E.add(current, E.typed(cols.load(b, [row, col]), y.dtype))
                    b.store(b.select(inside, added, current), target)
    if bias is not None and not gathered:
        from kiln.backends.llvm.kernels_elementwise import emit_pointwise

        rank = len(y.shape)
        channel_bias = View(bias.ptr, bias.dtype, tuple(y.shape[1] if i == 1 else 1 for i in range(rank)), tuple(1 if i == 1 else 0 for i in range(rank)))
        emit_pointwise(b, ctx.module, y, [y, channel_bias], lambda E, xs: E.add(xs[0], xs[1]))


def _sum_taps_by_rows(ctx: KernelContext, cols: ir.Value, y: ir.Value, bias: ir.Value | None, dtype: DType, channels: int, kernel_shape, in_sp, out_sp, strides, dilations, pads, product: tuple[View, View] | None = None, pitch: int | None = None) -> None:
    """A 2-D ConvTranspose's output planes from the columns (channel, tap row, tap column) x
    input positions, output row by output row: the row starts from the bias, then every tap
    row that lands on it adds each tap column's column-matrix row at stride ``sx`` (the range
    of input columns that lands inside, computed per tap). The row stays in L1 while its taps
    are added, and each thread owns whole channels (FCN-8s's last upsampling, 21 channels by
    16x16 taps from 28x28, with a Relu: 3.0 -> 2.1 ms; the zero fill, the scatter and the bias were
    separate passes, the scatter on one thread).

    ``product`` (W^T, x): the columns are not made yet; each channel's are, into its thread's
    part of ``cols``, just before they are summed (``_columns_per_channel``). ``pitch``: the
    elements from one column-matrix row to the next (the batched columns' images side by side),
    else ``ih * iw``."""
    (kh, kw), (ih, iw), (oh, ow) = kernel_shape, in_sp, out_sp
    pitch = pitch or ih * iw
    sx = strides[1]
    ty = llvm_type(dtype)
    taps = kh * kw

    def planes(emitting, ptrs, lo, hi, block):
        b = emitting.b
        E = LLVMScalarOps(b, emitting.module)
        y_p = ptrs[1]
        with for_range(b, hi, start=lo, name="tch") as ch:
            if product is None:  # this channel's rows of the whole column matrix
                cols_p = b.gep(ptrs[0], [b.mul(ch, const_i64(taps * pitch))], source_etype=ty)
            else:  # made now: W^T's rows for this channel times x, into this thread's scratch
                wt, xg = product
                cols_p = b.gep(ptrs[0], [const_i64(block * taps * ih * iw)], source_etype=ty)
                rows = View(b.gep(ptrs[3], [b.mul(ch, const_i64(taps * wt.strides[0]))], source_etype=ty), wt.dtype, (taps, wt.shape[1]), wt.strides)
                _serial_gemm(emitting, rows, xg.on(ptrs[4]), View.dense(cols_p, dtype, (taps, ih * iw)), 1.0, micro_rows(taps))
            start = b.load(b.gep(ptrs[2], [ch], source_etype=ty), typ=ty) if bias is not None else ir.Constant(ty, 0.0)
            if sx == 1 and dtype in (DType.float32, DType.float64):
                _sum_row_chunks(emitting, cols_p, b.gep(y_p, [b.mul(ch, const_i64(oh * ow))], source_etype=ty), start, dtype, kernel_shape, in_sp, out_sp, strides, dilations, pads, pitch)
            else:
                with for_range(b, oh, name="toy") as oy:
                    row = b.gep(y_p, [b.add(b.mul(ch, const_i64(oh * ow)), b.mul(oy, const_i64(ow)))], source_etype=ty)
                    with for_range(b, ow, name="tfill") as ox:
                        b.store(start, b.gep(row, [ox], source_etype=ty))

                    def add_taps(iy, ky, kx, ix0, ix1, shift):
                        tap = b.add(b.mul(ky, const_i64(kw)), kx)
                        source = b.gep(cols_p, [b.add(b.mul(tap, const_i64(pitch)), b.mul(iy, const_i64(iw)))], source_etype=ty)
                        with for_range(b, ix1, start=ix0, name="tix") as ix:
                            target = b.gep(row, [b.add(b.mul(ix, const_i64(sx)), shift)], source_etype=ty)
                            added = E.add(E.typed(b.load(target, typ=ty), dtype), E.typed(b.load(b.gep(source, [ix], source_etype=ty), typ=ty), dtype))
                            b.store(added, target)

                    _taps_landing(b, oy, kernel_shape, in_sp, ow, strides, dilations, pads, add_taps)

    work = channels * oh * ow + channels * kh * kw * ih * iw
    threads = min(num_threads(), channels) if work >= PARALLEL_COPY else 1
    pointers = [cols, y, bias if bias is not None else y]
    if product is not None:
        pointers += [product[0].ptr, product[1].ptr]
    parallel_rows(ctx, channels, threads, pointers, planes)


def _sum_row_chunks(emitting, cols: ir.Value, plane: ir.Value, start: ir.Value, dtype: DType, kernel_shape, in_sp, out_sp, strides, dilations, pads, pitch: int) -> None:
    """One output plane of a ConvTranspose with unit column stride, a vector of output columns
    at a time: the vector starts from the bias, each landing tap adds its column-matrix row
    shifted into place (one masked load: lanes whose input column is off the row read
    nothing), and it is stored once. (The row-at-a-time sums stored every tap's additions:
    LeNet-5's input gradient, 6 planes of 14x14 from 5x5 taps, batch 64, 0.60 -> 0.28 ms.)"""
    from kiln.backends.llvm.kernels_nn import vector_width

    b = emitting.b
    kw, iw, (oh, ow) = kernel_shape[1], in_sp[1], out_sp
    width = vector_width(dtype)
    V = Vectors(b, emitting.module, dtype, width)
    acc = entry_alloca(b, V.vec)
    with for_range(b, oh, name="coy") as oy:
        row = b.gep(plane, [b.mul(oy, const_i64(ow))], source_etype=V.scalar)
        for c0 in range(0, ow, width):
            b.store(V.splat(start), acc)

            def add_taps(iy, ky, kx, ix0, ix1, shift):
                # output column c0 + lane takes input column first + lane, inside [ix0, ix1)
                tap = b.add(b.mul(ky, const_i64(kw)), kx)
                source = b.gep(cols, [b.add(b.mul(tap, const_i64(pitch)), b.mul(iy, const_i64(iw)))], source_etype=V.scalar)
                first = b.sub(const_i64(c0), shift)
                live = V.lanes_within(b.sub(ix0, first), b.sub(ix1, first))
                value = V.load(b.gep(source, [first], source_etype=V.scalar), live)
                b.store(b.fadd(b.load(acc, typ=V.vec), value), acc)

            _taps_landing(b, oy, kernel_shape, in_sp, ow, strides, dilations, pads, add_taps)
            V.store(b.load(acc, typ=V.vec), b.gep(row, [const_i64(c0)], source_etype=V.scalar), V.mask(min(width, ow - c0)))


def _taps_landing(b: ir.IRBuilder, oy: ir.Value, kernel_shape, in_sp, ow: int, strides, dilations, pads, body) -> None:
    """For output row ``oy`` of a 2-D ConvTranspose: ``body(iy, ky, kx, ix0, ix1, shift)`` for
    every tap (ky, kx) whose input row ``iy`` lands on it, input columns [ix0, ix1) landing
    inside the row at ``ox = ix * sx + shift``."""
    (kh, kw), (ih, iw) = kernel_shape, in_sp
    (sy, sx), (dy, dx) = strides, dilations
    py, px = pads[0], pads[1]
    with for_range(b, kh, name="tky") as ky:
        reach = b.sub(b.add(oy, const_i64(py)), b.mul(ky, const_i64(dy)))  # iy * sy when this tap row lands here
        iy = b.sdiv(reach, const_i64(sy))
        lands = b.and_(b.icmp_signed(">=", reach, const_i64(0)), b.icmp_signed("<", iy, const_i64(ih)))
        lands = b.and_(lands, b.icmp_signed("==", b.srem(reach, const_i64(sy)), const_i64(0)))
        with b.if_then(lands):
            with for_range(b, kw, name="tkx") as kx:
                shift = b.sub(b.mul(kx, const_i64(dx)), const_i64(px))
                before = b.neg(shift)  # the first ix lands at ox >= 0
                ix0 = b.select(b.icmp_signed(">", before, const_i64(0)), b.sdiv(b.add(before, const_i64(sx - 1)), const_i64(sx)), const_i64(0))
                last = b.sub(const_i64(ow - 1), shift)
                ix1 = b.add(b.select(b.icmp_signed("<", last, const_i64(0)), const_i64(-1), b.sdiv(last, const_i64(sx))), const_i64(1))
                body(iy, ky, kx, ix0, b.select(b.icmp_signed("<", ix1, const_i64(iw)), ix1, const_i64(iw)), shift)


def _nhwc_conv_transpose(ctx: KernelContext) -> None:
    """cols[P_in, (K, M)] = x[P_in, C] @ w[C, (K, M)]; each tap's M-vector added into the output
    pixel it lands on (contiguous channel rows both sides)."""
    node = ctx.node
    if node.attrs["group"] != 1:
        raise KilnError(f"node {node.name!r}: grouped NHWC ConvTranspose has no LLVM kernel yet")
    x, w, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    nd = len(x.shape) - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    n, in_sp, c = x.shape[0], x.shape[1:-1], x.shape[-1]
    kernel_shape, m = w.shape[1:-1], w.shape[-1]
    out_sp = y.shape[1:-1]
    p_in, taps = math.prod(in_sp), math.prod(kernel_shape)
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    cols = View(ctx.scratch, y.dtype, (p_in, taps * m), (taps * m, 1))
    rows_gathered = nd == 2  # each output row summed once from the taps landing on it, rows over the pool
    if not rows_gathered:
        _fill_zero(ctx, y)
    w_view = View(w.ptr, w.dtype, (c, taps * m), (taps * m, 1))
    with for_range(b, n, name="img") as img:
        xi = View(b.gep(x.ptr, [b.mul(img, const_i64(p_in * c))], source_etype=_t(x)), x.dtype, (p_in, c), (c, 1))
        emit_gemm(ctx, xi, w_view, cols)
        y_base = b.mul(img, const_i64(math.prod(out_sp) * m))
        if rows_gathered:
            y_img = b.gep(y.ptr, [b.add(const_i64(y.offset), y_base)], source_etype=_t(y))
            _sum_nhwc_taps_by_rows(ctx, cols.ptr, y_img, b.gep(bias.ptr, [const_i64(bias.offset)], source_etype=_t(bias)) if bias is not None else None, y.dtype, m, kernel_shape, in_sp, out_sp, strides, dilations, pads)
        else:
            with loop_nest(b, (*in_sp, *kernel_shape), name="sc") as index:
                pos, ks = index[:nd], index[nd:]
                flat, inside = _tap_offset(b, y_base, pos, ks, out_sp, m, strides, dilations, pads)
                row, tap = _row_major(b, pos, in_sp), _row_major(b, ks, kernel_shape)
                with b.if_then(inside):
                    col0 = b.mul(tap, const_i64(m))
                    with for_range(b, m, name="ch") as ch:
                        target = b.gep(y.ptr, [b.add(flat, ch)], source_etype=_t(y))
                        current = E.typed(b.load(target, typ=_t(y)), y.dtype)
                        b.store(E.add(current, E.typed(cols.load(b, [row, b.add(col0, ch)]), y.dtype)), target)
    if bias is not None and not rows_gathered:
        from kiln.backends.llvm.kernels_elementwise import emit_pointwise

        rows = n * math.prod(out_sp)
        flat_y = View(y.ptr, y.dtype, (rows, m), (m, 1))
        emit_pointwise(b, ctx.module, flat_y, [flat_y, View(bias.ptr, bias.dtype, (rows, m), (0, 1))], lambda E, xs: E.add(xs[0], xs[1]))


def _sum_nhwc_taps_by_rows(ctx: KernelContext, cols: ir.Value, y: ir.Value, bias: ir.Value | None, dtype: DType, m: int, kernel_shape, in_sp, out_sp, strides, dilations, pads) -> None:
    """The channels-last form of ``_sum_taps_by_rows``: an output row (ow positions by m
    channels) starts from the bias, then each landing tap adds its column-matrix channel rows
    (contiguous, in vectors) to the positions it lands on. Threads split the output rows."""
    (kh, kw), (ih, iw), (oh, ow) = kernel_shape, in_sp, out_sp
    sx = strides[1]
    ty = llvm_type(dtype)
    row_cols = kh * kw * m  # a column-matrix row: every tap's channels for one input position

    def rows(emitting, ptrs, lo, hi, _):
        b = emitting.b
        E = LLVMScalarOps(b, emitting.module)
        cols_p, y_p = ptrs[0], ptrs[1]
        with for_range(b, hi, start=lo, name="toy") as oy:
            row = b.gep(y_p, [b.mul(oy, const_i64(ow * m))], source_etype=ty)
            with for_range(b, ow, name="tfill") as ox, for_range(b, m, name="tch") as ch:
                start = b.load(b.gep(ptrs[2], [ch], source_etype=ty), typ=ty) if bias is not None else ir.Constant(ty, 0.0)
                b.store(start, b.gep(row, [b.add(b.mul(ox, const_i64(m)), ch)], source_etype=ty))

            def add_taps(iy, ky, kx, ix0, ix1, shift):
                tap = b.add(b.mul(ky, const_i64(kw)), kx)
                source = b.gep(cols_p, [b.add(b.mul(iy, const_i64(iw * row_cols)), b.mul(tap, const_i64(m)))], source_etype=ty)
                with for_range(b, ix1, start=ix0, name="tix") as ix:
                    target = b.gep(row, [b.mul(b.add(b.mul(ix, const_i64(sx)), shift), const_i64(m))], source_etype=ty)
                    taken = b.gep(source, [b.mul(ix, const_i64(row_cols))], source_etype=ty)
                    with for_range(b, m, name="tch") as ch:
                        at = b.gep(target, [ch], source_etype=ty)
                        added = E.add(E.typed(b.load(at, typ=ty), dtype), E.typed(b.load(b.gep(taken, [ch], source_etype=ty), typ=ty), dtype))
                        b.store(added, at)

            _taps_landing(b, oy, kernel_shape, in_sp, ow, strides, dilations, pads, add_taps)

    work = oh * ow * m + kh * kw * ih * iw * m
    threads = min(num_threads(), oh) if work >= PARALLEL_COPY else 1
    parallel_rows(ctx, oh, threads, [cols, y, bias if bias is not None else y], rows)
