"""DynamicQuantizeLinear as one kernel: the range of x in one vector pass, its scale and zero
point (onnxruntime's rule: ``ir.ops.quant.dynamic_quantized``), then x quantized by them, split
over the pool when x is large. Its decomposition (ReduceMin, ReduceMax, the scalar math,
QuantizeLinear) is four kernels and reads x three times; a quantized LSTM runs one per step.
(64 x 784: 9 us, where the decomposition took 19.)"""

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


@kernel("DynamicQuantizeLinear")
def dynamic_quantize_linear(ctx: KernelContext) -> None:
    x, (y, scale_out, zero_out) = ctx.inputs[0], ctx.outputs
    if any(v.strides != tuple(contiguous_strides(v.shape)) for v in (x, y)):
        raise KilnError(f"node {ctx.node.name!r}: DynamicQuantizeLinear reads and writes dense tensors")
    b, module = ctx.b, ctx.module
    E = LLVMScalarOps(b, module)
    lo, hi = _range(b, module, E, x)
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

    threads = max(1, min(num_threads(), n // SPLIT_ELEMENTS))
    parallel_rows(Emitting(b, module), vectors, threads, pointers, block)


def _f32(E: LLVMScalarOps, value: float) -> ir.Value:
    return E.constant(value, DType.float32)


SPLIT_ELEMENTS = 1 << 14  # the quantization splits over the pool from twice this (one division each)


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


def _range(b: ir.IRBuilder, module: ir.Module, E: LLVMScalarOps, x: View) -> tuple[ir.Value, ir.Value]:
    """min(x, 0) and max(x, 0): CHAINS x 16 lanes of each, from 0 (the range always holds it,
    so the last vector's lanes past the end read as 0), then folded across chains and lanes."""
    V = Vectors(b, module, DType.float32, LANES)
    n = math.prod(x.shape)
    start = b.gep(x.ptr, [const_i64(x.offset)], source_etype=V.scalar)
    # x < lo ? x : lo (and >): one vminps/vmaxps each, where a NaN-propagating minimum is six
    # instructions (64x784: 16.6 -> 12.2 us). A NaN in x is skipped, as onnxruntime's own
    # min/max pass skips it; numpy's propagates it, so such an x is out of the op's contract.
    lane_wise = [lambda acc, v: b.select(b.fcmp_ordered("<", v, acc), v, acc), lambda acc, v: b.select(b.fcmp_ordered(">", v, acc), v, acc)]
    slots = [[entry_alloca(b, V.vec) for _ in range(2)] for _ in range(CHAINS)]
    for pair in slots:
        for slot in pair:
            b.store(V.zero, slot)

    def take(chain: int, first: ir.Value, mask: ir.Constant | None = None) -> None:
        v = V.load(b.gep(start, [first], source_etype=V.scalar), mask)
        for slot, combine in zip(slots[chain], lane_wise):
            b.store(combine(b.load(slot, typ=V.vec), v), slot)

    block = CHAINS * LANES
    with for_range(b, n // block, name="v") as i:
        for chain in range(CHAINS):
            take(chain, b.add(b.mul(i, const_i64(block)), const_i64(chain * LANES)))
    done = n // block * block
    for k in range((n - done) // LANES):
        take(k, const_i64(done + k * LANES))
    if n % LANES:
        take(CHAINS - 1, const_i64(n - n % LANES), V.mask(n % LANES))
    folded = []
    for side, combine in enumerate(lane_wise):
        vector = b.load(slots[0][side], typ=V.vec)
        for chain in range(1, CHAINS):
            vector = combine(vector, b.load(slots[chain][side], typ=V.vec))
        fold = (E.min, E.max)[side]
        value = E.typed(b.extract_element(vector, ir.Constant(I32, 0)), DType.float32)
        for lane in range(1, LANES):
            value = fold(value, E.typed(b.extract_element(vector, ir.Constant(I32, lane)), DType.float32))
        folded.append(value)
    return folded[0], folded[1]
