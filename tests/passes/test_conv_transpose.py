"""conv_transpose_as_conv: a unit-stride ConvTranspose as a Conv by flipped, swapped weights."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir import parse_graph, verify
from kiln.passes import run_passes


def test_a_unit_stride_conv_transpose_becomes_a_conv_by_flipped_weights(rewrites):
    rewrites(
        ["conv_transpose_as_conv"],
        """
        graph g(%x: f32[4,3,9,9], %w: f32[3,16,3,3]) {
          %y: f32[4,16,9,9] = ConvTranspose(%x, %w) {pads=[1, 1, 1, 1]}
          return %y
        }""",
        """
        graph g(%x: f32[4,3,9,9], %w: f32[3,16,3,3]) {
          %r: f32[1,3,16,3,3] = Reshape(%w) {shape=[1, 3, 16, 3, 3]}
          %t: f32[1,16,3,3,3] = Transpose(%r) {perm=[0, 2, 1, 3, 4]}
          %f: f32[1,16,3,3,3] = Slice(%t) {starts=[-1, -1], ends=[-4, -4], axes=[3, 4], steps=[-1, -1]}
          %v: f32[16,3,3,3] = Reshape(%f) {shape=[16, 3, 3, 3]}
          %y: f32[4,16,9,9] = Conv(%x, %v) {group=1, dilations=[1, 1], pads=[1, 1, 1, 1]}
          return %y
        }""",
    )


@pytest.mark.parametrize(
    "weight, attrs, out",
    [
        ("[4,8,3,3]", "{group=2, pads=[0, 2, 1, 0]}", "[2,16,9,7]"),  # groups, uneven pads
        ("[4,16,3,3]", "{dilations=[2, 1], pads=[3, 1, 2, 0]}", "[2,16,7,8]"),  # a dilated axis
        ("[4,16,3,3]", "{pads=[0, 0, 0, 0]}", "[2,16,10,9]"),  # no pads: the conv pads the full reach
    ],
)
def test_conv_transposes_with_groups_dilations_and_pads_keep_their_outputs(weight, attrs, out):
    graph = parse_graph(f"""graph g(%x: f32[2,4,8,7], %w: f32{weight}, %b: f32[16]) {{
  %y: f32{out} = ConvTranspose(%x, %w, %b) {attrs}
  return %y
}}""")
    rewritten = run_passes(graph.copy(), ["conv_transpose_as_conv"])
    verify(rewritten)
    assert "ConvTranspose" not in rewritten.op_histogram()
    rng = np.random.default_rng(2)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = kiln.compile(graph).run(feeds)["y"]
    for compiled in (kiln.compile(rewritten), kiln.compile(graph, target="llvm", layout="nchw")):
        np.testing.assert_allclose(compiled.run(feeds)["y"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "text",
    [
        # stride 2: output rows a kernel tap apart take other taps
        "graph g(%x: f32[2,4,8,8], %w: f32[4,16,2,2]) {\n %y: f32[2,16,16,16] = ConvTranspose(%x, %w) {strides=[2, 2]}\n return %y\n}",
        # a pad past the flipped kernel's reach would be a negative conv pad
        "graph g(%x: f32[2,4,8,8], %w: f32[4,16,3,3]) {\n %y: f32[2,16,4,8] = ConvTranspose(%x, %w) {pads=[3, 1, 3, 1]}\n return %y\n}",
        # to 6 channels (LeNet-5's input gradient): each column would feed only 6 outputs
        "graph g(%x: f32[64,16,10,10], %w: f32[16,6,5,5]) {\n %y: f32[64,6,14,14] = ConvTranspose(%x, %w) {}\n return %y\n}",
        # run-time weights as large as the columns they would save (128 channels at 2x2)
        "graph g(%x: f32[2,128,2,2], %w: f32[128,16,3,3]) {\n %y: f32[2,16,2,2] = ConvTranspose(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}",
    ],
)
def test_strided_over_padded_narrow_and_weight_bound_conv_transposes_stay(text):
    graph = parse_graph(text)
    rewritten = run_passes(graph.copy(), ["conv_transpose_as_conv"])
    assert rewritten.op_histogram() == graph.op_histogram()
