"""``ScalarOps`` over TVM ``PrimExpr``s: the elementwise ``compute`` rules of ``kiln.ir.ops``
(written once for every backend) built as TE/TIR scalar expressions."""

from __future__ import annotations

from tvm import tirx as tir

from kiln.ir.dtypes import DType


def tvm_dtype(dtype: DType) -> str:
    """TVM's name of a kiln dtype (``float32``, ``int64``, ``bool``...)."""
    return dtype.name


def dtype_of(x) -> str:
    """The element type of a TIR expression, a TE tensor or a numpy array, as TVM names it."""
    if hasattr(x, "expr_ty"):
        return str(x.expr_ty())
    return str(x.dtype)


def _is_float(x) -> bool:
    return dtype_of(x).startswith("float")


class TEScalarOps:
    """Builds TIR expressions; operands share a dtype unless the protocol says otherwise."""

    _MATH = {
        "exp": tir.exp, "log": tir.log, "sqrt": tir.sqrt, "tanh": tir.tanh, "erf": tir.erf,
        "pow": tir.pow, "floor": tir.floor, "ceil": tir.ceil, "round": tir.nearbyint,
        "sin": tir.sin, "cos": tir.cos, "tan": tir.tan, "asin": tir.asin, "acos": tir.acos,
        "atan": tir.atan, "sinh": tir.sinh, "cosh": tir.cosh, "asinh": tir.asinh,
        "acosh": tir.acosh, "atanh": tir.atanh, "log1p": tir.log1p,
    }  # fmt: skip

    def const(self, value, like):
        if dtype_of(like) == "bool":
            value = bool(value)
        elif not _is_float(like):
            value = int(value)
        return tir.const(value, dtype_of(like))

    def add(self, a, b):
        return a + b

    def sub(self, a, b):
        return a - b

    def mul(self, a, b):
        return a * b

    def div(self, a, b):
        return tir.Div(a, b) if _is_float(a) else tir.truncdiv(a, b)

    def neg(self, a):
        return -a

    def max(self, a, b):
        return tir.max(a, b)

    def min(self, a, b):
        return tir.min(a, b)

    def abs(self, a):
        return tir.abs(a) if dtype_of(a) != "bool" and not dtype_of(a).startswith("uint") else a

    def select(self, cond, a, b):
        return tir.Select(cond, a, b)

    def lt(self, a, b):
        return a < b

    def le(self, a, b):
        return a <= b

    def gt(self, a, b):
        return a > b

    def ge(self, a, b):
        return a >= b

    def eq(self, a, b):
        return tir.EQ(a, b)

    def logical_and(self, a, b):
        return tir.And(a, b)

    def logical_or(self, a, b):
        return tir.Or(a, b)

    def logical_xor(self, a, b):
        return tir.Or(tir.And(a, tir.Not(b)), tir.And(tir.Not(a), b))

    def logical_not(self, a):
        return tir.Not(a)

    def rem(self, a, b):
        if _is_float(a):  # C's fmod (infinities, signed zeros), which libm and CUDA both have
            kind = dtype_of(a)
            if kind == "float64":
                return tir.call_pure_extern("float64", "fmod", a, b)
            wide = tir.call_pure_extern("float32", "fmodf", tir.Cast("float32", a), tir.Cast("float32", b))
            return wide if kind == "float32" else tir.Cast(kind, wide)  # float16: exact in float32
        return tir.truncmod(a, b)

    def bit_and(self, a, b):
        return tir.bitwise_and(a, b)

    def bit_or(self, a, b):
        return tir.bitwise_or(a, b)

    def bit_xor(self, a, b):
        return tir.bitwise_xor(a, b)

    def bit_not(self, a):
        return tir.bitwise_not(a)

    def _shift_count(self, a, b):
        """(whether ``b`` is a shift count in range, the count to shift by): TIR shifts by a
        negative or >= width count are undefined (LLVM poison); numpy's give 0 or the sign bits."""
        width = int("".join(ch for ch in dtype_of(a) if ch.isdigit()))
        kind = dtype_of(b)
        top = tir.const(width - 1, kind)
        if kind.startswith("uint"):
            return b <= top, tir.min(b, top), width
        zero = tir.const(0, kind)
        return tir.all(b >= zero, b <= top), tir.max(tir.min(b, top), zero), width

    def shift_left(self, a, b):
        ok, count, _ = self._shift_count(a, b)
        return tir.Select(ok, tir.shift_left(a, count), tir.const(0, dtype_of(a)))

    def shift_right(self, a, b):
        ok, count, width = self._shift_count(a, b)
        kind = dtype_of(a)
        fill = tir.shift_right(a, tir.const(width - 1, kind)) if not kind.startswith("uint") else tir.const(0, kind)
        return tir.Select(ok, tir.shift_right(a, count), fill)

    def isnan(self, a):
        return tir.isnan(a)

    def cast(self, a, dtype: DType):
        return a.astype(tvm_dtype(dtype))

    def cast_like(self, a, like):
        return a.astype(dtype_of(like))

    def call(self, fn: str, *args):
        if fn == "expm1":  # no TIR intrinsic: exp(x) - 1, with the series where that cancels
            x = args[0]
            series = x + x * x * tir.const(0.5, dtype_of(x))
            return tir.Select(tir.abs(x) < tir.const(1e-5, dtype_of(x)), series, tir.exp(x) - tir.const(1.0, dtype_of(x)))
        if fn == "pow":
            x, y = args
            if not _is_float(x):  # integer powers through float64 (exact in its 53 bits)
                return tir.pow(x.astype("float64"), y.astype("float64")).astype(dtype_of(x))
            return tir.pow(x, y if dtype_of(y) == dtype_of(x) else y.astype(dtype_of(x)))
        return self._MATH[fn](*args)
