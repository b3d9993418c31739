"""DynamicQuantizeLinear as one kernel: the range of x in one vector pass, its scale and zero
point (onnxruntime's rule: ``ir.ops.quant.dynamic_quantized``), then x quantized by them, split
over the pool when x is large. Its decomposition (ReduceMin, ReduceMax, the scalar math,
QuantizeLinear) is four kernels and reads x three times; a quantized LSTM runs one per step.
(64 x 784: 7.5 us, where the decomposition took 19.)"""

from __future__ import annotations

import math

import llvmlite.ir as ir

from kiln.backends.llvm.codegen import KernelContext, kernel
from kiln.backends.llvm.emit import I32, PTR, LLVMScalarOps, Vectors, View, const_i64, contiguous_strides, entry_alloca, for_range
from kiln.backends.llvm.parallel import Emitting, parallel_rows
from kiln.config import num_threads
from kiln.errors import KilnError
from kiln.ir.dtypes import DType

LANES = 16  # float32 lanes of the range's accumulators


def _scratch(node) -> int:
    return num_threads() * 2 * LANES * 4  # each block's range: its min and max vectors


@kernel("DynamicQuantizeLinear", scratch=_scratch)
def dynamic_quantize_linear(ctx: KernelContext) -> None:
    x, (y, scale_out, zero_out) = ctx.inputs[0], ctx.outputs
    if any(v.strides != tuple(contiguous_strides(v.shape)) for v in (x, y)):
        raise KilnError(f"node {ctx.node.name!r}: DynamicQuantizeLinear reads and writes dense tensors")
    b, module = ctx.b, ctx.module
    E = LLVMScalarOps(b, module)
    lo, hi = _range(ctx, E, x)
    span = E.sub(hi, lo)
    scale = E.select(E.eq(span, _f32(E, 0.0)), _f32(E, 1.0), E.div(span, _f32(E, 255.0)))
    zero = E.call("round", E.min(E.max(E.sub(_f32(E, 0.0), E.div(lo, scale)), _f32(E, 0.0)), _f32(E, 255.0)))
    scale_out.store(b, [], scale)
    zero_out.store(b, [], E.cast(zero, DType.uint8))
    n = math.prod(x.shape)
    vectors = -(-n // LANES)
    pointers = [b.gep(v.ptr, [const_i64(v.offset)], source_etype=ir.IntType(8 * v.dtype.itemsize)) for v in (x, y, scale_out, zero_out)]

    def block(emitting, ptrs, first, last, _):
        eb = emitting.b  # each block reads the scale and the zero point once
        scale, zero = eb.load(ptrs[2], typ=ir.FloatType()), eb.uitofp(eb.load(ptrs[3], typ=ir.IntType(8)), ir.FloatType())
        _quantize(eb, emitting.module, ptrs[0], ptrs[1], scale, zero, first, last, n)

    parallel_rows(Emitting(b, module), vectors, _threads(n), pointers, block)


def _f32(E: LLVMScalarOps, value: float) -> ir.Value:
    return E.constant(value, DType.float32)


SPLIT_ELEMENTS = 1 << 14  # both passes split over the pool from twice this many elements


def _threads(n: int) -> int:
    return max(1, min(num_threads(), n // SPLIT_ELEMENTS))


def _quantize(b: ir.IRBuilder, module: ir.Module, source: ir.Value, target: ir.Value, scale: ir.Value, zero: ir.Value, lo: int, hi: int, n: int) -> None:
    """Vectors [lo, hi) of y = saturate(round(x / scale) + zero) as uint8, 16 lanes at a time
    (the last, short vector under a mask)."""
    V = Vectors(b, module, DType.float32, LANES)
    bytes_ty = ir.VectorType(ir.IntType(8), LANES)
    intrinsic = lambda name, ty, args: module.declare_intrinsic(name, (), ir.FunctionType(ty, args))  # noqa: E731
    roundeven = intrinsic(f"llvm.roundeven.v{LANES}f32", V.vec, [V.vec])
    lowest, highest = (intrinsic(f"llvm.{name}.v{LANES}f32", V.vec, [V.vec, V.vec]) for name in ("maxnum", "minnum"))
    store_masked = intrinsic(f"llvm.masked.store.v{LANES}i8.p0", ir.VoidType(), [bytes_ty, PTR, I32, V.mask_ty])
    scales, zeros = V.splat(scale), V.splat(zero)
    ceiling = ir.Constant(V.vec, [255.0] * LANES)

    def step(first: ir.Value, mask: ir.Constant | None) -> None:
        v = V.load(b.gep(source, [first], source_etype=V.scalar), mask)
        q = b.fadd(b.call(roundeven, [b.fdiv(v, scales)]), zeros)
        q = b.fptoui(b.call(highest, [b.call(lowest, [q, V.zero]), ceiling]), bytes_ty)
        at = b.gep(target, [first], source_etype=ir.IntType(8))
        if mask is None:
            b.store(q, at, align=1)
        else:
            b.call(store_masked, [q, at, ir.Constant(I32, 1), mask])

    whole = min(hi, n // LANES)
    with for_range(b, whole, start=lo, name="q") as i:
        step(b.mul(i, const_i64(LANES)), None)
    if whole < hi:  # the short last vector
        step(const_i64(whole * LANES), V.mask(n % LANES))


CHAINS = 4  # independent accumulators: a min's latency would bound one chain (64x784: 20.9 -> 16.6 us)
GROUP = CHAINS * LANES  # elements the range takes per step


def _range(ctx: KernelContext, E: LLVMScalarOps, x: View) -> tuple[ir.Value, ir.Value]:
    """min(x, 0) and max(x, 0): each block of the pool's split (a large x's) leaves its two
    vectors in the scratch, which start at 0 (the range always holds it); then they are folded
    across blocks and lanes."""
    b, module = ctx.b, ctx.module
    V = Vectors(b, module, DType.float32, LANES)
    n = math.prod(x.shape)
    groups = -(-n // GROUP)
    threads = _threads(n)
    with for_range(b, 2 * threads, name="s") as i:
        b.store(V.zero, b.gep(ctx.scratch, [b.mul(i, const_i64(LANES * 4))], source_etype=ir.IntType(8)))
    start = b.gep(x.ptr, [const_i64(x.offset)], source_etype=V.scalar)

    def block(emitting, ptrs, first, last, index):
        eb = emitting.b
        pair = _block_range(eb, emitting.module, ptrs[0], first * GROUP, min(last * GROUP, n))
        for side, vector in enumerate(pair):
            eb.store(vector, eb.gep(ptrs[1], [const_i64((2 * index + side) * LANES * 4)], source_etype=ir.IntType(8)))

    parallel_rows(Emitting(b, module), groups, threads, [start, ctx.scratch], block)
    folded = []
    for side, combine in enumerate((_lesser, _greater)):
        at = lambda t: b.gep(ctx.scratch, [const_i64((2 * t + side) * LANES * 4)], source_etype=ir.IntType(8))  # noqa: E731
        vector = b.load(at(0), typ=V.vec)
        for t in range(1, threads):
            vector = combine(b, vector, b.load(at(t), typ=V.vec))
        fold = (E.min, E.max)[side]
        value = E.typed(b.extract_element(vector, ir.Constant(I32, 0)), DType.float32)
        for lane in range(1, LANES):
            value = fold(value, E.typed(b.extract_element(vector, ir.Constant(I32, lane)), DType.float32))
        folded.append(value)
    return folded[0], folded[1]


# v < acc ? v : acc (and >): one vminps/vmaxps each, where a NaN-propagating minimum is six
# instructions (64x784: 16.6 -> 12.2 us). A NaN in x is skipped, as onnxruntime's own min/max
# pass skips it; numpy's propagates it, so such an x is out of the op's contract.
def _lesser(b: ir.IRBuilder, acc: ir.Value, v: ir.Value) -> ir.Value:
    return b.select(b.fcmp_ordered("<", v, acc), v, acc)


def _greater(b: ir.IRBuilder, acc: ir.Value, v: ir.Value) -> ir.Value:
    return b.select(b.fcmp_ordered(">", v, acc), v, acc)


def _block_range(b: ir.IRBuilder, module: ir.Module, source: ir.Value, first: int, last: int) -> list[ir.Value]:
    """The min and max vectors of elements [first, last) (``first`` a multiple of GROUP),
    from 0: CHAINS accumulators of each, then the last elements under a mask."""
    V = Vectors(b, module, DType.float32, LANES)
    slots = [[entry_alloca(b, V.vec) for _ in range(2)] for _ in range(CHAINS)]
    for pair in slots:
        for slot in pair:
            b.store(V.zero, slot)

    def take(chain: int, at: ir.Value, mask: ir.Constant | None = None) -> None:
        v = V.load(b.gep(source, [at], source_etype=V.scalar), mask)  # a masked lane reads 0
        for slot, combine in zip(slots[chain], (_lesser, _greater)):
            b.store(combine(b, b.load(slot, typ=V.vec), v), slot)

    whole = first + (last - first) // GROUP * GROUP
    with for_range(b, (last - first) // GROUP, name="v") as i:
        for chain in range(CHAINS):
            take(chain, b.add(b.mul(i, const_i64(GROUP)), const_i64(first + chain * LANES)))
    for k in range((last - whole) // LANES):
        take(k, const_i64(whole + k * LANES))
    if (last - whole) % LANES:
        take(CHAINS - 1, const_i64(last - (last - whole) % LANES), V.mask((last - whole) % LANES))
    pairs = []
    for side, combine in enumerate((_lesser, _greater)):
        vector = b.load(slots[0][side], typ=V.vec)
        for chain in range(1, CHAINS):
            vector = combine(b, vector, b.load(slots[chain][side], typ=V.vec))
        pairs.append(vector)
    return pairs
