"""Scalar expressions: how elementwise ops describe their computation once for every backend.

An elementwise OpDef's ``compute(E, attrs, *xs)`` builds its result from its operands ``xs``
with the methods of ``E``, a ScalarOps implementation. The LLVM backend's E emits LLVM IR, the
TVM backend's builds TE expressions, and ``NumpyScalarOps`` evaluates on arrays, which is how
tests check every ``compute`` against the op's numpy reference.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from kiln.ir.dtypes import DType


class ScalarOps(Protocol):
    """The operations a ``compute`` rule may use. Operands share a dtype unless stated."""

    def const(self, value: float | int | bool, like: Any) -> Any: ...  # a constant of like's dtype
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def div(self, a: Any, b: Any) -> Any: ...  # floats: true division; ints: toward zero
    def neg(self, a: Any) -> Any: ...
    def max(self, a: Any, b: Any) -> Any: ...
    def min(self, a: Any, b: Any) -> Any: ...
    def abs(self, a: Any) -> Any: ...
    def select(self, cond: Any, a: Any, b: Any) -> Any: ...  # cond: bool
    def lt(self, a: Any, b: Any) -> Any: ...  # -> bool
    def le(self, a: Any, b: Any) -> Any: ...
    def gt(self, a: Any, b: Any) -> Any: ...
    def ge(self, a: Any, b: Any) -> Any: ...
    def eq(self, a: Any, b: Any) -> Any: ...
    def logical_and(self, a: Any, b: Any) -> Any: ...
    def logical_or(self, a: Any, b: Any) -> Any: ...
    def logical_xor(self, a: Any, b: Any) -> Any: ...
    def logical_not(self, a: Any) -> Any: ...
    def rem(self, a: Any, b: Any) -> Any: ...  # C fmod / integer remainder: the dividend's sign
    def bit_and(self, a: Any, b: Any) -> Any: ...
    def bit_or(self, a: Any, b: Any) -> Any: ...
    def bit_xor(self, a: Any, b: Any) -> Any: ...
    def bit_not(self, a: Any) -> Any: ...
    def shift_left(self, a: Any, b: Any) -> Any: ...
    def shift_right(self, a: Any, b: Any) -> Any: ...  # arithmetic for signed, logical for unsigned
    def isnan(self, a: Any) -> Any: ...  # -> bool
    def cast(self, a: Any, dtype: DType) -> Any: ...
    def cast_like(self, a: Any, like: Any) -> Any: ...  # to like's dtype
    def call(self, fn: str, *args: Any) -> Any: ...  # float math: exp log sqrt tanh erf pow floor ceil sin cos ...


MATH_FUNCTIONS = (
    "exp", "log", "sqrt", "tanh", "erf", "pow", "floor", "ceil", "round", "sin", "cos", "tan",
    "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "log1p", "expm1",
)  # fmt: skip


class NumpyScalarOps:
    """``ScalarOps`` over numpy arrays: evaluates a ``compute`` rule directly (for tests)."""

    _NUMPY = {
        "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh, "pow": np.power,
        "floor": np.floor, "ceil": np.ceil, "round": np.round, "sin": np.sin, "cos": np.cos,
        "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan, "sinh": np.sinh,
        "cosh": np.cosh, "asinh": np.arcsinh, "acosh": np.arccosh, "atanh": np.arctanh,
        "log1p": np.log1p, "expm1": np.expm1,
        "erf": np.vectorize(math.erf, otypes=[np.float64]),
    }  # fmt: skip

    def const(self, value, like):
        return np.asarray(value, dtype=np.asarray(like).dtype)

    def add(self, a, b):
        return np.add(a, b)

    def sub(self, a, b):
        return np.subtract(a, b)

    def mul(self, a, b):
        return np.multiply(a, b)

    def div(self, a, b):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind in "iu":
            q = np.floor_divide(a, b)
            return q + ((np.remainder(a, b) != 0) & ((a < 0) != (b < 0))).astype(q.dtype)
        return np.divide(a, b)

    def neg(self, a):
        return np.negative(a)

    def max(self, a, b):
        return np.maximum(a, b)

    def min(self, a, b):
        return np.minimum(a, b)

    def abs(self, a):
        return np.abs(a)

    def select(self, cond, a, b):
        return np.where(cond, a, b)

    def lt(self, a, b):
        return np.less(a, b)

    def le(self, a, b):
        return np.less_equal(a, b)

    def gt(self, a, b):
        return np.greater(a, b)

    def ge(self, a, b):
        return np.greater_equal(a, b)

    def eq(self, a, b):
        return np.equal(a, b)

    def logical_and(self, a, b):
        return np.logical_and(a, b)

    def logical_or(self, a, b):
        return np.logical_or(a, b)

    def logical_xor(self, a, b):
        return np.logical_xor(a, b)

    def logical_not(self, a):
        return np.logical_not(a)

    def rem(self, a, b):
        return np.fmod(a, b)

    def bit_and(self, a, b):
        return np.bitwise_and(a, b)

    def bit_or(self, a, b):
        return np.bitwise_or(a, b)

    def bit_xor(self, a, b):
        return np.bitwise_xor(a, b)

    def bit_not(self, a):
        return np.invert(a)

    def shift_left(self, a, b):
        return np.left_shift(a, b)

    def shift_right(self, a, b):
        return np.right_shift(a, b)

    def isnan(self, a):
        return np.isnan(a)

    def cast(self, a, dtype):
        a = np.asarray(a)
        if a.dtype.kind == "f" and dtype.numpy.kind in "iu":
            return np.trunc(a).astype(dtype.numpy)
        return a.astype(dtype.numpy)

    def cast_like(self, a, like):
        return np.asarray(a).astype(np.asarray(like).dtype)

    def call(self, fn, *args):
        dtype = np.asarray(args[0]).dtype
        return np.asarray(self._NUMPY[fn](*args)).astype(dtype)
