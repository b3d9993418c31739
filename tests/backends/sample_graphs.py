"""Small graphs every compiled backend is checked on against the eager oracle."""

from __future__ import annotations

import numpy as np

from kiln.ir import parse_graph

GRAPHS = {
    "broadcast_chain": """
        graph g(%x: f32[4,1,8], %y: f32[3,8]) {
          %a: f32[4,3,8] = Add(%x, %y)
          %b: f32[4,3,8] = Sigmoid(%a)
          %c: f32[4,3,8] = Mul(%b, %a)
          return %c
        }""",
    "mlp": """
        graph g(%x: f32[5,16]) {
          param %w1: f32[16,8] = dense
          param %b1: f32[8] = dense
          param %w2: f32[8,3] = dense
          %h: f32[5,8] = Gemm(%x, %w1, %b1) {alpha=1.0, beta=1.0, transA=0, transB=0}
          %r: f32[5,8] = Relu(%h)
          %o: f32[5,3] = MatMul(%r, %w2)
          %p: f32[5,3] = Softmax(%o) {axis=-1}
          return %p
        }""",
    "conv_pool": """
        graph g(%x: f32[2,3,9,9]) {
          param %w: f32[4,3,3,3] = dense
          param %b: f32[4] = dense
          %c: f32[2,4,5,5] = Conv(%x, %w, %b) {dilations=[1, 1], group=1, pads=[1, 1, 1, 1], strides=[2, 2]}
          %r: f32[2,4,5,5] = Relu(%c)
          %m: f32[2,4,3,3] = MaxPool(%r) {ceil_mode=1, dilations=null, kernel_shape=[2, 2], pads=null, strides=[2, 2]}
          %a: f32[2,4,1,1] = GlobalAveragePool(%m)
          return %a, %m
        }""",
    "data_movement": """
        graph g(%x: f32[2,3,4]) {
          %t: f32[4,2,3] = Transpose(%x) {perm=[2, 0, 1]}
          %s: f32[2,2,3] = Slice(%t) {starts=[3], ends=[0], axes=[0], steps=[-2]}
          %c: f32[6,2,3] = Concat(%t, %s) {axis=0}
          %p: f32[6,4,3] = Pad(%c) {pads=[0, 1, 0, 0, 1, 0], mode="constant"}
          %r: f32[12,6] = Reshape(%p) {shape=[12, 6]}
          %e: f32[12,6] = Tile(%r) {repeats=[1, 1]}
          return %e
        }""",
}


def build(text: str):
    """Parse ``text``, giving each ``param ... = dense`` seeded random data."""
    from kiln.ir.text import array_digest

    rng = np.random.default_rng(0)
    lines = []
    params = {}
    for line in text.splitlines():
        if "param" in line and line.rstrip().endswith("= dense"):
            name = line.split("%")[1].split(":")[0]
            dims = line.split("[")[1].split("]")[0]
            shape = tuple(int(d) for d in dims.split(","))
            params[name] = rng.standard_normal(shape).astype(np.float32)
            line = line.replace("= dense", f"= dense<sha256:{array_digest(params[name])}>")
        lines.append(line)
    return parse_graph("\n".join(lines), params)
