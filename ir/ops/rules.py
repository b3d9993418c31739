"""Helpers the shape rules of every op family share: broadcasting, axes, dtype checks."""

from __future__ import annotations

from typing import Iterable, Sequence

from kiln.errors import TypeInferenceError
from kiln.ir.dtypes import DType
from kiln.ir.types import TensorType


def fail(message: str) -> TypeInferenceError:
    return TypeInferenceError(message)


def present(types: Sequence[TensorType | None], index: int, what: str) -> TensorType:
    """The type of input ``index``, which must be given."""
    if index >= len(types) or types[index] is None:
        raise fail(f"input {index} ({what}) is required")
    return types[index]


def check_dtype(t: TensorType, allowed: Iterable[DType], what: str = "input") -> None:
    allowed = frozenset(allowed)
    if t.dtype not in allowed:
        names = ", ".join(sorted(d.short for d in allowed))
        raise fail(f"{what} has dtype {t.dtype.short}; expected one of {names}")


def same_dtype(types: Sequence[TensorType | None]) -> DType:
    dtypes = {t.dtype for t in types if t is not None}
    if len(dtypes) != 1:
        raise fail(f"inputs must share one dtype, got {sorted(d.short for d in dtypes)}")
    return dtypes.pop()


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """Numpy-style multidirectional broadcasting; errors show the shapes."""
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise fail(f"shapes {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    """``axis`` in ``[-rank, rank)`` as a non-negative index."""
    if not -rank <= axis < max(rank, 1):
        raise fail(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def norm_axes(axes: Iterable[int], rank: int, what: str = "axes") -> list[int]:
    out = [norm_axis(a, rank, what) for a in axes]
    if len(set(out)) != len(out):
        raise fail(f"{what} {list(axes)} repeat an axis")
    return out


def ints(values: Iterable, what: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        raise fail(f"{what} must be a list of integers") from None
