"""Elementwise ops: unary math and activations, broadcasting binaries, comparisons, logic,
Where, Clip, Cast. Each op keeps its input dtype unless it says otherwise (comparisons: bool)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from kiln.ir.dtypes import ALL, DType, FLOATS, INTS, NUMERIC, SIGNED_INTS
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, get_op, register
from kiln.ir.ops.rules import broadcast_shapes, check_dtype, fail, present, same_dtype
from kiln.ir.types import TensorType

BOOL = frozenset({DType.bool})
SIGNED = FLOATS | SIGNED_INTS


# -- unary -----------------------------------------------------------------------------------
def _unary_infer(dtypes: frozenset, out_dtype: DType | None = None):
    def infer(attrs, types):
        x = present(types, 0, "X")
        check_dtype(x, dtypes)
        return [x.with_dtype(out_dtype) if out_dtype else x]

    return infer


def unary(name: str, fn: Callable, dtypes=FLOATS, attrs=None, out_dtype: DType | None = None, doc: str = "") -> OpDef:
    """Register ``name(X) -> fn(attrs, X)`` keeping X's dtype (or ``out_dtype``)."""

    def eager(a, x):
        y = fn(a, x)
        return np.asarray(y, dtype=out_dtype.numpy if out_dtype else x.dtype)

    return register(OpDef(name, OpKind.ELEMENTWISE, _unary_infer(frozenset(dtypes), out_dtype), eager, attrs or {}, doc=doc))


def _erf(x: np.ndarray) -> np.ndarray:
    # vectorised math.erf: numpy has no erf, and it must be exact to the last ulp in float32
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return np.where(x64 >= 0, 1 / (1 + np.exp(-np.abs(x64))), np.exp(-np.abs(x64)) / (1 + np.exp(-np.abs(x64))))


def _softplus(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return np.logaddexp(0, x64)


def _gelu(a, x):
    x64 = x.astype(np.float64)
    if a["approximate"] == "tanh":
        return 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    if a["approximate"] != "none":
        raise fail(f"Gelu approximate={a['approximate']!r} is not 'none' or 'tanh'")
    return 0.5 * x64 * (1 + _erf(x64 / math.sqrt(2)))


unary("Abs", lambda a, x: np.abs(x), NUMERIC)
unary("Neg", lambda a, x: np.negative(x), SIGNED)
unary("Sign", lambda a, x: np.sign(x), NUMERIC)
unary("Exp", lambda a, x: np.exp(x))
unary("Log", lambda a, x: np.log(x))
unary("Sqrt", lambda a, x: np.sqrt(x))
unary("Reciprocal", lambda a, x: np.reciprocal(x))
unary("Floor", lambda a, x: np.floor(x))
unary("Ceil", lambda a, x: np.ceil(x))
unary("Round", lambda a, x: np.round(x))  # numpy rounds half to even, as ONNX does
unary("Sin", lambda a, x: np.sin(x))
unary("Cos", lambda a, x: np.cos(x))
unary("Tan", lambda a, x: np.tan(x))
unary("Asin", lambda a, x: np.arcsin(x))
unary("Acos", lambda a, x: np.arccos(x))
unary("Atan", lambda a, x: np.arctan(x))
unary("Sinh", lambda a, x: np.sinh(x))
unary("Cosh", lambda a, x: np.cosh(x))
unary("Tanh", lambda a, x: np.tanh(x))
unary("Asinh", lambda a, x: np.arcsinh(x))
unary("Acosh", lambda a, x: np.arccosh(x))
unary("Atanh", lambda a, x: np.arctanh(x))
unary("Erf", lambda a, x: _erf(x))
unary("Sigmoid", lambda a, x: _sigmoid(x))
unary("Relu", lambda a, x: np.maximum(x, 0), SIGNED)
unary("Softplus", lambda a, x: _softplus(x))
unary("Softsign", lambda a, x: x / (1 + np.abs(x)))
unary("Mish", lambda a, x: x.astype(np.float64) * np.tanh(_softplus(x)))
unary("HardSwish", lambda a, x: x * np.clip(x / 6 + 0.5, 0, 1))
unary("HardSigmoid", lambda a, x: np.clip(a["alpha"] * x + a["beta"], 0, 1), attrs={"alpha": 0.2, "beta": 0.5})
unary("LeakyRelu", lambda a, x: np.where(x >= 0, x, a["alpha"] * x), attrs={"alpha": 0.01})
unary("Elu", lambda a, x: np.where(x >= 0, x, a["alpha"] * np.expm1(x)), attrs={"alpha": 1.0})
unary(
    "Celu",
    lambda a, x: np.maximum(0, x) + np.minimum(0, a["alpha"] * np.expm1(x / a["alpha"])),
    attrs={"alpha": 1.0},
)
unary(
    "Selu",
    lambda a, x: a["gamma"] * np.where(x > 0, x, a["alpha"] * np.expm1(x)),
    attrs={"alpha": 1.6732632423543772, "gamma": 1.0507009873554805},
)
unary("ThresholdedRelu", lambda a, x: np.where(x > a["alpha"], x, 0), attrs={"alpha": 1.0})
unary(
    "Shrink",
    lambda a, x: np.where(x < -a["lambd"], x + a["bias"], np.where(x > a["lambd"], x - a["bias"], 0)),
    NUMERIC,
    attrs={"bias": 0.0, "lambd": 0.5},
)
unary("Gelu", _gelu, attrs={"approximate": "none"})
unary("Not", lambda a, x: np.logical_not(x), BOOL)
unary("BitwiseNot", lambda a, x: np.invert(x), INTS)
unary("IsNaN", lambda a, x: np.isnan(x), FLOATS, out_dtype=DType.bool)
unary(
    "IsInf",
    lambda a, x: (np.isposinf(x) & bool(a["detect_positive"])) | (np.isneginf(x) & bool(a["detect_negative"])),
    FLOATS,
    attrs={"detect_negative": 1, "detect_positive": 1},
    out_dtype=DType.bool,
)
unary("Identity", lambda a, x: x, ALL)


# -- binary and variadic ---------------------------------------------------------------------
def _binary_infer(dtypes: frozenset, out_dtype: DType | None, same: bool = True):
    def infer(attrs, types):
        a, b = present(types, 0, "A"), present(types, 1, "B")
        check_dtype(a, dtypes, "A")
        if same:
            same_dtype([a, b])
        return [TensorType(broadcast_shapes(a.shape, b.shape), out_dtype or a.dtype)]

    return infer


def binary(name: str, fn: Callable, dtypes=NUMERIC, out_dtype: DType | None = None, attrs=None, same: bool = True) -> OpDef:
    """Register a broadcasting ``name(A, B)``."""

    def eager(a, x, y):
        return np.asarray(fn(a, x, y), dtype=out_dtype.numpy if out_dtype else x.dtype)

    infer = _binary_infer(frozenset(dtypes), out_dtype, same)
    return register(OpDef(name, OpKind.ELEMENTWISE, infer, eager, attrs or {}, num_inputs=(2, 2)))


def _div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if x.dtype.kind in "iu":
        # integer division truncates toward zero (C semantics), not numpy's floor
        q = np.floor_divide(x, y)
        fix = (np.remainder(x, y) != 0) & ((x < 0) != (y < 0))
        return q + fix.astype(q.dtype)
    return x / y


def _mod(a, x, y):
    # fmod=1: the sign of the dividend (C fmod); fmod=0: the sign of the divisor (Python %)
    return np.fmod(x, y) if a["fmod"] else np.mod(x, y)


def _pow(a, x, y):
    if x.dtype.kind in "iu":
        return np.power(x.astype(np.float64), y.astype(np.float64))
    return np.power(x, y.astype(x.dtype))


def _bitshift(a, x, y):
    if a["direction"] == "LEFT":
        return np.left_shift(x, y)
    return np.right_shift(x, y)


def _pow_infer(attrs, types):
    a, b = present(types, 0, "X"), present(types, 1, "Y")
    check_dtype(a, NUMERIC, "X")
    check_dtype(b, NUMERIC, "Y")
    return [TensorType(broadcast_shapes(a.shape, b.shape), a.dtype)]


binary("Add", lambda a, x, y: x + y)
binary("Sub", lambda a, x, y: x - y)
binary("Mul", lambda a, x, y: x * y)
binary("Div", lambda a, x, y: _div(x, y))
binary("Mod", _mod, attrs={"fmod": 0})
binary("BitShift", _bitshift, INTS, attrs={"direction": "LEFT"})
binary("PRelu", lambda a, x, y: np.where(x < 0, y * x, x), SIGNED)
register(OpDef("Pow", OpKind.ELEMENTWISE, _pow_infer, lambda a, x, y: np.asarray(_pow(a, x, y), x.dtype), num_inputs=(2, 2)))
binary("Equal", lambda a, x, y: x == y, ALL, DType.bool)
binary("Less", lambda a, x, y: x < y, NUMERIC, DType.bool)
binary("LessOrEqual", lambda a, x, y: x <= y, NUMERIC, DType.bool)
binary("Greater", lambda a, x, y: x > y, NUMERIC, DType.bool)
binary("GreaterOrEqual", lambda a, x, y: x >= y, NUMERIC, DType.bool)
binary("And", lambda a, x, y: x & y, BOOL)
binary("Or", lambda a, x, y: x | y, BOOL)
binary("Xor", lambda a, x, y: x ^ y, BOOL)
binary("BitwiseAnd", lambda a, x, y: x & y, INTS)
binary("BitwiseOr", lambda a, x, y: x | y, INTS)
binary("BitwiseXor", lambda a, x, y: x ^ y, INTS)


def _variadic_infer(attrs, types):
    if not types:
        raise fail("needs at least one input")
    dtype = same_dtype(types)
    if dtype not in NUMERIC:
        raise fail(f"dtype {dtype.short} is not numeric")
    return [TensorType(broadcast_shapes(*(t.shape for t in types)), dtype)]


def variadic(name: str, fn: Callable) -> OpDef:
    def eager(a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        if name == "Mean":
            out = out / len(xs)
        return np.asarray(np.broadcast_to(out, np.broadcast_shapes(*(x.shape for x in xs))), dtype=xs[0].dtype)

    return register(OpDef(name, OpKind.ELEMENTWISE, _variadic_infer, eager, num_inputs=(1, None)))


variadic("Sum", np.add)
variadic("Mean", np.add)
variadic("Max", np.maximum)
variadic("Min", np.minimum)


# -- Where, Clip, Cast -----------------------------------------------------------------------
def _where_infer(attrs, types):
    c, x, y = (present(types, i, n) for i, n in enumerate(("condition", "X", "Y")))
    check_dtype(c, BOOL, "condition")
    dtype = same_dtype([x, y])
    return [TensorType(broadcast_shapes(c.shape, x.shape, y.shape), dtype)]


register(OpDef("Where", OpKind.ELEMENTWISE, _where_infer, lambda a, c, x, y: np.where(c, x, y), num_inputs=(3, 3)))


def _clip_infer(attrs, types):
    x = present(types, 0, "input")
    check_dtype(x, NUMERIC)
    for i, what in ((1, "min"), (2, "max")):
        if len(types) > i and types[i] is not None:
            if types[i].numel != 1:
                raise fail(f"{what} must be a scalar, got {types[i]}")
            same_dtype([x, types[i]])
    return [x]


def _clip(a, x, lo=None, hi=None):
    out = x
    if lo is not None:
        out = np.maximum(out, lo.reshape(()))
    if hi is not None:
        out = np.minimum(out, hi.reshape(()))
    return np.asarray(out, x.dtype)


register(OpDef("Clip", OpKind.ELEMENTWISE, _clip_infer, _clip, num_inputs=(1, 3)))


def _cast_infer(attrs, types):
    x = present(types, 0, "input")
    return [x.with_dtype(DType.parse(attrs["to"]))]


def _cast(a, x):
    to = DType.parse(a["to"]).numpy
    if x.dtype.kind == "f" and to.kind in "iu":
        # float -> int: truncate, and saturate NaN/inf deterministically instead of UB
        with np.errstate(invalid="ignore"):
            return np.trunc(x).astype(to)
    return x.astype(to)


register(OpDef("Cast", OpKind.ELEMENTWISE, _cast_infer, _cast, {"to": REQUIRED}, doc="Convert to dtype `to` (short name)."))


def _bitcast_infer(attrs, types):
    x = present(types, 0, "input")
    to = DType.parse(attrs["to"])
    if to.itemsize != x.dtype.itemsize:
        raise fail(f"cannot reinterpret {x.dtype.short} ({x.dtype.itemsize} bytes) as {to.short} ({to.itemsize} bytes)")
    return [x.with_dtype(to)]


register(
    OpDef(
        "BitCast",
        OpKind.ELEMENTWISE,
        _bitcast_infer,
        lambda a, x: np.array(x, order="C").view(DType.parse(a["to"]).numpy),
        {"to": REQUIRED},
        doc="Reinterpret the bytes (little endian) as dtype `to` of the same width.",
    )
)


# -- scalar compute rules (kiln.ir.scalar): the same ops, described once for the backends -------
def _c(E, value, like):
    return E.const(value, like)


def _sigmoid_rule(E, x):
    return E.div(_c(E, 1.0, x), E.add(_c(E, 1.0, x), E.call("exp", E.neg(x))))


def _softplus_rule(E, x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))
    return E.add(E.max(x, _c(E, 0.0, x)), E.call("log1p", E.call("exp", E.neg(E.abs(x)))))


def _gelu_rule(E, a, x):
    half = _c(E, 0.5, x)
    if a["approximate"] == "tanh":
        inner = E.mul(_c(E, math.sqrt(2 / math.pi), x), E.add(x, E.mul(_c(E, 0.044715, x), E.mul(x, E.mul(x, x)))))
        return E.mul(E.mul(half, x), E.add(_c(E, 1.0, x), E.call("tanh", inner)))
    return E.mul(E.mul(half, x), E.add(_c(E, 1.0, x), E.call("erf", E.mul(x, _c(E, 1 / math.sqrt(2), x)))))


def _nary(fn):
    def rule(E, a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(E, out, x)
        return out

    return rule


COMPUTE = {
    "Identity": lambda E, a, x: x,
    "Abs": lambda E, a, x: E.abs(x),
    "Neg": lambda E, a, x: E.neg(x),
    "Sign": lambda E, a, x: E.select(E.gt(x, _c(E, 0, x)), _c(E, 1, x), E.select(E.lt(x, _c(E, 0, x)), _c(E, -1, x), _c(E, 0, x))),
    "Reciprocal": lambda E, a, x: E.div(_c(E, 1.0, x), x),
    "Relu": lambda E, a, x: E.max(x, _c(E, 0, x)),
    "Sigmoid": lambda E, a, x: _sigmoid_rule(E, x),
    "Softplus": lambda E, a, x: _softplus_rule(E, x),
    "Softsign": lambda E, a, x: E.div(x, E.add(_c(E, 1.0, x), E.abs(x))),
    "Mish": lambda E, a, x: E.mul(x, E.call("tanh", _softplus_rule(E, x))),
    "HardSwish": lambda E, a, x: E.mul(x, E.max(_c(E, 0.0, x), E.min(_c(E, 1.0, x), E.add(E.mul(x, _c(E, 1 / 6, x)), _c(E, 0.5, x))))),
    "HardSigmoid": lambda E, a, x: E.max(_c(E, 0.0, x), E.min(_c(E, 1.0, x), E.add(E.mul(_c(E, a["alpha"], x), x), _c(E, a["beta"], x)))),
    "LeakyRelu": lambda E, a, x: E.select(E.ge(x, _c(E, 0, x)), x, E.mul(_c(E, a["alpha"], x), x)),
    "Elu": lambda E, a, x: E.select(E.ge(x, _c(E, 0, x)), x, E.mul(_c(E, a["alpha"], x), E.call("expm1", x))),
    "Selu": lambda E, a, x: E.mul(
        _c(E, a["gamma"], x), E.select(E.gt(x, _c(E, 0, x)), x, E.mul(_c(E, a["alpha"], x), E.call("expm1", x)))
    ),
    "ThresholdedRelu": lambda E, a, x: E.select(E.gt(x, _c(E, a["alpha"], x)), x, _c(E, 0, x)),
    "Gelu": _gelu_rule,
    "Not": lambda E, a, x: E.logical_not(x),
    "Add": lambda E, a, x, y: E.add(x, y),
    "Sub": lambda E, a, x, y: E.sub(x, y),
    "Mul": lambda E, a, x, y: E.mul(x, y),
    "Div": lambda E, a, x, y: E.div(x, y),
    "PRelu": lambda E, a, x, y: E.select(E.lt(x, _c(E, 0, x)), E.mul(y, x), x),
    "Equal": lambda E, a, x, y: E.eq(x, y),
    "Less": lambda E, a, x, y: E.lt(x, y),
    "LessOrEqual": lambda E, a, x, y: E.le(x, y),
    "Greater": lambda E, a, x, y: E.gt(x, y),
    "GreaterOrEqual": lambda E, a, x, y: E.ge(x, y),
    "And": lambda E, a, x, y: E.logical_and(x, y),
    "Or": lambda E, a, x, y: E.logical_or(x, y),
    "Xor": lambda E, a, x, y: E.logical_xor(x, y),
    "Where": lambda E, a, c, x, y: E.select(c, x, y),
    "Sum": _nary(lambda E, x, y: E.add(x, y)),
    "Max": _nary(lambda E, x, y: E.max(x, y)),
    "Min": _nary(lambda E, x, y: E.min(x, y)),
    "Mean": lambda E, a, *xs: E.mul(_nary(lambda E, x, y: E.add(x, y))(E, a, *xs), _c(E, 1.0 / len(xs), xs[0])),
    "Cast": lambda E, a, x: E.cast(x, DType.parse(a["to"])),
    "Clip": lambda E, a, x, lo=None, hi=None: _clip_rule(E, x, lo, hi),
    "Mod": lambda E, a, x, y: E.rem(x, y) if a["fmod"] else _python_mod_rule(E, x, y),
    "BitShift": lambda E, a, x, y: E.shift_left(x, y) if a["direction"] == "LEFT" else E.shift_right(x, y),
    "BitwiseAnd": lambda E, a, x, y: E.bit_and(x, y),
    "BitwiseOr": lambda E, a, x, y: E.bit_or(x, y),
    "BitwiseXor": lambda E, a, x, y: E.bit_xor(x, y),
    "BitwiseNot": lambda E, a, x: E.bit_not(x),
    "IsNaN": lambda E, a, x: E.isnan(x),
    "IsInf": lambda E, a, x: _isinf_rule(E, a, x),
    "Celu": lambda E, a, x: E.add(
        E.max(x, _c(E, 0.0, x)), E.min(_c(E, 0.0, x), E.mul(_c(E, a["alpha"], x), E.call("expm1", E.div(x, _c(E, a["alpha"], x)))))
    ),
    "Shrink": lambda E, a, x: E.select(
        E.lt(x, _c(E, -a["lambd"], x)),
        E.add(x, _c(E, a["bias"], x)),
        E.select(E.gt(x, _c(E, a["lambd"], x)), E.sub(x, _c(E, a["bias"], x)), _c(E, 0, x)),
    ),
}


def _python_mod_rule(E, x, y):
    # the divisor's sign (numpy.mod): shift a remainder whose sign differs from y's by y
    r = E.rem(x, y)
    zero = _c(E, 0, r)
    wrong_sign = E.logical_and(E.logical_not(E.eq(r, zero)), E.logical_xor(E.lt(r, zero), E.lt(y, _c(E, 0, y))))
    return E.select(wrong_sign, E.add(r, y), r)


def _isinf_rule(E, a, x):
    inf = _c(E, float("inf"), x)
    pos, neg = E.eq(x, inf), E.eq(x, E.neg(inf))
    if a["detect_positive"] and a["detect_negative"]:
        return E.logical_or(pos, neg)
    if a["detect_positive"]:
        return pos
    if a["detect_negative"]:
        return neg
    return E.logical_and(pos, neg)  # neither asked for: always false


def _clip_rule(E, x, lo, hi):
    if lo is not None:
        x = E.max(x, lo)
    if hi is not None:
        x = E.min(x, hi)
    return x
for _fn in ("Exp", "Log", "Sqrt", "Tanh", "Erf", "Floor", "Ceil", "Round", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh"):
    COMPUTE[_fn] = (lambda fn: lambda E, a, x: E.call(fn, x))(_fn.lower())
COMPUTE["Pow"] = lambda E, a, x, y: E.call("pow", x, E.cast_like(y, x))

for _name, _rule in COMPUTE.items():
    get_op(_name).compute = _rule
