"""Element types of kiln tensors, their short names in the text form, and numpy mapping."""

from __future__ import annotations

from enum import Enum

import numpy as np


class DType(Enum):
    """An element type. ``value`` is the short name used in the text form (``f32``)."""

    float16 = "f16"
    float32 = "f32"
    float64 = "f64"
    int8 = "i8"
    int16 = "i16"
    int32 = "i32"
    int64 = "i64"
    uint8 = "u8"
    uint16 = "u16"
    uint32 = "u32"
    uint64 = "u64"
    bool = "bool"

    @property
    def short(self) -> str:
        return self.value

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.name)

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self in FLOATS

    @property
    def is_int(self) -> bool:
        return self in INTS

    @property
    def is_signed(self) -> bool:
        return self in FLOATS or self in SIGNED_INTS

    @staticmethod
    def from_numpy(dtype: np.dtype | type) -> "DType":
        """The kiln dtype of a numpy dtype; ValueError for ones kiln has no type for."""
        dt = np.dtype(dtype)
        try:
            return _BY_NUMPY[dt]
        except KeyError:
            raise ValueError(f"numpy dtype {dt} has no kiln dtype") from None

    @staticmethod
    def parse(text: str) -> "DType":
        try:
            return _BY_SHORT[text]
        except KeyError:
            raise ValueError(f"unknown dtype {text!r}; known: {sorted(_BY_SHORT)}") from None


FLOATS = frozenset({DType.float16, DType.float32, DType.float64})
SIGNED_INTS = frozenset({DType.int8, DType.int16, DType.int32, DType.int64})
UNSIGNED_INTS = frozenset({DType.uint8, DType.uint16, DType.uint32, DType.uint64})
INTS = SIGNED_INTS | UNSIGNED_INTS
NUMERIC = FLOATS | INTS
ALL = NUMERIC | {DType.bool}

_BY_NUMPY = {d.numpy: d for d in DType}
_BY_SHORT = {d.short: d for d in DType}
