"""NCHW convolution with few output positions per image: images side by side in one GEMM.

The NCHW conv multiplies W (M, K) by each image's im2col columns (K, P). Where P is small (a
ResNet's last stage on small images: 2x2 at 64 pixels; a weight gradient, whose "images" are
the input's channels and whose 3x3 "positions" are the kernel's taps) that GEMM runs its
micro-tiles nearly empty and reads all of W once per image: the weights of a 512-channel 3x3
layer are 9.4 MB. Here the columns of several images go side by side into one scratch matrix
(K, images * P), one GEMM multiplies W by them all, and each image's block of the product is
copied to its place in the output. Chunks of images aim at ``CHUNK_COLUMNS`` columns; threads
take whole chunks where there are enough of them, else the one GEMM splits itself.
"""

from __future__ import annotations

import math

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext
from kiln.backends.llvm.emit import Vectors, View, const_i64, for_range, loop_nest
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads

BATCHED_POSITIONS = 64  # output positions per image below which images share a GEMM
CHUNK_COLUMNS = 128  # the columns (images x positions) a shared GEMM aims for ...
CHUNK_BYTES = 1 << 20  # ... in a column matrix no larger than this (a core's L2 holds it)
WINDOW_RUN = 8  # kernel widths from which a position's window rows are copied whole


def applies(node) -> bool:
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, nd, strides, dilations, pads, out = _conv_geometry(node)
    return node.attrs["group"] == 1 and x.shape[0] > 1 and math.prod(out) < BATCHED_POSITIONS


def _chunk_images(node) -> int:
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, *_, out = _conv_geometry(node)
    p, k = math.prod(out), math.prod(w.shape[1:])
    return max(1, min(x.shape[0], CHUNK_COLUMNS // p, CHUNK_BYTES // (p * k * x.dtype.itemsize)))


def _threads(node) -> int:
    """Threads over chunks: one where there are too few chunks to share (the GEMM splits)."""
    chunks = node.inputs[0].type.shape[0] // _chunk_images(node)
    return min(num_threads(), chunks) if chunks >= 2 * num_threads() else 1


def _positions_major(node) -> bool:
    """Whether the columns go in transposed, a row per output position: where the output rows
    are shorter than the kernel's, the usual column rows would be copied in runs of a few
    elements (a weight gradient's 3-wide outputs under a 16x16 "kernel": 0.67 of its 1.1 ms)
    while a position's window row is a run of the kernel's width. The GEMM is then the
    columns (positions, K) by W^T (K, M), W transposed once per run."""
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, nd, strides, dilations, pads, out = _conv_geometry(node)
    return nd == 2 and dilations[1] == 1 and w.shape[-1] >= WINDOW_RUN and out[-1] < w.shape[-1]


def _block_bytes(node) -> int:
    """One thread's scratch: the chunk's columns (K, C) and its product (M, C)."""
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, nd, *_, out = _conv_geometry(node)
    k = w.shape[1] * math.prod(w.shape[2:])
    return (k + w.shape[0]) * _chunk_images(node) * math.prod(out) * x.dtype.itemsize


def _transposed_weights_bytes(node) -> int:
    w = node.inputs[1].type
    return math.prod(w.shape) * w.dtype.itemsize if _positions_major(node) else 0


def scratch_bytes(node) -> int:
    return _transposed_weights_bytes(node) + _block_bytes(node) * _threads(node)


def emit(ctx: KernelContext) -> None:
    from kiln.backends.llvm.kernels_nn import MR, Start, _conv_geometry, _im2col, _serial_gemm, _t, emit_gemm

    node = ctx.node
    x, w, nd, strides, dilations, pads, out_sp = _conv_geometry(node)
    n, c = x.shape[:2]
    m = w.shape[0]
    kernel_shape, in_sp = w.shape[2:], x.shape[2:]
    k, p = c * math.prod(kernel_shape), math.prod(out_sp)
    per_chunk = _chunk_images(node)
    columns = per_chunk * p
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    threads = _threads(node)
    block_bytes = _block_bytes(node)
    item = x.dtype.itemsize

    by_positions = _positions_major(node)
    blocks_at = _transposed_weights_bytes(node)
    ty = _t(ctx.outputs[0])

    def chunk(emitting, ptrs, block, img0, count: int, serial: bool) -> None:
        """Images [img0, img0 + count): columns, one GEMM, the product copied out."""
        b = emitting.b
        xv, y = ctx.inputs[0].on(ptrs[0]), ctx.outputs[0].on(ptrs[2])
        scratch = b.gep(ptrs[3], [const_i64(blocks_at + block * block_bytes)], source_etype=ir.IntType(8))
        product_ptr = b.gep(scratch, [const_i64(k * columns * item)], source_etype=ir.IntType(8))
        init = None
        if by_positions:  # product (positions, M) = columns (positions, K) @ W^T (K, M)
            _window_rows(emitting, xv, scratch, img0, count, x.shape, kernel_shape, out_sp, strides, dilations, pads)
            a = View(scratch, x.dtype, (count * p, k), (k, 1))
            weights = View(ptrs[3], w.dtype, (k, m), (m, 1))
            product = View(product_ptr, y.dtype, (count * p, m), (m, 1))
            if bias is not None:
                init = View(ptrs[4], bias.dtype, (count * p, m), (0, 1))
            gemm = (a, weights, product)
        else:  # product (M, positions) = W (M, K) @ columns (K, positions)
            with for_range(b, count, name="bimg") as j:
                cols = View(b.gep(scratch, [b.mul(j, const_i64(p * item))], source_etype=ir.IntType(8)), x.dtype, (k, p), (columns, 1))
                _im2col(emitting, xv, b.mul(b.add(img0, j), const_i64(c * math.prod(in_sp))), cols, c, kernel_shape, in_sp, out_sp, strides, dilations, pads)
            cols = View(scratch, x.dtype, (k, count * p), (columns, 1))
            product = View(product_ptr, y.dtype, (m, count * p), (columns, 1))
            if bias is not None:
                init = View(ptrs[4], bias.dtype, (m, count * p), (1, 0))
            gemm = (View(ptrs[1], w.dtype, (m, k), (k, 1)), cols, product)
        if serial:
            _serial_gemm(emitting, *gemm, 1.0, MR, Start(init, 1.0) if init is not None else None)
        else:
            emit_gemm(emitting, *gemm, 1.0, init)
        # y[img0 + j, o, q] = product[o, j * p + q], or product[j * p + q, o]
        with loop_nest(b, (count, m, p), name="out") as (j, o, q):
            if by_positions:
                src = b.add(b.mul(b.add(b.mul(j, const_i64(p)), q), const_i64(m)), o)
            else:
                src = b.add(b.add(b.mul(o, const_i64(columns)), b.mul(j, const_i64(p))), q)
            dst = b.add(b.mul(b.add(b.mul(b.add(img0, j), const_i64(m)), o), const_i64(p)), q)
            b.store(b.load(b.gep(product_ptr, [src], source_etype=ty), typ=ty), b.gep(y.ptr, [dst], source_etype=ty))

    def chunks(emitting, ptrs, lo, hi, block) -> None:
        with for_range(emitting.b, hi, start=lo, name="chunk") as index:
            chunk(emitting, ptrs, block, emitting.b.mul(index, const_i64(per_chunk)), per_chunk, serial=threads > 1)

    pointers = [ctx.inputs[0].ptr, ctx.inputs[1].ptr, ctx.outputs[0].ptr, ctx.scratch] + ([bias.ptr] if bias is not None else [ctx.scratch])
    if by_positions:  # W^T at the start of the scratch, read by every chunk
        from kiln.backends.llvm.kernels_data import emit_transpose

        emit_transpose(ctx, View(ctx.scratch, w.dtype, (k, m), (m, 1)), View(ctx.inputs[1].ptr, w.dtype, (k, m), (1, k)))
    full = n // per_chunk
    if full:
        parallel_rows(ctx, full, threads, pointers, chunks)
    if n % per_chunk:
        chunk(ctx, pointers, 0, const_i64(full * per_chunk), n % per_chunk, serial=False)


def _window_rows(emitting, xv: View, cols: ir.Value, img0: ir.Value, count: int, x_shape, kernel_shape, out_sp, strides, dilations, pads) -> None:
    """cols[j * P + (oy, ox), (ch, ky, kx)] = x[img0 + j, ch, iy, ix] (0 outside the image), a
    position's window row (ch, ky) copied as vectors of kx (unit width dilation), each load
    masked to the part of the row inside the image."""
    from kiln.backends.llvm.kernels_nn import _clamp, vector_width

    b = emitting.b
    (c, (ih, iw)), ((kh, kw), (oh, ow)) = (x_shape[1], x_shape[2:]), (kernel_shape, out_sp)
    k, p = c * kh * kw, oh * ow
    width = vector_width(xv.dtype)
    V = Vectors(b, emitting.module, xv.dtype, width)

    with loop_nest(b, (count, oh, ow, c, kh), name="win") as (j, oy, ox, ch, ky):
        iy = b.add(b.mul(oy, const_i64(strides[0])), b.sub(b.mul(ky, const_i64(dilations[0])), const_i64(pads[0])))
        ix0 = b.sub(b.mul(ox, const_i64(strides[1])), const_i64(pads[1]))  # ix = ix0 + kx
        row_ok = b.and_(b.icmp_signed(">=", iy, const_i64(0)), b.icmp_signed("<", iy, const_i64(ih)))
        lo = _clamp(b, b.neg(ix0), 0, kw)  # kx in [lo, hi) reads inside the image
        hi = b.select(row_ok, _clamp(b, b.sub(const_i64(iw), ix0), 0, kw), lo)
        position = b.add(b.mul(j, const_i64(p)), b.add(b.mul(oy, const_i64(ow)), ox))
        dst = b.gep(cols, [b.add(b.mul(position, const_i64(k)), b.mul(b.add(b.mul(ch, const_i64(kh)), ky), const_i64(kw)))], source_etype=V.scalar)
        image = b.add(b.mul(b.add(img0, j), const_i64(c)), ch)
        src = b.gep(xv.ptr, [b.add(b.mul(b.add(b.mul(image, const_i64(ih)), b.select(row_ok, iy, const_i64(0))), const_i64(iw)), ix0)], source_etype=V.scalar)
        for start in range(0, kw, width):
            inside = V.lanes_within(b.sub(lo, const_i64(start)), b.sub(hi, const_i64(start)))  # kx = start + lane
            value = V.load(b.gep(src, [const_i64(start)], source_etype=V.scalar), inside)
            V.store(value, b.gep(dst, [const_i64(start)], source_etype=V.scalar), V.mask(min(width, kw - start)))
