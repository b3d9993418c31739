"""Gradient rules derived from compute rules: every elementwise op with a ``compute`` rule and no
hand-written VJP (Sin, Elu, Selu, Mish, HardSwish, PRelu, Celu, Softsign, ...) gets one.

The op's scalar ``compute(E, attrs, *xs)`` is run over ``TangentOps``, a ScalarOps whose values
are (primal, tangent) pairs of graph values: every operation adds the elementwise node of its
primal and the nodes of its derivative (forward mode). Seeding input ``i``'s tangent with the
output cotangent gives ``cotangent * d out / d x_i`` elementwise, which is that input's
gradient once broadcasting is summed away. The primal is recomputed inside the gradient (the
fusion pass makes it one kernel with the rest of the chain).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.graph import Value
from kiln.ir.opdef import all_ops


@dataclass
class Dual:
    primal: Value
    tangent: Value | None  # None: zero


_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max", "min": "Min"}
_CONSTANT = {  # no tangent flows through these (booleans, integers, steps)
    "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual", "eq": "Equal",
    "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor", "bit_and": "BitwiseAnd",
    "bit_or": "BitwiseOr", "bit_xor": "BitwiseXor",
}  # fmt: skip
_FUNCTIONS = {"exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh", "erf": "Erf", "floor": "Floor", "ceil": "Ceil", "round": "Round"}
_FUNCTIONS.update({fn: fn.capitalize() for fn in ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh")})


class TangentOps:
    """ScalarOps over ``Dual`` values, adding graph nodes through a GradBuilder ``b``."""

    def __init__(self, b):
        self.b = b

    # -- helpers over graph values ------------------------------------------------------------
    def _op(self, op: str, *xs: Value, **attrs) -> Value:
        return self.b.op(op, *xs, **attrs)

    def _c(self, value: float, like: Value) -> Value:
        return self.b.const(value, like)

    def _sum(self, x: Value | None, y: Value | None) -> Value | None:
        return y if x is None else x if y is None else self._op("Add", x, y)

    def _times(self, t: Value | None, factor: Value) -> Value | None:
        return None if t is None else self._op("Mul", t, factor)

    def _pick(self, cond: Value, x: Value | None, y: Value | None, like: Value) -> Value | None:
        if x is None and y is None:
            return None
        zero = self._c(0.0, like)
        return self._op("Where", cond, zero if x is None else x, zero if y is None else y)

    # -- ScalarOps ------------------------------------------------------------------------------
    def const(self, value, like: Dual) -> Dual:
        return Dual(self._c(value, like.primal), None)

    def __getattr__(self, name: str):
        if name in _CONSTANT:
            return lambda a, b: Dual(self._op(_CONSTANT[name], a.primal, b.primal), None)
        raise AttributeError(name)

    def add(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("Add", a.primal, b.primal), self._sum(a.tangent, b.tangent))

    def sub(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("Sub", a.primal, b.primal), self._sum(a.tangent, None if b.tangent is None else self._op("Neg", b.tangent)))

    def mul(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("Mul", a.primal, b.primal), self._sum(self._times(a.tangent, b.primal), self._times(b.tangent, a.primal)))

    def div(self, a: Dual, b: Dual) -> Dual:
        y = self._op("Div", a.primal, b.primal)
        # (ta - tb * y) / b
        numerator = self._sum(a.tangent, None if b.tangent is None else self._op("Neg", self._op("Mul", b.tangent, y)))
        return Dual(y, None if numerator is None else self._op("Div", numerator, b.primal))

    def neg(self, a: Dual) -> Dual:
        return Dual(self._op("Neg", a.primal), None if a.tangent is None else self._op("Neg", a.tangent))

    def max(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("Max", a.primal, b.primal), self._pick(self._op("GreaterOrEqual", a.primal, b.primal), a.tangent, b.tangent, a.primal))

    def min(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("Min", a.primal, b.primal), self._pick(self._op("LessOrEqual", a.primal, b.primal), a.tangent, b.tangent, a.primal))

    def abs(self, a: Dual) -> Dual:
        negative = self._op("Less", a.primal, self._c(0.0, a.primal))
        flipped = None if a.tangent is None else self._op("Neg", a.tangent)
        return Dual(self._op("Abs", a.primal), self._pick(negative, flipped, a.tangent, a.primal))

    def select(self, cond: Dual, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("Where", cond.primal, a.primal, b.primal), self._pick(cond.primal, a.tangent, b.tangent, a.primal))

    def logical_not(self, a: Dual) -> Dual:
        return Dual(self._op("Not", a.primal), None)

    def bit_not(self, a: Dual) -> Dual:
        return Dual(self._op("BitwiseNot", a.primal), None)

    def shift_left(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("BitShift", a.primal, b.primal, direction="LEFT"), None)

    def shift_right(self, a: Dual, b: Dual) -> Dual:
        return Dual(self._op("BitShift", a.primal, b.primal, direction="RIGHT"), None)

    def isnan(self, a: Dual) -> Dual:
        return Dual(self._op("IsNaN", a.primal), None)

    def rem(self, a: Dual, b: Dual) -> Dual:
        if b.tangent is not None:
            raise KilnError("autodiff: the remainder's gradient with respect to its divisor is not built")
        return Dual(self._op("Mod", a.primal, b.primal, fmod=1), a.tangent)

    def cast(self, a: Dual, dtype: DType) -> Dual:
        primal = a.primal if a.primal.type.dtype == dtype else self._op("Cast", a.primal, to=dtype.short)
        keeps = dtype.is_float and a.primal.type.dtype.is_float and a.tangent is not None
        tangent = None if not keeps else a.tangent if a.tangent.type.dtype == dtype else self._op("Cast", a.tangent, to=dtype.short)
        return Dual(primal, tangent)

    def cast_like(self, a: Dual, like: Dual) -> Dual:
        return self.cast(a, like.primal.type.dtype)

    def call(self, fn: str, *args: Dual) -> Dual:
        x = args[0]
        if fn == "pow":
            return self._pow(x, args[1])
        if fn == "log1p":
            return self.call("log", self.add(x, self.const(1.0, x)))
        if fn == "expm1":
            return self.sub(self.call("exp", x), self.const(1.0, x))
        y = self._op(_FUNCTIONS[fn], x.primal)
        if x.tangent is None or fn in ("floor", "ceil", "round"):
            return Dual(y, None)
        return Dual(y, self._op("Mul", x.tangent, self._derivative(fn, x.primal, y)))

    def _derivative(self, fn: str, x: Value, y: Value) -> Value:
        """d fn(x) / dx, given y = fn(x)."""
        op, c = self._op, self._c
        if fn == "exp":
            return y
        if fn == "log":
            return op("Reciprocal", x)
        if fn == "sqrt":
            return op("Div", c(0.5, x), y)
        if fn in ("tanh", "tan"):  # 1 - y^2 and 1 + y^2
            return op("Sub" if fn == "tanh" else "Add", c(1.0, x), op("Mul", y, y))
        if fn == "sin":
            return op("Cos", x)
        if fn == "cos":
            return op("Neg", op("Sin", x))
        if fn in ("sinh", "cosh"):
            return op("Cosh" if fn == "sinh" else "Sinh", x)
        square = op("Mul", x, x)
        if fn == "erf":
            return op("Mul", c(2 / math.sqrt(math.pi), x), op("Exp", op("Neg", square)))
        if fn in ("atan", "atanh"):  # 1 / (1 + x^2) and 1 / (1 - x^2)
            return op("Reciprocal", op("Add" if fn == "atan" else "Sub", c(1.0, x), square))
        if fn in ("asin", "acos"):  # +-1 / sqrt(1 - x^2)
            root = op("Reciprocal", op("Sqrt", op("Sub", c(1.0, x), square)))
            return root if fn == "asin" else op("Neg", root)
        # asinh, acosh: 1 / sqrt(x^2 +- 1)
        return op("Reciprocal", op("Sqrt", op("Add" if fn == "asinh" else "Sub", square, c(1.0, x))))

    def _pow(self, a: Dual, b: Dual) -> Dual:
        y = self._op("Pow", a.primal, b.primal)
        tangent = None
        if a.tangent is not None:  # b * a^(b - 1)
            slope = self._op("Mul", b.primal, self._op("Pow", a.primal, self._op("Sub", b.primal, self._c(1.0, b.primal))))
            tangent = self._op("Mul", a.tangent, slope)
        if b.tangent is not None:  # log(a) * a^b
            tangent = self._sum(tangent, self._op("Mul", b.tangent, self._op("Mul", self._op("Log", a.primal), y)))
        return Dual(y, tangent)


def derived_vjp(b, node, grads):
    """The gradient of each wanted input: the cotangent pushed through the compute rule."""
    g = grads[0]
    out = []
    for i, x in enumerate(node.inputs):
        if not b.wants(i) or not x.type.dtype.is_float:
            out.append(None)
            continue
        inputs = [None if v is None else Dual(v, g if j == i else None) for j, v in enumerate(node.inputs)]
        tangent = node.op.compute(TangentOps(b), node.attrs, *inputs).tangent
        out.append(b.zeros_like(x) if tangent is None else b.unbroadcast(tangent, x.type.shape))
    return out


def install() -> None:
    """Give every elementwise op with a compute rule and no hand-written VJP the derived one."""
    for op in all_ops().values():
        if op.vjp is None and op.compute is not None:
            op.vjp = derived_vjp
