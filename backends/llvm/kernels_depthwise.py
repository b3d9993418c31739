"""Depthwise convolution in NCHW: ``group`` = input channels = output channels (MobileNet's,
ShuffleNet's and EfficientNet's 3x3 and 5x5 layers).

Each output channel reads one input plane with its own few weights, so im2col and a GEMM per
group (one output row by a handful of taps) waste nearly all their work: a 136-channel 3x3 at
28x28 took 1.16 ms that way against onnxruntime's 0.023. Here each (image, channel) plane is
done on its own: its taps are broadcast once, and every output row is computed in vectors along
its width, one multiply-add per tap with the input row under it (unit column stride: one
unaligned load; stride 2: two loads and the even lanes picked). Padding is never copied: rows
whose window leaves the plane (the first and last few) leave out those kernel rows, and the
vectors at a row's ends load under a mask of the lanes inside it (a masked-off lane is not
read), all decided when the code is built; the rest runs with no test. Planes are split over
the pool.
"""

from __future__ import annotations

import math

import llvmlite.ir as ir

from kiln.backends.llvm.emit import I32, Vectors, View, const_i64, for_range, llvm_type
from kiln.backends.llvm.parallel import parallel_rows
from kiln.config import num_threads
from kiln.ir.dtypes import DType
from kiln.ir.ops.nn import is_depthwise

PARALLEL_TAPS = 1 << 16  # multiply-adds below which one thread does every plane


def applies(node) -> bool:
    """A 2-D NCHW float depthwise conv, column stride 1 or 2."""
    return (
        is_depthwise(node)
        and node.attrs["layout"] == "NCHW"
        and node.inputs[0].type.dtype in (DType.float32, DType.float64)
        and (node.attrs["strides"] or [1, 1])[-1] in (1, 2)
    )


def _geometry(node):
    from kiln.backends.llvm.kernels_nn import _conv_geometry

    x, w, nd, strides, dilations, pads, out = _conv_geometry(node)
    return x, w, strides, dilations, pads, out


def _inside(flags: list[bool]) -> tuple[int, int]:
    """[first, last): the first run of True in ``flags`` (the positions whose window stays
    inside the image: a loop with no test), empty at the end where there is none."""
    first = flags.index(True) if any(flags) else len(flags)
    return first, first + (flags[first:] + [False]).index(False)


def _threads(node) -> int:
    x, w, *_, out = _geometry(node)
    planes = x.shape[0] * x.shape[1]
    return min(num_threads(), planes) if planes * math.prod(out) * math.prod(w.shape[2:]) >= PARALLEL_TAPS else 1


def emit(ctx, epilogue=None) -> None:
    """y = depthwise conv(x, w) (+ bias), then ``epilogue`` (a fused group's pointwise tail,
    its operands views over the output's shape) on each output plane while it is in cache."""
    node = ctx.node
    x, w, strides, dilations, pads, out = _geometry(node)
    (sh, sw), (dh, dw), (oh, ow) = strides, dilations, out
    kh, kw = w.shape[2:]
    height, width = x.shape[2:]
    top, left = pads[:2]
    channels = x.shape[1]
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    from kiln.backends.llvm.kernels_nn import vector_width

    lanes = vector_width(x.dtype)
    ty = llvm_type(x.dtype)
    operands = epilogue.operands if epilogue is not None else []
    views = [ctx.inputs[0], ctx.inputs[1], ctx.outputs[0], *([bias] if bias is not None else []), *operands]
    pick = ir.Constant(ir.VectorType(I32, lanes), [sw * i for i in range(lanes)])  # every sw-th lane of two vectors

    def valid_rows(oy: int) -> list[int]:
        return [ky for ky in range(kh) if 0 <= oy * sh + ky * dh - top < height]

    def lane_masks(ox0: int | None, count: int, kx: int):
        """The masks of the one or two loads under tap column ``kx`` for outputs ox0.. (count
        of them): the needed elements (every sw-th) inside the row; ox0 None: an interior chunk."""
        span = sw * (lanes - 1) + 1  # elements from the first needed one to the last, full chunk
        needed = [e % sw == 0 and e // sw < count for e in range(sw * lanes)]
        if ox0 is not None:
            base = ox0 * sw + kx * dw - left
            needed = [ok and 0 <= base + e < width for e, ok in enumerate(needed)]
        needed[span:] = [False] * (len(needed) - span)
        halves = [needed[h * lanes : (h + 1) * lanes] for h in range(sw)]
        return [None if all(m) else ir.Constant(ir.VectorType(ir.IntType(1), lanes), [int(v) for v in m]) if any(m) else False for m in halves]

    def planes(emitting, ptrs, lo, hi, _):
        b = emitting.b
        V, at, (xv, wv, yv), bv, tails = _block(emitting, views, ptrs, len(operands), x.dtype, lanes)

        def tap_vector(row: ir.Value, first: ir.Value, masks) -> ir.Value:
            """The elements under one tap: sw == 1 one (masked) load, else the even lanes of two."""
            loaded = [V.zero if m is False else V.load(at(row, b.add(first, const_i64(h * lanes))), m) for h, m in enumerate(masks)]
            return loaded[0] if sw == 1 else b.shuffle_vector(loaded[0], loaded[1], pick)

        with for_range(b, hi, start=lo, name="plane") as plane:
            channel = b.urem(plane, const_i64(channels))
            source = at(xv.ptr, b.add(const_i64(xv.offset), b.mul(plane, const_i64(height * width))))
            w_at = b.add(const_i64(wv.offset), b.mul(channel, const_i64(kh * kw)))
            taps = [V.splat(b.load(at(wv.ptr, b.add(w_at, const_i64(t))), typ=ty)) for t in range(kh * kw)]
            start = V.splat(b.load(at(bv[0].ptr, b.add(const_i64(bv[0].offset), channel)), typ=ty)) if bv else V.zero
            out_plane = at(yv.ptr, b.add(const_i64(yv.offset), b.mul(plane, const_i64(oh * ow))))

            def output_row(oy: ir.Value, kys: list[int]) -> None:
                rows = {ky: at(source, b.mul(b.sub(b.add(b.mul(oy, const_i64(sh)), const_i64(ky * dh)), const_i64(top)), const_i64(width))) for ky in kys}
                out_row = at(out_plane, b.mul(oy, const_i64(ow)))

                def chunk(ox0: ir.Value, count: int, static: int | None) -> None:
                    # one sum per kernel row, added at the end: short chains of dependent
                    # multiply-adds in flight at once instead of one long one
                    sums = []
                    for ky in kys:
                        acc = V.zero
                        for kx in range(kw):
                            masks = lane_masks(static, count, kx)
                            if all(m is False for m in masks):
                                continue
                            first = b.sub(b.add(b.mul(ox0, const_i64(sw)), const_i64(kx * dw)), const_i64(left))
                            acc = V.fma(taps[ky * kw + kx], tap_vector(rows[ky], first, masks), acc)
                        sums.append(acc)
                    total = start
                    for part in sums:
                        total = b.fadd(total, part)
                    V.store(total, at(out_row, ox0), V.mask(count))

                # chunks whose every needed element lies inside the row run in a loop, unmasked
                chunks = [(c * lanes, min(lanes, ow - c * lanes)) for c in range(-(-ow // lanes))]
                inside = [count == lanes and ox0 * sw - left >= 0 and (ox0 + lanes - 1) * sw + (kw - 1) * dw - left < width for ox0, count in chunks]
                first_in, last_in = _inside(inside)
                for c in range(first_in):
                    chunk(const_i64(chunks[c][0]), chunks[c][1], chunks[c][0])
                if last_in > first_in:
                    with for_range(b, last_in, start=first_in, name="ox") as c:
                        chunk(b.mul(c, const_i64(lanes)), lanes, None)
                for c in range(last_in, len(chunks)):
                    chunk(const_i64(chunks[c][0]), chunks[c][1], chunks[c][0])

            # rows whose window stays inside the plane run in a loop; the others each with their kernel rows
            first_row, last_row = _inside([len(valid_rows(oy)) == kh for oy in range(oh)])
            for oy in [*range(first_row), *range(last_row, oh)]:
                output_row(const_i64(oy), valid_rows(oy))
            if last_row > first_row:
                with for_range(b, last_row, start=first_row, name="oy") as oy:
                    output_row(oy, list(range(kh)))
            if epilogue is not None:  # over the whole plane, still in cache: one vector loop however narrow its rows
                epilogue.run(b, emitting.module, View(out_plane, yv.dtype, (oh, ow), (ow, 1)), [_plane_of(b, v, plane, channels) for v in tails])

    parallel_rows(ctx, x.shape[0] * channels, _threads(node), [v.ptr for v in views], planes)


def _block(emitting, views: list[View], ptrs: list[ir.Value], tail_count: int, dtype: DType, lanes: int):
    """What one block of the pool's split works with: vectors at its builder, ``at(ptr, i)``
    (element i's address), and its views at its pointers: (data, weights, output), the bias
    (a list of none or one), the tail's operands (the last ``tail_count``)."""
    b, ty = emitting.b, llvm_type(dtype)
    xv, wv, yv, *rest = [v.on(p) for v, p in zip(views, ptrs)]

    def at(ptr: ir.Value, index) -> ir.Value:
        return b.gep(ptr, [index if isinstance(index, ir.Value) else const_i64(index)], source_etype=ty)

    return Vectors(b, emitting.module, dtype, lanes), at, (xv, wv, yv), rest[: len(rest) - tail_count], rest[len(rest) - tail_count :]


def _plane_of(b: ir.IRBuilder, view: View, plane: ir.Value, channels: int) -> View:
    """Output plane ``plane`` (image * channels + channel) of a view over the output's shape."""
    img, channel = b.udiv(plane, const_i64(channels)), b.urem(plane, const_i64(channels))
    s0, s1, s2, s3 = view.strides
    offset = b.add(b.add(b.mul(img, const_i64(s0)), b.mul(channel, const_i64(s1))), const_i64(view.offset))
    return View(b.gep(view.ptr, [offset], source_etype=llvm_type(view.dtype)), view.dtype, view.shape[2:], (s2, s3))


# -- channels-last ------------------------------------------------------------------------------
def applies_nhwc(node) -> bool:
    """A 2-D NHWC float depthwise conv (weights (kh, kw, 1, C))."""
    return is_depthwise(node) and node.attrs["layout"] == "NHWC" and node.inputs[0].type.dtype in (DType.float32, DType.float64)


def nhwc_scratch_bytes(node) -> int:
    """One input row of zeros (what a window row above or below the image reads), then an
    output row per thread (where a fused tail that changes the dtype reads the conv's row)."""
    y = node.outputs[0].type
    return _zeros_bytes(node) + num_threads() * y.shape[2] * y.shape[3] * y.dtype.itemsize


def _zeros_bytes(node) -> int:
    x = node.inputs[0].type
    return -(-x.shape[2] * x.shape[3] * x.dtype.itemsize // 64) * 64


POSITIONS = 8  # output positions of a row whose windows every channel block takes in turn


def emit_nhwc(ctx, epilogue=None) -> None:
    """y[img, oy, ox, c] = sum over taps of w[ky, kx, 0, c] * x[img, iy, ix, c]: vectors along
    the channels. Each (image, output row) is one item of the pool's split; per block of
    channels the taps' weight vectors are loaded once and every position of the row multiplies
    by them. A kernel row above or below the image reads a row of zeros; positions whose
    window leaves the row at its ends (the first and last few) leave out those taps, decided
    when the code is built, and the rest run in a loop with no test. ``epilogue`` (a fused
    group's pointwise tail) runs on each output row while it is in cache: in place, or, where
    it changes the dtype (a requantization to 8 bits), from the row computed into the
    thread's scratch."""
    from kiln.backends.llvm.kernels_conv import geometry
    from kiln.backends.llvm.kernels_nn import vector_width

    node = ctx.node
    g = geometry(node)
    (sh, sw), (dh, dw), (oh, ow) = g.strides, g.dilations, g.out
    kh, kw = g.kernel
    height, width = g.size
    top, left = g.before
    c = g.c
    bias = ctx.inputs[2] if len(ctx.inputs) > 2 else None
    x_type = node.inputs[0].type
    lanes = vector_width(x_type.dtype)
    ty = llvm_type(x_type.dtype)
    blocks = [(c0, min(lanes, c - c0)) for c0 in range(0, c, lanes)]
    full = sum(1 for _, n in blocks if n == lanes)
    operands = epilogue.operands if epilogue is not None else []
    views = [ctx.inputs[0], ctx.inputs[1], ctx.outputs[0], *([bias] if bias is not None else []), *operands]
    retyped = epilogue is not None and ctx.outputs[0].dtype != x_type.dtype  # the row goes to scratch first
    b = ctx.b
    zeros = ctx.scratch
    with for_range(b, width * c, name="zero") as i:
        b.store(ir.Constant(ty, 0.0), b.gep(zeros, [i], source_etype=ty))
    inside = [0 <= ox * sw + kx * dw - left < width for ox in range(ow) for kx in range(kw)]
    first_in, last_in = _inside([all(inside[ox * kw : (ox + 1) * kw]) for ox in range(ow)])

    def rows(emitting, ptrs, lo, hi, block):
        eb = emitting.b
        V, at, (xv, wv, yv), bv, tails = _block(emitting, views, ptrs, len(operands), x_type.dtype, lanes)
        row_buffer = eb.gep(ptrs[-1], [const_i64(_zeros_bytes(node) + block * ow * c * x_type.dtype.itemsize)], source_etype=ir.IntType(8)) if retyped else None

        with for_range(eb, hi, start=lo, name="item") as item:
            img, oy = eb.udiv(item, const_i64(oh)), eb.urem(item, const_i64(oh))
            image = at(xv.ptr, eb.add(const_i64(xv.offset), eb.mul(img, const_i64(height * width * c))))
            window_rows = []
            for ky in range(kh):
                iy = eb.sub(eb.add(eb.mul(oy, const_i64(sh)), const_i64(ky * dh)), const_i64(top))
                valid = eb.and_(eb.icmp_signed(">=", iy, const_i64(0)), eb.icmp_signed("<", iy, const_i64(height)))
                window_rows.append(eb.select(valid, at(image, eb.mul(iy, const_i64(width * c))), ptrs[-1]))
            out_row = row_buffer if retyped else at(yv.ptr, eb.add(const_i64(yv.offset), eb.mul(item, const_i64(ow * c))))

            def channel_block(c0: ir.Value, count: int, middle: tuple | None) -> None:
                """Channels [c0, c0 + count): the border positions (``middle`` None) or the
                test-free positions [lo, hi) of ``middle``."""
                mask = V.mask(count)
                taps = [V.load(at(wv.ptr, eb.add(const_i64(wv.offset + t * c), c0)), mask) for t in range(kh * kw)]
                start = V.load(at(bv[0].ptr, eb.add(const_i64(bv[0].offset), c0)), mask) if bv else V.zero

                def position(ox: ir.Value, kxs: list[int]) -> None:
                    total = start
                    for ky in range(kh):
                        acc = V.zero
                        for kx in kxs:
                            ix = eb.sub(eb.add(eb.mul(ox, const_i64(sw)), const_i64(kx * dw)), const_i64(left))
                            acc = V.fma(taps[ky * kw + kx], V.load(at(window_rows[ky], eb.add(eb.mul(ix, const_i64(c)), c0)), mask), acc)
                        total = eb.fadd(total, acc)
                    V.store(total, at(out_row, eb.add(eb.mul(ox, const_i64(c)), c0)), mask)

                if middle is None:
                    for ox in [*range(first_in), *range(last_in, ow)]:
                        position(const_i64(ox), [kx for kx in range(kw) if inside[ox * kw + kx]])
                    return
                with for_range(eb, middle[1], start=middle[0], name="ox") as ox:
                    position(ox, list(range(kw)))

            def every_block(middle: tuple | None) -> None:
                if full:
                    with for_range(eb, full, name="cb") as cb:
                        channel_block(eb.mul(cb, const_i64(lanes)), lanes, middle)
                if full < len(blocks):
                    channel_block(const_i64(blocks[-1][0]), blocks[-1][1], middle)

            every_block(None)
            # the test-free positions a run of POSITIONS at a time, every channel block over the
            # run while its window columns are in L1 (channel block by channel block over the
            # whole row, a 112-wide row's 3 input rows left L1 between blocks)
            if last_in > first_in:
                runs = -(-(last_in - first_in) // POSITIONS)
                with for_range(eb, runs, name="run") as k:
                    lo = eb.add(const_i64(first_in), eb.mul(k, const_i64(POSITIONS)))
                    hi = eb.select(eb.icmp_signed("<", eb.add(lo, const_i64(POSITIONS)), const_i64(last_in)), eb.add(lo, const_i64(POSITIONS)), const_i64(last_in))
                    every_block((lo, hi))
            if epilogue is not None:  # the tail over this output row, in cache
                first = eb.mul(item, const_i64(ow))

                def block(ptr: ir.Value, view: View) -> View:
                    offset = eb.add(const_i64(view.offset), eb.mul(first, const_i64(view.strides[0])))
                    return View(eb.gep(ptr, [offset], source_etype=llvm_type(view.dtype)), view.dtype, (ow, c), view.strides)

                if retyped:
                    out = block(yv.ptr, View(yv.ptr, yv.dtype, (x_type.shape[0] * oh * ow, c), (c, 1), yv.offset))
                    epilogue.run(eb, emitting.module, out, [block(v.ptr, v) for v in tails], source=View(out_row, x_type.dtype, (ow, c), (c, 1)))
                else:
                    epilogue.run(eb, emitting.module, View(out_row, x_type.dtype, (ow, c), (c, 1)), [block(v.ptr, v) for v in tails])

    items = x_type.shape[0] * oh
    threads = min(num_threads(), items) if items * ow * c * kh * kw >= PARALLEL_TAPS else 1
    parallel_rows(ctx, items, threads, [v.ptr for v in views] + [zeros], rows)
