"""ConvInteger and MatMulInteger on AVX-512 VNNI: a channels-last conv, or a product by a
(K, N) matrix taken as a 1x1 conv over its rows, of 8-bit activations by int8 weights, summed
exactly in int32 (``vpdpbusd``: four byte products per 32-bit lane per instruction, four times
a float FMA's work).

The structure is the float direct conv's (``kernels_conv``): a micro-tile of ``mr`` positions
along an output row by 32 output channels keeps its sums in two vectors per position over all
of K; A comes straight from the image, four channels (one 32-bit broadcast) at a time, and B
from the weights packed at compile time as byte quads (``PanelSpec.quads``: each 32-bit lane
holds four consecutive K rows of one column). A tap's channels are padded to a multiple of
four with zero weights; the image is copied into scratch with its border filled with the zero
point (ConvInteger's padding) wherever it has pads or such channel padding, else read in
place. vpdpbusd multiplies unsigned bytes by signed ones, so int8 activations are copied with
each byte's top bit flipped (x + 128), their zero point moved by 128 with them. The zero point
itself comes off as a constant per column block:
``sum (x - z) w = sum x w - z sum w``, each column's ``sum w`` packed after its panel at
compile time (``PanelSpec.sums``; taking it over the quads every block cost an LSTM step's
16x256x1024 product 10.2 -> 9.0 us).

Each output row's sums go either to the int32 output or, in a fused group, through the
group's pointwise tail (the scale, bias and next QuantizeLinear the ``integer_products`` pass
leaves) to the group's output: on each vector of sums as it leaves the registers where every
op of the tail has a vector rule (``Epilogue.on_vector``: LSTM int8 1.42 -> 1.37 ms,
MobileNetV2-int8 2.00 -> 1.95), else from a row buffer in the thread's scratch while it is in L1.
"""

from __future__ import annotations

import dataclasses
import math

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext, PanelSpec, kernel
from kiln.backends.llvm.emit import I8, I32, L1_WAYS, PTR, LLVMVectorOps, broadcast, Panels, View, const_i64, entry_alloca, for_range, rows_per_l1_set
from kiln.backends.llvm.kernels_conv import Geometry, _row_start, _tap_offset, geometry, over_tiles
from kiln.backends.llvm.kernels_nn import PARALLEL_MACS, SHARED_WEIGHTS, _unflatten, micro_rows
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.errors import KilnError
from kiln.ir.dtypes import DType

LANES = 16  # int32 sums per vector
NR = 2 * LANES  # output channels per column block
QUAD = 4  # K bytes one 32-bit lane sums per instruction
I32X16 = ir.VectorType(I32, LANES)
MASK = ir.VectorType(ir.IntType(1), LANES)


def available() -> bool:
    """Whether this machine has AVX-512 VNNI (the integer_products pass runs only where it does)."""
    from kiln.backends.llvm.target import host_cpu

    return {"avx512f", "avx512vnni"} <= host_cpu().feature_set


def applies(node) -> bool:
    """A channels-last, ungrouped ConvInteger, or a MatMulInteger by a (K, N) matrix, of uint8
    by int8 with no weight zero point and a scalar (or no) activation zero point, on a VNNI
    machine."""
    op = node.op.name
    if op == "ConvInteger":
        if node.attrs["layout"] != "NHWC" or (node.attrs["group"] != 1 and not depthwise(node)):
            return False
    elif op != "MatMulInteger" or node.inputs[1].type.rank != 2:
        return False
    x, w = node.inputs[0].type, node.inputs[1].type
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    weight_zero = node.inputs[3] if len(node.inputs) > 3 else None
    return x.dtype in (DType.uint8, DType.int8) and w.dtype == DType.int8 and weight_zero is None and (zero is None or zero.type.numel == 1) and available()


def depthwise(node) -> bool:
    """A 2-D channels-last ConvInteger with one input and one output channel per group."""
    x, w = node.inputs[0].type, node.inputs[1].type
    return node.op.name == "ConvInteger" and x.rank == 4 and node.attrs["group"] == x.shape[-1] == w.shape[-1] and w.shape[2] == 1


def _signed(node) -> bool:
    """int8 activations: the copy of the image adds 128 to each (flips its top bit), making the
    unsigned bytes vpdpbusd multiplies, and the zero point moves by 128 with them."""
    return node.inputs[0].type.dtype == DType.int8


def _quads(c: int) -> int:
    return -(-c // QUAD) * QUAD


ROW_POSITIONS = 64  # a matrix product's rows go in "output rows" of at most this many (a row buffer each)
MIN_THREAD_ROWS = 8  # ... or, split over the pool, one of at least this many per thread (a full micro-tile)


def _original(node) -> Geometry:
    """A conv's geometry; a matrix product's as a 1x1 conv over its rows, taken as a 2-D image
    of rows of at most ROW_POSITIONS positions (the largest such divisor of the row count). A
    product of one such row by weights each core keeps whole (an RNN step's) is one row per
    thread instead, so the pool splits its rows (``emit``'s ``by_rows``)."""
    if node.op.name == "ConvInteger":
        return geometry(node)
    (k, n), rows = node.inputs[1].type.shape, math.prod(node.inputs[0].type.shape[:-1])
    width = max(d for d in range(1, min(rows, ROW_POSITIONS) + 1) if rows % d == 0)
    if width < 8 and rows > ROW_POSITIONS:  # no good divisor: one long row
        width = rows
    if width == rows and _quads(k) * n <= SHARED_WEIGHTS and rows % num_threads() == 0 and rows // num_threads() >= MIN_THREAD_ROWS:
        width = rows // num_threads()
    out = (rows // width, width)
    return Geometry(k, n, (1, 1), (1, 1), (1, 1), out, out, (0, 0), out)


def _geometry(node) -> tuple[Geometry, bool]:
    """The geometry over the image the kernel reads (channels padded to a multiple of four),
    and whether that image is a scratch copy (pads, or channel padding)."""
    g = _original(node)
    return dataclasses.replace(g, c=_quads(g.c)), g.has_pads or g.c % QUAD != 0 or _signed(node)


def _panels(node, i: int) -> PanelSpec | None:
    if i != 1 or not applies(node) or depthwise(node):
        return None
    w = node.inputs[1].type
    return PanelSpec(math.prod(w.shape[:-1]), w.shape[-1], NR, quads=w.shape[-2], sums=True)


def _image_bytes(node) -> int:
    g, copied = _geometry(node)
    return -(-math.prod(g.padded) * g.c // 64) * 64 if copied else 0


def _scratch(node) -> int:
    """The padded image, then one output row of int32 sums per thread (a fused tail's source);
    a depthwise conv's: a pixel of zero points (what taps off the image read), then a whole
    output row per thread."""
    g, _ = _geometry(node)
    if depthwise(node):
        return _zero_row_bytes(node) + num_threads() * g.ow * g.m * 4
    return _image_bytes(node) + num_threads() * g.ow * NR * 4


@kernel("ConvInteger", "MatMulInteger", scratch=_scratch, panels=_panels)
def integer_product(ctx: KernelContext) -> None:
    if not applies(ctx.node):
        raise KilnError(f"node {ctx.node.name!r}: {ctx.node.op.name} has an LLVM kernel only for 8-bit activations by int8 weights without a weight zero point (ConvInteger channels-last), on AVX-512 VNNI (the decompose lowering takes the others)")
    emit(ctx)


def emit(ctx: KernelContext, epilogue=None) -> None:
    """y = ConvInteger(x, w, z) or MatMulInteger(x, w, z) in int32, or with ``epilogue`` (a
    ``kernels_conv.Epilogue``) the group's output from each row of sums."""
    node = ctx.node
    if depthwise(node):
        emit_depthwise(ctx, epilogue)
        return
    g, copied = _geometry(node)
    xv, wv, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    zero = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    if not isinstance(wv, Panels):
        raise KilnError(f"node {node.name!r}: the LLVM kernel of {node.op.name} needs constant weights (packed at compile time)")
    b = ctx.b
    original = _original(node)
    images = xv.shape[0] if node.op.name == "ConvInteger" else 1  # a matrix product's rows are one image
    blocks = -(-g.m // NR)
    image_in, image_out = math.prod(original.size) * original.c, math.prod(g.out) * g.m
    # rows split over the pool where every thread may read all the weights, and each gets two
    # rows or more, or a matrix product its one row (``_original``: its rows then stay in the
    # thread's cache for the pointwise kernels after it: LSTM 2x256 b16 int8, ms: 1.71 -> 1.61)
    by_rows = g.kk * blocks * NR <= SHARED_WEIGHTS and (g.rows >= 2 * num_threads() or node.op.name == "MatMulInteger" and g.rows == num_threads())
    items = g.rows if by_rows else blocks * g.rows
    threads = min(num_threads(), items) if math.prod(g.out) * g.kk * g.m >= PARALLEL_MACS else 1
    operands = epilogue.operands if epilogue else []
    out_ty = ir.IntType(8 * y.dtype.itemsize)
    with for_range(b, images, name="img") as img:
        x_img = b.gep(xv.ptr, [b.add(const_i64(xv.offset), b.mul(img, const_i64(image_in)))], source_etype=I8)
        y_img = b.gep(y.ptr, [b.add(const_i64(y.offset), b.mul(img, const_i64(image_out)))], source_etype=out_ty)
        source = x_img
        if copied:
            _pad_image(ctx, x_img, ctx.scratch, original, g, zero, _signed(node))
            source = ctx.scratch
        rows = b.gep(ctx.scratch, [const_i64(_image_bytes(node))], source_etype=I8)
        starts = [b.gep(v.ptr, [b.add(const_i64(v.offset), b.mul(img, const_i64(math.prod(g.out) * v.strides[0])))], source_etype=ir.IntType(8 * v.dtype.itemsize)) for v in operands]
        pointers = [source, wv.ptr, y_img, zero.ptr if zero is not None else y_img, rows, *starts]

        def work(emitting, ptrs, lo, hi, block):
            eb = emitting.b
            row_buffer = eb.gep(ptrs[4], [const_i64(block * g.ow * NR * 4)], source_etype=I8) if epilogue else None
            here = [View(p, v.dtype, v.shape, v.strides) for v, p in zip(operands, ptrs[5:])]
            zero_point = eb.load(ptrs[3], typ=I8) if zero is not None else None
            if _signed(node):  # the image's bytes moved up by 128: so does the zero point
                zero_point = eb.xor(zero_point if zero_point is not None else ir.Constant(I8, 0), ir.Constant(I8, 0x80))
            tiles = _Tiles(emitting, g, ptrs[0], ptrs[1], ptrs[2], y.dtype, zero_point, row_buffer, epilogue, here)
            if by_rows:  # output rows [lo, hi), every column block
                with for_range(eb, blocks, name="jb") as jb:
                    tiles.segment(jb, const_i64(lo), const_i64(hi))
                return
            (jb0, oy0), (jb1, oy1) = divmod(lo, g.rows), divmod(hi - 1, g.rows)  # block major
            with for_range(eb, jb1 + 1, start=jb0, name="jb") as jb:
                first = eb.select(eb.icmp_unsigned("==", jb, const_i64(jb0)), const_i64(oy0), const_i64(0))
                last = eb.select(eb.icmp_unsigned("==", jb, const_i64(jb1)), const_i64(oy1 + 1), const_i64(g.rows))
                tiles.segment(jb, first, last)

        parallel_rows(ctx, items, threads, pointers, work)


def _pad_image(ctx: KernelContext, x_img: ir.Value, dst: ir.Value, original: Geometry, g: Geometry, zero: View | None, flip: bool) -> None:
    """dst = x's image with ``g.c`` channels (the extra ones any value: their weights are 0)
    inside a border of the zero point, its rows split over the pool; ``flip``: every byte
    (the border's too) with its top bit flipped, int8 made uint8 plus 128."""
    rows_total = math.prod(g.padded[:-1])
    row_len = g.padded[-1] * g.c

    def rows(emitting, ptrs, lo, hi, _):
        b = emitting.b
        top = ir.Constant(I8, 0x80 if flip else 0)
        fill = b.xor(b.load(ptrs[2], typ=I8) if zero is not None else ir.Constant(I8, 0), top)
        with for_range(b, const_i64(hi), start=const_i64(lo), name="prow") as r:
            out_row = b.gep(ptrs[1], [b.mul(r, const_i64(row_len))], source_etype=I8)
            with for_range(b, row_len, name="pz") as j:
                b.store(fill, b.gep(out_row, [j], source_etype=I8))
            inside, source_row = ir.Constant(ir.IntType(1), 1), const_i64(0)
            for axis, coord in enumerate(_unflatten(b, r, g.padded[:-1])):
                at = b.sub(coord, const_i64(g.before[axis]))
                inside = b.and_(inside, b.and_(b.icmp_signed(">=", at, const_i64(0)), b.icmp_signed("<", at, const_i64(g.size[axis]))))
                source_row = b.add(b.mul(source_row, const_i64(g.size[axis])), at)
            with b.if_then(inside):
                src_row = b.gep(ptrs[0], [b.mul(source_row, const_i64(g.size[-1] * original.c))], source_etype=I8)
                dst_row = b.gep(out_row, [const_i64(g.before[-1] * g.c)], source_etype=I8)
                if original.c == g.c:  # one contiguous run
                    with for_range(b, g.size[-1] * g.c, name="pc") as j:
                        b.store(b.xor(b.load(b.gep(src_row, [j], source_etype=I8), typ=I8), top), b.gep(dst_row, [j], source_etype=I8))
                else:
                    with for_range(b, g.size[-1], name="px") as px:
                        with for_range(b, original.c, name="pc") as ch:
                            value = b.xor(b.load(b.gep(src_row, [b.add(b.mul(px, const_i64(original.c)), ch)], source_etype=I8), typ=I8), top)
                            b.store(value, b.gep(dst_row, [b.add(b.mul(px, const_i64(g.c)), ch)], source_etype=I8))

    threads = min(num_threads(), rows_total) if rows_total * row_len >= 1 << 17 else 1
    parallel_rows(ctx, rows_total, threads, [x_img, dst, zero.ptr if zero is not None else dst], rows)


class _Tiles:
    """The micro-tiles of one block of the pool's split: (column block, output rows) segments."""

    def __init__(self, emitting, g: Geometry, source: ir.Value, panels: ir.Value, out: ir.Value, out_dtype: DType, zero_point, row_buffer, epilogue, operands: list[View]):
        self.b, self.module, self.g = emitting.b, emitting.module, g
        self.source, self.panels, self.out, self.out_dtype = source, panels, out, out_dtype
        self.zero_point, self.row_buffer, self.epilogue, self.operands = zero_point, row_buffer, epilogue, operands
        self.in_registers = epilogue is not None and epilogue.in_registers(out_dtype, operands)  # the tail on each vector of sums
        self.mr = micro_rows(g.ow)
        # the tail runs after each output row, or after each micro-tile where a row's outputs
        # would crowd one L1 set (rows 4 KB apart, as a 1024-column float product's: 512 x 64
        # x 1024 with its Cast, 0.86 -> 0.11 ms; MobileNetV2's convs keep whole rows: 2.17 ms
        # against 2.23 by tiles)
        self.tail_by_tiles = rows_per_l1_set(g.ow, g.m * out_dtype.itemsize) > L1_WAYS // 2
        self.quads = g.run // QUAD  # per tap
        self.taps = math.prod(g.tap_shape)
        self.panel_bytes = (self.taps * self.quads + 1) * NR * QUAD  # the quads, then the column sums
        self.dot = self.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", (), ir.FunctionType(I32X16, [I32X16] * 3))
        self.store_masked = self.module.declare_intrinsic("llvm.masked.store.v16i32.p0", (), ir.FunctionType(ir.VoidType(), [I32X16, PTR, I32, MASK]))

    def segment(self, jb: ir.Value, oy0: ir.Value, oy1: ir.Value) -> None:
        """Output rows [oy0, oy1) of column block ``jb`` (the last block may be partial)."""
        b, g = self.b, self.g
        full, blocks = g.m // NR, -(-g.m // NR)
        if full == blocks or full == 0:
            self._rows(jb, oy0, oy1, min(NR, g.m))
            return
        with b.if_else(b.icmp_unsigned("<", jb, const_i64(full))) as (whole, last):
            with whole:
                self._rows(jb, oy0, oy1, NR)
            with last:
                self._rows(jb, oy0, oy1, g.m - full * NR)

    def _starts(self, panel: ir.Value) -> list[ir.Value]:
        """Each sum's start: ``-z * (the column's weight sum)`` (the sums packed after the
        panel's quads), or 0 without a zero point."""
        b = self.b
        zero = ir.Constant(I32X16, [0] * LANES)
        if self.zero_point is None:
            return [zero, zero]
        zs = broadcast(b, b.zext(self.zero_point, I32), LANES)
        at = b.gep(panel, [const_i64(self.taps * self.quads * NR * QUAD)], source_etype=I8)
        sums = [b.load(b.gep(at, [const_i64(h * LANES * QUAD)], source_etype=I8), typ=I32X16, align=64) for h in range(2)]
        return [b.sub(zero, b.mul(zs, s)) for s in sums]

    def _rows(self, jb: ir.Value, oy0: ir.Value, oy1: ir.Value, cols: int) -> None:
        b, g = self.b, self.g
        masks = [self._mask(min(LANES, cols - h * LANES)) for h in range(2)]
        panel = b.gep(self.panels, [b.mul(jb, const_i64(self.panel_bytes))], source_etype=I8)
        starts = self._starts(panel)
        j0 = b.mul(jb, const_i64(NR))
        with for_range(b, oy1, start=oy0, name="oy") as oy:
            in_row = _row_start(b, g, _unflatten(b, oy, g.out[:-1]))
            if self.row_buffer is not None:  # sums to the thread's row buffer, (ow, NR)
                target, pitch = self.row_buffer, NR
            else:  # sums straight to the int32 output's row
                target = b.gep(self.out, [b.add(b.mul(oy, const_i64(g.ow * g.m)), j0)], source_etype=I32)
                pitch = g.m

            def tile(ox0: ir.Value, rows: int) -> None:
                first = b.add(in_row, b.mul(ox0, const_i64(g.strides[-1] * g.c)))
                place = (b.add(b.mul(oy, const_i64(g.ow)), ox0), j0) if self.in_registers else None
                self._tile(first, rows, panel, starts, b.gep(target, [b.mul(ox0, const_i64(pitch))], source_etype=I32), pitch, masks, place)
                if self.row_buffer is not None and self.tail_by_tiles and not self.in_registers:
                    self._tail(oy, j0, cols, ox0, rows)

            over_tiles(b, g.ow, self.mr, tile)
            if self.row_buffer is not None and not self.tail_by_tiles and not self.in_registers:
                self._tail(oy, j0, cols, const_i64(0), g.ow)

    def _mask(self, count: int) -> ir.Constant | None:
        return None if count >= LANES else ir.Constant(MASK, [1] * max(count, 0) + [0] * (LANES - max(count, 0)))

    def _tile(self, first: ir.Value, rows: int, panel: ir.Value, starts: list, out: ir.Value, pitch: int, masks: list, place: tuple | None = None) -> None:
        """``rows`` positions from image element ``first``: every tap's quads into the sums,
        then the sums stored ``pitch`` int32s apart from ``out``, or, given ``place`` (the tile's
        first output position and column), the fused tail applied to them in registers and
        its values stored to the group's output."""
        b, g = self.b, self.g
        accs = [[entry_alloca(b, I32X16) for _ in range(2)] for _ in range(rows)]
        for row in accs:
            for h, slot in enumerate(row):
                b.store(starts[h], slot)
        step = g.strides[-1] * g.c
        with for_range(b, self.taps, name="tap") as tap:
            window = b.add(first, _tap_offset(b, g, _unflatten(b, tap, g.tap_shape)))
            with for_range(b, self.quads, name="q") as q:
                at = b.gep(panel, [b.mul(b.add(b.mul(tap, const_i64(self.quads)), q), const_i64(NR * QUAD))], source_etype=I8)
                weights = [b.load(b.gep(at, [const_i64(h * LANES * QUAD)], source_etype=I8), typ=I32X16, align=64) for h in range(2)]
                a_at = b.gep(self.source, [b.add(window, b.mul(q, const_i64(QUAD)))], source_etype=I8)
                for r in range(rows):
                    a = broadcast(b, b.load(b.gep(a_at, [const_i64(r * step)], source_etype=I8), typ=I32, align=1), LANES)
                    for h in range(2):
                        b.store(b.call(self.dot, [b.load(accs[r][h], typ=I32X16), a, weights[h]]), accs[r][h])
        for r in range(rows):
            for h, mask in enumerate(masks):
                if mask is not None and not any(mask.constant):
                    continue
                value = b.load(accs[r][h], typ=I32X16)
                if place is not None:
                    self._tail_in_registers(b.add(place[0], const_i64(r)), b.add(place[1], const_i64(h * LANES)), value, mask)
                    continue
                where = b.gep(out, [const_i64(r * pitch + h * LANES)], source_etype=I32)
                if mask is None:
                    b.store(value, where, align=4)
                else:
                    b.call(self.store_masked, [value, where, ir.Constant(I32, 4), mask])

    def _tail_in_registers(self, position: ir.Value, column: ir.Value, sums: ir.Value, mask) -> None:
        """The fused tail on one vector of sums (output ``position``, columns from ``column``),
        stored to the group's output."""
        value = self.epilogue.on_vector(self.b, self.module, sums, DType.int32, self.operands, position, column, mask)
        out = View(self.out, self.out_dtype, (math.prod(self.g.out), self.g.m), (self.g.m, 1))
        LLVMVectorOps(self.b, self.module, LANES).store(value, out.address(self.b, [position, column]), mask)

    def _tail(self, oy: ir.Value, j0: ir.Value, cols: int, ox0: ir.Value, count: int) -> None:
        """The fused tail over positions [ox0, ox0 + count) of this output row's columns
        [j0, j0 + cols), from the row buffer."""
        b, g = self.b, self.g
        first_row = b.add(b.mul(oy, const_i64(g.ow)), ox0)

        def block(view: View) -> View:
            at = b.add(const_i64(view.offset), b.add(b.mul(first_row, const_i64(view.strides[0])), b.mul(j0, const_i64(view.strides[1]))))
            return View(b.gep(view.ptr, [at], source_etype=ir.IntType(8 * view.dtype.itemsize)), view.dtype, (count, cols), view.strides)

        out = block(View(self.out, self.out_dtype, (math.prod(g.out), g.m), (g.m, 1)))
        sums = View(b.gep(self.row_buffer, [b.mul(ox0, const_i64(NR * 4))], source_etype=I8), DType.int32, (count, cols), (NR, 1))
        self.epilogue.run(b, self.module, out, [block(v) for v in self.operands], source=sums)


# -- depthwise: one channel per group, vectors along the channels -------------------------------
F32X16 = ir.VectorType(ir.FloatType(), LANES)
I8X16 = ir.VectorType(I8, LANES)


def _zero_row_bytes(node) -> int:
    """An input row of zero points: what a window row above or below the image reads."""
    x = node.inputs[0].type
    return -(-x.shape[2] * x.shape[3] // 64) * 64


def emit_depthwise(ctx: KernelContext, epilogue=None) -> None:
    """y[img, oy, ox, c] = sum over taps of (x - z) * w[ky, kx, 0, c], 16 channels a vector:
    the bytes widened to float, whose multiply-adds are exact here (every partial sum of at
    most 513 byte products is an integer below 2^24), and the zero point's share
    ``z * sum w`` taken off once per channel block. A tap off the image reads a row of zero
    points, so it adds nothing: a window row above or below the image reads that row instead
    (chosen once per output row), and only the positions whose windows leave the row at its
    ends (decided when the code is built) pick each tap's column. Each (image, output row) is
    one item of the pool's split; its sums go to the int32 output or, fused, to the thread's
    row buffer, then the tail."""
    from kiln.backends.llvm.kernels_depthwise import _inside

    node = ctx.node
    g = geometry(node)
    (sh, sw), (dh, dw), (oh, ow) = g.strides, g.dilations, g.out
    kh, kw = g.kernel
    height, width = g.size
    top, left = g.before
    c = g.c
    xv, wv, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    zero = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    signed = _signed(node)
    operands = epilogue.operands if epilogue is not None else []
    b = ctx.b
    outside = ctx.scratch  # an input row of zero points
    fill = b.load(zero.ptr, typ=I8) if zero is not None else ir.Constant(I8, 0)
    with for_range(b, width * c, name="zfill") as i:
        b.store(fill, b.gep(outside, [i], source_etype=I8))
    inside = [0 <= ox * sw + kx * dw - left < width for ox in range(ow) for kx in range(kw)]
    first_in, last_in = _inside([all(inside[ox * kw : (ox + 1) * kw]) for ox in range(ow)])
    items = xv.shape[0] * oh
    views = [xv, wv, y, *operands]

    def rows(emitting, ptrs, lo, hi, block):
        eb = emitting.b
        x_ptr, w_ptr, y_ptr, *rest = ptrs[: len(views)]
        outside_ptr = ptrs[len(views)]
        here = [View(p, v.dtype, v.shape, v.strides) for v, p in zip(operands, rest)]
        row_buffer = eb.gep(outside_ptr, [const_i64(_zero_row_bytes(node) + block * ow * c * 4)], source_etype=I8) if epilogue is not None else None
        z = eb.load(outside_ptr, typ=I8)
        z_float = eb.sitofp(z, ir.FloatType()) if signed else eb.uitofp(z, ir.FloatType())

        def widen(address: ir.Value, count: int, is_signed: bool) -> ir.Value:
            """``count`` bytes from ``address`` as floats (the lanes past count: 0)."""
            if count == LANES:
                raw = eb.load(address, typ=I8X16, align=1)
            else:
                raw = ir.Constant(I8X16, [0] * LANES)
                for lane in range(count):
                    raw = eb.insert_element(raw, eb.load(eb.gep(address, [const_i64(lane)], source_etype=I8), typ=I8), ir.Constant(I32, lane))
            return eb.sitofp(raw, F32X16) if is_signed else eb.uitofp(raw, F32X16)

        with for_range(eb, hi, start=lo, name="item") as item:
            img, oy = eb.udiv(item, const_i64(oh)), eb.urem(item, const_i64(oh))
            image = eb.gep(x_ptr, [eb.mul(img, const_i64(height * width * c))], source_etype=I8)
            sums = row_buffer if row_buffer is not None else eb.gep(y_ptr, [eb.mul(item, const_i64(ow * c))], source_etype=I32)
            window_rows = []  # each kernel row's input row, or the row of zero points
            for ky in range(kh):
                iy = eb.sub(eb.add(eb.mul(oy, const_i64(sh)), const_i64(ky * dh)), const_i64(top))
                valid = eb.and_(eb.icmp_signed(">=", iy, const_i64(0)), eb.icmp_signed("<", iy, const_i64(height)))
                window_rows.append(eb.select(valid, eb.gep(image, [eb.mul(iy, const_i64(width * c))], source_etype=I8), outside_ptr))

            def block_of(c0: ir.Value, count: int) -> None:
                weights = [widen(eb.gep(w_ptr, [eb.add(const_i64(t * c), c0)], source_etype=I8), count, True) for t in range(kh * kw)]
                total = weights[0]
                for wt in weights[1:]:
                    total = eb.fadd(total, wt)
                start = eb.fmul(eb.fneg(total), broadcast(eb, z_float, LANES))  # -z * sum w

                def position(ox: ir.Value, columns: list[bool] | None) -> None:
                    """Output position ``ox``; ``columns``: which kernel columns read the image
                    (a border position's), None for all (an interior one)."""
                    acc = start
                    for ky in range(kh):
                        for kx in range(kw):
                            if columns is None or columns[kx]:
                                ix = eb.sub(eb.add(eb.mul(ox, const_i64(sw)), const_i64(kx * dw)), const_i64(left))
                                address = eb.gep(window_rows[ky], [eb.add(eb.mul(ix, const_i64(c)), c0)], source_etype=I8)
                            else:
                                address = eb.gep(outside_ptr, [c0], source_etype=I8)
                            acc = eb.call(_fma(emitting.module), [widen(address, count, signed), weights[ky * kw + kx], acc])
                    out = eb.fptosi(acc, I32X16)
                    at = eb.gep(sums, [eb.add(eb.mul(ox, const_i64(c)), c0)], source_etype=I32)
                    if count == LANES:
                        eb.store(out, at, align=4)
                    else:
                        for lane in range(count):
                            eb.store(eb.extract_element(out, ir.Constant(I32, lane)), eb.gep(at, [const_i64(lane)], source_etype=I32))

                for ox in [*range(first_in), *range(last_in, ow)]:
                    position(const_i64(ox), inside[ox * kw : (ox + 1) * kw])
                if last_in > first_in:
                    with for_range(eb, last_in, start=first_in, name="ox") as ox:
                        position(ox, None)

            if c // LANES:  # whole blocks in a loop (a 960-channel layer unrolled made a 12 s compile)
                with for_range(eb, c // LANES, name="cb") as cb:
                    block_of(eb.mul(cb, const_i64(LANES)), LANES)
            if c % LANES:
                block_of(const_i64(c - c % LANES), c % LANES)
            if epilogue is not None:
                first = eb.mul(item, const_i64(ow))

                def block(view: View) -> View:
                    at = eb.add(const_i64(view.offset), eb.mul(first, const_i64(view.strides[0])))
                    return View(eb.gep(view.ptr, [at], source_etype=ir.IntType(8 * view.dtype.itemsize)), view.dtype, (ow, c), view.strides)

                out = block(View(y_ptr, y.dtype, (items * ow, c), (c, 1)))
                epilogue.run(eb, emitting.module, out, [block(v) for v in here], source=View(row_buffer, DType.int32, (ow, c), (c, 1)))

    threads = min(num_threads(), items) if items * ow * c * kh * kw >= PARALLEL_MACS // 4 else 1
    parallel_rows(ctx, items, threads, [v.ptr for v in views] + [outside], rows)




def _fma(module: ir.Module) -> ir.Function:
    return module.declare_intrinsic("llvm.fma.v16f32", (), ir.FunctionType(F32X16, [F32X16] * 3))
