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
from kiln.backends.llvm.emit import View, const_i64, for_range
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads

BATCHED_POSITIONS = 64  # output positions per image below which images share a GEMM
CHUNK_COLUMNS = 128  # the columns (images x positions) a shared GEMM aims for


def applies(node) -> bool:
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, nd, strides, dilations, pads, out = _conv_geometry(node)
    return node.attrs["group"] == 1 and x.shape[0] > 1 and math.prod(out) < BATCHED_POSITIONS


def _chunk_images(node) -> int:
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, *_, out = _conv_geometry(node)
    return max(1, min(x.shape[0], CHUNK_COLUMNS // math.prod(out)))


def _threads(node) -> int:
    """Threads over chunks: one where there are too few chunks to share (the GEMM splits)."""
    chunks = node.inputs[0].type.shape[0] // _chunk_images(node)
    return min(num_threads(), chunks) if chunks >= 2 * num_threads() else 1


def _block_bytes(node) -> int:
    """One thread's scratch: the chunk's columns (K, C) and its product (M, C)."""
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, nd, *_, out = _conv_geometry(node)
    k = w.shape[1] * math.prod(w.shape[2:])
    return (k + w.shape[0]) * _chunk_images(node) * math.prod(out) * x.dtype.itemsize


def scratch_bytes(node) -> int:
    return _block_bytes(node) * _threads(node)


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

    def chunk(emitting, ptrs, block, img0, count: int, serial: bool) -> None:
        """Images [img0, img0 + count): columns, one GEMM, the product copied out."""
        b = emitting.b
        xv, y = ctx.inputs[0].on(ptrs[0]), ctx.outputs[0].on(ptrs[2])
        scratch = b.gep(ptrs[3], [const_i64(block * block_bytes)], source_etype=ir.IntType(8))
        product_ptr = b.gep(scratch, [const_i64(k * columns * item)], source_etype=ir.IntType(8))
        with for_range(b, count, name="bimg") as j:
            cols = View(b.gep(scratch, [b.mul(j, const_i64(p * item))], source_etype=ir.IntType(8)), x.dtype, (k, p), (columns, 1))
            _im2col(emitting, xv, b.mul(b.add(img0, j), const_i64(c * math.prod(in_sp))), cols, c, kernel_shape, in_sp, out_sp, strides, dilations, pads)
        weights = View(ptrs[1], w.dtype, (m, k), (k, 1))
        cols = View(scratch, x.dtype, (k, count * p), (columns, 1))
        product = View(product_ptr, y.dtype, (m, count * p), (columns, 1))
        init = View(ptrs[4], bias.dtype, (m, count * p), (1, 0)) if bias is not None else None
        if serial:
            _serial_gemm(emitting, weights, cols, product, 1.0, MR, Start(init, 1.0) if init is not None else None)
        else:
            emit_gemm(emitting, weights, cols, product, 1.0, init)
        with for_range(b, count, name="oimg") as j:  # y[img0 + j, o, q] = product[o, j * p + q]
            with for_range(b, m, name="och") as o:
                src = b.add(b.mul(o, const_i64(columns)), b.mul(j, const_i64(p)))
                dst = b.mul(b.add(b.mul(b.add(img0, j), const_i64(m)), o), const_i64(p))
                with for_range(b, p, name="pos") as q:
                    value = b.load(b.gep(product_ptr, [b.add(src, q)], source_etype=_t(y)), typ=_t(y))
                    b.store(value, b.gep(y.ptr, [b.add(dst, q)], source_etype=_t(y)))

    def chunks(emitting, ptrs, lo, hi, block) -> None:
        with for_range(emitting.b, hi, start=lo, name="chunk") as index:
            chunk(emitting, ptrs, block, emitting.b.mul(index, const_i64(per_chunk)), per_chunk, serial=threads > 1)

    pointers = [ctx.inputs[0].ptr, ctx.inputs[1].ptr, ctx.outputs[0].ptr, ctx.scratch] + ([bias.ptr] if bias is not None else [ctx.scratch])
    full = n // per_chunk
    if full:
        parallel_rows(ctx, full, threads, pointers, chunks)
    if n % per_chunk:
        chunk(ctx, pointers, 0, const_i64(full * per_chunk), n % per_chunk, serial=False)
