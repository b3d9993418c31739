"""Padded NCHW convs with a few output positions under a kernel about the image's size: a
training step's weight gradient.

The weight gradient of a conv is a conv whose images I are the input's channels, whose
channels J are the batch, whose M kernels are the output gradient's planes (as large as the
image, less the taps) and whose outputs are the weight's taps (3x3): each output is one long
dot product of a kernel with the image's window at that tap. The taps are unrolled, so
everything about a window is known when the code is built: the kernel rows that land inside
the image and, along a row, which lanes of each vector do (a constant mask). A tile of kernels
by DOT_TILE images by ROW_TAPS taps along an output row keeps its dot products as vectors of
partial sums (ACCUMULATORS of them), read in place: per vector of a kernel row, one load of
each kernel serves every tap of the group, whose windows read the same image rows shifted
(from L1). Tiles are split over the pool, and each keeps its planes in L2 across its taps. No
column matrix, no transposes (a U-Net's 4x32x64x64 weight gradient to 16 channels: 1.18 ms
through the batched columns of ``kernels_conv_batched``, 0.75 here; torch about 0.6).
``_dot_conv`` does the same for unpadded convs, tiling positions instead of images (LeNet-5's
one-image gradients).

Window rows over the padding, and vectors of a row wholly over it, are skipped as if their
products were 0: an infinite or NaN kernel value there gives NaN in the reference (0 times it)
and nothing here.
"""

from __future__ import annotations

import math

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext
from kiln.backends.llvm.emit import Vectors, const_i64, entry_alloca, for_range
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.ir.dtypes import DType

MAX_TAPS = 25  # output positions per image: a 5x5 weight's taps at most
ROW_TAPS = 3  # taps along an output row computed together (their windows share kernel loads)
ACCUMULATORS = 24  # vector accumulators of a tile where there are 32 vector registers (AVX-512; half on AVX2's 16)


def applies(node) -> bool:
    """A padded, ungrouped 2-D NCHW conv of float32/64 with at most MAX_TAPS output positions,
    at least DOT_TILE images, window rows contiguous (unit width dilation) and at least half a
    vector long, and long sums (``_dot_shaped``'s)."""
    from kiln.backends.llvm.kernels_nn import DOT_TILE, _conv_geometry, vector_width

    x, w, nd, strides, dilations, pads, out = _conv_geometry(node)
    width = vector_width(x.dtype)
    return (
        nd == 2
        and node.attrs["layout"] == "NCHW"
        and node.attrs["group"] == 1
        and any(pads)
        and x.dtype in (DType.float32, DType.float64)
        and dilations[1] == 1
        and math.prod(out) <= MAX_TAPS
        and x.shape[0] >= DOT_TILE
        and w.shape[-1] >= width // 2
        and math.prod(w.shape[1:]) >= 64 * width
    )


def emit(ctx: KernelContext) -> None:
    from kiln.backends.llvm.kernels_nn import DOT_TILE, PARALLEL_MACS, _conv_geometry, vector_width

    node = ctx.node
    x, w, nd, (sh, sw), (dh, _), (pt, pl, _, _), (oh, ow) = _conv_geometry(node)
    images, channels, height, width = x.shape
    m, _, hk, wk = w.shape
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    lanes = vector_width(x.dtype)
    taps = oh * ow

    group = min(ow, ROW_TAPS)  # taps along an output row that share the kernels' loads
    accumulators = ACCUMULATORS if lanes * x.dtype.itemsize == 64 else ACCUMULATORS // 2
    kernels_per_tile = max(1, min(DOT_TILE, accumulators // (DOT_TILE * group)))
    kernel_tiles, image_tiles = -(-m // kernels_per_tile), -(-images // DOT_TILE)
    vector_mask = lambda live: None if all(live) else ir.Constant(ir.VectorType(ir.IntType(1), lanes), live)  # noqa: E731

    def tap_rows(oy: int) -> list[int]:
        """The kernel rows of output row ``oy``'s windows that land inside the image."""
        return [ky for ky in range(hk) if 0 <= oy * sh + ky * dh - pt < height]

    def tile_block(emitting, ptrs, lo, hi, _):
        """Tiles [lo, hi) (kernel-tile major), every tap of each: a tile's kernels and images
        stay in L2 while its taps read them again, and the taps of a group read the same
        image rows, shifted, from L1."""
        b = emitting.b
        V = Vectors(b, emitting.module, x.dtype, lanes)
        scalar, vec = V.scalar, V.vec
        xv, wv, y = ctx.inputs[0].on(ptrs[0]), ctx.inputs[1].on(ptrs[1]), ctx.outputs[0].on(ptrs[2])

        def tile(m0: ir.Value, kernels: int, i0: ir.Value, count: int) -> None:
            for oy in range(oh):
                rows = tap_rows(oy)
                for ox0 in range(0, ow, group):
                    columns = [ox * sw - pl for ox in range(ox0, min(ow, ox0 + group))]  # the image column under kernel column 0
                    accs = [[[entry_alloca(b, vec) for _ in range(count)] for _ in range(kernels)] for _ in columns]
                    for slot in (s for tap in accs for row in tap for s in row):
                        b.store(V.zero, slot)
                    if rows:
                        with for_range(b, channels, name="tj") as j, for_range(b, rows[-1] + 1, start=rows[0], name="tky") as ky:
                            iy = b.add(b.mul(ky, const_i64(dh)), const_i64(oy * sh - pt))
                            images_at = [xv.address(b, [b.add(i0, const_i64(q)), j, iy, const_i64(0)]) for q in range(count)]
                            for start in range(0, wk, lanes):
                                inside = [[start + lane < wk and 0 <= first + start + lane < width for lane in range(lanes)] for first in columns]
                                if not any(map(any, inside)):
                                    continue
                                kernel_mask = vector_mask([start + lane < wk for lane in range(lanes)])
                                av = [V.load(wv.address(b, [b.add(m0, const_i64(r)), j, ky, const_i64(start)]), kernel_mask) for r in range(kernels)]
                                for t, first in enumerate(columns):
                                    if not any(inside[t]):
                                        continue
                                    bv = [V.load(b.gep(at, [const_i64(first + start)], source_etype=scalar), vector_mask(inside[t])) for at in images_at]
                                    for r in range(kernels):
                                        for q in range(count):
                                            b.store(V.fma(av[r], bv[q], b.load(accs[t][r][q], typ=vec)), accs[t][r][q])
                    for t in range(len(columns)):
                        for r in range(kernels):
                            for q in range(count):
                                total = V.sum(b.load(accs[t][r][q], typ=vec))
                                if bias is not None:
                                    total = b.fadd(total, bias.on(ptrs[3]).load(b, [b.add(m0, const_i64(r))]))
                                y.store(b, [b.add(i0, const_i64(q)), b.add(m0, const_i64(r)), const_i64(oy), const_i64(ox0 + t)], total)

        with for_range(b, hi, start=lo, name="tile") as t:
            mt, it = b.udiv(t, const_i64(image_tiles)), b.urem(t, const_i64(image_tiles))
            m0, i0 = b.mul(mt, const_i64(kernels_per_tile)), b.mul(it, const_i64(DOT_TILE))
            last_m = b.icmp_unsigned("==", mt, const_i64(kernel_tiles - 1))
            last_i = b.icmp_unsigned("==", it, const_i64(image_tiles - 1))
            m_rest, i_rest = m - (kernel_tiles - 1) * kernels_per_tile, images - (image_tiles - 1) * DOT_TILE
            for m_case, kernels in ([(None, kernels_per_tile)] if m_rest == kernels_per_tile else [(False, kernels_per_tile), (True, m_rest)]):
                for i_case, count in ([(None, DOT_TILE)] if i_rest == DOT_TILE else [(False, DOT_TILE), (True, i_rest)]):
                    here = ir.Constant(ir.IntType(1), 1)
                    if m_case is not None:
                        here = b.and_(here, last_m if m_case else b.not_(last_m))
                    if i_case is not None:
                        here = b.and_(here, last_i if i_case else b.not_(last_i))
                    with b.if_then(here):
                        tile(m0, kernels, i0, count)

    pointers = [ctx.inputs[0].ptr, ctx.inputs[1].ptr, ctx.outputs[0].ptr] + ([bias.ptr] if bias is not None else [])
    items = kernel_tiles * image_tiles
    work = images * m * math.prod(w.shape[1:]) * taps
    threads = min(num_threads(), items) if work >= PARALLEL_MACS else 1
    parallel_rows(ctx, items, threads, pointers, tile_block)
