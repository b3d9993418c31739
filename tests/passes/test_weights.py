"""pretranspose_weights: constant Gemm weights read with transB become row-major copies."""

from __future__ import annotations


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
