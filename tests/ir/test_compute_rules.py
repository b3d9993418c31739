"""Every elementwise op's scalar ``compute`` rule agrees with its numpy reference.

The backends lower ``compute``; the eager backend runs ``eager``. Evaluating ``compute`` with
NumpyScalarOps over the same inputs ties the two descriptions together.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.ir import OpKind, all_ops
from kiln.ir.ops.elementwise import COMPUTE
from kiln.ir.scalar import NumpyScalarOps

RNG = np.random.default_rng(0)
FLOAT_X = RNG.uniform(-3, 3, 64).astype(np.float32)
POSITIVE = RNG.uniform(0.2, 3, 64).astype(np.float32)
UNIT = RNG.uniform(-0.9, 0.9, 64).astype(np.float32)
BOOLS = RNG.random(64) < 0.5

DOMAIN = {"Log": POSITIVE, "Sqrt": POSITIVE, "Acosh": POSITIVE + 1, "Asin": UNIT, "Acos": UNIT, "Atanh": UNIT, "Reciprocal": POSITIVE}
ATTRS = {"Cast": {"to": "i32"}, "Gelu": {"approximate": "tanh"}, "BitShift": {"direction": "RIGHT"}, "IsInf": {"detect_negative": 0}}


INTS_A = RNG.integers(-50, 50, 64).astype(np.int32)
INTS_B = np.where(RNG.integers(1, 9, 64) % 2 == 0, 1, -1).astype(np.int32) * RNG.integers(1, 9, 64).astype(np.int32)
UINTS = RNG.integers(0, 200, 64).astype(np.uint8)


def operands(op):
    if op.name == "Mod":
        return [INTS_A, INTS_B]
    if op.name == "BitShift":
        return [UINTS, (UINTS % 8).astype(np.uint8)]
    if op.name in ("BitwiseAnd", "BitwiseOr", "BitwiseXor"):
        return [INTS_A, INTS_B]
    if op.name == "BitwiseNot":
        return [INTS_A]
    if op.name in ("IsNaN", "IsInf"):
        return [np.array([0.0, np.nan, np.inf, -np.inf, 1.5] * 4, np.float32)]
    if op.name in ("Not",):
        return [BOOLS]
    if op.name in ("And", "Or", "Xor"):
        return [BOOLS, ~BOOLS]
    if op.name == "Where":
        return [BOOLS, FLOAT_X, POSITIVE]
    if op.name == "Pow":
        return [POSITIVE, UNIT]
    if op.name == "Clip":
        return [FLOAT_X, np.array(-1.0, np.float32), np.array(0.5, np.float32)]
    x = DOMAIN.get(op.name, FLOAT_X)
    lo, hi = op.num_inputs
    count = max(lo, 2 if hi is None else lo)
    return [x, POSITIVE, FLOAT_X][:count]


@pytest.mark.parametrize("name", sorted(COMPUTE))
def test_compute_matches_eager(name):
    op = all_ops()[name]
    attrs = op.complete_attrs(ATTRS.get(name, {}))
    xs = operands(op)
    want = op.run_eager(attrs, xs)[0]
    got = np.asarray(op.compute(NumpyScalarOps(), attrs, *xs))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2e-6, atol=2e-6)


def test_the_common_elementwise_ops_have_compute_rules():
    elementwise = {n for n, op in all_ops().items() if op.kind is OpKind.ELEMENTWISE}
    wanted = {"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Clip", "LeakyRelu", "Sum", "Where", "Cast"}
    assert wanted <= set(COMPUTE) <= elementwise
