"""Heavy kernels: Gemm/MatMul (register-tiled FMA micro-kernel, split over the worker pool),
Conv as im2col into scratch plus the same GEMM, pooling, reductions and softmax."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import llvmlite.ir as ir
import numpy as np

from kiln.backends.llvm import kernels_conv_batched, kernels_conv_taps, kernels_depthwise, kernels_reduce_fused
from kiln.backends.llvm.codegen import KernelContext, PanelSpec, kernel
from kiln.backends.llvm.emit import I32, I64, PTR, LLVMScalarOps, LLVMVectorOps, Panels, Vectors, View, broadcast, const_i64, contiguous_strides, entry_alloca, for_range, llvm_type, loop_nest
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.ops.nn import _spatial_attrs, window_output_shape

FAST = ("contract",)  # allow a*b+c as one FMA


KC = 256  # K block of the GEMM micro-kernel (B panel: KC x two vectors)
MR = 6  # rows of C per micro-tile by default (2 vectors of columns: 12 accumulators)
A_BLOCK = 1 << 18  # bytes of A per row block, kept in L2 while each column block reads it


def micro_rows(m: int) -> int:
    """Rows per micro-tile for the Gemm and MatMul ops' ``m`` rows: up to 12 where AVX-512 has
    32 vector registers (24 accumulators; 1024^3 on one core: 0.59 -> 0.7 of numpy), else MR.
    A short C (an RNN step's 16 rows) gets the height in 6..12 that needs the fewest tiles and
    makes the last one fullest: 2 x 8, not 12 + 4. The direct convolution tiles each output
    row's positions the same way (ResNet's 56: 4 x 12 + 8; its 7: one tile of 7)."""
    if vector_width(DType.float32) != 16:
        return MR
    return min(range(6, 13), key=lambda mr: (-(-m // mr), -(m - (-(-m // mr) - 1) * mr), -mr))


def row_split(m: int) -> tuple[int, int, int]:
    """(threads, rows per micro-tile, block alignment) for ``m`` rows split over the pool (a
    micro-tile of them a thread at least): the tiles fit each thread's share (196 rows: 98 a
    thread as 8 x 11 + 10, where 12-row tiles leave one of 2), and the blocks stay even (16
    rows: 8 and 8, not 12 and 4)."""
    threads = min(num_threads(), max(1, m // micro_rows(m)))
    share = -(-m // threads)
    mr = micro_rows(share)
    return threads, mr, min(mr, share)


def vector_width(dtype) -> int:
    """Elements per SIMD register on the host (AVX-512: 16 floats, AVX2: 8, else 4)."""
    from kiln.backends.llvm.target import host_cpu

    features = host_cpu().feature_set
    lanes = 16 if "avx512f" in features else 8 if "avx2" in features else 4
    return lanes * 4 // dtype.itemsize


def emit_gemm(ctx: KernelContext, a: View, bm: View, c: View, alpha: float = 1.0, init: View | None = None, beta: float = 1.0, mr: int | None = None, serial: bool = False) -> None:
    """``c[M,N] = alpha * a[M,K] @ bm[K,N] (+ beta * init)``; views may be strided.

    Column blocks of two SIMD vectors go through the register-blocked micro-kernel when bm's
    and c's rows are contiguous; the remaining columns (and strided cases) use plain i-k-j loops.
    With alpha 1, ``beta * init`` (a bias row, an RNN step's input projection) is where the
    accumulators start, so C is written once; otherwise it is added in a second pass. ``mr``:
    rows per micro-tile (by default ``micro_rows`` of the rows each thread takes).
    """
    if c.dtype is DType.float16:
        _half_gemm(ctx, a, bm, c, alpha, init, beta)
        return
    m, k = a.shape
    n = bm.shape[1]
    nr = 2 * vector_width(c.dtype)
    start = Start(init, beta) if init is not None and alpha == 1.0 and init.dtype == c.dtype and init.strides[-1] in (0, 1) else None
    split = "serial" if serial else gemm_split(m, k, n, c.dtype, isinstance(bm, Panels), micro_rows(m))
    if split == "serial":
        _serial_gemm(ctx, a, bm, c, alpha, mr or micro_rows(m), start)
    elif split == "rows":
        threads, tile_rows, align = row_split(m)
        _parallel_gemm(ctx, a, bm, c, alpha, threads, mr or tile_rows, start, align if mr is None else mr)
    else:
        _parallel_columns(ctx, a, bm, c, alpha, min(num_threads(), n // nr), nr, mr or micro_rows(m), start)
    if init is not None and start is None:
        from kiln.backends.llvm.kernels_elementwise import emit_pointwise

        def add_init(E, xs):
            extra = xs[1] if beta == 1.0 else E.mul(xs[1], E.const(beta, xs[1]))
            return E.add(xs[0], extra)

        emit_pointwise(ctx.b, ctx.module, c, [c, init], add_init)


@dataclass
class Start:
    """What a GEMM's accumulators start from: ``beta * view`` (rows contiguous or one
    broadcast value per row)."""

    view: View
    beta: float

    def part(self, view: View) -> "Start":
        return Start(view, self.beta)


SHARED_WEIGHTS = 1 << 20  # weights every thread may read whole (half of L2)
STREAMED_WHOLE = 3 << 20  # weights every thread with rows enough may stream whole from L3
PARALLEL_MACS = 1 << 18  # below this a GEMM runs on one thread (handing a block to the pool costs ~1 us)


def gemm_split(m: int, k: int, n: int, dtype: DType, packed: bool, mr: int) -> str:
    """How a GEMM goes over the pool: "serial" (too small to hand out), "rows" (blocks of whole
    micro-tiles of rows) or "columns" (blocks of whole two-vector column blocks).

    The rows, where each thread gets four micro-tiles of them and B is at most a few MB: each
    thread then reads only its own rows of A, which the kernel before it left in its own cache
    when that split its rows too, and streams all of B from L3, prefetched. A column split
    reads half of every row of A from the other core (chains of 8 MatMuls on 2 threads, ms:
    196x1024x512 5.03 -> 4.76, 197x768x768 5.58 -> 5.13). Past that (ViT's 768x3072 MLP: 9.4
    MB), few rows by many columns split the columns, so each thread streams half of B, unless
    B is constant weights (``packed``) each core keeps whole in L2 (an RNN step's recurrent
    matrix, read again every step) and every thread gets a micro-tile of rows: then the rows,
    so each thread's rows stay in its own cache from the product to the step's gates and into
    the next step's product (LSTM 2x256 batch 16 a run, ms: 3.22 -> 2.99; its GRU 2.50 -> 2.33)."""
    threads, nr = num_threads(), 2 * vector_width(dtype)
    if m * n * k < PARALLEL_MACS or threads == 1:
        return "serial"
    if m >= 4 * mr * threads and (m >= n or k * n * dtype.itemsize <= STREAMED_WHOLE) or n < 2 * nr * threads:
        return "rows"
    kept = packed and k * n * dtype.itemsize <= SHARED_WEIGHTS and m >= mr * threads
    return "rows" if kept else "columns"


def _serial_gemm(ctx, a: View, bm: View, c: View, alpha: float, mr: int = MR, start: Start | None = None) -> None:
    width = vector_width(c.dtype)
    if bm.strides[1] == 1 and c.strides[1] == 1 and c.dtype.is_float:
        _micro_tiles(ctx, a, bm, c, width, alpha, mr, start)
    else:
        _gemm_loops(ctx, a, bm, c, alpha, start)


def _parallel_gemm(ctx, a: View, bm: View, c: View, alpha: float, threads: int, mr: int, start: Start | None = None, align: int | None = None) -> None:
    """Rows of C split over ``threads`` (blocks starting at multiples of ``align``, by default
    whole micro-tiles)."""

    def block(emitting, ptrs, lo, hi, _):
        part = start.part(start.view.rows(lo, hi, ptrs[3])) if start is not None else None
        _serial_gemm(emitting, a.rows(lo, hi, ptrs[0]), bm.on(ptrs[1]), c.rows(lo, hi, ptrs[2]), alpha, mr, part)

    parallel_rows(ctx, a.shape[0], threads, [a.ptr, bm.ptr, c.ptr, start.view.ptr if start else c.ptr], block, align=align or mr)


def _parallel_columns(ctx, a: View, bm: View, c: View, alpha: float, threads: int, nr: int, mr: int, start: Start | None = None) -> None:
    """Columns of C split over ``threads`` (blocks of whole micro-tile widths): each thread
    reads all of A, which is small, and only its part of B."""

    def block(emitting, ptrs, lo, hi, _):
        part = start.part(start.view.columns(lo, hi, ptrs[3])) if start is not None else None
        _serial_gemm(emitting, a.on(ptrs[0]), bm.columns(lo, hi, ptrs[1]), c.columns(lo, hi, ptrs[2]), alpha, mr, part)

    parallel_rows(ctx, bm.shape[1], threads, [a.ptr, bm.ptr, c.ptr, start.view.ptr if start else c.ptr], block, align=nr)


def _gemm_loops(ctx: KernelContext, a: View, bm: View, c: View, alpha: float, start: Start | None = None) -> None:
    """The plain i-k-j loops (the inner one vectorizes when c's and bm's rows are contiguous)."""
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    m, k = a.shape
    n = bm.shape[1]
    zero = E.typed(ir.Constant(_t(c), 0.0), c.dtype)
    with for_range(b, m, name="m") as i:
        with for_range(b, n, name="n0") as j:
            if start is None:
                c.store(b, [i, j], zero)
            else:
                value = E.typed(start.view.load(b, [i, j]), c.dtype)
                c.store(b, [i, j], value if start.beta == 1.0 else E.mul(value, E.const(start.beta, value)))
        with for_range(b, k, name="k") as kk:
            av = E.typed(a.load(b, [i, kk]), a.dtype)
            if alpha != 1.0:
                av = E.mul(av, E.const(alpha, av))
            with for_range(b, n, name="n") as j:
                prod = b.fmul(av, bm.load(b, [kk, j]), flags=FAST)
                c.store(b, [i, j], b.fadd(c.load(b, [i, j]), prod, flags=FAST))


def _half_gemm(ctx: KernelContext, a: View, bm: View, c: View, alpha: float, init: View | None, beta: float) -> None:
    """float16: each dot product summed in float32 and rounded once, then ``alpha *`` and
    ``+ beta * init`` in float16, as numpy's float16 matmul and the reference's Gemm round
    (a float16 accumulator loses a digit per few hundred terms)."""
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    m, k = a.shape
    n = bm.shape[1]
    total = entry_alloca(b, ir.FloatType())
    with for_range(b, m, name="m") as i, for_range(b, n, name="n") as j:
        b.store(ir.Constant(ir.FloatType(), 0.0), total)
        with for_range(b, k, name="k") as kk:
            ak = E.cast(E.typed(a.load(b, [i, kk]), a.dtype), DType.float32)
            bk = E.cast(E.typed(bm.load(b, [kk, j]), bm.dtype), DType.float32)
            b.store(b.fadd(b.load(total, typ=ir.FloatType()), b.fmul(ak, bk)), total)
        value = E.cast(E.typed(b.load(total, typ=ir.FloatType()), DType.float32), DType.float16)
        if alpha != 1.0:
            value = E.mul(value, E.const(alpha, value))
        if init is not None:
            extra = E.typed(init.load(b, [i, j]), init.dtype)
            value = E.add(value, extra if beta == 1.0 else E.mul(extra, E.const(beta, extra)))
        c.store(b, [i, j], value)


def _micro_tiles(ctx: KernelContext, a: View, bm: View, c: View, width: int, alpha: float, mr: int, start: Start | None = None) -> None:
    """C in mr x (2 x width) tiles: per k, two vector loads of bm's row, one broadcast of a per
    row, and 2 x mr fused multiply-adds into accumulators that stay in registers. The last
    columns (fewer than two vectors: a classifier's 10 outputs, LeNet's 6 channels) use the same
    tile with masked loads and stores."""
    b = ctx.b
    m, k = a.shape
    n = bm.shape[1]
    V = Vectors(b, ctx.module, c.dtype, width)
    vec, zero = V.vec, V.zero
    # packed weights come from L3 (a model's weights do not stay in a core's 2 MB L2 between
    # runs): the first row tile of a column block prefetches, each K step, its row of the next
    # column block's panel. Chains of 8 MatMuls, 2 threads, ms: 196x1024x512 5.48 -> 5.12,
    # 197x768x768 6.80 -> 5.85 (a prefetch only for panels of 2 MB or more, before)
    streamed = isinstance(bm, Panels) and n > 2 * width
    prefetcher = ctx.module.declare_intrinsic("llvm.prefetch.p0", (), ir.FunctionType(ir.VoidType(), [PTR, I32, I32, I32])) if streamed else None

    def initial(i: ir.Value, j: ir.Value, mask) -> ir.Value:
        view = start.view
        if view.strides[-1] == 1:
            value = V.load(view.address(b, [i, j]), mask)
        else:  # one value per row, broadcast along it
            value = V.splat(b.load(view.address(b, [i, j]), typ=V.scalar))
        return value if start.beta == 1.0 else b.fmul(value, ir.Constant(vec, [float(start.beta)] * width))

    def tile(i0: ir.Value, rows: int, j0: ir.Value, masks: list, k0: ir.Value, k1: ir.Value, first: ir.Value | None, prefetch: bool = False) -> None:
        """Rows i0.. (``rows`` of them) by one vector per entry of ``masks`` (None: all lanes),
        over the K block [k0, k1): the first block (``first`` None: the only one) starts from
        zero, later ones from the partial sums in C."""
        accs = [[entry_alloca(b, vec) for _ in masks] for _ in range(rows)]

        def start_from_zero():  # or from beta * the start view
            for r, row in enumerate(accs):
                for h, slot in enumerate(row):
                    b.store(zero if start is None else initial(b.add(i0, const_i64(r)), b.add(j0, const_i64(h * width)), masks[h]), slot)

        if first is None:
            start_from_zero()
        else:
            with b.if_else(first) as (then, otherwise):
                with then:
                    start_from_zero()
                with otherwise:
                    for r, row in enumerate(accs):
                        for h, slot in enumerate(row):
                            b.store(V.load(c.address(b, [b.add(i0, const_i64(r)), b.add(j0, const_i64(h * width))]), masks[h]), slot)
        with for_range(b, k1, start=k0, name="mk") as kk:
            if prefetch:  # the same row of the next column block's panel, into L2 while this one runs
                for h in range(2):
                    b.call(prefetcher, [bm.address(b, [kk, b.add(j0, const_i64(2 * width + h * width))]), ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])
            bvs = [V.load(bm.address(b, [kk, b.add(j0, const_i64(h * width))]), mask) for h, mask in enumerate(masks)]
            for r in range(rows):
                splat = V.splat(b.load(a.address(b, [b.add(i0, const_i64(r)), kk]), typ=V.scalar))
                for h in range(len(masks)):
                    b.store(V.fma(splat, bvs[h], b.load(accs[r][h], typ=vec)), accs[r][h])
        scale = ir.Constant(vec, [float(alpha)] * width)
        for r in range(rows):
            for h, mask in enumerate(masks):
                value = b.load(accs[r][h], typ=vec)
                if alpha != 1.0:
                    value = b.fmul(value, scale)
                V.store(value, c.address(b, [b.add(i0, const_i64(r)), b.add(j0, const_i64(h * width))]), mask)

    full_tiles, tail = m // mr, m % mr
    # rows in blocks whose A part stays in L2 while every column block reads it: a tall A
    # (ResNet's 3136 positions x 256) came from L3 once per column block. 3136x256x256, one
    # thread: 150 -> 175 GF/s (onnxruntime 176); a chain of 4 on 2 threads 5.15 -> 4.72 ms.
    # One copy of the code serves every block (the count of whole tiles is a run-time value,
    # the last rows go with the last block), so a GEMM compiles no larger than without them
    per_block = max(1, A_BLOCK // (min(k, KC) * c.dtype.itemsize) // mr)  # whole tiles a block
    blocks = max(1, -(-full_tiles // per_block))

    def column_block(i0: ir.Value, tiles: ir.Value, last: ir.Value, j0: ir.Value, masks: list, *k_block) -> None:
        """``tiles`` whole tiles of rows from i0 in one column block, then, in the ``last``
        block, the rows after every whole tile."""
        if full_tiles:
            if streamed:  # the first tile prefetches the next panel
                with b.if_then(b.icmp_signed(">", tiles, const_i64(0))):
                    tile(i0, mr, j0, masks, *k_block, prefetch=True)
            with for_range(b, tiles, start=1 if streamed else 0, name="mb") as ib:
                tile(b.add(i0, b.mul(ib, const_i64(mr))), mr, j0, masks, *k_block)
        if tail:
            with b.if_then(last):
                tile(const_i64(full_tiles * mr), tail, j0, masks, *k_block, prefetch=streamed and not full_tiles)

    nr = 2 * width
    rest = n % nr

    def panel(k0: ir.Value, k1: ir.Value, first: ir.Value | None) -> None:
        """Every row block's column blocks over the K block [k0, k1)."""
        with for_range(b, blocks, name="rb") as rb:
            i0 = b.mul(rb, const_i64(per_block * mr))
            left = b.sub(const_i64(full_tiles), b.mul(rb, const_i64(per_block)))
            tiles = b.select(b.icmp_signed("<", left, const_i64(per_block)), left, const_i64(per_block))
            last = b.icmp_signed("==", rb, const_i64(blocks - 1))
            if n // nr:
                with for_range(b, n // nr, name="nb") as jb:
                    column_block(i0, tiles, last, b.mul(jb, const_i64(nr)), [None, None], k0, k1, first)
            if rest:
                column_block(i0, tiles, last, const_i64(n - rest), V.masks(rest), k0, k1, first)

    # K in blocks of KC when it is long (a ResNet's 3x3x512 = 4608): the block's B panel stays
    # in L1 across the row tiles and its A block in L2 across the column blocks
    if k > KC and alpha == 1.0:
        with for_range(b, (k + KC - 1) // KC, name="kb") as kb:
            k0 = b.mul(kb, const_i64(KC))
            k1 = b.select(b.icmp_signed("<", b.add(k0, const_i64(KC)), const_i64(k)), b.add(k0, const_i64(KC)), const_i64(k))
            panel(k0, k1, b.icmp_signed("==", kb, const_i64(0)))
    else:
        panel(const_i64(0), const_i64(k), None)


def sum_dtype(dtype: DType) -> DType:
    """What a long float sum accumulates in: float32 for float16 (numpy sums float16 pairwise
    in float and rounds once; a float16 accumulator loses a digit per few hundred terms)."""
    return DType.float32 if dtype is DType.float16 else dtype


def _t(view: View) -> ir.Type:
    return llvm_type(view.dtype)


def _require_float(ctx: KernelContext) -> None:
    if not ctx.outputs[0].dtype.is_float:
        raise KilnError(f"node {ctx.node.name!r}: {ctx.node.op.name} on {ctx.outputs[0].dtype.short} has no LLVM kernel yet")


def _panel(k: int, n: int, dtype: DType, transpose: bool = False, nr: int | None = None) -> PanelSpec | None:
    """Packing for a float GEMM's constant B (nr: by default the micro-kernel's two vectors)."""
    if dtype not in (DType.float32, DType.float64):
        return None
    return PanelSpec(k, n, nr or 2 * vector_width(dtype), transpose)


def _gemm_panels(node, i: int) -> PanelSpec | None:
    if i != 1:
        return None
    bm = node.inputs[1].type
    trans = bool(node.attrs["transB"])
    k, n = (bm.shape[1], bm.shape[0]) if trans else bm.shape
    return _panel(k, n, node.outputs[0].type.dtype, trans)


def _matmul_panels(node, i: int) -> PanelSpec | None:
    bm = node.inputs[1].type
    return _panel(*bm.shape, bm.dtype) if i == 1 and bm.rank == 2 else None


@kernel("Gemm", panels=_gemm_panels)
def gemm(ctx: KernelContext) -> None:
    _require_float(ctx)
    attrs = ctx.node.attrs
    a, bm = ctx.inputs[0], ctx.inputs[1]
    c = ctx.outputs[0]
    m, n = c.shape
    ka = a.shape[0] if attrs["transA"] else a.shape[1]
    a_view = View(a.ptr, a.dtype, (m, ka), (1, m) if attrs["transA"] else (ka, 1))
    b_view = bm if isinstance(bm, Panels) else View(bm.ptr, bm.dtype, (ka, n), (1, ka) if attrs["transB"] else (n, 1))
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    init = bias.broadcast_to((m, n)) if bias is not None else None
    emit_gemm(ctx, a_view, b_view, c, attrs["alpha"], init, attrs["beta"])


@kernel("MatMul", panels=_matmul_panels)
def matmul(ctx: KernelContext) -> None:
    _require_float(ctx)
    a, bm = ctx.inputs
    c = ctx.outputs[0]
    a2 = a if len(a.shape) > 1 else View(a.ptr, a.dtype, (1, a.shape[0]), (0, 1))
    b2 = bm if len(bm.shape) > 1 else View(bm.ptr, bm.dtype, (bm.shape[0], 1), (1, 0))
    m, k, n = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    batch = tuple(c.shape[: max(len(a2.shape), len(b2.shape)) - 2])
    row_stride = _row_stride(a2) if batch and len(b2.shape) == 2 else None
    if row_stride is not None:  # one B for every batch: one GEMM of all their rows
        rows = m * math.prod(batch)
        a_rows = View(a2.ptr, a2.dtype, (rows, k), (row_stride, a2.strides[-1]), a2.offset)
        emit_gemm(ctx, a_rows, bm if isinstance(bm, Panels) else b2, View.dense(c.ptr, c.dtype, (rows, n)))
        return
    ab = a2.broadcast_to(batch + (m, k))
    bb = b2.broadcast_to(batch + (k, n))
    cv = View(c.ptr, c.dtype, batch + (m, n), tuple(contiguous_strides(batch + (m, n))))
    b = ctx.b
    with loop_nest(b, batch, name="batch") as index:

        def matrix(v: View, rows: int, cols: int) -> View:
            start = v.address(b, [*index, const_i64(0), const_i64(0)])
            return View(start, v.dtype, (rows, cols), v.strides[-2:])

        b_matrix = bm if isinstance(bm, Panels) else matrix(bb, k, n)  # packed: one 2-D B for every batch
        emit_gemm(ctx, matrix(ab, m, k), b_matrix, matrix(cv, m, n))


def _row_stride(a: View) -> int | None:
    """The one stride of A's rows when its leading dims and rows step through memory as one
    run, so that (..., m, k) reads as (prod(...) * m, k); else None. ViT's attention projects
    (197, 1, 768) tokens (torch.onnx's sequence-first MultiheadAttention) by one (768, 2304)
    weight: as 197 one-row products it took 24 ms a layer, ten times its MLP's larger one."""
    dims = [(size, stride) for size, stride in zip(a.shape[:-1], a.strides[:-1]) if size != 1]
    for (_, outer), (size, inner) in zip(dims, dims[1:]):
        if outer != inner * size:
            return None
    return dims[-1][1] if dims else a.shape[-1]


# -- convolution: im2col columns in scratch, then GEMM ----------------------------------------------
def _conv_geometry(node):
    x, w = node.inputs[0].type, node.inputs[1].type
    nd = x.rank - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    out = window_output_shape(x.shape[2:], w.shape[2:], strides, dilations, pads)
    return x, w, nd, strides, dilations, pads, out


def _direct(node) -> bool:
    x, w, nd, strides, dilations, pads, out = _conv_geometry(node)
    return all(k == 1 for k in w.shape[2:]) and all(s == 1 for s in strides) and not any(pads)


def _group_items(node) -> bool:
    """Whether an NCHW grouped conv's threads take (image, group) items, each group's GEMM on
    one thread, rather than images whose every group's GEMM splits over the pool: ResNeXt's
    groups of 8 channels make GEMMs of 8 rows, each split costing a hand-out and a wait (32
    a conv)."""
    x, w, *_ = _conv_geometry(node)
    groups = node.attrs["group"]
    return groups > 1 and x.shape[0] * groups >= 2 * num_threads() and not kernels_depthwise.applies(node)


def _image_threads(node) -> int:
    """Threads an NCHW convolution splits its images over: several when one image's GEMM is too
    small to split itself (LeNet-5's 6x25x784) but the batch is large enough, and when the
    images share out evenly (within a quarter), so each thread makes its own im2col columns
    too instead of waiting while one thread makes them (a training batch of 8 at 64x16x16:
    0.98 -> 0.50 ms)."""
    x, w, nd, *_, out = _conv_geometry(node)
    n = x.shape[0]
    per_image = w.shape[0] * w.shape[1] * math.prod(w.shape[2:]) * math.prod(out)
    if _group_items(node):
        return num_threads() if n * per_image >= PARALLEL_MACS else 1
    threads = max(1, min(num_threads(), n))
    if n * per_image < PARALLEL_MACS:
        return 1
    if per_image >= PARALLEL_MACS and -(-n // threads) * threads > 1.25 * n:
        return 1
    return threads


def _conv_scratch(node) -> int:
    if node.attrs["layout"] == "NHWC":
        return _nhwc_conv_scratch(node)
    if kernels_depthwise.applies(node) or _dot_shaped(node) or _row_shaped(node):  # reads in place
        return 0
    if kernels_conv_taps.applies(node):  # reads in place
        return 0
    if kernels_conv_batched.applies(node):
        return kernels_conv_batched.scratch_bytes(node)
    if _direct(node):
        return 0
    if _banded(node):
        return _band_bytes(node) * _band_threads(node)
    return _columns_bytes(node) * _image_threads(node)


def _conv_panels(node, i: int) -> PanelSpec | None:
    """An NHWC conv multiplies by its weights (*kernel, C/g, M) as a (kernel * C/g, M) matrix.
    A grouped one's panels lie within a group: two vectors wide where its channels are a
    multiple of that, else one; channels fewer than a vector stay unpacked."""
    w = node.inputs[1].type
    # (a one-channel conv is depthwise too, and the depthwise kernel reads its weight as it is)
    if i != 1 or node.attrs["layout"] != "NHWC" or kernels_depthwise.applies_nhwc(node):
        return None
    groups, width = node.attrs["group"], vector_width(w.dtype)
    nr = next((nr for nr in (2 * width, width) if w.shape[-1] // groups % nr == 0), None) if groups > 1 else 2 * width
    if nr is None:
        return None
    return _panel(math.prod(w.shape[:-1]), w.shape[-1], w.dtype, nr=nr)


@kernel("Conv", scratch=_conv_scratch, panels=_conv_panels)
def conv(ctx: KernelContext) -> None:
    _require_float(ctx)
    node = ctx.node
    if node.attrs["layout"] == "NHWC":
        _nhwc_conv(ctx)
        return
    x, w, nd, strides, dilations, pads, out_sp = _conv_geometry(node)
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    n, c = x.shape[:2]
    m, cg = w.shape[0], w.shape[1]
    groups = node.attrs["group"]
    mg = m // groups
    kernel_shape = w.shape[2:]
    kk = cg * math.prod(kernel_shape)
    p = math.prod(out_sp)
    spatial_in = math.prod(x.shape[2:])
    direct = _direct(node)
    cols_bytes = kk * p * x.dtype.itemsize

    if _dot_shaped(node):  # a weight gradient: few outputs, each a long sum
        _dot_conv(ctx, node)
        return
    if _row_shaped(node):  # a small conv: rows computed in place, no im2col
        _row_conv(ctx, node)
        return
    if kernels_depthwise.applies(node):  # one plane per channel: its rows in vectors
        kernels_depthwise.emit(ctx)
        return
    if kernels_conv_taps.applies(node):  # a padded weight gradient: dot products per tap, in place
        kernels_conv_taps.emit(ctx)
        return
    if kernels_conv_batched.applies(node):  # few positions per image: images share a GEMM
        kernels_conv_batched.emit(ctx)
        return
    if _banded(node):  # an image's columns outgrow L2: bands of output rows over the pool
        _banded_conv(ctx, node)
        return

    by_group = _group_items(node)

    def images(emitting, ptrs, lo, hi, block):
        """Images [lo, hi) (or (image, group) items, ``by_group``): im2col into this block's
        scratch, then one GEMM per group."""
        b = emitting.b
        xv, wv, y = (View(ptr, v.dtype, v.shape, v.strides) for ptr, v in zip(ptrs, ctx.inputs[:2] + ctx.outputs[:1]))
        scratch = b.gep(ptrs[3], [const_i64(block * cols_bytes)], source_etype=ir.IntType(8))
        cols = View(scratch, x.dtype, (kk, p), (p, 1))
        with for_range(b, hi, start=lo, name="item") as item:
            img = b.udiv(item, const_i64(groups)) if by_group else item
            with for_range(b, 1 if by_group else groups, name="grp") as g:
                g = b.urem(item, const_i64(groups)) if by_group else g  # the item's one group
                channel0 = b.mul(g, const_i64(cg))
                x_base = b.add(b.mul(img, const_i64(c * spatial_in)), b.mul(channel0, const_i64(spatial_in)))
                if direct:
                    src = View(b.gep(xv.ptr, [x_base], source_etype=_t(xv)), xv.dtype, (kk, p), (p, 1))
                else:
                    _im2col(emitting, xv, x_base, cols, cg, kernel_shape, x.shape[2:], out_sp, strides, dilations, pads)
                    src = cols
                w_base = b.mul(g, const_i64(mg * kk))
                wg = View(b.gep(wv.ptr, [w_base], source_etype=_t(wv)), wv.dtype, (mg, kk), (kk, 1))
                y_base = b.add(b.mul(img, const_i64(m * p)), b.mul(g, const_i64(mg * p)))
                yg = View(b.gep(y.ptr, [y_base], source_etype=_t(y)), y.dtype, (mg, p), (p, 1))
                init = None
                if bias is not None:
                    bias_ptr = b.gep(ptrs[4], [b.mul(g, const_i64(mg))], source_etype=_t(bias))
                    init = View(bias_ptr, bias.dtype, (mg, p), (1, 0))
                emit_gemm(emitting, wg, src, yg, 1.0, init, serial=by_group)

    pointers = [ctx.inputs[0].ptr, ctx.inputs[1].ptr, ctx.outputs[0].ptr, ctx.scratch] + ([bias.ptr] if bias is not None else [])
    parallel_rows(ctx, n * groups if by_group else n, _image_threads(node), pointers, images)


# -- banded convolution: im2col columns a band of output rows at a time ----------------------------
COLUMN_BAND_BYTES = 1 << 16  # the columns of one band (a U-Net's 32x3x3 taps: one 64-wide output row)
BAND_COLUMNS = 64  # ... or more, if one output row is shorter: a GEMM narrower than this wastes its tiles


def _banded(node) -> bool:
    """A 2-D NCHW conv copying by rows (unit width stride, not 1x1 in place) whose im2col
    columns for one image outgrow COLUMN_BAND_BYTES several times over: made whole, they go
    to memory and back (a U-Net's 4x32x64x64 conv to 16 channels wrote and read 4.7 MB per
    image)."""
    x, w, nd, strides, *_, out = _conv_geometry(node)
    return nd == 2 and strides[1] == 1 and not _direct(node) and _band_bytes(node) * 4 <= _columns_bytes(node)


def _columns_bytes(node, rows: int | None = None) -> int:
    """One image's (one group's) im2col columns: of every output position, or of ``rows``
    output rows (a 2-D conv's)."""
    x, w, *_, out = _conv_geometry(node)
    positions = math.prod(out) if rows is None else rows * out[-1]
    return w.shape[1] * math.prod(w.shape[2:]) * positions * x.dtype.itemsize


def _band_rows(node) -> int:
    """Output rows per band: as many as COLUMN_BAND_BYTES holds, at least BAND_COLUMNS
    columns' worth (and one row)."""
    out = node.outputs[0].type.shape[2:]
    return min(out[0], max(1, COLUMN_BAND_BYTES // _columns_bytes(node, 1), -(-BAND_COLUMNS // out[1])))


def _band_bytes(node) -> int:
    return _columns_bytes(node, _band_rows(node))


def _band_threads(node) -> int:
    x, w, *_, out = _conv_geometry(node)
    items = x.shape[0] * -(-out[0] // _band_rows(node))
    return max(1, min(num_threads(), items)) if math.prod(w.shape) * math.prod(out) * x.shape[0] >= PARALLEL_MACS else 1


def _banded_conv(ctx: KernelContext, node) -> None:
    """(image, band of output rows) items split over the pool. For each, every group's im2col
    columns of those rows go to the thread's scratch and one single-thread GEMM multiplies them
    while they are in cache, writing the band's part of each output channel's plane (a
    U-Net's 4x32x64x64 conv to 16 channels: 1.28 -> 0.65 ms; torch 0.57)."""
    x, w, nd, strides, dilations, pads, (oh, ow) = _conv_geometry(node)
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    m, cg = w.shape[:2]
    groups = node.attrs["group"]
    mg, kk, p = m // groups, cg * math.prod(w.shape[2:]), oh * ow
    band = _band_rows(node)
    bands = -(-oh // band)

    def items(emitting, ptrs, lo, hi, block):
        b = emitting.b
        xv, wv, y = (View(ptr, v.dtype, v.shape, v.strides) for ptr, v in zip(ptrs, ctx.inputs[:2] + ctx.outputs[:1]))
        scratch = b.gep(ptrs[3], [const_i64(block * _band_bytes(node))], source_etype=ir.IntType(8))

        def rows(img: ir.Value, g: ir.Value, oh0: ir.Value, count: int) -> None:
            columns = count * ow
            cols = View(scratch, x.dtype, (kk, columns), (columns, 1))
            x_base = b.mul(b.add(b.mul(img, const_i64(groups)), g), const_i64(cg * math.prod(x.shape[2:])))
            _im2col_rows(b, xv, x_base, cols, cg, w.shape[2:], x.shape[2:], (oh, ow), strides, dilations, pads, (oh0, count))
            wg = View(b.gep(wv.ptr, [b.mul(g, const_i64(mg * kk))], source_etype=_t(wv)), wv.dtype, (mg, kk), (kk, 1))
            y_at = b.add(b.mul(b.add(b.mul(img, const_i64(groups)), g), const_i64(mg * p)), b.mul(oh0, const_i64(ow)))
            yg = View(b.gep(y.ptr, [y_at], source_etype=_t(y)), y.dtype, (mg, columns), (p, 1))
            start = None
            if bias is not None:
                at = b.gep(ptrs[4], [b.mul(g, const_i64(mg))], source_etype=_t(bias))
                start = Start(View(at, bias.dtype, (mg, columns), (1, 0)), 1.0)
            _serial_gemm(emitting, wg, cols, yg, 1.0, MR, start)

        with for_range(b, hi, start=lo, name="item") as item:
            img, k = b.udiv(item, const_i64(bands)), b.urem(item, const_i64(bands))
            oh0 = b.mul(k, const_i64(band))
            with for_range(b, groups, name="grp") as g:
                if oh % band == 0:
                    rows(img, g, oh0, band)
                else:  # the last band is short
                    with b.if_else(b.icmp_unsigned("<", k, const_i64(bands - 1))) as (whole, last):
                        with whole:
                            rows(img, g, oh0, band)
                        with last:
                            rows(img, g, oh0, oh % band)

    pointers = [ctx.inputs[0].ptr, ctx.inputs[1].ptr, ctx.outputs[0].ptr, ctx.scratch] + ([bias.ptr] if bias is not None else [])
    parallel_rows(ctx, x.shape[0] * bands, _band_threads(node), pointers, items)


# -- row convolution: small NCHW convs, output rows in vectors -------------------------------------
ROW_ACCUMULATORS = 24  # vector accumulators of a row tile (AVX-512 has 32 registers)


def _row_shaped(node) -> bool:
    """A small NCHW conv (LeNet-5's 1->6 and 6->16 channels, 5x5): few output channels and a
    short reduction, so im2col's copy of every window costs more than the products. Each output
    row is computed in place instead, vectors along it: unpadded, ungrouped, unit stride along
    the last axis, rows at least half a vector long, float32/64."""
    x, w, nd, strides, dilations, pads, out_sp = _conv_geometry(node)
    width = vector_width(x.dtype)
    return (
        node.attrs["group"] == 1
        and not any(pads)
        and strides[-1] == 1
        and x.dtype in (DType.float32, DType.float64)
        and out_sp[-1] >= width // 2
        and w.shape[0] <= 32
        and w.shape[1] * math.prod(w.shape[2:]) <= 256
        and w.shape[-1] <= 11
    )


def _row_conv(ctx: KernelContext, node) -> None:
    """y[img, o, *lead, :] for a block of output channels at once: per tap (channel, kernel
    offset) one or two vector loads of the input row under it, read in place (the row's last
    vector masked), and a fused multiply-add into each channel's accumulators with the tap's
    weight broadcast. The bias starts the accumulators; (image, leading output position) rows
    split over the pool."""
    x, w, nd, strides, dilations, pads, out_sp = _conv_geometry(node)
    n, c = x.shape[:2]
    m, kernel = w.shape[0], w.shape[2:]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    width = vector_width(x.dtype)
    span = min(2, -(-out_sp[-1] // width)) * width  # output columns per tile
    block = max(1, min(m, ROW_ACCUMULATORS // (span // width)))  # output channels per tile
    rows = n * math.prod(out_sp[:-1])
    views = [ctx.inputs[0], ctx.inputs[1], ctx.outputs[0], *([bias] if bias is not None else [])]

    def part(emitting, ptrs, lo, hi, _):
        b = emitting.b
        V = Vectors(b, emitting.module, x.dtype, width)
        xv, wv, yv, *bv = [v.on(p) for v, p in zip(views, ptrs)]

        def tile(img, lead, m0: int, count: int, col0: ir.Value, masks: list) -> None:
            accs = [[entry_alloca(b, V.vec) for _ in masks] for _ in range(count)]
            for j, row in enumerate(accs):
                start = V.splat(bv[0].load(b, [const_i64(m0 + j)])) if bv else V.zero
                for slot in row:
                    b.store(start, slot)
            with for_range(b, c, name="c") as ch, loop_nest(b, kernel[:-1], name="k") as ks:
                coords = [b.add(b.mul(lead[a], const_i64(strides[a])), b.mul(ks[a], const_i64(dilations[a]))) for a in range(nd - 1)]
                for kw in range(kernel[-1]):
                    column = b.add(col0, const_i64(kw * dilations[-1]))
                    xs = [V.load(xv.address(b, [img, ch, *coords, b.add(column, const_i64(h * width))]), mask) for h, mask in enumerate(masks)]
                    for j in range(count):
                        weight = V.splat(wv.load(b, [const_i64(m0 + j), ch, *ks, const_i64(kw)]))
                        for h, xs_h in enumerate(xs):
                            b.store(V.fma(weight, xs_h, b.load(accs[j][h], typ=V.vec)), accs[j][h])
            for j in range(count):
                for h, mask in enumerate(masks):
                    V.store(b.load(accs[j][h], typ=V.vec), yv.address(b, [img, const_i64(m0 + j), *lead, b.add(col0, const_i64(h * width))]), mask)

        with for_range(b, hi, start=lo, name="row") as row:
            img, *lead = _unflatten(b, row, [n, *out_sp[:-1]])
            for m0 in range(0, m, block):
                count = min(block, m - m0)
                if out_sp[-1] // span:
                    with for_range(b, out_sp[-1] // span, name="col") as chunk:
                        tile(img, lead, m0, count, b.mul(chunk, const_i64(span)), [None] * (span // width))
                if out_sp[-1] % span:
                    tile(img, lead, m0, count, const_i64(out_sp[-1] - out_sp[-1] % span), V.masks(out_sp[-1] % span))

    macs = rows * out_sp[-1] * m * c * math.prod(kernel)
    threads = min(num_threads(), rows) if macs >= PARALLEL_MACS else 1
    parallel_rows(ctx, rows, threads, [v.ptr for v in views], part)


# -- dot-product convolution: few outputs, long sums (a weight gradient) ------------------------------
DOT_TILE = 4  # rows of W and of cols^T a dot tile multiplies (16 vector accumulators)


def _dot_shaped(node) -> bool:
    """An NCHW conv whose per-image GEMM has fewer output positions than a micro-tile is wide
    and a long reduction (LeNet-5's weight gradients: 6 x 25 outputs over 64*28*28 products):
    the micro-kernel would run its tiles nearly empty, so each output is a vector dot product
    of a filter with its window instead, read in place. Unpadded, ungrouped, unit dilation
    along the last axis, window rows at least half a vector long, float32/64."""
    x, w, nd, strides, dilations, pads, out_sp = _conv_geometry(node)
    kk = w.shape[1] * math.prod(w.shape[2:])
    return (
        node.attrs["group"] == 1
        and not any(pads)
        and dilations[-1] == 1
        and x.dtype in (DType.float32, DType.float64)
        and w.shape[-1] >= vector_width(x.dtype) // 2  # a window row fills half a vector at least
        and math.prod(out_sp) < 2 * vector_width(x.dtype)
        and kk >= 64 * vector_width(x.dtype)
    )


def _dot_conv(ctx: KernelContext, node) -> None:
    """y[img, o, j] = w[o, :] . window(img, j): tiles of DOT_TILE filters by DOT_TILE output
    positions, each dot product kept as a vector of partial sums. A window's rows along the
    last kernel axis are contiguous runs of the input (the filter's too), read in vectors (the
    run's tail masked); threads take a share of the output positions."""
    x, w, nd, strides, dilations, pads, out_sp = _conv_geometry(node)
    n, c = x.shape[:2]
    m = w.shape[0]
    kernel_shape = w.shape[2:]
    p = math.prod(out_sp)
    in_sp = x.shape[2:]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    threads = min(num_threads(), p)
    width = vector_width(x.dtype)
    run = kernel_shape[-1]
    segments = [(start, min(width, run - start)) for start in range(0, run, width)]

    def positions(emitting, ptrs, lo, hi, _):
        b = emitting.b
        V = Vectors(b, emitting.module, x.dtype, width)
        scalar, vec = V.scalar, V.vec
        xv, wv, y = ctx.inputs[0].on(ptrs[0]), ctx.inputs[1].on(ptrs[1]), ctx.outputs[0].on(ptrs[2])

        def load(address, count):
            return V.load(address, V.mask(count))

        def window_start(img, j):
            """Where position j's window starts in image img (its first tap's element)."""
            flat = b.mul(img, const_i64(c * math.prod(in_sp)))
            for axis, coord in enumerate(_unflatten(b, j, out_sp)):
                flat = b.add(flat, b.mul(coord, const_i64(strides[axis] * math.prod(in_sp[axis + 1 :]))))
            return flat

        def tile(img, o0, rows: int, j0, cols: int) -> None:
            accs = [[entry_alloca(b, vec) for _ in range(cols)] for _ in range(rows)]
            for row in accs:
                for slot in row:
                    b.store(V.zero, slot)
            starts = [window_start(img, b.add(j0, const_i64(q))) for q in range(cols)]
            with loop_nest(b, (c, *kernel_shape[:-1]), name="tap") as (ch, *ks):
                x_off = b.mul(ch, const_i64(math.prod(in_sp)))
                for axis in range(nd - 1):
                    x_off = b.add(x_off, b.mul(ks[axis], const_i64(dilations[axis] * math.prod(in_sp[axis + 1 :]))))
                w_row = b.mul(_row_major(b, [ch, *ks], [0, *kernel_shape[:-1]]), const_i64(run))
                for start, count in segments:
                    av = [load(b.gep(wv.ptr, [b.add(b.add(b.mul(b.add(o0, const_i64(r)), const_i64(c * math.prod(kernel_shape))), w_row), const_i64(start))], source_etype=scalar), count) for r in range(rows)]
                    bv = [load(b.gep(xv.ptr, [b.add(b.add(starts[q], x_off), const_i64(start))], source_etype=scalar), count) for q in range(cols)]
                    for r in range(rows):
                        for q in range(cols):
                            b.store(V.fma(av[r], bv[q], b.load(accs[r][q], typ=vec)), accs[r][q])
            for r in range(rows):
                for q in range(cols):
                    total = V.sum(b.load(accs[r][q], typ=vec))
                    if bias is not None:
                        total = b.fadd(total, bias.on(ptrs[3]).load(b, [b.add(o0, const_i64(r))]))
                    y.store(b, [img, b.add(o0, const_i64(r)), *_unflatten(b, b.add(j0, const_i64(q)), out_sp)], total)

        def rows_for(img, j0, cols: int) -> None:
            if m // DOT_TILE:
                with for_range(b, m // DOT_TILE, name="di") as ib:
                    tile(img, b.mul(ib, const_i64(DOT_TILE)), DOT_TILE, j0, cols)
            if m % DOT_TILE:
                tile(img, const_i64(m - m % DOT_TILE), m % DOT_TILE, j0, cols)

        count = hi - lo
        with for_range(b, n, name="img") as img:
            if count // DOT_TILE:
                with for_range(b, count // DOT_TILE, name="dj") as jb:
                    rows_for(img, b.add(const_i64(lo), b.mul(jb, const_i64(DOT_TILE))), DOT_TILE)
            if count % DOT_TILE:
                rows_for(img, const_i64(hi - count % DOT_TILE), count % DOT_TILE)

    pointers = [ctx.inputs[0].ptr, ctx.inputs[1].ptr, ctx.outputs[0].ptr] + ([bias.ptr] if bias is not None else [])
    w_shape = ctx.inputs[1].shape
    if threads > 1 and m * p * math.prod(w_shape[1:]) * n >= PARALLEL_MACS:
        parallel_rows(ctx, p, threads, pointers, positions)
    else:
        positions(ctx, pointers, 0, p, 0)


def _unflatten(b, flat: ir.Value, shape) -> list[ir.Value]:
    """The row-major coordinates of ``flat`` in ``shape``."""
    coords = []
    for axis in range(len(shape)):
        step = math.prod(shape[axis + 1 :])
        coords.append(b.sdiv(flat, const_i64(step)))
        flat = b.srem(flat, const_i64(step))
    return coords


# -- channels-last convolution: contiguous im2col rows, then one GEMM per image ------------------------
def _nhwc_geometry(node):
    """(x, w, nd, strides, dilations, pads, out spatial) of an NHWC conv, w as (*kernel, C, M)."""
    x, w = node.inputs[0].type, node.inputs[1].type
    nd = x.rank - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    out = window_output_shape(x.shape[1:-1], w.shape[:nd], strides, dilations, pads)
    return x, w, nd, strides, dilations, pads, out


def _nhwc_direct(node) -> bool:
    """An ungrouped 1x1 conv with unit strides and no pads: a GEMM over the positions."""
    x, w, nd, strides, dilations, pads, out = _nhwc_geometry(node)
    return node.attrs["group"] == 1 and all(k == 1 for k in w.shape[:nd]) and all(s == 1 for s in strides) and not any(pads)


def _nhwc_conv_scratch(node) -> int:
    from kiln.backends.llvm import kernels_conv

    if kernels_depthwise.applies_nhwc(node):
        return kernels_depthwise.nhwc_scratch_bytes(node)
    if _nhwc_direct(node):
        return 0
    if kernels_conv.applies(node):
        return kernels_conv.scratch_bytes(node)
    x, w, nd, *_, out = _nhwc_geometry(node)
    return math.prod(out) * math.prod(w.shape[:-1]) * x.dtype.itemsize


def _nhwc_conv(ctx: KernelContext) -> None:
    """Float32/64: the direct convolution (``kernels_conv``); a 1x1 conv with unit strides and
    no pads is one GEMM over every image's positions (``emit_pointwise_conv``, as when it has a
    fused tail). Otherwise (float16) y[img, P, M] =
    cols[P, K] @ w[K, M] (+ bias), K = (*kernel, C), im2col copying whole channel rows."""
    from kiln.backends.llvm import kernels_conv

    node = ctx.node
    if kernels_depthwise.applies_nhwc(node):
        kernels_depthwise.emit_nhwc(ctx)
        return
    if kernels_conv.applies(node):
        kernels_conv.emit(ctx)
        return
    if node.attrs["group"] != 1:
        raise KilnError(f"node {node.name!r}: grouped NHWC Conv on {node.inputs[0].type.dtype.short} has no LLVM kernel yet (float32/64 ones have)")
    if _nhwc_direct(node) and node.outputs[0].type.dtype in (DType.float32, DType.float64):  # every image at once: (N*P, C) @ (C, M)
        kernels_conv.emit_pointwise_conv(ctx)
        return
    x, w, nd, strides, dilations, pads, out_sp = _nhwc_geometry(node)
    xv, wv, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    n, c, m = x.shape[0], x.shape[-1], w.shape[-1]
    in_sp, kernel_shape = x.shape[1:-1], w.shape[:nd]
    kk, p = math.prod(kernel_shape) * c, math.prod(out_sp)
    b = ctx.b
    w_view = wv if isinstance(wv, Panels) else View(wv.ptr, wv.dtype, (kk, m), (m, 1))
    if _nhwc_direct(node):  # float16: every image at once, as a GEMM
        rows = n * p
        init = View(bias.ptr, bias.dtype, (rows, m), (0, 1)) if bias is not None else None
        emit_gemm(ctx, View(xv.ptr, xv.dtype, (rows, c), (c, 1)), w_view, View(y.ptr, y.dtype, (rows, m), (m, 1)), 1.0, init)
        return
    cols = View(ctx.scratch, x.dtype, (p, kk), (kk, 1))
    image = math.prod(in_sp) * c
    geometry = (in_sp, out_sp, kernel_shape, strides, dilations, pads, c)
    threads = min(num_threads(), p)
    with for_range(b, n, name="img") as img:
        x_img = b.gep(xv.ptr, [b.mul(img, const_i64(image))], source_etype=_t(xv))

        def block(emitting, ptrs, lo, hi, _):
            _nhwc_im2col(emitting.b, ptrs[0], View(ptrs[1], cols.dtype, cols.shape, cols.strides), lo, hi, *geometry)

        if threads > 1 and p * kk >= PARALLEL_COPY:
            parallel_rows(ctx, p, threads, [x_img, ctx.scratch], block)
        else:
            block(ctx, [x_img, ctx.scratch], 0, p, 0)
        y_img = View(b.gep(y.ptr, [b.mul(img, const_i64(p * m))], source_etype=_t(y)), y.dtype, (p, m), (m, 1))
        init = View(bias.ptr, bias.dtype, (p, m), (0, 1)) if bias is not None else None
        emit_gemm(ctx, cols, w_view, y_img, 1.0, init)


PARALLEL_COPY = 1 << 16  # im2col elements below which one thread copies


def _nhwc_im2col(b, x_img, cols: View, lo: int, hi: int, in_sp, out_sp, kernel_shape, strides, dilations, pads, c) -> None:
    """cols[pos, (tap, ch)] = x[pos * s - pad + tap * d, ch] (0 outside) for positions [lo, hi)."""
    nd = len(in_sp)
    with for_range(b, hi, start=lo, name="pos") as row:
        pos, rest = [], row
        for axis in reversed(range(nd)):  # the flat position as coordinates
            pos.insert(0, b.urem(rest, const_i64(out_sp[axis])))
            rest = b.udiv(rest, const_i64(out_sp[axis]))
        if nd == 2 and dilations[1] == 1:
            _nhwc_im2col_runs(b, x_img, cols, row, pos, in_sp, kernel_shape, strides, dilations, pads, c)
        else:
            _nhwc_im2col_taps(b, x_img, cols, row, pos, in_sp, kernel_shape, strides, dilations, pads, c)


def _nhwc_im2col_runs(b, x_img, cols: View, row, pos, in_sp, kernel_shape, strides, dilations, pads, c) -> None:
    """A 2-D window with unit width dilation: each kernel row reads kw * C contiguous input
    elements, copied as one run where the window lies inside the image (the borders take the
    tap-by-tap path)."""
    ty = _t(cols)
    kh, kw = kernel_shape
    height, width = in_sp
    x0 = b.sub(b.mul(pos[1], const_i64(strides[1])), const_i64(pads[1]))
    x_inside = b.and_(b.icmp_signed(">=", x0, const_i64(0)), b.icmp_signed("<=", b.add(x0, const_i64(kw)), const_i64(width)))
    with for_range(b, kh, name="ky") as ky:
        y = _tap_coord(b, pos[0], ky, strides[0], dilations[0], pads[0])
        inside = b.and_(x_inside, b.and_(b.icmp_signed(">=", y, const_i64(0)), b.icmp_signed("<", y, const_i64(height))))
        col0 = b.mul(ky, const_i64(kw * c))
        with b.if_else(inside) as (whole, edge):
            with whole:
                start = b.mul(b.add(b.mul(y, const_i64(width)), x0), const_i64(c))
                with for_range(b, kw * c, name="run") as j:
                    value = b.load(b.gep(x_img, [b.add(start, j)], source_etype=ty), typ=ty)
                    cols.store(b, [row, b.add(col0, j)], value)
            with edge:
                with for_range(b, kw, name="kx") as kx:
                    tap0 = b.add(col0, b.mul(kx, const_i64(c)))
                    _copy_tap(b, x_img, cols, row, tap0, pos, [ky, kx], in_sp, strides, dilations, pads, c)


def _nhwc_im2col_taps(b, x_img, cols: View, row, pos, in_sp, kernel_shape, strides, dilations, pads, c) -> None:
    """cols[row, (tap, ch)] tap by tap."""
    with loop_nest(b, kernel_shape, name="tap") as ks:
        col0 = b.mul(_row_major(b, ks, kernel_shape), const_i64(c))
        _copy_tap(b, x_img, cols, row, col0, pos, ks, in_sp, strides, dilations, pads, c)


def _copy_tap(b, x_img, cols: View, row, col0, pos, ks, in_sp, strides, dilations, pads, c) -> None:
    """cols[row, col0 + ch] = the C channels tap ``ks`` of window ``pos`` reads (0 outside the image)."""
    ty = _t(cols)
    flat, inside = _tap_offset(b, const_i64(0), pos, ks, in_sp, c, strides, dilations, pads)
    with for_range(b, c, name="ch") as ch:
        value = b.load(b.gep(x_img, [b.add(flat, ch)], source_etype=ty), typ=ty)
        cols.store(b, [row, b.add(col0, ch)], b.select(inside, value, ir.Constant(ty, 0.0)))


def _tap_coord(b, pos: ir.Value, k: ir.Value, stride: int, dilation: int, pad: int) -> ir.Value:
    """The input coordinate kernel tap ``k`` of window ``pos`` reads along one axis."""
    return b.add(b.sub(b.mul(pos, const_i64(stride)), const_i64(pad)), b.mul(k, const_i64(dilation)))


def _tap_offset(b, base, pos, ks, image_sp, scale: int, strides, dilations, pads):
    """Where tap ``ks`` of window ``pos`` lands in an image of ``image_sp`` whose spatial steps
    are ``scale`` elements apart (1 channels-first, C channels-last): the flat offset from
    ``base`` (clamped into the image) and whether it is inside."""
    inside = ir.Constant(ir.IntType(1), 1)
    flat = base
    for axis in range(len(image_sp)):
        coord = _tap_coord(b, pos[axis], ks[axis], strides[axis], dilations[axis], pads[axis])
        ok = b.and_(b.icmp_signed(">=", coord, const_i64(0)), b.icmp_signed("<", coord, const_i64(image_sp[axis])))
        inside = b.and_(inside, ok)
        flat = b.add(flat, b.mul(b.select(ok, coord, const_i64(0)), const_i64(math.prod(image_sp[axis + 1 :]) * scale)))
    return flat, inside


def _row_major(b, index, extents) -> ir.Value:
    """The flat row-major position of ``index`` in a grid of ``extents`` (the first unused)."""
    flat = index[0]
    for i, extent in zip(index[1:], extents[1:]):
        flat = b.add(b.mul(flat, const_i64(extent)), i)
    return flat


def _window(b, base, ch, ks, pos, image_sp, positions_sp, kernel_shape, strides, dilations, pads):
    """Where kernel tap ``ks`` of window ``pos`` lands in an image of ``image_sp`` (channel ``ch``):
    the flat element offset (clamped into the image), whether it is inside, and the column
    matrix's row (channel, tap) and column (position)."""
    channel_base = b.add(base, b.mul(ch, const_i64(math.prod(image_sp))))
    flat, inside = _tap_offset(b, channel_base, pos, ks, image_sp, 1, strides, dilations, pads)
    row = _row_major(b, [ch, *ks], [0, *kernel_shape])
    col = _row_major(b, pos, positions_sp)
    return flat, inside, row, col


def _im2col(ctx, xv, x_base, cols, cg, kernel_shape, in_sp, out_sp, strides, dilations, pads):
    """cols[(c, k...), (o...)] = x[c, o*s - pad + k*d] (0 outside the image)."""
    b = ctx.b
    nd = len(kernel_shape)
    zero = ir.Constant(_t(cols), 0.0)
    if nd == 2 and strides[1] == 1:
        _im2col_rows(b, xv, x_base, cols, cg, kernel_shape, in_sp, out_sp, strides, dilations, pads)
        return
    with loop_nest(b, (cg, *kernel_shape, *out_sp), name="col") as index:
        ch, ks, pos = index[0], index[1 : 1 + nd], index[1 + nd :]
        flat, inside, row, col = _window(b, x_base, ch, ks, pos, in_sp, out_sp, kernel_shape, strides, dilations, pads)
        value = b.load(b.gep(xv.ptr, [flat], source_etype=_t(xv)), typ=_t(xv))
        cols.store(b, [row, col], b.select(inside, value, zero))


def _im2col_rows(b, xv, x_base, cols, cg, kernel_shape, in_sp, out_sp, strides, dilations, pads, band: tuple | None = None) -> None:
    """The 2-D, unit-width-stride im2col as row copies: for each (channel, tap, output row) the
    columns that read inside the image are one contiguous run of the input row (a loop LLVM
    vectorizes), and the padded ends are zeros, with no per-element bounds checks. ``band``
    (first output row, count): those rows' columns only, from column 0 of ``cols``."""
    (kh_n, kw_n), (ih_n, iw_n), (oh_n, ow_n) = kernel_shape, in_sp, out_sp
    first, count = band if band is not None else (const_i64(0), oh_n)
    zero = ir.Constant(_t(cols), 0.0)
    with loop_nest(b, (cg, kh_n, kw_n, count), name="row") as (ch, kh, kw, at):
        oh = b.add(first, at)
        ih = _tap_coord(b, oh, kh, strides[0], dilations[0], pads[0])
        row = _row_major(b, [ch, kh, kw], [0, kh_n, kw_n])
        start = b.mul(at, const_i64(ow_n))  # the column of (oh, 0)
        shift = b.sub(b.mul(kw, const_i64(dilations[1])), const_i64(pads[1]))  # iw = ow + shift
        row_ok = b.and_(b.icmp_signed(">=", ih, const_i64(0)), b.icmp_signed("<", ih, const_i64(ih_n)))
        # ow in [lo, hi) reads inside: 0 <= ow + shift < iw_n; empty when the row is outside
        lo = _clamp(b, b.neg(shift), 0, ow_n)
        hi = _clamp(b, b.sub(const_i64(iw_n), shift), 0, ow_n)
        hi = b.select(row_ok, b.select(b.icmp_signed("<", hi, lo), lo, hi), lo)
        with for_range(b, lo, name="zl") as ow:
            cols.store(b, [row, b.add(start, ow)], zero)
        src = b.add(b.add(x_base, b.mul(ch, const_i64(ih_n * iw_n))), b.mul(b.select(row_ok, ih, const_i64(0)), const_i64(iw_n)))
        with for_range(b, hi, start=lo, name="cp") as ow:
            value = b.load(b.gep(xv.ptr, [b.add(src, b.add(ow, shift))], source_etype=_t(xv)), typ=_t(xv))
            cols.store(b, [row, b.add(start, ow)], value)
        with for_range(b, const_i64(ow_n), start=hi, name="zh") as ow:
            cols.store(b, [row, b.add(start, ow)], zero)


def _clamp(b, value: ir.Value, lo: int, hi: int) -> ir.Value:
    value = b.select(b.icmp_signed("<", value, const_i64(lo)), const_i64(lo), value)
    return b.select(b.icmp_signed(">", value, const_i64(hi)), const_i64(hi), value)


# -- pooling ------------------------------------------------------------------------------------------
def _pool(ctx: KernelContext, mode: str) -> None:
    """Each output is its window's max or mean; MaxPool's optional Indices output records where
    the first max sits, as a flat index into the channels-first input (``storage_order`` 1:
    the spatial dims column-major)."""
    from kiln.ir.ops.nn import _pool_geometry

    node = ctx.node
    if mode == "avg":
        _require_float(ctx)
    x, y = ctx.inputs[0], ctx.outputs[0]
    argmax = ctx.outputs[1] if len(ctx.outputs) > 1 else None
    xt = node.inputs[0].type
    nhwc = node.attrs["layout"] == "NHWC"
    if nhwc:  # the geometry of the channels-first twin; index (n, *spatial, c) below
        xt = xt.with_shape([xt.shape[0], xt.shape[-1], *xt.shape[1:-1]])
    kernel_shape, strides, dilations, pads, out_sp = _pool_geometry(node.attrs, xt)
    nd = len(kernel_shape)
    in_sp = xt.shape[2:]
    if nhwc and argmax is None:
        if x.dtype.is_float and math.prod(kernel_shape) <= MAX_UNROLLED_TAPS:
            _pool_positions(ctx, mode, kernel_shape, strides, dilations, pads, out_sp, in_sp)
        else:
            _pool_channels_last(ctx, mode, kernel_shape, strides, dilations, pads, out_sp, in_sp)
        return
    if argmax is None and math.prod(kernel_shape) <= MAX_UNROLLED_TAPS:
        _pool_planes(ctx, mode, kernel_shape, strides, dilations, pads, out_sp, in_sp)
        return
    first = 1 if nhwc else 2  # where the spatial indices start
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    ty = _t(x)
    include_pad = mode == "avg" and node.attrs.get("count_include_pad", 0)
    acc_ptr, count_ptr, arg_ptr = entry_alloca(b, ty), entry_alloca(b, ty), entry_alloca(b, I64)
    column_major = node.attrs.get("storage_order", 0)
    place = [math.prod(in_sp[:i]) if column_major else math.prod(in_sp[i + 1 :]) for i in range(nd)]
    with loop_nest(b, y.shape, name="o") as index:
        b.store(_initial(E, "ReduceMax", x.dtype) if mode == "max" else E.constant(0, x.dtype), acc_ptr)
        b.store(E.constant(0, x.dtype), count_ptr)
        b.store(const_i64(0), arg_ptr)
        with loop_nest(b, kernel_shape, name="k") as ks:
            inside = ir.Constant(ir.IntType(1), 1)
            counted = ir.Constant(ir.IntType(1), 1)
            coords = []
            for axis in range(nd):
                coord = _tap_coord(b, index[first + axis], ks[axis], strides[axis], dilations[axis], pads[axis])
                ok = b.and_(b.icmp_signed(">=", coord, const_i64(0)), b.icmp_signed("<", coord, const_i64(in_sp[axis])))
                inside = b.and_(inside, ok)
                in_padded = b.icmp_signed("<", coord, const_i64(in_sp[axis] + pads[axis + nd]))
                counted = b.and_(counted, in_padded)
                coords.append(b.select(ok, coord, const_i64(0)))
            where = [index[0], *coords, index[-1]] if nhwc else [index[0], index[1], *coords]
            value = E.typed(x.load(b, where), x.dtype)
            acc = E.typed(b.load(acc_ptr, typ=ty), x.dtype)
            if mode == "max":
                b.store(b.select(inside, E.max(acc, value), acc), acc_ptr)
                if argmax is not None:  # the first strict improvement (a NaN counts as one, once)
                    better = E.gt(value, acc)
                    if x.dtype.is_float:
                        better = E.logical_or(better, E.logical_and(E.isnan(value), E.logical_not(E.isnan(acc))))
                    spatial = const_i64(0)
                    for axis in range(nd):
                        spatial = b.add(spatial, b.mul(coords[axis], const_i64(place[axis])))
                    with b.if_then(b.and_(inside, better)):
                        b.store(spatial, arg_ptr)
            else:
                b.store(b.select(inside, b.fadd(acc, value), acc), acc_ptr)
                hit = counted if include_pad else inside
                b.store(b.select(hit, b.fadd(b.load(count_ptr, typ=ty), ir.Constant(ty, 1.0)), b.load(count_ptr, typ=ty)), count_ptr)
        result = b.load(acc_ptr, typ=ty)
        if mode == "avg":
            result = b.fdiv(result, b.load(count_ptr, typ=ty))
        y.store(b, index, result)
        if argmax is not None:
            n, c = (index[0], index[-1]) if nhwc else (index[0], index[1])
            image = b.add(b.mul(n, const_i64(xt.shape[1])), c)
            argmax.store(b, index, b.add(b.mul(image, const_i64(math.prod(in_sp))), b.load(arg_ptr, typ=I64)))


MAX_UNROLLED_TAPS = 64  # the channels-first pool unrolls windows of up to this many taps


def _pool_planes(ctx: KernelContext, mode: str, kernel_shape, strides, dilations, pads, out_sp, in_sp) -> None:
    """NCHW pooling without indices, the window unrolled. Every output row first picks, for each
    tap of the window's leading axes (its rows, in 2-D), a row of the image: a tap outside the
    image reads the window's first inside row instead (MaxPool: a duplicate changes no maximum)
    or adds zero (AveragePool). The interior columns, whose taps all land inside the image, are
    then one loop with no test that takes in every tap in registers; the few border columns are
    written out with their inside taps only. (image, channel) planes split over the pool."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    node = ctx.node
    nd = len(kernel_shape)
    images, channels = x.shape[0], x.shape[1]
    width, out_w, taps_w = in_sp[-1], out_sp[-1], kernel_shape[-1]
    stride, dilation, pad = strides[-1], dilations[-1], pads[nd - 1]
    include_pad = mode == "avg" and node.attrs.get("count_include_pad", 0)
    ty = _t(x)

    def column_taps(col: int, lo: int, hi: int) -> list[int]:
        """The taps of output column ``col`` that read a coordinate in [lo, hi)."""
        return [k for k in range(taps_w) if lo <= col * stride - pad + k * dilation < hi]

    interior = [c for c in range(out_w) if len(column_taps(c, 0, width)) == taps_w]  # contiguous
    first, stop = (interior[0], interior[-1] + 1) if interior else (0, 0)
    border = [c for c in range(out_w) if not first <= c < stop]

    def planes(emitting, ptrs, lo, hi, _):
        b = emitting.b
        E = LLVMScalarOps(b, emitting.module)
        xv, yv = x.on(ptrs[0]), y.on(ptrs[1])
        initial = _initial(E, "ReduceMax", x.dtype) if mode == "max" else E.constant(0, x.dtype)
        with for_range(b, hi, start=lo, name="plane") as plane:
            img, ch = _unflatten(b, plane, [images, channels])
            with loop_nest(b, out_sp[:-1], name="o") as out:
                rows, inside, counted = _window_taps(b, mode, out, kernel_shape[:-1], strides, dilations, pads, in_sp)
                any_inside = functools.reduce(b.or_, inside)
                if mode == "avg":
                    taken = b.sitofp(functools.reduce(b.add, [b.zext(c, I64) for c in (counted if include_pad else inside)]), ty)

                def window(col, ks, count_w):
                    values = []
                    for row, ok in zip(rows, inside):
                        for k in ks:
                            value = E.typed(xv.load(b, [img, ch, *row, _tap_coord(b, col, const_i64(k), stride, dilation, pad)]), x.dtype)
                            values.append(value if mode == "max" else E.select(ok, value, E.constant(0, x.dtype)))
                    if mode == "max":
                        return E.select(any_inside, _max_of(E, initial, values), initial)
                    divisor = E.typed(b.fmul(taken, ir.Constant(ty, float(count_w))), x.dtype)
                    return E.div(functools.reduce(E.add, values, initial), divisor)

                with for_range(b, stop, start=first, name="w") as col:
                    yv.store(b, [img, ch, *out, col], window(col, range(taps_w), taps_w))
                for c in border:
                    ks = column_taps(c, 0, width)
                    count_w = len(column_taps(c, -pad, width + pads[-1])) if include_pad else len(ks)
                    yv.store(b, [img, ch, *out, const_i64(c)], window(const_i64(c), ks, count_w))

    work = images * channels * math.prod(out_sp) * math.prod(kernel_shape)
    threads = min(num_threads(), images * channels) if work >= PARALLEL_MACS else 1
    parallel_rows(ctx, images * channels, threads, [x.ptr, y.ptr], planes)


def _window_taps(b, mode: str, out: list, kernel_shape, strides, dilations, pads, in_sp):
    """For each tap of a window over the first ``len(kernel_shape)`` spatial axes (the window of
    output position ``out``): its input coordinates, clamped into the image, whether it is inside
    the image, and whether it is inside the padded one (AveragePool's count_include_pad). For
    MaxPool a tap outside the image reads the window's first inside tap instead (a duplicate
    changes no maximum)."""
    nd = len(in_sp)
    taps, inside, counted = [], [], []
    for tap in itertools.product(*(range(k) for k in kernel_shape)):
        coords = [_tap_coord(b, out[a], const_i64(k), strides[a], dilations[a], pads[a]) for a, k in enumerate(tap)]
        ok = counts = ir.Constant(ir.IntType(1), 1)
        for a, coord in enumerate(coords):
            ok = b.and_(ok, b.and_(b.icmp_signed(">=", coord, const_i64(0)), b.icmp_signed("<", coord, const_i64(in_sp[a]))))
            counts = b.and_(counts, b.icmp_signed("<", coord, const_i64(in_sp[a] + pads[a + nd])))
        taps.append([_clamp(b, c, 0, in_sp[a] - 1) for a, c in enumerate(coords)])
        inside.append(ok)
        counted.append(counts)
    if mode == "max":
        fallback = taps[-1]
        for tap, ok in zip(reversed(taps), reversed(inside)):
            fallback = [b.select(ok, t, f) for t, f in zip(tap, fallback)]
        taps = [[b.select(ok, t, f) for t, f in zip(tap, fallback)] for tap, ok in zip(taps, inside)]
    return taps, inside, counted


def _pool_positions(ctx: KernelContext, mode: str, kernel_shape, strides, dilations, pads, out_sp, in_sp) -> None:
    """NHWC pooling without indices, the window unrolled: each output position picks its taps'
    input positions once (_window_taps), then takes the channel row in vectors, every tap's
    vector loaded and combined in registers and the result stored once. Positions split over
    the pool."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    node = ctx.node
    images, channels = x.shape[0], x.shape[-1]
    positions = images * math.prod(out_sp)
    include_pad = mode == "avg" and node.attrs.get("count_include_pad", 0)
    width = vector_width(x.dtype)
    ty = _t(x)

    def rows(emitting, ptrs, lo, hi, _):
        b = emitting.b
        V = Vectors(b, emitting.module, x.dtype, width)
        xv, yv = x.on(ptrs[0]), y.on(ptrs[1])
        with for_range(b, hi, start=lo, name="pos") as pos:
            img, *out = _unflatten(b, pos, [images, *out_sp])
            taps, inside, counted = _window_taps(b, mode, out, kernel_shape, strides, dilations, pads, in_sp)
            any_inside = functools.reduce(b.or_, inside)
            if mode == "max":
                initial = V.splat(ir.Constant(ty, float("-inf")))
            else:
                taken = b.sitofp(functools.reduce(b.add, [b.zext(c, I64) for c in (counted if include_pad else inside)]), ty)
                divisor = V.splat(taken)

            def block(ch: ir.Value, mask) -> None:
                values = [V.load(xv.address(b, [img, *tap, ch]), mask) for tap in taps]
                if mode == "max":
                    result = b.select(any_inside, _float_max_of(b, initial, values), initial)
                else:
                    result = b.fdiv(functools.reduce(b.fadd, [b.select(ok, v, V.zero) for v, ok in zip(values, inside)]), divisor)
                V.store(result, yv.address(b, [img, *out, ch]), mask)

            if channels // width:
                with for_range(b, channels // width, name="c") as c:
                    block(b.mul(c, const_i64(width)), None)
            if channels % width:
                block(const_i64(channels - channels % width), V.mask(channels % width))

    work = positions * channels * math.prod(kernel_shape)
    threads = min(num_threads(), positions) if work >= PARALLEL_MACS else 1
    parallel_rows(ctx, positions, threads, [x.ptr, y.ptr], rows)


def _max_of(E: LLVMScalarOps, acc: ir.Value, values: list[ir.Value]) -> ir.Value:
    """The maximum of ``acc`` and ``values``, NaN if any is (as numpy.maximum)."""
    if not E._is_float(acc):
        return functools.reduce(E.max, values, acc)
    return E.typed(_float_max_of(E.b, acc, values), E.dtype(acc))


def _float_max_of(b: ir.IRBuilder, acc: ir.Value, values: list[ir.Value]) -> ir.Value:
    """_max_of for floats, scalars or vectors (lane by lane): an ordered compare and a select
    per value, and off that chain one unordered compare per pair of values for the NaN test.
    (llvm.maximum, which also orders -0 below +0, took twice as long in small pools.)"""
    if not values:
        return acc
    result = acc
    for value in values:
        result = b.select(b.fcmp_ordered(">", value, result), value, result)
    pairs = [b.fcmp_unordered("uno", values[i], values[min(i + 1, len(values) - 1)]) for i in range(0, len(values), 2)]
    lanes = acc.type.count if isinstance(acc.type, ir.VectorType) else None
    nan = ir.Constant(acc.type, [float("nan")] * lanes if lanes else float("nan"))
    return b.select(functools.reduce(b.or_, pairs), nan, result)


def _pool_channels_last(ctx: KernelContext, mode: str, kernel_shape, strides, dilations, pads, out_sp, in_sp) -> None:
    """NHWC pooling without indices where the window is not unrolled (integer MaxPool, windows of
    more than MAX_UNROLLED_TAPS): each output position's channel row starts at the initial value
    and takes in each tap inside the image as one loop over channels (contiguous, so it
    vectorizes); positions split over the pool."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    node = ctx.node
    nd = len(kernel_shape)
    images, channels = x.shape[0], x.shape[-1]
    positions = images * math.prod(out_sp)
    include_pad = mode == "avg" and node.attrs.get("count_include_pad", 0)
    ty = _t(x)

    def rows(emitting, ptrs, lo, hi, _):
        b = emitting.b
        E = LLVMScalarOps(b, emitting.module)
        xv, yv = x.on(ptrs[0]), y.on(ptrs[1])
        count_ptr = entry_alloca(b, ty)
        with for_range(b, hi, start=lo, name="pos") as pos:
            img, *out = _unflatten(b, pos, [images, *out_sp])
            with for_range(b, channels, name="c0") as ch:
                yv.store(b, [img, *out, ch], _initial(E, "ReduceMax", x.dtype) if mode == "max" else E.constant(0, x.dtype))
            b.store(E.constant(0, x.dtype), count_ptr)
            with loop_nest(b, kernel_shape, name="k") as ks:
                inside = counted = ir.Constant(ir.IntType(1), 1)
                coords = []
                for axis in range(nd):
                    coord = _tap_coord(b, out[axis], ks[axis], strides[axis], dilations[axis], pads[axis])
                    inside = b.and_(inside, b.and_(b.icmp_signed(">=", coord, const_i64(0)), b.icmp_signed("<", coord, const_i64(in_sp[axis]))))
                    counted = b.and_(counted, b.icmp_signed("<", coord, const_i64(in_sp[axis] + pads[axis + nd])))
                    coords.append(coord)
                if mode == "avg":
                    one = b.fadd(b.load(count_ptr, typ=ty), ir.Constant(ty, 1.0))
                    b.store(b.select(counted if include_pad else inside, one, b.load(count_ptr, typ=ty)), count_ptr)
                with b.if_then(inside), for_range(b, channels, name="c") as ch:
                    acc = E.typed(yv.load(b, [img, *out, ch]), y.dtype)
                    value = E.typed(xv.load(b, [img, *coords, ch]), x.dtype)
                    yv.store(b, [img, *out, ch], E.max(acc, value) if mode == "max" else E.add(acc, value))
            if mode == "avg":
                count = E.typed(b.load(count_ptr, typ=ty), x.dtype)
                with for_range(b, channels, name="c1") as ch:
                    yv.store(b, [img, *out, ch], E.div(E.typed(yv.load(b, [img, *out, ch]), y.dtype), count))

    work = positions * channels * math.prod(kernel_shape)
    threads = min(num_threads(), positions) if work >= PARALLEL_MACS else 1
    parallel_rows(ctx, positions, threads, [x.ptr, y.ptr], rows)


@kernel("MaxPool")
def max_pool(ctx: KernelContext) -> None:
    _pool(ctx, "max")


@kernel("AveragePool")
def average_pool(ctx: KernelContext) -> None:
    _pool(ctx, "avg")


# -- reductions and softmax -------------------------------------------------------------------------------
REDUCTIONS = {
    # op: (initial value, combine(E, acc, x), finish(E, acc, count))
    "ReduceSum": (0.0, lambda E, a, x: E.add(a, x), lambda E, a, n: a),
    "ReduceMean": (0.0, lambda E, a, x: E.add(a, x), lambda E, a, n: E.div(a, E.const(n, a))),
    "ReduceMax": (float("-inf"), lambda E, a, x: E.max(a, x), lambda E, a, n: a),
    "ReduceMin": (float("inf"), lambda E, a, x: E.min(a, x), lambda E, a, n: a),
    "ReduceProd": (1.0, lambda E, a, x: E.mul(a, x), lambda E, a, n: a),
    "ReduceL1": (0.0, lambda E, a, x: E.add(a, E.abs(x)), lambda E, a, n: a),
    "ReduceL2": (0.0, lambda E, a, x: E.add(a, E.mul(x, x)), lambda E, a, n: E.call("sqrt", a)),
    "ReduceSumSquare": (0.0, lambda E, a, x: E.add(a, E.mul(x, x)), lambda E, a, n: a),
    "GlobalAveragePool": (0.0, lambda E, a, x: E.add(a, x), lambda E, a, n: E.div(a, E.const(n, a))),
    "GlobalMaxPool": (float("-inf"), lambda E, a, x: E.max(a, x), lambda E, a, n: a),
}


FLOAT_ONLY = {"ReduceMean", "ReduceL2", "GlobalAveragePool"}
SUMS = {"ReduceSum", "ReduceMean", "ReduceL1", "ReduceL2", "ReduceSumSquare", "GlobalAveragePool"}


def _initial(E: LLVMScalarOps, op: str, dtype: DType) -> ir.Value:
    """The reduction's starting value in ``dtype``: an integer max starts at the type's lowest."""
    init = REDUCTIONS[op][0]
    if math.isinf(init) and not dtype.is_float:
        info = np.iinfo(dtype.numpy)
        init = info.min if init < 0 else info.max
    return E.constant(init, dtype)


@kernel(*REDUCTIONS, scratch=lambda node: _reduce_scratch(node))
def reduce(ctx: KernelContext) -> None:
    node = ctx.node
    if node.op.name in FLOAT_ONLY:
        _require_float(ctx)
    if kernels_reduce_fused.reduces_along_rows(node):  # vectorized rows, outputs over the pool
        kernels_reduce_fused.emit_reduction(ctx)
        return
    x, y = ctx.inputs[0], ctx.outputs[0]
    if x.dtype is DType.bool:  # bytes of 0/1: max is any, min is all
        x, y = (View(v.ptr, DType.uint8, v.shape, v.strides, v.offset) for v in (x, y))
    rank = len(x.shape)
    axes = _reduced_axes(node)
    kept = [a for a in range(rank) if a not in axes]
    _, combine, finish = REDUCTIONS[node.op.name]
    count = math.prod(x.shape[a] for a in axes)
    inner = math.prod(x.shape[max(axes) + 1 :]) if axes else 1
    if axes and axes == list(range(axes[0], axes[-1] + 1)) and inner > 1 and x.strides == tuple(contiguous_strides(x.shape)):
        geometry = _column_geometry(node)
        if geometry is not None:
            _reduce_columns(ctx, x, y, *geometry)
        else:
            _reduce_into_rows(ctx, x, y, math.prod(x.shape[: axes[0]]), count, inner)
        return
    out = View(y.ptr, y.dtype, tuple(x.shape[a] for a in kept), tuple(contiguous_strides([x.shape[a] for a in kept])))
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module, reassociate=True)  # the accumulator's adds vectorize
    # a float16 sum accumulates each term, rounded to float16, in float32
    wide = sum_dtype(x.dtype) if node.op.name in SUMS else x.dtype
    ty = llvm_type(wide)
    acc_ptr = entry_alloca(b, ty)
    with loop_nest(b, out.shape, name="o") as index:
        b.store(_initial(E, node.op.name, wide), acc_ptr)
        with loop_nest(b, [x.shape[a] for a in axes], name="r") as red:
            full = [None] * rank
            for a, i in zip(kept, index):
                full[a] = i
            for a, i in zip(axes, red):
                full[a] = i
            acc = E.typed(b.load(acc_ptr, typ=ty), wide)
            value = E.typed(x.load(b, full), x.dtype)
            if wide != x.dtype:  # the term alone (0 + term), then added in the wide type
                term = E.cast(combine(E, _initial(E, node.op.name, x.dtype), value), wide)
                b.store(E.add(acc, term), acc_ptr)
            else:
                b.store(combine(E, acc, value), acc_ptr)
        out.store(b, index, E.cast(finish(E, E.typed(b.load(acc_ptr, typ=ty), wide), count), y.dtype))


COLUMN_VECTORS = 4  # vectors of accumulators a block of columns keeps in registers
PARALLEL_REDUCE = 1 << 15  # elements below which one thread reduces them all
MERGES = {"ReduceMax": "max", "ReduceMin": "min", "GlobalMaxPool": "max", "ReduceProd": "mul"}  # partial results' merge; else add


def _reduced_axes(node) -> list[int]:
    rank = node.inputs[0].type.rank
    if node.op.name.startswith("Global"):
        return list(range(2, rank))
    return list(range(rank)) if node.attrs["axes"] is None else sorted(a % rank for a in node.attrs["axes"])


def _column_geometry(node) -> tuple[int, int, int, int] | None:
    """(outer, length, inner, chunks) where a float reduction reads x as (outer, length,
    inner) over its middle axis, inner > 1, ``chunks`` the parts of ``length`` the threads
    take (1: they take (outer, column block) items instead); None for other reductions."""
    x, y = node.inputs[0].type, node.outputs[0].type
    axes = _reduced_axes(node)
    if x.dtype not in (DType.float32, DType.float64) or y.dtype != x.dtype or not axes or axes != list(range(axes[0], axes[-1] + 1)):
        return None
    outer, length, inner = math.prod(x.shape[: axes[0]]), math.prod(x.shape[a] for a in axes), math.prod(x.shape[axes[-1] + 1 :])
    if inner < 2:
        return None
    threads = num_threads() if outer * length * inner >= PARALLEL_REDUCE else 1
    chunks = threads if outer < threads and length >= 8 * threads else 1
    return outer, length, inner, chunks


def _reduce_scratch(node) -> int:
    geometry = _column_geometry(node)
    if geometry is None or geometry[3] == 1:
        return 0
    outer, _, inner, chunks = geometry
    return chunks * outer * inner * node.inputs[0].type.dtype.itemsize


def _reduce_columns(ctx: KernelContext, x: View, y: View, outer: int, length: int, inner: int, chunks: int) -> None:
    """A float x as (outer, length, inner) reduced over its middle axis (a global average pool
    in channels-last: each channel over the positions). Each block of up to COLUMN_VECTORS
    vectors of columns keeps its accumulators in registers down the rows. The threads split
    the rows (``chunks`` > 1), each reducing its part of every column into scratch and this
    thread merging the parts: each core reads the rows the kernel before it most likely left
    in its own cache (split by positions), as with an RNN step's rows. Otherwise the threads
    take (outer, column block) items. EfficientNet-B0's 17 pools took 0.31 ms a run on one
    thread, column by column in memory; now 0.08, and the squeeze-excite Muls after them,
    whose rows each core now has in cache, 0.61 -> 0.12 (the model 6.3 -> 5.4)."""
    op = ctx.node.op.name
    _, combine, finish = REDUCTIONS[op]
    dtype = x.dtype
    width = vector_width(dtype)
    vectors = -(-inner // width)
    per = min(COLUMN_VECTORS, vectors)
    threads = num_threads() if outer * length * inner >= PARALLEL_REDUCE else 1
    while chunks == 1 and per > 1 and outer * -(-vectors // per) < threads:  # a block for every thread
        per -= 1
    blocks = -(-inner // (per * width))
    ragged = inner % (per * width) != 0

    def reduce_block(emitting, xs, o, block, r0, r1, store) -> None:
        b = emitting.b
        E = LLVMVectorOps(b, emitting.module, width)
        ty = E.value_type(dtype)
        accs = [entry_alloca(b, ty) for _ in range(per)]
        lanes = ir.Constant(ir.VectorType(I64, width), list(range(width)))
        column = b.mul(block, const_i64(per * width))
        starts = [b.add(column, const_i64(v * width)) for v in range(per)]
        masks = [b.icmp_signed("<", lanes, broadcast(b, b.sub(const_i64(inner), start), width)) if ragged else None for start in starts]
        for acc in accs:
            b.store(_initial(E, op, dtype), acc)
        with for_range(b, r1, start=r0, name="r") as r:
            row = b.mul(b.add(b.mul(o, const_i64(length)), r), const_i64(inner))
            for acc, start, mask in zip(accs, starts, masks):
                value = E.load(xs.address(b, [b.add(row, start)]), dtype, mask)
                b.store(combine(E, E.typed(b.load(acc, typ=ty), dtype), value), acc)
        for acc, start, mask in zip(accs, starts, masks):
            store(E, E.typed(b.load(acc, typ=ty), dtype), start, mask)

    flat = lambda ptr, n, offset=0: View(ptr, dtype, (n,), (1,), offset)

    if chunks == 1:

        def items(emitting, ptrs, lo, hi, _):
            b = emitting.b
            xs, ys = flat(ptrs[0], outer * length * inner, x.offset), flat(ptrs[1], outer * inner, y.offset)
            with for_range(b, hi, start=lo, name="item") as item:
                o = b.sdiv(item, const_i64(blocks))

                def store(E, acc, start, mask):
                    E.store(finish(E, acc, length), ys.address(b, [b.add(b.mul(o, const_i64(inner)), start)]), mask)

                reduce_block(emitting, xs, o, b.srem(item, const_i64(blocks)), const_i64(0), length, store)

        parallel_rows(ctx, outer * blocks, min(threads, outer * blocks), [x.ptr, y.ptr], items)
        return

    def parts(emitting, ptrs, lo, hi, _):
        b = emitting.b
        xs, partial = flat(ptrs[0], outer * length * inner, x.offset), flat(ptrs[1], chunks * outer * inner)
        for chunk in range(lo, hi):
            r0, r1 = length * chunk // chunks, length * (chunk + 1) // chunks
            with loop_nest(b, (outer, blocks), name="ob") as (o, block):

                def store(E, acc, start, mask):
                    E.store(acc, partial.address(b, [b.add(b.mul(b.add(const_i64(chunk * outer), o), const_i64(inner)), start)]), mask)

                reduce_block(emitting, xs, o, block, const_i64(r0), r1, store)

    parallel_rows(ctx, chunks, chunks, [x.ptr, ctx.scratch], parts)
    b = ctx.b  # this thread merges the parts, in order, and finishes
    E = LLVMScalarOps(b, ctx.module)
    merge = getattr(E, MERGES.get(op, "add"))
    partial, ys = flat(ctx.scratch, chunks * outer * inner), flat(y.ptr, outer * inner, y.offset)
    with for_range(b, outer * inner, name="j") as j:
        total = E.typed(partial.load(b, [j]), dtype)
        for chunk in range(1, chunks):
            total = merge(total, E.typed(partial.load(b, [b.add(j, const_i64(chunk * outer * inner))]), dtype))
        ys.store(b, [j], finish(E, total, length))


def _reduce_into_rows(ctx: KernelContext, x: View, y: View, outer: int, length: int, inner: int) -> None:
    """x viewed as (outer, length, inner), reduced over its middle axis with the output's row
    of ``inner`` accumulators updated by each input row in turn: the innermost loop runs along
    contiguous memory and vectorizes, and each output element still combines its inputs in
    order (the same result as one accumulator walking the column)."""
    _, combine, finish = REDUCTIONS[ctx.node.op.name]
    xv = View(x.ptr, x.dtype, (outer, length, inner), (length * inner, inner, 1), x.offset)
    yv = View(y.ptr, y.dtype, (outer, inner), (inner, 1), y.offset)
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    with for_range(b, outer, name="o") as o:
        with for_range(b, inner, name="i") as i:
            yv.store(b, [o, i], _initial(E, ctx.node.op.name, y.dtype))
        with for_range(b, length, name="r") as r:
            with for_range(b, inner, name="i") as i:
                acc = E.typed(yv.load(b, [o, i]), y.dtype)
                yv.store(b, [o, i], combine(E, acc, E.typed(xv.load(b, [o, r, i]), x.dtype)))
        with for_range(b, inner, name="i") as i:  # the mean's division, L2's root (others: a copy)
            yv.store(b, [o, i], finish(E, E.typed(yv.load(b, [o, i]), y.dtype), length))


@kernel("Softmax", "LogSoftmax")
def softmax(ctx: KernelContext) -> None:
    _require_float(ctx)
    x, y = ctx.inputs[0], ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(x.shape)
    outer, length, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])
    xv = View(x.ptr, x.dtype, (outer, length, inner), (length * inner, inner, 1))
    yv = View(y.ptr, y.dtype, (outer, length, inner), (length * inner, inner, 1))
    log = ctx.node.op.name == "LogSoftmax"
    if inner == 1 and x.dtype in (DType.float32, DType.float64):
        _softmax_rows(ctx, View(x.ptr, x.dtype, (outer, length), (length, 1)), View(y.ptr, y.dtype, (outer, length), (length, 1)), log)
        return
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    ty = _t(x)
    wide = sum_dtype(x.dtype)
    top_ptr, sum_ptr = entry_alloca(b, ty), entry_alloca(b, llvm_type(wide))
    with loop_nest(b, (outer, inner), name="o") as (o, i):
        b.store(ir.Constant(ty, float("-inf")), top_ptr)
        b.store(ir.Constant(llvm_type(wide), 0.0), sum_ptr)
        with for_range(b, length, name="a") as a:
            v = E.typed(xv.load(b, [o, a, i]), x.dtype)
            b.store(E.max(E.typed(b.load(top_ptr, typ=ty), x.dtype), v), top_ptr)
        top = E.typed(b.load(top_ptr, typ=ty), x.dtype)
        with for_range(b, length, name="a") as a:
            e = E.call("exp", E.sub(E.typed(xv.load(b, [o, a, i]), x.dtype), top))
            b.store(b.fadd(b.load(sum_ptr, typ=llvm_type(wide)), E.cast(e, wide), flags=("reassoc", "nsz")), sum_ptr)  # vector partial sums
            if not log:
                yv.store(b, [o, a, i], e)
        total = E.cast(E.typed(b.load(sum_ptr, typ=llvm_type(wide)), wide), x.dtype)
        log_total = E.call("log", total)
        with for_range(b, length, name="a") as a:
            if log:
                yv.store(b, [o, a, i], E.sub(E.sub(E.typed(xv.load(b, [o, a, i]), x.dtype), top), log_total))
            else:
                yv.store(b, [o, a, i], E.div(E.typed(yv.load(b, [o, a, i]), y.dtype), total))



def _softmax_rows(ctx: KernelContext, xv: View, yv: View, log: bool) -> None:
    """Softmax over contiguous rows (the last axis), rows split over the pool. A row's maximum
    is taken in vectors (an ordered compare and select per lane, NaN lanes flagged apart, so it
    is NaN-propagating and still vectorizes), then one pass writes exp(x - max) and sums it,
    and one divides by the sum (or, for LogSoftmax, writes x - max - log(sum))."""
    from kiln.backends.llvm.fastmath import INLINE_F32_COST
    from kiln.backends.llvm.kernels_elementwise import PARALLEL_WORK

    rows, length = xv.shape[0], xv.shape[1]
    width = vector_width(xv.dtype)
    ty = _t(xv)

    def part(emitting, ptrs, lo, hi, _):
        b = emitting.b
        E = LLVMScalarOps(b, emitting.module, reassociate=True)
        V = Vectors(b, emitting.module, xv.dtype, width)
        x_, y_ = xv.on(ptrs[0]), yv.on(ptrs[1])
        low = V.splat(ir.Constant(ty, float("-inf")))
        flags = ir.VectorType(ir.IntType(1), width)
        top_ptr, nan_ptr, sum_ptr = entry_alloca(b, V.vec), entry_alloca(b, flags), entry_alloca(b, ty)
        reduce_max = emitting.module.declare_intrinsic(f"llvm.vector.reduce.fmax.v{width}f{xv.dtype.itemsize * 8}", (), ir.FunctionType(ty, [V.vec]))
        reduce_or = emitting.module.declare_intrinsic(f"llvm.vector.reduce.or.v{width}i1", (), ir.FunctionType(ir.IntType(1), [flags]))

        def take(v):
            top = b.load(top_ptr, typ=V.vec)
            b.store(b.select(b.fcmp_ordered(">", v, top), v, top), top_ptr)
            b.store(b.or_(b.load(nan_ptr, typ=flags), b.fcmp_unordered("uno", v, v)), nan_ptr)

        with for_range(b, hi, start=lo, name="row") as row:
            b.store(low, top_ptr)
            b.store(ir.Constant(flags, [0] * width), nan_ptr)
            if length // width:
                with for_range(b, length // width, name="v") as k:
                    take(V.load(x_.address(b, [row, b.mul(k, const_i64(width))])))
            if length % width:
                take(V.load(x_.address(b, [row, const_i64(length - length % width)]), V.mask(length % width), low))
            top = b.call(reduce_max, [b.load(top_ptr, typ=V.vec)])  # no NaN lanes: they were flagged
            top = E.typed(b.select(b.call(reduce_or, [b.load(nan_ptr, typ=flags)]), ir.Constant(ty, float("nan")), top), xv.dtype)
            b.store(ir.Constant(ty, 0.0), sum_ptr)
            with for_range(b, length, name="a") as a:
                e = E.call("exp", E.sub(E.typed(x_.load(b, [row, a]), xv.dtype), top))
                b.store(b.fadd(b.load(sum_ptr, typ=ty), e, flags=("reassoc", "nsz")), sum_ptr)  # vector partial sums
                if not log:
                    y_.store(b, [row, a], e)
            total = E.typed(b.load(sum_ptr, typ=ty), xv.dtype)
            if log:
                log_total = E.call("log", total)
                with for_range(b, length, name="a") as a:
                    y_.store(b, [row, a], E.sub(E.sub(E.typed(x_.load(b, [row, a]), xv.dtype), top), log_total))
            else:
                with for_range(b, length, name="a") as a:
                    y_.store(b, [row, a], E.div(E.typed(y_.load(b, [row, a]), yv.dtype), total))

    threads = min(num_threads(), rows) if rows * length * (1 + INLINE_F32_COST["exp"]) >= PARALLEL_WORK else 1
    parallel_rows(ctx, rows, threads, [xv.ptr, yv.ptr], part)


@kernel("LRN")
def lrn(ctx: KernelContext) -> None:
    """y = x / (bias + alpha / size * sum of x^2 over a window of channels) ^ beta."""
    _require_float(ctx)
    attrs = ctx.node.attrs
    x, y = ctx.inputs[0], ctx.outputs[0]
    size = attrs["size"]
    lo = (size - 1) // 2
    channels = x.shape[1]
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    ty = _t(x)
    acc_ptr = entry_alloca(b, ty)
    with loop_nest(b, x.shape, name="o") as index:
        b.store(ir.Constant(ty, 0.0), acc_ptr)
        with for_range(b, size, name="w") as w:
            ch = b.add(b.sub(index[1], const_i64(lo)), w)
            ok = b.and_(b.icmp_signed(">=", ch, const_i64(0)), b.icmp_signed("<", ch, const_i64(channels)))
            v = E.typed(x.load(b, [index[0], b.select(ok, ch, const_i64(0)), *index[2:]]), x.dtype)
            acc = E.typed(b.load(acc_ptr, typ=ty), x.dtype)
            b.store(b.select(ok, E.add(acc, E.mul(v, v)), acc), acc_ptr)
        acc = E.typed(b.load(acc_ptr, typ=ty), x.dtype)
        base = E.add(E.const(attrs["bias"], acc), E.mul(E.const(attrs["alpha"] / size, acc), acc))
        value = E.typed(x.load(b, index), x.dtype)
        y.store(b, index, E.div(value, E.call("pow", base, E.const(attrs["beta"], acc))))


def _fill_zero(ctx: KernelContext, view: View) -> None:
    from kiln.backends.llvm.kernels_elementwise import emit_pointwise

    emit_pointwise(ctx.b, ctx.module, view, [], lambda E, xs: E.typed(ir.Constant(_t(view), 0.0), view.dtype))


@kernel("LayerNormalization", "RMSNormalization")
def layer_norm(ctx: KernelContext) -> None:
    """Per row of the normalized axes: statistics in float64 (sums regrouped into vector
    partial sums), then the affine map; rows split over the pool. LayerNorm also writes its
    optional Mean and InvStdDev outputs. (A transformer's (4, 64, 256): 108 -> 15 us; it summed
    one float64 at a time, on one thread.)"""
    from kiln.ir.dtypes import DType

    _require_float(ctx)
    node = ctx.node
    rms = node.op.name == "RMSNormalization"
    x, y = ctx.inputs[0], ctx.outputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    outer, inner = math.prod(x.shape[:axis]), math.prod(x.shape[axis:])
    trailing = x.shape[axis:]
    rows = View(x.ptr, x.dtype, (outer, inner), (inner, 1))
    out = View(y.ptr, y.dtype, (outer, inner), (inner, 1))

    def per_column(view: View | None) -> View | None:
        if view is None:
            return None
        # the same element for every row; a column index walks the trailing dims
        if view.broadcast_to(trailing).strides == tuple(contiguous_strides(trailing)):
            return View(view.ptr, view.dtype, (1, inner), (0, 1))
        raise KilnError(f"node {node.name!r}: a broadcast scale/bias has no LLVM kernel yet")

    scale, bias = per_column(ctx.inputs[1]), per_column(ctx.inputs[2] if len(ctx.inputs) > 2 else None)
    stats = [ctx.outputs[k] for k in (1, 2) if len(ctx.outputs) > k]
    views = [rows, out, *(v for v in (scale, bias) if v is not None), *stats]
    f64 = llvm_type(DType.float64)
    eps = node.attrs["epsilon"]

    def block(emitting, ptrs, lo, hi, _):
        b = emitting.b
        # the row's sums may be regrouped (float64 partial sums in vectors: each row's
        # statistics move by float64 rounding, far below the float32 output's)
        E = LLVMScalarOps(b, emitting.module, reassociate=True)
        xs, ys, *rest = [v.on(p) for v, p in zip(views, ptrs)]
        ws = rest.pop(0) if scale is not None else None
        bs = rest.pop(0) if bias is not None else None
        sum_ptr = entry_alloca(b, f64)

        def row_sum(r, term) -> ir.Value:
            b.store(ir.Constant(f64, 0.0), sum_ptr)
            with for_range(b, inner, name="c") as c:
                b.store(E.add(E.typed(b.load(sum_ptr, typ=f64), DType.float64), term(E.cast(E.typed(xs.load(b, [r, c]), x.dtype), DType.float64))), sum_ptr)
            return E.div(E.typed(b.load(sum_ptr, typ=f64), DType.float64), E.constant(float(inner), DType.float64))

        with for_range(b, hi, start=lo, name="row") as r:
            mean = E.constant(0.0, DType.float64) if rms else row_sum(r, lambda v: v)
            var = row_sum(r, lambda v: E.mul(E.sub(v, mean), E.sub(v, mean)))
            inv = E.div(E.constant(1.0, DType.float64), E.call("sqrt", E.add(var, E.constant(eps, DType.float64))))
            with for_range(b, inner, name="c") as c:
                v = E.mul(E.sub(E.cast(E.typed(xs.load(b, [r, c]), x.dtype), DType.float64), mean), inv)
                v = E.mul(v, E.cast(E.typed(ws.load(b, [r, c]), ws.dtype), DType.float64))
                if bs is not None:
                    v = E.add(v, E.cast(E.typed(bs.load(b, [r, c]), bs.dtype), DType.float64))
                ys.store(b, [r, c], E.cast(v, y.dtype))
            for view, stat in zip(rest, (mean, inv)):
                View(view.ptr, view.dtype, (outer,), (1,), view.offset).store(b, [r], E.cast(stat, view.dtype))

    threads = min(num_threads(), outer) if outer * inner >= NORM_SPLIT else 1
    parallel_rows(ctx, outer, threads, [v.ptr for v in views], block)


NORM_SPLIT = 1 << 13  # elements from which a normalization's rows split over the pool


@kernel("ArgMax", "ArgMin")
def arg_extreme(ctx: KernelContext) -> None:
    """The index of the first (or, with select_last_index, last) extreme along one axis."""
    node = ctx.node
    x, y = ctx.inputs[0], ctx.outputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    outer, length, inner = math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])
    xv = View(x.ptr, x.dtype, (outer, length, inner), (length * inner, inner, 1))
    yv = View(y.ptr, y.dtype, (outer, inner), (inner, 1))
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    best_ptr, index_ptr = entry_alloca(b, _t(x)), entry_alloca(b, ir.IntType(64))
    better = E.gt if node.op.name == "ArgMax" else E.lt
    last = node.attrs["select_last_index"]
    with loop_nest(b, (outer, inner), name="o") as (o, i):
        b.store(xv.load(b, [o, const_i64(0), i]), best_ptr)
        b.store(const_i64(0), index_ptr)
        with for_range(b, length, start=1, name="a") as a:
            v = E.typed(xv.load(b, [o, a, i]), x.dtype)
            best = E.typed(b.load(best_ptr, typ=_t(x)), x.dtype)
            wins = better(v, best)
            if last:
                wins = E.logical_or(wins, E.eq(v, best))
            b.store(b.select(wins, v, best), best_ptr)
            b.store(b.select(wins, a, b.load(index_ptr, typ=ir.IntType(64))), index_ptr)
        yv.store(b, [o, i], b.load(index_ptr, typ=ir.IntType(64)))


def _lines(x: View, axis: int):
    """The index lists of the lines along ``axis`` (the other axes' loop nest)."""
    return [d for k, d in enumerate(x.shape) if k != axis]


@kernel("LpNormalization")
def lp_normalization(ctx: KernelContext) -> None:
    """Each line along ``axis`` divided by its L1 or L2 norm (lines of norm 0 are left as 0)."""
    _require_float(ctx)
    x, y = ctx.inputs[0], ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(x.shape)
    p = ctx.node.attrs["p"]
    if p not in (1, 2):
        raise KilnError(f"node {ctx.node.name!r}: LpNormalization with p={p} has no LLVM kernel")
    b = ctx.b
    E = LLVMScalarOps(b, ctx.module)
    ty = _t(y)
    total = entry_alloca(b, ty)
    with loop_nest(b, _lines(x, axis), name="line") as index:
        b.store(ir.Constant(ty, 0.0), total)
        with for_range(b, x.shape[axis], name="s") as k:
            v = E.typed(x.load(b, [*index[:axis], k, *index[axis:]]), x.dtype)
            b.store(E.add(E.typed(b.load(total, typ=ty), y.dtype), E.abs(v) if p == 1 else E.mul(v, v)), total)
        norm = E.typed(b.load(total, typ=ty), y.dtype)
        if p == 2:
            norm = E.call("sqrt", norm)
        norm = b.select(b.fcmp_ordered("==", norm, ir.Constant(ty, 0.0)), ir.Constant(ty, 1.0), norm)
        with for_range(b, x.shape[axis], name="d") as k:
            where = [*index[:axis], k, *index[axis:]]
            y.store(b, where, b.fdiv(x.load(b, where), norm))


@kernel("Hardmax")
def hardmax(ctx: KernelContext) -> None:
    """1 at the first maximum of each line along ``axis``, 0 elsewhere."""
    _require_float(ctx)
    x, y = ctx.inputs[0], ctx.outputs[0]
    axis = ctx.node.attrs["axis"] % len(x.shape)
    b = ctx.b
    ty = _t(y)
    best, best_at = entry_alloca(b, ty), entry_alloca(b, ir.IntType(64))
    with loop_nest(b, _lines(x, axis), name="line") as index:
        b.store(ir.Constant(ty, float("-inf")), best)
        b.store(const_i64(0), best_at)
        with for_range(b, x.shape[axis], name="s") as k:
            v = x.load(b, [*index[:axis], k, *index[axis:]])
            better = b.fcmp_ordered(">", v, b.load(best, typ=ty))
            b.store(b.select(better, v, b.load(best, typ=ty)), best)
            b.store(b.select(better, k, b.load(best_at, typ=ir.IntType(64))), best_at)
        with for_range(b, x.shape[axis], name="w") as k:
            hit = b.icmp_signed("==", k, b.load(best_at, typ=ir.IntType(64)))
            y.store(b, [*index[:axis], k, *index[axis:]], b.select(hit, ir.Constant(ty, 1.0), ir.Constant(ty, 0.0)))
