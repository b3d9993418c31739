"""pretranspose_weights and row_major_gemm: Gemm operands laid out the way the kernels read them."""

from __future__ import annotations

import numpy as np
import pytest


def test_transposed_constant_weight_is_flipped_at_compile_time(rewrites):
    rewrites(
        ["pretranspose_weights"],
        """
        graph g(%x: f32[2,3]) {
          param %w: f32[2,3] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
          param %b: f32[2] = [0.5, -0.5]
          %y: f32[2,2] = Gemm(%x, %w, %b) {alpha=1.0, beta=1.0, transA=0, transB=1}
          return %y
        }""",
        """
        graph g(%x: f32[2,3]) {
          param %b: f32[2] = [0.5, -0.5]
          param %wt: f32[3,2] = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
          %y: f32[2,2] = Gemm(%x, %wt, %b) {alpha=1.0, beta=1.0, transA=0, transB=0}
          return %y
        }""",
    )


def test_computed_weights_and_plain_gemms_are_left_alone(rewrites):
    text = """
        graph g(%x: f32[2,3], %w: f32[2,3]) {
          param %v: f32[3,2] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
          %h: f32[2,2] = Gemm(%x, %w) {alpha=1.0, beta=1.0, transA=0, transB=1}
          %y: f32[2,2] = Gemm(%x, %v) {alpha=1.0, beta=1.0, transA=0, transB=0}
          %z: f32[2,2] = Add(%h, %y)
          return %z
        }"""
    rewrites(["pretranspose_weights"], text, text)


def test_a_weight_read_by_many_gemms_is_transposed_once(rewrites):
    """An unrolled recurrence reads its recurrent weights at every step: one copy, shared."""
    for name in ("pretranspose_weights", "row_major_gemm"):
        rewrites(
            [name],
            """
            graph g(%x: f32[2,3]) {
              param %w: f32[3,3] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
              %h: f32[2,3] = Gemm(%x, %w) {alpha=1.0, beta=1.0, transA=0, transB=1}
              %y: f32[2,3] = Gemm(%h, %w) {alpha=1.0, beta=1.0, transA=0, transB=1}
              return %y
            }""",
            """
            graph g(%x: f32[2,3]) {
              param %wt: f32[3,3] = [1.0, 4.0, 7.0, 2.0, 5.0, 8.0, 3.0, 6.0, 9.0]
              %h: f32[2,3] = Gemm(%x, %wt) {alpha=1.0, beta=1.0, transA=0, transB=0}
              %y: f32[2,3] = Gemm(%h, %wt) {alpha=1.0, beta=1.0, transA=0, transB=0}
              return %y
            }""",
        )


@pytest.mark.parametrize("bias", [None, (32,), (1, 32), (4, 32), (4, 1), (1,)])
def test_a_batch_times_a_computed_wide_weight_is_taken_the_other_way_round(bias):
    """x W^T with W computed at run time (a training step) and bigger than x and C: row_major_gemm
    computes (W x^T)^T, transposing x and C instead of W, with C's bias transposed to match."""
    import kiln
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType
    from kiln.passes import get_pass

    graph = Graph("g")
    x = graph.add_input("x", TensorType((4, 40), DType.float32))
    w = graph.add_input("w", TensorType((32, 40), DType.float32))
    inputs = [x, w]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((4, 40)).astype(np.float32), "w": rng.standard_normal((32, 40)).astype(np.float32)}
    if bias is not None:
        inputs.append(graph.add_input("c", TensorType(bias, DType.float32)))
        feeds["c"] = rng.standard_normal(bias).astype(np.float32)
    graph.outputs = [graph.add_node("Gemm", inputs, {"alpha": 0.5, "beta": 2.0, "transB": 1}, name="dense").outputs[0]]
    swapped = get_pass("row_major_gemm")(graph.copy())
    gemm = next(n for n in swapped.nodes if n.op.name == "Gemm")
    assert gemm.inputs[0].name == "w" and not gemm.attrs["transB"]
    assert swapped.outputs[0].name == graph.outputs[0].name
    (want,) = kiln.compile(graph).run(feeds).values()
    (got,) = kiln.compile(graph, target="llvm").run(feeds).values()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
