"""integer_products: a Conv, MatMul or Gemm of dequantized uint8 activations and int8 weights
becomes a channels-last ConvInteger or a MatMulInteger, its int32 sums scaled back to float;
nodes it cannot express stay."""

from __future__ import annotations

import pytest

from kiln.ir import parse_graph
from kiln.passes import run_passes

QDQ_CONV = """
    graph g(%xq: u8[1,2,3,3]) {{
      param %sx: f32[] = [0.5]
      param %zx: {zx_type} = [3]
      param %wq: i8[2,2,1,1] = [1, -2, 3, 4]
      param %sw: f32[2] = [0.25, 0.125]
      param %zw: i8[2] = {zw}
      param %b: f32[2] = [1.0, -1.0]
      %x: f32[1,2,3,3] = DequantizeLinear(%xq, %sx, %zx) {{axis=1, block_size=0, output_dtype=null}}
      %w: f32[2,2,1,1] = DequantizeLinear(%wq, %sw, %zw) {{axis=0, block_size=0, output_dtype=null}}
      %y: f32[1,2,3,3] = Conv(%x, %w, %b) {{strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group={group}}}
      return %y
    }}"""


def test_a_dequantized_conv_becomes_a_channels_last_integer_conv_and_its_scale(rewrites):
    """The weight goes to (kernel, C, M) order, the scale is x's times each channel's, the bias
    is added after; the DequantizeLinear nodes it read go."""
    rewrites(
        ["integer_products"],
        QDQ_CONV.format(zx_type="u8[]", zw="[0, 0]", group=1),
        """
        graph g(%xq: u8[1,2,3,3]) {
          param %zx: u8[] = [3]
          param %b: f32[2] = [1.0, -1.0]
          param %wt: i8[1,1,2,2] = [1, 3, -2, 4]
          param %scale: f32[1,2,1,1] = [0.125, 0.0625]
          %t: u8[1,3,3,2] = Transpose(%xq) {perm=[0, 2, 3, 1]}
          %sums: i32[1,3,3,2] = ConvInteger(%t, %wt, %zx) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1, layout="NHWC"}
          %back: i32[1,2,3,3] = Transpose(%sums) {perm=[0, 3, 1, 2]}
          %f: f32[1,2,3,3] = Cast(%back) {to="f32"}
          %scaled: f32[1,2,3,3] = Mul(%f, %scale)
          %bias: f32[1,2,1,1] = Reshape(%b) {shape=[1, 2, 1, 1]}
          %y: f32[1,2,3,3] = Add(%scaled, %bias)
          return %y
        }""",
    )


def test_a_weight_zero_point_becomes_a_shift_times_each_windows_sum():
    """int8 weight less its zero point: the integer conv by the weight, less the zero point
    times each window's sum of (xq - zx), a ones-kernel conv of the channel sums."""
    import numpy as np

    import kiln

    text = QDQ_CONV.format(zx_type="u8[]", zw="[0, 1]", group=1).replace("pads=[0, 0, 0, 0]", "pads=[1, 0, 1, 0]").replace("%y: f32[1,2,3,3]", "%y: f32[1,2,5,3]")
    graph = run_passes(parse_graph(text), ["integer_products"])
    ops = [n.op.name for n in graph.nodes]
    assert ops.count("ConvInteger") == 1 and ops.count("Conv") == 1 and "ReduceSum" in ops
    xq = np.random.default_rng(0).integers(0, 256, (1, 2, 3, 3), dtype=np.uint8)
    want = kiln.compile(parse_graph(text)).run({"xq": xq})["y"]
    np.testing.assert_allclose(kiln.compile(graph).run({"xq": xq})["y"], want, rtol=1e-6)


@pytest.mark.parametrize(
    "zx_type, zw, group, why",
    [
        ("u8[]", "[0, 0]", 2, "a grouped conv that is not depthwise"),
        ("u8[]", "[0, 1]", 2, "... with a weight zero point too"),
    ],
)
def test_convs_without_an_integer_form_stay(zx_type, zw, group, why):
    text = QDQ_CONV.format(zx_type=zx_type, zw=zw, group=group).replace("%xq: u8", f"%xq: {zx_type[:2]}")
    if group == 2:  # 4 channels in 2 groups of 2
        text = text.replace("u8[1,2,3,3]", "u8[1,4,3,3]").replace("%x: f32[1,2,3,3]", "%x: f32[1,4,3,3]")
    graph = run_passes(parse_graph(text), ["integer_products"])
    assert [n.op.name for n in graph.nodes].count("Conv") == 1, why
    assert "ConvInteger" not in [n.op.name for n in graph.nodes], why


QDQ_GEMM = """
    graph g(%xq: u8[2,3]) {{
      param %sx: f32[] = [0.5]
      param %zx: u8[] = [3]
      param %wq: i8[{w_shape}] = [1, -2, 3, 4, -5, 6]
      param %sw: f32[2] = [0.25, 0.125]
      param %c: f32[2] = [1.0, -1.0]
      %x: f32[2,3] = DequantizeLinear(%xq, %sx, %zx) {{axis=1, block_size=0, output_dtype=null}}
      %w: f32[{w_shape}] = DequantizeLinear(%wq, %sw) {{axis={axis}, block_size=0, output_dtype=null}}
      %y: f32[2,2] = {product}
      return %y
    }}"""


def test_a_dequantized_matmul_becomes_matmul_integer_and_its_column_scales(rewrites):
    rewrites(
        ["integer_products"],
        QDQ_GEMM.format(w_shape="3,2", axis=1, product="MatMul(%x, %w)"),
        """
        graph g(%xq: u8[2,3]) {
          param %zx: u8[] = [3]
          param %wq: i8[3,2] = [1, -2, 3, 4, -5, 6]
          param %scale: f32[2] = [0.125, 0.0625]
          %sums: i32[2,2] = MatMulInteger(%xq, %wq, %zx)
          %f: f32[2,2] = Cast(%sums) {to="f32"}
          %y: f32[2,2] = Mul(%f, %scale)
          return %y
        }""",
    )


def test_a_dequantized_gemm_takes_its_transposed_weight_alpha_and_beta(rewrites):
    """Gemm's (N, K) weight is stored (K, N); alpha joins the scale, beta * C is the bias."""
    rewrites(
        ["integer_products"],
        QDQ_GEMM.format(w_shape="2,3", axis=0, product="Gemm(%x, %w, %c) {alpha=2.0, beta=0.5, transA=0, transB=1}"),
        """
        graph g(%xq: u8[2,3]) {
          param %zx: u8[] = [3]
          param %c: f32[2] = [1.0, -1.0]
          param %wt: i8[3,2] = [1, 4, -2, -5, 3, 6]
          param %scale: f32[2] = [0.25, 0.125]
          param %half: f32[] = [0.5]
          %sums: i32[2,2] = MatMulInteger(%xq, %wt, %zx)
          %f: f32[2,2] = Cast(%sums) {to="f32"}
          %scaled: f32[2,2] = Mul(%f, %scale)
          %bias: f32[2] = Mul(%c, %half)
          %y: f32[2,2] = Add(%scaled, %bias)
          return %y
        }""",
    )
