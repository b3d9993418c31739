"""Direct NHWC convolution: the GEMM micro-kernel reading its A operand straight from the
input image, with no im2col matrix.

In channels-last layout the K index of a 2-D conv, (tap row, tap column, channel), walks
memory: the window of output position (oy, ox) under tap row ky starts at input pixel
(oy * sh + ky * dh, ox * sw) and, with unit width dilation, its kw * C elements are
contiguous. Consecutive output positions along a row start ``sw * C`` elements apart. So a
micro-tile of ``mr`` positions along one output row by two vectors of output channels reads
A as ``mr`` broadcasts at a fixed stride, and B (the packed weights) as the GEMM does; the
accumulators stay in registers over all of K. Borders: the image is first copied into a
zero-padded scratch image (one pass over the input, against im2col's kh * kw passes and a
column matrix that leaves the caches). A tile skips the taps whose windows lie wholly in the
border (``_live_taps``): a dilated conv over a small map reads mostly border.

K goes in parts whose weight rows fit L1 (whole tap rows, or pieces of KC), each part's
slice reused by every row of the thread's share. Threads split the output rows where the
weights are small (each reads them all and its part of the image), else (column block,
output row) items, block major (each streams its share of the weights: layer 4 of a ResNet
has 9.4 MB of them, which come from memory every run, so each K step prefetches its row of
the next part). The bias starts the accumulators; a fused pointwise tail (Relu, a residual
Add) runs over each block of output while it is in cache. A fused 1x1 conv (a GEMM over the
positions) gets its tail the same way (``emit_pointwise_conv``).

A grouped conv (not depthwise: ``kernels_depthwise``) is the same kernel with each column
block inside one group: its K is the taps by the group's C/g channels (a tap is then one
kernel position, its C/g elements contiguous from the group's first channel of the pixel),
its weights panels one or two vectors wide where the group's outputs are a multiple of that,
else unpacked rows read with masked vectors. ResNeXt-50 (32 groups) converts to channels-last
whole and loses the 33 transposes around its grouped convs: 34.0 -> 31.3 ms a run;
RegNetY-400MF 5.8 -> 4.2.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext
from kiln.backends.llvm.emit import I32, PTR, VECTOR_RULE_OPS, LLVMVectorOps, Panels, Vectors, View, const_i64, entry_alloca, for_range, llvm_type
from kiln.backends.llvm.kernels_nn import SHARED_WEIGHTS, _unflatten
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.ir.dtypes import DType
from kiln.ir.opdef import OpKind

WHOLE_K_ROWS = 10  # tiles this tall sum all of K in registers (one thread, 3x3 convs, ms:
# 256 channels at 56x56 25.3 -> 17.5, 64 at 224x224 22.9 -> 19.6; 7-tall tiles at 7x7 lost)
PARALLEL_PAD = 1 << 15  # padded-image elements below which one thread copies
BAND_BYTES = 1 << 18  # the padded rows a row-split conv copies at a time (in L2 with its output)


@dataclass(frozen=True)
class Geometry:
    """An NHWC conv's sizes (any number of spatial axes), the input as its zero-padded copy.
    An output "row" is a position of every spatial axis but the last; a "tap" is a kernel
    position of every axis but the last where width dilation is 1 (its window row is then
    ``kw * C`` contiguous elements), else of every axis (``C`` elements)."""

    c: int
    m: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    out: tuple[int, ...]
    size: tuple[int, ...]  # the input's spatial sizes
    before: tuple[int, ...]  # pads before each spatial axis
    padded: tuple[int, ...]
    groups: int = 1

    @property
    def cg(self) -> int:
        """Input channels a group's outputs read."""
        return self.c // self.groups

    @property
    def mg(self) -> int:
        """Output channels of a group."""
        return self.m // self.groups

    @property
    def kk(self) -> int:
        """K of one group's product: (*kernel, channels of the group)."""
        return math.prod(self.kernel) * self.cg

    @property
    def ow(self) -> int:
        return self.out[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.out[:-1])

    @property
    def whole_rows(self) -> bool:
        """Whether a tap spans a window row: its kw pixels' channels are all in K and contiguous."""
        return self.dilations[-1] == 1 and self.groups == 1

    @property
    def run(self) -> int:
        """K elements contiguous in the padded image under one tap."""
        return self.kernel[-1] * self.c if self.whole_rows else self.cg

    @property
    def tap_shape(self) -> tuple[int, ...]:
        return self.kernel[:-1] if self.whole_rows else self.kernel

    def pitch(self, axis: int) -> int:
        """Elements between neighbours along spatial ``axis`` of the padded image."""
        return math.prod(self.padded[axis + 1 :]) * self.c

    @property
    def has_pads(self) -> bool:
        return self.padded != self.size


@dataclass
class Epilogue:
    """Pointwise work on a block of conv output while it is in cache: ``apply(E, value,
    operands)`` gives the element's final value from the conv's (bias included) and the
    operands', each operand a view over the output's (images * positions, channels) rows.
    ``vectors``: every op of the chain has a rule ``LLVMVectorOps`` emits (``VECTOR_RULE_OPS``),
    so a kernel may apply it to whole vectors of sums in registers."""

    operands: list[View]
    apply: Callable
    vectors: bool = False

    def in_registers(self, out_dtype: DType, operands: list[View]) -> bool:
        """Whether a kernel may apply the tail to its vectors of sums as they leave the
        registers (``on_vector``): every op has a vector rule, and each operand runs along the
        channels or is one value a position (bytes for bools: those keep the loop, which widens
        them)."""
        return self.vectors and out_dtype is not DType.bool and all(v.strides[1] in (0, 1) and v.dtype is not DType.bool for v in operands)

    def on_vector(self, b: ir.IRBuilder, module: ir.Module, value: ir.Value, dtype: DType, operands: list[View], position: ir.Value, column: ir.Value, mask) -> ir.Value:
        """The tail's values for one vector of the conv's (``dtype``) at output ``position``,
        channels from ``column`` (lanes off ``mask`` unread), each operand's vector, or its one
        value for the position, loaded beside it."""
        E = LLVMVectorOps(b, module, value.type.count)
        xs = []
        for view in operands:
            address = view.address(b, [position, column])
            xs.append(E.load(address, view.dtype, mask) if view.strides[1] == 1 else E.splat(b.load(address, typ=llvm_type(view.dtype)), view.dtype))
        return self.apply(E, E.typed(value, dtype), xs)

    def run(self, b: ir.IRBuilder, module: ir.Module, target: View, operands: list[View], source: View | None = None) -> None:
        """The tail over the output block ``target``, from the conv's values in ``source`` (by
        default ``target`` itself: in place), ``operands`` over the same block (one thread's
        loop: the caller already runs as one block of a split kernel)."""
        from kiln.backends.llvm.kernels_elementwise import emit_pointwise_outputs

        inputs = [source if source is not None else target, *operands]
        emit_pointwise_outputs(b, module, [target], inputs, lambda E, xs: [self.apply(E, xs[0], xs[1:])], parallel=False)


def fused_conv(ctx: KernelContext, body) -> bool:
    """A Fused group of an NHWC Conv (or a depthwise one, NCHW too; or an integer one) and the
    pointwise ops after it (Relu, a residual Add, a requantization...) as one kernel: the chain
    runs on each block of conv output while it is in cache, instead of as passes over the whole
    output. Returns False (nothing emitted) where the conv cannot (``_takes_tail``) or an
    operand is not laid out by rows."""
    from kiln.backends.llvm import kernels_depthwise, kernels_integer

    conv, *chain = body.nodes
    if conv.op.name not in ("Conv", "ConvInteger", "MatMulInteger") or not chain:
        return False
    integer = kernels_integer.applies(conv)  # sums to a row buffer: the tail may change the dtype
    if conv.op.name != "Conv" and not integer:
        return False
    depthwise = not integer and kernels_depthwise.applies(conv)  # NCHW: the tail runs on each output plane
    depthwise_nhwc = not integer and kernels_depthwise.applies_nhwc(conv)
    if not integer and not depthwise and not depthwise_nhwc and (conv.attrs.get("layout") != "NHWC" or not _takes_tail(conv)):
        return False
    shape = conv.outputs[0].type.shape
    pointwise = all(n.op.kind is OpKind.ELEMENTWISE and n.op.compute is not None and len(n.outputs) == 1 and n.outputs[0].type.shape == shape for n in chain)
    if not pointwise or len(body.outputs) != 1 or body.outputs[0] is not chain[-1].outputs[0]:
        return False
    if not integer and not depthwise_nhwc and body.outputs[0].type.dtype != conv.outputs[0].type.dtype:  # the tail rewrites the conv's output in place
        return False
    outer = {v: view for v, view in zip(body.inputs, ctx.inputs)}
    operands = list(dict.fromkeys(v for n in chain for v in n.inputs if v is not None and v in outer))
    rows = [outer[v].broadcast_to(shape) if depthwise else _by_rows(outer[v].broadcast_to(shape)) for v in operands]
    if any(r is None for r in rows):
        return False

    def apply(E, value, xs):
        from kiln.backends.llvm.kernels_elementwise import compute_nodes

        env = compute_nodes(E, chain, {id(conv.outputs[0]): value, **{id(v): x for v, x in zip(operands, xs)}})
        return env[id(chain[-1].outputs[0])]

    conv_ctx = KernelContext(ctx.b, ctx.module, conv, [outer[v] if v is not None else None for v in conv.inputs], ctx.outputs, ctx.scratch, ctx.codegen)
    if integer:
        kernel = kernels_integer.emit
    else:
        kernel = kernels_depthwise.emit if depthwise else kernels_depthwise.emit_nhwc if depthwise_nhwc else emit if applies(conv) else emit_pointwise_conv
    kernel(conv_ctx, Epilogue(rows, apply, all(n.op.name in VECTOR_RULE_OPS for n in chain)))
    return True


def _takes_tail(conv) -> bool:
    """Whether a fused conv can apply its pointwise tail block by block: a direct conv, or a
    float 1x1 conv with unit strides and no pads (a GEMM over the positions)."""
    from kiln.backends.llvm.kernels_nn import _nhwc_direct

    return applies(conv) or (conv.inputs[0].type.dtype in (DType.float32, DType.float64) and _nhwc_direct(conv))


CHUNK_BYTES = 1 << 16  # output rows a 1x1 conv's thread finishes (GEMM, then tail) while they are in L2
WEIGHT_PASSES = 4  # ... or more rows: at most a quarter of the weights' size each, since every chunk
# reads all the weights again (1 thread, ms: 1024->256 channels at 14x14 0.585 -> 0.483,
# 2048->512 at 7x7 0.70 -> 0.54; onnxruntime 0.456 and 0.508)


def emit_pointwise_conv(ctx: KernelContext, epilogue: Epilogue | None = None) -> None:
    """A 1x1 conv (unit strides, no pads) and its tail: y[N*P, M] = x[N*P, C] @ w[C, M] (+ bias),
    split over the pool as a GEMM of those sizes splits (``gemm_split``): by positions (each
    thread a chunk of rows at a time: the GEMM, then the tail while the rows are in cache) or
    by columns (the GEMM on the thread's columns, then the tail on them)."""
    from kiln.backends.llvm.kernels_nn import Start, _serial_gemm, gemm_split, micro_rows, row_split, vector_width

    xv, wv, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    c, m = xv.shape[-1], y.shape[-1]
    rows = math.prod(y.shape[:-1])
    a = View(xv.ptr, xv.dtype, (rows, c), (c, 1), xv.offset)
    w = wv if isinstance(wv, Panels) else View(wv.ptr, wv.dtype, (c, m), (m, 1), wv.offset)
    out = View(y.ptr, y.dtype, (rows, m), (m, 1), y.offset)
    start = View(bias.ptr, bias.dtype, (rows, m), (0, 1), bias.offset) if bias is not None else None
    split = gemm_split(rows, c, m, y.dtype, isinstance(w, Panels), micro_rows(rows))
    by_rows = split != "columns"
    if split == "rows":
        threads, mr, align = row_split(rows)
    else:
        nr = 2 * vector_width(y.dtype)
        threads, mr, align = (1, micro_rows(rows), 1) if split == "serial" else (min(num_threads(), max(1, m // nr)), micro_rows(rows), nr)
    count = rows if by_rows else m
    operands = epilogue.operands if epilogue is not None else []
    views = [a, w, out, *([start] if start is not None else []), *operands]

    def part(emitting, ptrs, lo, hi, _):
        b = emitting.b
        a_, w_, out_, *rest = [v.on(p) for v, p in zip(views, ptrs)]
        start_ = Start(rest.pop(0), 1.0) if start is not None else None
        if not by_rows:  # columns [lo, hi) of every row
            cut = [v.columns(lo, hi) for v in rest]
            _serial_gemm(emitting, a_, w_.columns(lo, hi), out_.columns(lo, hi), 1.0, mr, start_.part(start_.view.columns(lo, hi)) if start_ else None)
            if epilogue is not None:
                epilogue.run(b, emitting.module, out_.columns(lo, hi), cut)
            return
        chunk = max(mr, max(CHUNK_BYTES, c * m * y.dtype.itemsize // WEIGHT_PASSES) // (m * y.dtype.itemsize) // mr * mr)
        # as many chunks as that size needs, evened out (whole micro-tiles): the last one then
        # overlaps the one before by less than a tile, not by up to a whole chunk
        chunks = -(-(hi - lo) // chunk)
        chunk = -(-(-(-(hi - lo) // chunks)) // mr) * mr

        def rows_from(v: View, first: ir.Value, count: int) -> View:
            at = b.gep(v.ptr, [b.add(const_i64(v.offset), b.mul(first, const_i64(v.strides[0])))], source_etype=llvm_type(v.dtype))
            return View(at, v.dtype, (count, v.shape[1]), v.strides)

        def one(first: ir.Value, count: int) -> None:
            target = rows_from(out_, first, count)
            init = Start(rows_from(start_.view, first, count), 1.0) if start_ else None
            _serial_gemm(emitting, rows_from(a_, first, count), w_, target, 1.0, mr, init)
            if epilogue is not None:
                epilogue.run(b, emitting.module, target, [rows_from(v, first, count) for v in rest])

        if hi - lo <= chunk:
            one(const_i64(lo), hi - lo)
            return
        # the last chunk ends at hi, overlapping the one before: its rows are computed afresh
        # (the GEMM starts them from the bias), so one copy of the code serves every chunk
        with for_range(b, -(-(hi - lo) // chunk), name="chunk") as k:
            first = b.add(const_i64(lo), b.mul(k, const_i64(chunk)))
            one(b.select(b.icmp_signed("<", first, const_i64(hi - chunk)), first, const_i64(hi - chunk)), chunk)

    parallel_rows(ctx, count, threads, [v.ptr for v in views], part, align=align)


def over_tiles(b: ir.IRBuilder, ow: int, mr: int, tile: Callable[[ir.Value, int], None]) -> None:
    """``tile(first position, count)`` along a row of ``ow`` positions: tiles of ``mr`` in a
    loop, then one of the ``ow % mr`` left."""
    full, rest = divmod(ow, mr)
    if full:
        with for_range(b, full, name="tile") as t:
            tile(b.mul(t, const_i64(mr)), mr)
    if rest:
        tile(const_i64(ow - rest), rest)


def _by_rows(view: View) -> View | None:
    """An NHWC-shaped view as (images * positions, channels) rows, where its images and
    positions step evenly (a dense tensor; a per-channel one steps by 0)."""
    *outer, channels = view.shape
    steps = [(n, s) for n, s in zip(outer, view.strides[:-1]) if n != 1]  # a size-1 axis's stride is never used
    if any(steps[i][1] != steps[i + 1][1] * steps[i + 1][0] for i in range(len(steps) - 1)):
        return None
    return View(view.ptr, view.dtype, (math.prod(outer), channels), (steps[-1][1] if steps else 0, view.strides[-1]), view.offset)


def geometry(node) -> Geometry:
    from kiln.backends.llvm.kernels_nn import _nhwc_geometry

    x, w, nd, strides, dilations, pads, out = _nhwc_geometry(node)
    size = tuple(x.shape[1:-1])
    padded = tuple(n + pads[a] + pads[a + nd] for a, n in enumerate(size))
    return Geometry(x.shape[-1], w.shape[-1], tuple(w.shape[:nd]), tuple(strides), tuple(dilations), tuple(out), size, tuple(pads[:nd]), padded, node.attrs["group"])


def _tap_offset(b: ir.IRBuilder, g: Geometry, tap: list[ir.Value]) -> ir.Value:
    """Where the tap at kernel coordinates ``tap`` starts its window row, relative to the
    window's first element."""
    offset = const_i64(0)
    for axis, k in enumerate(tap):
        offset = b.add(offset, b.mul(k, const_i64(g.dilations[axis] * g.pitch(axis))))
    return offset


def _row_start(b: ir.IRBuilder, g: Geometry, row: list[ir.Value]) -> ir.Value:
    """Where the output row at coordinates ``row`` starts its first window in the padded image."""
    start = const_i64(0)
    for axis, o in enumerate(row):
        start = b.add(start, b.mul(o, const_i64(g.strides[axis] * g.pitch(axis))))
    return start


def applies(node) -> bool:
    """A float32/64 NHWC conv that is not a plain GEMM (ungrouped 1x1, stride 1, no pads) or
    depthwise (``kernels_depthwise``)."""
    from kiln.backends.llvm.kernels_depthwise import applies_nhwc
    from kiln.backends.llvm.kernels_nn import _nhwc_direct

    return node.inputs[0].type.dtype in (DType.float32, DType.float64) and not _nhwc_direct(node) and not applies_nhwc(node)


def _split_by_rows(g: Geometry, itemsize: int) -> bool:
    """Threads split the output rows where the weights are small (each reads all of them and
    its share of the image), else the column blocks (each reads its share of the weights)."""
    return g.kk * g.m * itemsize <= SHARED_WEIGHTS and g.rows >= 2 * num_threads()


def _band(g: Geometry, itemsize: int) -> tuple[int, int] | None:
    """(output rows, padded input rows) of the bands a row-split 2-D conv pads at a time, or
    None where the whole image is padded first. A band's padded rows are copied just before its
    output rows are computed, so they are read back from L2 (U-Net's 64 channels at 128x128:
    a 4.3 MB padded image went out to L3 and back, 13-17% of the conv's time)."""
    if not g.has_pads or len(g.size) != 2 or not _split_by_rows(g, itemsize):
        return None
    row_bytes = g.padded[-1] * g.c * itemsize
    reach = (g.kernel[0] - 1) * g.dilations[0] + 1  # padded rows under one output row
    out_rows = max(1, min(g.out[0], (BAND_BYTES // row_bytes - reach) // g.strides[0] + 1))
    return out_rows, (out_rows - 1) * g.strides[0] + reach


def scratch_bytes(node) -> int:
    """The zero-padded copy of one image, or a padded band per thread (none without pads)."""
    g = geometry(node)
    itemsize = node.inputs[0].type.dtype.itemsize
    band = _band(g, itemsize)
    if band is not None:
        return num_threads() * band[1] * g.padded[-1] * g.c * itemsize
    return math.prod(g.padded) * g.c * itemsize if g.has_pads else 0


def emit(ctx: KernelContext, epilogue: Epilogue | None = None) -> None:
    """y = conv(x, w) (+ bias), then ``epilogue`` on each output block."""
    from kiln.backends.llvm.kernels_nn import PARALLEL_MACS, micro_rows, vector_width

    g = geometry(ctx.node)
    xv, wv, y = ctx.inputs[0], ctx.inputs[1], ctx.outputs[0]
    if not isinstance(wv, Panels):  # run-time weights (*kernel, C, M): the (kk, m) matrix
        wv = View(wv.ptr, wv.dtype, (g.kk, g.m), (g.m, 1), wv.offset)
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    width = vector_width(xv.dtype)
    blocks = g.groups * -(-g.mg // block_columns(wv, width))  # column blocks, each within one group
    mr = micro_rows(g.ow)
    ty = llvm_type(xv.dtype)
    b = ctx.b
    image_in, image_out = math.prod(g.size) * g.c, math.prod(g.out) * g.m
    operands = epilogue.operands if epilogue else []
    by_rows = _split_by_rows(g, xv.dtype.itemsize)
    band = _band(g, xv.dtype.itemsize)
    pitch = g.pitch(0)  # elements between padded rows
    items = g.rows if by_rows else blocks * g.rows
    threads = min(num_threads(), items) if math.prod(g.out) * g.kk * g.m >= PARALLEL_MACS else 1  # (each output's K: kk)
    with for_range(b, xv.shape[0], name="img") as img:
        x_img = b.gep(xv.ptr, [b.add(const_i64(xv.offset), b.mul(img, const_i64(image_in)))], source_etype=ty)
        y_img = b.gep(y.ptr, [b.add(const_i64(y.offset), b.mul(img, const_i64(image_out)))], source_etype=ty)
        source = x_img
        if g.has_pads and band is None:
            _pad_image(ctx, x_img, ctx.scratch, g, ty)
            source = ctx.scratch
        starts = [b.gep(v.ptr, [b.add(const_i64(v.offset), b.mul(img, const_i64(math.prod(g.out) * v.strides[0])))], source_etype=llvm_type(v.dtype)) for v in operands]
        pointers = [source, wv.ptr, y_img, bias.ptr if bias is not None else y_img, ctx.scratch, *starts]

        def work(emitting, ptrs, lo, hi, block):
            eb = emitting.b
            here = [View(p, v.dtype, v.shape, v.strides) for v, p in zip(operands, ptrs[5:])]

            def tiles_over(source: ir.Value) -> _Tiles:
                return _Tiles(emitting, g, xv.dtype, width, mr, source, wv.on(ptrs[1]), ptrs[2], bias.on(ptrs[3]) if bias is not None else None)

            if band is not None:  # output rows [lo, hi) a band at a time, its padded rows copied first
                out_rows, in_rows = band
                scratch = eb.gep(ptrs[4], [const_i64(block * in_rows * pitch)], source_etype=ty)
                with for_range(eb, -(-(hi - lo) // out_rows), name="band") as k:
                    oy0 = eb.add(const_i64(lo), eb.mul(k, const_i64(out_rows)))
                    oy1 = eb.select(eb.icmp_signed("<", eb.add(oy0, const_i64(out_rows)), const_i64(hi)), eb.add(oy0, const_i64(out_rows)), const_i64(hi))
                    py0 = eb.mul(oy0, const_i64(g.strides[0]))  # the band's first padded row
                    py1 = eb.add(eb.mul(eb.sub(oy1, const_i64(1)), const_i64(g.strides[0])), const_i64(in_rows - (out_rows - 1) * g.strides[0]))
                    shifted = eb.gep(scratch, [eb.neg(eb.mul(py0, const_i64(pitch)))], source_etype=ty)  # padded row py at shifted + py * pitch
                    _pad_rows(emitting, g, ty, ptrs[0], shifted, py0, py1)
                    tiles = tiles_over(shifted)
                    with for_range(eb, blocks, name="jb") as jb:
                        tiles.segment(jb, oy0, oy1, epilogue, here)
                return
            tiles = tiles_over(ptrs[0])
            if by_rows:  # output rows [lo, hi), every column block
                with for_range(eb, blocks, name="jb") as jb:
                    tiles.segment(jb, const_i64(lo), const_i64(hi), epilogue, here)
                return
            # items [lo, hi) of (column block, output row), block major: the first and last
            # blocks may be partial
            (jb0, oy0), (jb1, oy1) = divmod(lo, g.rows), divmod(hi - 1, g.rows)
            with for_range(eb, jb1 + 1, start=jb0, name="jb") as jb:
                first = eb.select(eb.icmp_unsigned("==", jb, const_i64(jb0)), const_i64(oy0), const_i64(0))
                last = eb.select(eb.icmp_unsigned("==", jb, const_i64(jb1)), const_i64(oy1 + 1), const_i64(g.rows))
                tiles.segment(jb, first, last, epilogue, here)

        parallel_rows(ctx, items, threads, pointers, work)


def _pad_image(ctx: KernelContext, x_img: ir.Value, dst: ir.Value, g: Geometry, ty: ir.Type) -> None:
    """dst = x's image inside a border of zeros, its rows (every axis but the last) split over the pool."""
    rows_total = math.prod(g.padded[:-1])

    def rows(emitting, ptrs, lo, hi, _):
        _pad_rows(emitting, g, ty, ptrs[0], ptrs[1], const_i64(lo), const_i64(hi))

    threads = min(num_threads(), rows_total) if rows_total * g.padded[-1] * g.c >= PARALLEL_PAD else 1
    parallel_rows(ctx, rows_total, threads, [x_img, dst], rows)


def _pad_rows(emitting, g: Geometry, ty: ir.Type, src: ir.Value, out: ir.Value, lo: ir.Value, hi: ir.Value) -> None:
    """Padded rows [lo, hi) (every axis but the last, flattened) of x's image ``src``, each at
    ``out + row * (its length)``: the image row inside its left and right zeros, or all zeros."""
    b = emitting.b
    row_len, width = g.padded[-1] * g.c, g.size[-1] * g.c
    left = g.before[-1] * g.c
    zero = ir.Constant(ty, 0.0)
    with for_range(b, hi, start=lo, name="prow") as r:
        out_row = b.gep(out, [b.mul(r, const_i64(row_len))], source_etype=ty)
        inside, source_row = ir.Constant(ir.IntType(1), 1), const_i64(0)
        for axis, coord in enumerate(_unflatten(b, r, g.padded[:-1])):
            at = b.sub(coord, const_i64(g.before[axis]))
            inside = b.and_(inside, b.and_(b.icmp_signed(">=", at, const_i64(0)), b.icmp_signed("<", at, const_i64(g.size[axis]))))
            source_row = b.add(b.mul(source_row, const_i64(g.size[axis])), at)
        with b.if_else(inside) as (image_row, border_row):
            with image_row:
                src_row = b.gep(src, [b.mul(source_row, const_i64(width))], source_etype=ty)
                with for_range(b, left, name="pl") as j:
                    b.store(zero, b.gep(out_row, [j], source_etype=ty))
                with for_range(b, width, name="pc") as j:
                    b.store(b.load(b.gep(src_row, [j], source_etype=ty), typ=ty), b.gep(out_row, [b.add(j, const_i64(left))], source_etype=ty))
                with for_range(b, row_len, start=left + width, name="pr") as j:
                    b.store(zero, b.gep(out_row, [j], source_etype=ty))
            with border_row:
                with for_range(b, row_len, name="pz") as j:
                    b.store(zero, b.gep(out_row, [j], source_etype=ty))


def block_columns(weights: View, width: int) -> int:
    """Output channels a micro-tile takes: its panel's (two vectors, or one where a group's
    channels are a multiple of one vector only), else two vectors."""
    return weights.nr if isinstance(weights, Panels) else 2 * width


class _Tiles:
    """The micro-tiles of one block (a function of the pool's split) over a source image."""

    def __init__(self, emitting, g: Geometry, dtype: DType, width: int, mr: int, source: ir.Value, weights: View, out: ir.Value, bias: View | None):
        self.b, self.module, self.g = emitting.b, emitting.module, g
        self.dtype, self.width, self.mr = dtype, width, mr
        self.source, self.weights, self.out, self.bias = source, weights, out, bias
        self.V = Vectors(self.b, self.module, dtype, width)
        self.ty = self.V.scalar
        self.prefetcher = self.module.declare_intrinsic("llvm.prefetch.p0", (), ir.FunctionType(ir.VoidType(), [PTR, I32, I32, I32]))
        # K in parts whose weight rows fit L1: groups of whole taps (a window row each where
        # width dilation is 1) within KC rows, or one tap in pieces of at most KC. Tiles of
        # WHOLE_K_ROWS or more positions over packed weights whose panel fits L2 take all of K
        # at once: their K step's two B loads feed 2 x mr multiply-adds, so the contiguous
        # panel streams from L2 fast enough, and the partial sums stay in registers instead of
        # going out to the output and back every part. (Run-time weights, rows a whole
        # output-channel count apart, would come from memory: they keep the parts.)
        from kiln.backends.llvm.kernels_nn import KC

        panel_bytes = g.kk * 2 * width * dtype.itemsize
        whole = isinstance(weights, Panels) and min(mr, g.ow) >= WHOLE_K_ROWS and panel_bytes <= SHARED_WEIGHTS
        part = g.kk if whole else KC
        self.taps = math.prod(g.tap_shape)
        self.taps_per_part = max(1, min(self.taps, part // g.run))
        self.pieces = -(-g.run // part)
        self.piece = -(-g.run // self.pieces)
        # weights too large to stay cached between runs (a late ResNet stage's 9.4 MB) come
        # from memory: each K step prefetches its row of the next part into L2, one part ahead
        # (ResNet-18's layer 4 convs: 1.05-1.17 -> 0.72-0.78 ms)
        large = g.kk * g.m * dtype.itemsize > SHARED_WEIGHTS
        self.prefetch = (self.taps_per_part * g.run if self.pieces == 1 else self.piece) if large else 0

    def segment(self, jb: ir.Value, oy0: ir.Value, oy1: ir.Value, epilogue, operands: list[View]) -> None:
        """Output rows [oy0, oy1) of column block ``jb``: the blocks of each group in turn (a
        group's last block may be partial)."""
        b, g = self.b, self.g
        nr = block_columns(self.weights, self.width)
        full, per_group = g.mg // nr, -(-g.mg // nr)
        group, block = b.udiv(jb, const_i64(per_group)), b.urem(jb, const_i64(per_group))
        j0 = b.add(b.mul(group, const_i64(g.mg)), b.mul(block, const_i64(nr)))
        channel0 = b.mul(group, const_i64(g.cg))  # the group's first input channel
        if full == per_group or full == 0:
            self._rows(j0, channel0, oy0, oy1, min(nr, g.mg), epilogue, operands)
            return
        with b.if_else(b.icmp_unsigned("<", block, const_i64(full))) as (whole, last):
            with whole:
                self._rows(j0, channel0, oy0, oy1, nr, epilogue, operands)
            with last:
                self._rows(j0, channel0, oy0, oy1, g.mg - full * nr, epilogue, operands)

    def _rows(self, j0: ir.Value, channel0: ir.Value, oy0: ir.Value, oy1: ir.Value, cols: int, epilogue, operands: list[View]) -> None:
        """Columns [j0, j0 + cols) of output rows [oy0, oy1), from the input
        channels of their group from ``channel0``, K in pieces: each piece's slice of the
        weights (at most KC rows of nr) stays in L1 while every tile of the rows multiplies by
        it; the tiles keep their partial sums in the output between pieces."""
        b, g, width = self.b, self.g, self.width
        masks = self.V.masks(cols)
        if isinstance(self.weights, Panels):  # this block's panel: kk rows of nr contiguous (zero-padded)
            panel = b.gep(self.weights.ptr, [b.add(const_i64(self.weights.offset), b.mul(b.udiv(j0, const_i64(self.weights.nr)), const_i64(g.kk * self.weights.nr)))], source_etype=self.ty)
            b_row, b_masks = self.weights.nr, [None] * len(masks)
        else:  # the (kk, m) matrix's rows from column j0
            panel = b.gep(self.weights.ptr, [b.add(const_i64(self.weights.offset), j0)], source_etype=self.ty)
            b_row, b_masks = self.weights.strides[0], masks
        starts = None
        if self.bias is not None:
            first = b.gep(self.bias.ptr, [b.add(const_i64(self.bias.offset), j0)], source_etype=self.ty)
            starts = [self.V.load(b.gep(first, [const_i64(h * width)], source_etype=self.ty), mask) for h, mask in enumerate(masks)]
        run, taps, per_part, pieces, piece = g.run, self.taps, self.taps_per_part, self.pieces, self.piece
        with for_range(b, -(-taps // per_part) * pieces, name="part") as part:
            taps_part, p = b.udiv(part, const_i64(pieces)), b.urem(part, const_i64(pieces))
            tap0 = b.mul(taps_part, const_i64(per_part))
            tap1 = b.select(b.icmp_unsigned("<", b.add(tap0, const_i64(per_part)), const_i64(taps)), b.add(tap0, const_i64(per_part)), const_i64(taps))
            k0 = b.mul(p, const_i64(piece))
            k1 = b.select(b.icmp_unsigned("<", b.add(k0, const_i64(piece)), const_i64(run)), b.add(k0, const_i64(piece)), const_i64(run))
            begin = b.icmp_unsigned("==", part, const_i64(0))
            k_range = (tap0, tap1, k0, k1)
            with for_range(b, oy1, start=oy0, name="oy") as oy:
                coords = _unflatten(b, oy, g.out[:-1])
                in_row = _row_start(b, g, coords)
                out_row = b.add(b.mul(oy, const_i64(g.ow * g.m)), j0)

                def tile(ox0: ir.Value, rows: int) -> None:
                    first = b.add(b.add(in_row, channel0), b.mul(ox0, const_i64(g.strides[-1] * g.c)))
                    live = self._live_taps(coords, ox0, rows)
                    self._tile(first, rows, panel, b_row, b_masks, k_range, begin, starts, b.add(out_row, b.mul(ox0, const_i64(g.m))), masks, live)

                over_tiles(b, g.ow, self.mr, tile)
        if epilogue is not None:
            with for_range(b, oy1, start=oy0, name="eoy") as oy:
                self._epilogue(oy, j0, cols, epilogue, operands)

    def _live_taps(self, coords: list[ir.Value], ox0: ir.Value, rows: int) -> Callable[[list[ir.Value]], ir.Value] | None:
        """Whether a tap reads any of the image (not only its zero border) for the tile of
        ``rows`` positions from ``ox0`` in the output row at ``coords``; None without pads.

        Along an axis, tap ``k`` reads input ``o * s + k * d - before`` for the tile's
        positions ``o`` in [o_lo, o_hi], so it reads the image iff
        ``k * d >= before - o_hi * s`` and ``k * d <= size - 1 + before - o_lo * s``. Dilated
        convs over small maps skip most of their taps this way (DeepLab's rate-18 branch at
        14x14 reads only its centre tap), and every 3x3 conv skips a tap row at its top and
        bottom output rows."""
        g, b = self.g, self.b
        if not g.has_pads:
            return None
        spans = [(o, o) for o in coords]  # (lowest, highest) output coordinate of the tile per axis
        if len(g.tap_shape) == len(g.kernel):  # width dilated: taps go along the width too
            spans.append((ox0, b.add(ox0, const_i64(rows - 1))))
        bounds = [(b.sub(const_i64(g.before[a]), b.mul(hi, const_i64(g.strides[a]))), b.sub(const_i64(g.size[a] - 1 + g.before[a]), b.mul(lo, const_i64(g.strides[a])))) for a, (lo, hi) in enumerate(spans)]

        def live(tap: list[ir.Value]) -> ir.Value:
            reads = ir.Constant(ir.IntType(1), 1)
            for a, k in enumerate(tap):
                at = b.mul(k, const_i64(g.dilations[a]))
                reads = b.and_(reads, b.and_(b.icmp_signed(">=", at, bounds[a][0]), b.icmp_signed("<=", at, bounds[a][1])))
            return reads

        return live

    def _tile(self, first: ir.Value, rows: int, panel: ir.Value, b_row: int, b_masks: list, k_range: tuple, begin: ir.Value, starts, out_at: ir.Value, masks: list, live) -> None:
        """``rows`` output positions, windows from ``first`` (an element index into the source
        image), by one vector per mask, over elements [k0, k1) of taps [tap0, tap1) (B's rows
        from ``panel``), skipping taps ``live`` says read only zeros: accumulators from the bias
        (``begin``: the first part of K) or the output."""
        b, g, ty, width, V = self.b, self.g, self.ty, self.width, self.V
        out = b.gep(self.out, [out_at], source_etype=ty)
        accs = [[entry_alloca(b, V.vec) for _ in masks] for _ in range(rows)]
        with b.if_else(begin) as (fresh, partial):
            with fresh:
                for row in accs:
                    for h, slot in enumerate(row):
                        b.store(starts[h] if starts is not None else V.zero, slot)
            with partial:
                for r, row in enumerate(accs):
                    for h, slot in enumerate(row):
                        b.store(V.load(b.gep(out, [const_i64(r * g.m + h * width)], source_etype=ty), masks[h]), slot)
        step = g.strides[-1] * g.c  # between consecutive positions' windows
        tap0, tap1, k0, k1 = k_range
        with for_range(b, tap1, start=tap0, name="tap") as tap:
            at = _unflatten(b, tap, g.tap_shape)
            with b.if_then(live(at)) if live is not None else contextlib.nullcontext():
                window = _tap_offset(b, g, at)
                with for_range(b, k1, start=k0, name="k") as j:
                    self._multiply(rows, step, b.add(first, window), b.add(b.mul(tap, const_i64(g.run)), j), j, panel, b_row, b_masks, accs)
        for r in range(rows):
            for h, mask in enumerate(masks):
                V.store(b.load(accs[r][h], typ=V.vec), b.gep(out, [const_i64(r * g.m + h * width)], source_etype=ty), mask)

    def _multiply(self, rows: int, step: int, window: ir.Value, kk: ir.Value, j: ir.Value, panel: ir.Value, b_row: int, b_masks: list, accs) -> None:
        """One K step: B's row ``kk`` (one vector per mask) times A's element ``j`` of each of
        ``rows`` windows from ``window``, ``step`` apart, into the accumulators."""
        b, ty, width, V = self.b, self.ty, self.width, self.V
        b_at = b.gep(panel, [b.mul(kk, const_i64(b_row))], source_etype=ty)
        if self.prefetch:  # the same row of the next part of K, into L2 while this part runs
            ahead = b.gep(b_at, [const_i64(self.prefetch * b_row)], source_etype=ty)
            for h in range(len(b_masks)):
                b.call(self.prefetcher, [b.gep(ahead, [const_i64(h * width)], source_etype=ty), ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])
        bvs = [V.load(b.gep(b_at, [const_i64(h * width)], source_etype=ty), mask) for h, mask in enumerate(b_masks)]
        a_ptr = b.gep(self.source, [b.add(window, j)], source_etype=ty)
        for r in range(rows):
            splat = V.splat(b.load(b.gep(a_ptr, [const_i64(r * step)], source_etype=ty), typ=ty))
            for h in range(len(bvs)):
                b.store(V.fma(splat, bvs[h], b.load(accs[r][h], typ=V.vec)), accs[r][h])

    def _epilogue(self, oy: ir.Value, j0: ir.Value, cols: int, epilogue, operands: list[View]) -> None:
        """The pointwise tail over this item's (ow, cols) output block, in place."""
        b, g = self.b, self.g
        first_row = b.mul(oy, const_i64(g.ow))

        def block(ptr: ir.Value, view: View) -> View:
            at = b.add(const_i64(view.offset), b.add(b.mul(first_row, const_i64(view.strides[0])), b.mul(j0, const_i64(view.strides[1]))))
            return View(b.gep(ptr, [at], source_etype=llvm_type(view.dtype)), view.dtype, (g.ow, cols), view.strides)

        out = block(self.out, View(self.out, self.dtype, (math.prod(g.out), g.m), (g.m, 1)))
        here = [block(v.ptr, v) for v in operands]
        epilogue.run(b, self.module, out, here)
