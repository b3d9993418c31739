"""Matrix products: Gemm, MatMul (numpy batching rules), Einsum."""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import FLOATS, NUMERIC
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.ops.rules import broadcast_shapes, check_dtype, fail, present, same_dtype
from kiln.ir.types import TensorType


def _gemm_infer(attrs, types):
    a, b = present(types, 0, "A"), present(types, 1, "B")
    check_dtype(a, NUMERIC, "A")
    same_dtype([a, b])
    if a.rank != 2 or b.rank != 2:
        raise fail(f"A {a} and B {b} must be matrices")
    m, k = a.shape[::-1] if attrs["transA"] else a.shape
    k2, n = b.shape[::-1] if attrs["transB"] else b.shape
    if k != k2:
        raise fail(f"inner dimensions differ: A {a} (transA={attrs['transA']}), B {b} (transB={attrs['transB']})")
    if len(types) > 2 and types[2] is not None:
        if broadcast_shapes(types[2].shape, (m, n)) != (m, n):
            raise fail(f"C {types[2]} does not broadcast to ({m}, {n})")
    return [TensorType((m, n), a.dtype)]


def _gemm(attrs, a, b, c=None):
    a = a.T if attrs["transA"] else a
    b = b.T if attrs["transB"] else b
    y = attrs["alpha"] * (a @ b)
    if c is not None:
        y = y + attrs["beta"] * c
    return np.asarray(y, dtype=a.dtype)


register(
    OpDef(
        "Gemm",
        OpKind.HEAVY,
        _gemm_infer,
        _gemm,
        {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
        num_inputs=(2, 3),
    )
)


def matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """numpy.matmul's result shape (1-D operands promoted and dropped again)."""
    if not a or not b:
        raise fail("MatMul operands must have rank >= 1")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise fail(f"inner dimensions differ: {a} @ {b}")
    out = broadcast_shapes(a2[:-2], b2[:-2]) + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return out


def _matmul_infer(attrs, types):
    a, b = present(types, 0, "A"), present(types, 1, "B")
    check_dtype(a, NUMERIC, "A")
    same_dtype([a, b])
    return [TensorType(matmul_shape(a.shape, b.shape), a.dtype)]


register(
    OpDef("MatMul", OpKind.HEAVY, _matmul_infer, lambda attrs, a, b: np.matmul(a, b), num_inputs=(2, 2))
)


def einsum_shape(equation: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Result shape of an explicit einsum equation (``ij,jk->ik``, with ``...`` broadcasting)."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        raise fail(f"equation {eq!r} needs an explicit '->' (the importer adds it)")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise fail(f"equation {eq!r} has {len(terms)} operands, got {len(shapes)}")
    sizes: dict[str, int] = {}
    ellipses: list[tuple[int, ...]] = []
    for term, shape in zip(terms, shapes):
        pre, _, post = term.partition("...")
        n_ell = len(shape) - len(pre) - len(post) if "..." in term else 0
        if n_ell < 0 or ("..." not in term and len(term) != len(shape)):
            raise fail(f"term {term!r} does not match operand shape {shape}")
        ellipses.append(tuple(shape[len(pre) : len(pre) + n_ell]))
        for letter, dim in zip(pre + post, shape[: len(pre)] + shape[len(pre) + n_ell :]):
            known = sizes.setdefault(letter, dim)
            if known != dim and 1 not in (known, dim):
                raise fail(f"index {letter!r} is {known} in one operand and {dim} in another")
            sizes[letter] = max(known, dim)
    pre, _, post = rhs.partition("...")
    for letter in pre + post:
        if letter not in sizes:
            raise fail(f"output index {letter!r} appears in no operand")
    middle = broadcast_shapes(*ellipses) if "..." in rhs else ()
    return tuple(sizes[c] for c in pre) + middle + tuple(sizes[c] for c in post)


def _expand_ellipsis(term: str, rank: int, width: int) -> list[str]:
    """The labels of each of ``rank`` dims; ``...`` becomes the last of ``width`` shared
    broadcast labels (numbered so they cannot clash with letters)."""
    if "..." not in term:
        return list(term)
    pre, post = term.split("...")
    n = rank - len(pre) - len(post)
    return [*pre, *[str(i) for i in range(width - n, width)], *post]


def einsum_labels(equation: str, ranks: list[int]) -> tuple[list[list[str]], list[str]]:
    """Per operand, the label of each dim; and the output's labels."""
    lhs, rhs = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    width = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    return [_expand_ellipsis(t, r, width) for t, r in zip(terms, ranks)], _expand_ellipsis(rhs, width + len(rhs.replace("...", "")), width)


def _einsum_infer(attrs, types):
    check_dtype(present(types, 0, "Inputs"), NUMERIC)
    same_dtype(types)
    return [TensorType(einsum_shape(attrs["equation"], [t.shape for t in types]), types[0].dtype)]


register(
    OpDef(
        "Einsum",
        OpKind.HEAVY,
        _einsum_infer,
        lambda attrs, *xs: np.asarray(np.einsum(attrs["equation"], *xs), dtype=xs[0].dtype),
        {"equation": REQUIRED},
        num_inputs=(1, None),
    )
)


def _det_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS)
    if x.rank < 2 or x.shape[-1] != x.shape[-2]:
        raise fail(f"X {x} must end in square matrices")
    return [x.with_shape(x.shape[:-2])]


register(
    OpDef("Det", OpKind.HEAVY, _det_infer, lambda attrs, x: np.asarray(np.linalg.det(x.astype(np.float64)), dtype=x.dtype))
)
