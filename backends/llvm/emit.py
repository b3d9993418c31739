"""Helpers that make kernel emitters read like the loops they build (numba's cgutils style):
typed views of buffers, ``for_range`` loop nests, and ScalarOps over LLVM values."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import llvmlite.ir as ir

from kiln.backends.llvm.fastmath import INLINE_F32
from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.types import contiguous_strides  # noqa: F401 - the kernels import it from here

I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()

LLVM_TYPES: dict[DType, ir.Type] = {
    DType.float16: ir.HalfType(),
    DType.float32: ir.FloatType(),
    DType.float64: ir.DoubleType(),
    DType.int8: I8,
    DType.int16: ir.IntType(16),
    DType.int32: I32,
    DType.int64: I64,
    DType.uint8: I8,
    DType.uint16: ir.IntType(16),
    DType.uint32: I32,
    DType.uint64: I64,
    DType.bool: I8,  # stored as a byte; computed as i1
}


def llvm_type(dtype: DType) -> ir.Type:
    return LLVM_TYPES[dtype]


def const_i64(n: int) -> ir.Constant:
    return ir.Constant(I64, int(n))


@dataclass
class View:
    """A typed strided window on a buffer: element (i0, i1, ...) is at ptr[offset + sum(i*s)]."""

    ptr: ir.Value
    dtype: DType
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    @staticmethod
    def dense(ptr: ir.Value, dtype: DType, shape: Sequence[int]) -> "View":
        return View(ptr, dtype, tuple(shape), tuple(contiguous_strides(shape)))

    def broadcast_to(self, shape: Sequence[int]) -> "View":
        """Numpy broadcasting as zero strides (dims aligned at the right)."""
        lead = len(shape) - len(self.shape)
        strides = [0] * lead
        for d, s, want in zip(self.shape, self.strides, shape[lead:]):
            strides.append(0 if d == 1 and want != 1 else s)
        return View(self.ptr, self.dtype, tuple(shape), tuple(strides), self.offset)

    def rows(self, start: int, stop: int, ptr: ir.Value | None = None) -> "View":
        """Indices [start, stop) of the first dim (on ``ptr`` when given: the same buffer as
        another function sees it)."""
        return View(ptr if ptr is not None else self.ptr, self.dtype, (stop - start, *self.shape[1:]), self.strides, self.offset + start * self.strides[0])

    def columns(self, start: int, stop: int, ptr: ir.Value | None = None) -> "View":
        """Columns [start, stop) of a matrix (on ``ptr`` when given)."""
        return View(ptr if ptr is not None else self.ptr, self.dtype, (self.shape[0], stop - start), self.strides, self.offset + start * self.strides[1])

    def on(self, ptr: ir.Value) -> "View":
        """The same window on ``ptr`` (the buffer as another function sees it)."""
        return dataclasses.replace(self, ptr=ptr)

    def permuted(self, perm: Sequence[int]) -> "View":
        return View(self.ptr, self.dtype, tuple(self.shape[p] for p in perm), tuple(self.strides[p] for p in perm), self.offset)

    def address(self, b: ir.IRBuilder, index: Sequence[ir.Value]) -> ir.Value:
        flat: ir.Value = const_i64(self.offset)
        for i, s in zip(index, self.strides):
            if s:
                flat = b.add(flat, b.mul(i, const_i64(s)) if s != 1 else i)
        return b.gep(self.ptr, [flat], source_etype=llvm_type(self.dtype))

    def load(self, b: ir.IRBuilder, index: Sequence[ir.Value]) -> ir.Value:
        value = b.load(self.address(b, index), typ=llvm_type(self.dtype))
        return b.trunc(value, I1) if self.dtype is DType.bool else value

    def store(self, b: ir.IRBuilder, index: Sequence[ir.Value], value: ir.Value) -> None:
        if self.dtype is DType.bool:
            value = b.zext(value, I8)
        b.store(value, self.address(b, index))


@dataclass
class Panels(View):
    """A (K, N) matrix stored as panels of ``nr`` columns, each K rows of ``nr`` contiguous
    elements (the last panel padded): a GEMM's B operand packed so the micro-kernel streams
    contiguous memory. ``offset`` counts elements, as View's; column starts must be panel starts."""

    nr: int = 32

    def address(self, b: ir.IRBuilder, index: Sequence[ir.Value]) -> ir.Value:
        k, j = index
        panel_size = self.shape[0] * self.nr
        panel = b.udiv(j, const_i64(self.nr))
        flat = b.add(const_i64(self.offset), b.add(b.mul(panel, const_i64(panel_size)), b.add(b.mul(k, const_i64(self.nr)), b.urem(j, const_i64(self.nr)))))
        return b.gep(self.ptr, [flat], source_etype=llvm_type(self.dtype))

    def columns(self, start: int, stop: int, ptr: ir.Value | None = None) -> "Panels":
        assert start % self.nr == 0, "panel columns start at a panel"
        return Panels(ptr if ptr is not None else self.ptr, self.dtype, (self.shape[0], stop - start), self.strides, self.offset + start // self.nr * self.shape[0] * self.nr, self.nr)


def pack_into_panels(b: ir.IRBuilder, src: View, dst: Panels) -> None:
    """``dst`` filled from the (k, n) matrix ``src`` (rows contiguous): each panel's rows copied
    as runs of nr elements; the last panel's columns past n are zeros."""
    k, n = src.shape
    nr = dst.nr
    full = n // nr
    if full:
        with for_range(b, full, name="pb") as jb, for_range(b, k, name="pk") as kk, for_range(b, nr, name="pj") as jj:
            j = b.add(b.mul(jb, const_i64(nr)), jj)
            dst.store(b, [kk, j], src.load(b, [kk, j]))
    if n % nr:
        zero = ir.Constant(llvm_type(dst.dtype), 0.0)
        with for_range(b, k, name="tk") as kk, for_range(b, nr, name="tj") as jj:
            j = b.add(const_i64(full * nr), jj)
            inside = b.icmp_signed("<", j, const_i64(n))
            value = src.load(b, [kk, b.select(inside, j, const_i64(n - 1))])  # never reads past the row
            dst.store(b, [kk, j], b.select(inside, value, zero))


@contextlib.contextmanager
def for_range(b: ir.IRBuilder, stop: int | ir.Value, start: int | ir.Value = 0, name: str = "i") -> Iterator[ir.Value]:
    """``for i in range(start, stop)``: the body is emitted inside the ``with`` block."""
    start_v = const_i64(start) if isinstance(start, int) else start
    stop_v = const_i64(stop) if isinstance(stop, int) else stop
    fn = b.function
    head = b.block
    cond = fn.append_basic_block(f"{name}.cond")
    body = fn.append_basic_block(f"{name}.body")
    done = fn.append_basic_block(f"{name}.done")
    b.branch(cond)
    b.position_at_end(cond)
    index = b.phi(I64, name=name)
    index.add_incoming(start_v, head)
    b.cbranch(b.icmp_signed("<", index, stop_v), body, done)
    b.position_at_end(body)
    yield index
    index.add_incoming(b.add(index, const_i64(1)), b.block)
    b.branch(cond)
    b.position_at_end(done)


def broadcast(b: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    """The scalar ``value`` in each of ``lanes`` lanes (insert, then shuffle lane 0 everywhere)."""
    vec = ir.VectorType(value.type, lanes)
    one = b.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(I32, 0))
    return b.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))


class Vectors:
    """SIMD building blocks for the register-tiled kernels (GEMM, direct and dot-product
    convolutions): ``width`` lanes of ``dtype``, loads and stores under a lane mask (None:
    every lane), broadcasts and fused multiply-adds, emitted at ``b``."""

    def __init__(self, b: ir.IRBuilder, module: ir.Module, dtype: DType, width: int):
        self.b, self.width = b, width
        self.scalar = llvm_type(dtype)
        self.vec = ir.VectorType(self.scalar, width)
        self.mask_ty = ir.VectorType(I1, width)
        self.zero = ir.Constant(self.vec, [0.0] * width)
        bits = dtype.itemsize * 8
        self._fma = module.declare_intrinsic(f"llvm.fma.v{width}f{bits}", (), ir.FunctionType(self.vec, [self.vec] * 3))
        self._masked_load = module.declare_intrinsic(f"llvm.masked.load.v{width}f{bits}.p0", (), ir.FunctionType(self.vec, [PTR, I32, self.mask_ty, self.vec]))
        self._masked_store = module.declare_intrinsic(f"llvm.masked.store.v{width}f{bits}.p0", (), ir.FunctionType(ir.VoidType(), [self.vec, PTR, I32, self.mask_ty]))
        self._reduce_add = module.declare_intrinsic(f"llvm.vector.reduce.fadd.v{width}f{bits}", (), ir.FunctionType(self.scalar, [self.scalar, self.vec]))

    def mask(self, count: int) -> ir.Constant | None:
        """The first ``count`` lanes (None: all of them)."""
        return None if count == self.width else ir.Constant(self.mask_ty, [1] * count + [0] * (self.width - count))

    def masks(self, columns: int) -> list[ir.Constant | None]:
        """One mask per vector across ``columns`` lanes."""
        return [self.mask(min(self.width, columns - h * self.width)) for h in range(-(-columns // self.width))]

    def load(self, address: ir.Value, mask: ir.Constant | None = None, passthru: ir.Value | None = None) -> ir.Value:
        """The vector at ``address``; lanes off ``mask`` are not read and hold ``passthru`` (0)."""
        if mask is None:
            return self.b.load(address, typ=self.vec, align=4)
        return self.b.call(self._masked_load, [address, ir.Constant(I32, 4), mask, self.zero if passthru is None else passthru])

    def store(self, value: ir.Value, address: ir.Value, mask: ir.Constant | None = None) -> None:
        if mask is None:
            self.b.store(value, address, align=4)
        else:
            self.b.call(self._masked_store, [value, address, ir.Constant(I32, 4), mask])

    def splat(self, value: ir.Value) -> ir.Value:
        """``value`` in every lane."""
        return broadcast(self.b, value, self.width)

    def fma(self, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
        return self.b.call(self._fma, [a, b, c])

    def sum(self, v: ir.Value) -> ir.Value:
        """The lanes of ``v`` added, as a tree (regrouped: a dot product's vector of partial sums)."""
        return self.b.call(self._reduce_add, [ir.Constant(self.scalar, 0.0), v], fastmath=("reassoc",))

    def lanes_within(self, lo: ir.Value, hi: ir.Value) -> ir.Value:
        """The mask of lanes ``l`` with ``lo <= l < hi`` (i64 values known at run time)."""
        lanes = ir.Constant(ir.VectorType(I64, self.width), list(range(self.width)))
        return self.b.and_(self.b.icmp_signed(">=", lanes, broadcast(self.b, lo, self.width)), self.b.icmp_signed("<", lanes, broadcast(self.b, hi, self.width)))


L1_WAYS, L1_SETS, LINE = 12, 64, 64  # the L1 data cache: 48 KB, 12 ways of 64 sets of 64-byte lines


def rows_per_l1_set(rows: int, pitch: int) -> int:
    """The most of ``rows`` rows ``pitch`` bytes apart whose first lines share one L1 set (rows
    4 KB apart all do: past L1_WAYS of them, each evicts one still in use)."""
    sets = [(r * pitch // LINE) % L1_SETS for r in range(rows)]
    return max(sets.count(s) for s in set(sets))


FTZ_DAZ = 0x8040  # MXCSR: flush denormal results to zero (bit 15), read denormal inputs as zero (bit 6)


def flush_denormals(b: ir.IRBuilder) -> ir.Value | None:
    """On an x86 host, set this thread's MXCSR to flush denormal floats to zero (with
    KILN_FLUSH_DENORMALS, the default) or to keep them (without: IEEE arithmetic, whatever
    mode the thread had, as a pool worker started inside a run inherits its creator's), and
    return the slot holding the old value (``restore_mxcsr``); else None. A multiply-add on a
    denormal operand takes a microcode assist of ~100 cycles: attention probabilities below
    1.2e-38 (the exp of a large negative score) made a Swin-T window's attn @ V 50 times
    slower (0.04 -> 2 ms). Values that small become zero; nothing else changes (TensorFlow
    flushes so by default too)."""
    from kiln import config
    from kiln.backends.llvm.target import host_cpu

    if not host_cpu().triple.startswith("x86_64"):
        return None
    old, new = entry_alloca(b, I32), entry_alloca(b, I32)
    b.call(_mxcsr(b, "st"), [old])
    mode = b.load(old, typ=I32)
    if config.flags().flush_denormals:
        b.store(b.or_(mode, ir.Constant(I32, FTZ_DAZ)), new)
    else:
        b.store(b.and_(mode, ir.Constant(I32, ~FTZ_DAZ & 0xFFFFFFFF)), new)
    b.call(_mxcsr(b, "ld"), [new])
    return old


def restore_mxcsr(b: ir.IRBuilder, old: ir.Value | None) -> None:
    """Put back the MXCSR ``flush_denormals`` saved (nothing where it saved none)."""
    if old is not None:
        b.call(_mxcsr(b, "ld"), [old])


def _mxcsr(b: ir.IRBuilder, op: str) -> ir.Function:
    """The x86 intrinsic that stores (``st``) or loads (``ld``) MXCSR through a pointer."""
    return b.module.declare_intrinsic(f"llvm.x86.sse.{op}mxcsr", (), ir.FunctionType(ir.VoidType(), [PTR]))


def entry_alloca(b: ir.IRBuilder, ty: ir.Type) -> ir.Value:
    """A stack slot made once in the function's entry block (never inside a loop)."""
    here = b.block
    b.position_at_start(b.function.entry_basic_block)
    slot = b.alloca(ty)
    b.position_at_end(here)
    return slot


@contextlib.contextmanager
def loop_nest(b: ir.IRBuilder, shape: Sequence[int], name: str = "i") -> Iterator[list[ir.Value]]:
    """Nested ``for_range`` over every index of ``shape`` (row-major; innermost last)."""
    with contextlib.ExitStack() as stack:
        index = [stack.enter_context(for_range(b, d, name=f"{name}{k}")) for k, d in enumerate(shape)]
        yield index


class LLVMScalarOps:
    """``kiln.ir.scalar.ScalarOps`` emitting LLVM IR at the builder's position."""

    def __init__(self, b: ir.IRBuilder, module: ir.Module, dtypes: dict[int, DType] | None = None, reassociate: bool = False):
        self.b = b
        self.module = module
        self.dtypes: dict[int, DType] = dtypes if dtypes is not None else {}
        # float adds and multiplies may be regrouped (a reduction's accumulator: LLVM then keeps
        # vector partial sums; the result moves by rounding, as numpy's pairwise sums do)
        self.float_flags = ("reassoc", "nsz") if reassociate else ()

    # values carry their kiln dtype in a side table: LLVM's i32 is both int32 and uint32
    def typed(self, value: ir.Value, dtype: DType) -> ir.Value:
        self.dtypes[id(value)] = dtype
        return value

    def dtype(self, value: ir.Value) -> DType:
        try:
            return self.dtypes[id(value)]
        except KeyError:
            raise KilnError(f"internal: value {value} has no dtype") from None

    def _is_float(self, v):
        return self.dtype(v).is_float

    def value_type(self, dtype: DType) -> ir.Type:
        """The LLVM type this emitter's values of ``dtype`` have (a scalar here)."""
        return I1 if dtype is DType.bool else llvm_type(dtype)

    def constant(self, value, dtype: DType) -> ir.Value:
        """A constant of ``dtype`` (``const`` takes the dtype of a value instead)."""
        if dtype is DType.bool:
            return self.typed(ir.Constant(I1, int(bool(value))), dtype)
        return self.typed(ir.Constant(llvm_type(dtype), float(value) if dtype.is_float else int(value)), dtype)

    def const(self, value, like):
        return self.constant(value, self.dtype(like))

    def _arith(self, a, b, float_op, int_op):
        if not self._is_float(a):
            return self.typed(getattr(self.b, int_op)(a, b), self.dtype(a))
        flags = self.float_flags if float_op in ("fadd", "fmul") else ()
        return self.typed(getattr(self.b, float_op)(a, b, flags=flags), self.dtype(a))

    def add(self, a, b):
        return self._arith(a, b, "fadd", "add")

    def sub(self, a, b):
        return self._arith(a, b, "fsub", "sub")

    def mul(self, a, b):
        return self._arith(a, b, "fmul", "mul")

    def div(self, a, b):
        if self._is_float(a):
            return self._arith(a, b, "fdiv", "fdiv")
        op = "sdiv" if self.dtype(a).is_signed else "udiv"  # both truncate toward zero
        return self.typed(getattr(self.b, op)(a, b), self.dtype(a))

    def neg(self, a):
        if self._is_float(a):
            return self.typed(self.b.fneg(a), self.dtype(a))
        return self.typed(self.b.neg(a), self.dtype(a))

    def _cmp(self, op, a, b):
        if self._is_float(a):
            # ordered comparisons: false when either side is NaN, as numpy's are
            out = self.b.fcmp_ordered(op, a, b)
        elif self.dtype(a).is_signed:
            out = self.b.icmp_signed(op, a, b)
        else:
            out = self.b.icmp_unsigned(op, a, b)
        return self.typed(out, DType.bool)

    def lt(self, a, b):
        return self._cmp("<", a, b)

    def le(self, a, b):
        return self._cmp("<=", a, b)

    def gt(self, a, b):
        return self._cmp(">", a, b)

    def ge(self, a, b):
        return self._cmp(">=", a, b)

    def eq(self, a, b):
        return self._cmp("==", a, b)

    def select(self, cond, a, b):
        return self.typed(self.b.select(cond, a, b), self.dtype(a))

    def max(self, a, b):
        if self._is_float(a):
            return self._float_pick(a, b, "<=")
        return self.select(self.gt(a, b), a, b)

    def min(self, a, b):
        if self._is_float(a):
            return self._float_pick(a, b, ">=")
        return self.select(self.lt(a, b), a, b)

    def _float_pick(self, a, b, takes_b: str):
        """numpy.maximum (``takes_b`` "<=") or numpy.minimum (">="): ``b`` where ``a <= b``
        (``a >= b``) or ``b`` is NaN, else ``a`` (so a NaN ``a`` too; on a tie, -0 against +0,
        ``b`` as numpy). A compare and a blend; the NaN test of ``b`` leaves the loop where
        ``b`` is a bound or a broadcast scalar, and folds away for a constant. (llvm.maximum
        orders -0 below +0 at three more instructions: a Clip's pair cost MobileNetV2-int8's
        requantizing tails 2.20 -> 1.85 ms.)"""
        b_wins = self.b.or_(self.b.fcmp_ordered(takes_b, a, b), self.b.fcmp_unordered("uno", b, b))
        return self.typed(self.b.select(b_wins, b, a), self.dtype(a))

    def abs(self, a):
        if self._is_float(a):
            return self.call("fabs", a)
        if not self.dtype(a).is_signed:
            return a
        return self.select(self.lt(a, self.const(0, a)), self.neg(a), a)

    def rem(self, a, b):
        if self._is_float(a):
            return self.typed(self.b.frem(a, b), self.dtype(a))
        op = "srem" if self.dtype(a).is_signed else "urem"
        return self.typed(getattr(self.b, op)(a, b), self.dtype(a))

    def bit_and(self, a, b):
        return self.typed(self.b.and_(a, b), self.dtype(a))

    def bit_or(self, a, b):
        return self.typed(self.b.or_(a, b), self.dtype(a))

    def bit_xor(self, a, b):
        return self.typed(self.b.xor(a, b), self.dtype(a))

    def bit_not(self, a):
        return self.typed(self.b.not_(a), self.dtype(a))

    def _shift_in_range(self, a, b):
        # LLVM shifts by a negative or >= width amount are poison; numpy's give 0 (or the sign)
        width = ir.Constant(b.type, a.type.width)
        return self.b.icmp_unsigned("<", b, width)  # unsigned compare: negative counts are huge

    def shift_left(self, a, b):
        ok = self._shift_in_range(a, b)
        return self.typed(self.b.select(ok, self.b.shl(a, b), ir.Constant(a.type, 0)), self.dtype(a))

    def shift_right(self, a, b):
        ok = self._shift_in_range(a, b)
        if self.dtype(a).is_signed:
            fill = self.b.ashr(a, ir.Constant(a.type, a.type.width - 1))  # all sign bits
            return self.typed(self.b.select(ok, self.b.ashr(a, b), fill), self.dtype(a))
        return self.typed(self.b.select(ok, self.b.lshr(a, b), ir.Constant(a.type, 0)), self.dtype(a))

    def isnan(self, a):
        return self.typed(self.b.fcmp_unordered("uno", a, a), DType.bool)

    def logical_and(self, a, b):
        return self.typed(self.b.and_(a, b), DType.bool)

    def logical_or(self, a, b):
        return self.typed(self.b.or_(a, b), DType.bool)

    def logical_xor(self, a, b):
        return self.typed(self.b.xor(a, b), DType.bool)

    def logical_not(self, a):
        return self.typed(self.b.not_(a), DType.bool)

    def cast(self, a, dtype: DType):
        src = self.dtype(a)
        b = self.b
        dst_t = self.value_type(dtype)
        if src == dtype:
            return a
        if dtype is DType.bool:
            zero = self.constant(0, src)
            out = b.fcmp_unordered("!=", a, zero) if src.is_float else b.icmp_unsigned("!=", a, zero)
        elif src is DType.bool:
            out = b.uitofp(a, dst_t) if dtype.is_float else b.zext(a, dst_t)
        elif src.is_float and dtype.is_float:
            if {src, dtype} == {DType.float64, DType.float16}:
                # no instruction converts double <-> half directly (LLVM would call compiler-rt,
                # which is not in the process): go through float
                return self.cast(self.cast(a, DType.float32), dtype)
            out = b.fpext(a, dst_t) if dtype.itemsize > src.itemsize else b.fptrunc(a, dst_t)
        elif src.is_float:
            out = b.fptosi(a, dst_t) if dtype.is_signed else b.fptoui(a, dst_t)
        elif dtype.is_float:
            out = b.sitofp(a, dst_t) if src.is_signed else b.uitofp(a, dst_t)
        elif dtype.itemsize > src.itemsize:
            out = b.sext(a, dst_t) if src.is_signed else b.zext(a, dst_t)
        elif dtype.itemsize < src.itemsize:
            out = b.trunc(a, dst_t)
        else:
            out = a
        return self.typed(out, dtype)

    def cast_like(self, a, like):
        return self.cast(a, self.dtype(like))

    _INTRINSICS = {"exp", "log", "sqrt", "pow", "floor", "ceil", "sin", "cos", "fabs", "roundeven"}

    def _intrinsic(self, name: str, ty: ir.Type, arity: int) -> ir.Function:
        return self.module.declare_intrinsic(f"llvm.{name}", [ty], ir.FunctionType(ty, [ty] * arity))

    def call(self, fn: str, *args):
        dtype = self.dtype(args[0])
        if fn == "pow" and not dtype.is_float:  # integer powers: in float64, truncated back, as the reference
            return self.cast(self.call(fn, *[self.cast(a, DType.float64) for a in args]), dtype)
        if not dtype.is_float:
            raise KilnError(f"{fn} needs float operands, got {dtype.short}")
        ty = args[0].type
        if fn == "round":
            fn = "roundeven"  # numpy rounds half to even
        if dtype is DType.float32 and fn in INLINE_F32:  # inline arithmetic, so loops vectorize
            return self.typed(INLINE_F32[fn](self.b, args[0]), dtype)
        if fn in self._INTRINSICS:
            callee = self._intrinsic(fn, ty, len(args))
        else:
            # libm: expf/tanhf/erff... for float, exp/tanh/erf for double (half goes through float)
            if dtype is DType.float16:
                wide = [self.cast(a, DType.float32) for a in args]
                return self.cast(self.call(fn, *wide), DType.float16)
            name = fn + ("f" if dtype is DType.float32 else "")
            callee = self.module.globals.get(name) or ir.Function(self.module, ir.FunctionType(ty, [ty] * len(args)), name)
        return self.typed(self.b.call(callee, list(args)), dtype)


# ops whose compute rules keep to what LLVMVectorOps emits: arithmetic, compares, selects,
# casts and LLVM's own vector intrinsics (a conv's or product's requantizing tail)
VECTOR_RULE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Relu", "Clip", "LeakyRelu", "Cast", "Round", "Floor", "Ceil", "Sqrt"})


class LLVMVectorOps(LLVMScalarOps):
    """``LLVMScalarOps`` on vectors of ``lanes`` elements: constants are splats. Only the ops
    in ``VECTOR_RULE_OPS`` may run through it (no inline float32 math or libm calls, whose
    code is scalar; no shifts)."""

    def __init__(self, b: ir.IRBuilder, module: ir.Module, lanes: int):
        super().__init__(b, module)
        self.lanes = lanes

    def value_type(self, dtype: DType) -> ir.Type:
        return ir.VectorType(super().value_type(dtype), self.lanes)

    def constant(self, value, dtype: DType) -> ir.Value:
        element = int(bool(value)) if dtype is DType.bool else float(value) if dtype.is_float else int(value)
        return self.typed(ir.Constant(self.value_type(dtype), [element] * self.lanes), dtype)

    @staticmethod
    def _suffix(vec: ir.VectorType) -> str:
        """An overloaded intrinsic's name for ``vec``: v16f32, v16i8..."""
        element = vec.element
        kind = f"i{element.width}" if isinstance(element, ir.IntType) else {ir.HalfType: "f16", ir.FloatType: "f32", ir.DoubleType: "f64"}[type(element)]
        return f"v{vec.count}{kind}"

    def _intrinsic(self, name: str, ty: ir.Type, arity: int) -> ir.Function:
        full = f"llvm.{name}.{self._suffix(ty)}"
        return self.module.globals.get(full) or ir.Function(self.module, ir.FunctionType(ty, [ty] * arity), full)

    def call(self, fn: str, *args):
        dtype = self.dtype(args[0])
        if fn == "round":
            fn = "roundeven"
        if fn not in self._INTRINSICS or not dtype.is_float:
            raise KilnError(f"internal: {fn} on {dtype.short} has no vector form (VECTOR_RULE_OPS)")
        return self.typed(self.b.call(self._intrinsic(fn, args[0].type, len(args)), list(args)), dtype)

    def splat(self, value: ir.Value, dtype: DType) -> ir.Value:
        """The scalar ``value`` of ``dtype`` in every lane."""
        return self.typed(broadcast(self.b, value, self.lanes), dtype)

    def _masked(self, op: str, vec: ir.VectorType) -> ir.Function:
        mask = ir.VectorType(I1, self.lanes)
        if op == "load":
            return self.module.declare_intrinsic(f"llvm.masked.load.{self._suffix(vec)}.p0", (), ir.FunctionType(vec, [PTR, I32, mask, vec]))
        return self.module.declare_intrinsic(f"llvm.masked.store.{self._suffix(vec)}.p0", (), ir.FunctionType(ir.VoidType(), [vec, PTR, I32, mask]))

    def load(self, address: ir.Value, dtype: DType, mask: ir.Constant | None = None) -> ir.Value:
        """``lanes`` elements of ``dtype`` from ``address`` (lanes off ``mask`` not read: 0)."""
        vec = self.value_type(dtype)
        if mask is None:
            return self.typed(self.b.load(address, typ=vec, align=1), dtype)
        return self.typed(self.b.call(self._masked("load", vec), [address, ir.Constant(I32, 1), mask, ir.Constant(vec, None)]), dtype)

    def store(self, value: ir.Value, address: ir.Value, mask: ir.Constant | None = None) -> None:
        if mask is None:
            self.b.store(value, address, align=1)
        else:
            self.b.call(self._masked("store", value.type), [value, address, ir.Constant(I32, 1), mask])
