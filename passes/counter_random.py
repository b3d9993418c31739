"""Counter-based random numbers as graph ops: a different draw for every value of a runtime
counter (the training step), the same draw for the same counter, on every backend.

Each element's number is a hash of its position and a per-draw key, the key a hash of the seed
and the counter (Wellons' ``lowbias32`` finalizer: xor-shifts and odd multiplications in
uint32, whose wrap-around every backend computes alike). The top 24 bits become a float in
[0, 1). Nothing is carried between runs, so a compiled step stays a pure function of its inputs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kiln.ir.graph import Value
from kiln.passes.autodiff import GradBuilder

_U32 = np.uint32


def _lowbias32(b: GradBuilder, h: Value) -> Value:
    def const(value: int) -> Value:
        return b.graph.add_param(b.graph.fresh_name(f"{b.where}.k"), np.full((1,), value, dtype=_U32))

    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
        h = b.op("BitwiseXor", h, b.op("BitShift", h, const(shift), direction="RIGHT"))
        if factor is not None:
            h = b.op("Mul", h, const(factor))
    return h


def uniform(b: GradBuilder, shape: Sequence[int], seed: int, counter: Value) -> Value:
    """float32 numbers in [0, 1) of ``shape``, drawn afresh for each value of ``counter`` (a
    non-negative scalar, e.g. the optimizer's step count) and reproducible from ``seed``."""
    step = b.reshape(b.op("Cast", counter, to="u32"), [1])
    seeded = np.full((1,), (seed * 0x9E3779B9 + 0x85EBCA77) & 0xFFFFFFFF, dtype=_U32)
    key = _lowbias32(b, b.op("BitwiseXor", step, b.graph.add_param(b.graph.fresh_name(f"{b.where}.seed"), seeded)))
    count = int(np.prod(shape, dtype=np.int64))
    positions = (np.arange(count, dtype=np.uint64) * 0x9E3779B1 & 0xFFFFFFFF).astype(_U32).reshape(tuple(shape))
    h = _lowbias32(b, b.op("BitwiseXor", b.graph.add_param(b.graph.fresh_name(f"{b.where}.positions"), positions), key))
    top = b.op("BitShift", h, b.graph.add_param(b.graph.fresh_name(f"{b.where}.k"), np.full((1,), 8, dtype=_U32)), direction="RIGHT")
    scale = b.graph.add_param(b.graph.fresh_name(f"{b.where}.unit"), np.full((1,), 2.0**-24, dtype=np.float32))
    return b.reshape(b.op("Mul", b.op("Cast", top, to="f32"), scale), shape)
