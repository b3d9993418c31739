"""Canonicalization passes, Before/Expected in the text form."""

from __future__ import annotations

import numpy as np

from kiln import config
from kiln.ir import parse_graph
from kiln.passes import run_passes


def test_fold_constants(rewrites):
    rewrites(
        ["fold_constants", "eliminate_dead_code"],
        """
        graph g(%x: f32[2]) {
          param %a: f32[2] = [1.0, 2.0]
          param %b: f32[2] = [10.0, 20.0]
          %s: f32[2] = Add(%a, %b)
          %t: f32[2] = Mul(%s, %a)
          %y: f32[2] = Add(%x, %t)
          return %y
        }""",
        """
        graph g(%x: f32[2]) {
          param %k: f32[2] = [11.0, 44.0]
          %y: f32[2] = Add(%x, %k)
          return %y
        }""",
    )


def test_fold_constants_respects_the_fold_cap():
    text = """
    graph g(%x: f32[8]) {
      param %a: f32[8] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
      %e: f32[8] = Exp(%a)
      %y: f32[8] = Add(%x, %e)
      return %y
    }"""
    with config.override(fold_elements=4):
        graph = run_passes(parse_graph(text), ["fold_constants"])
    assert [n.op.name for n in graph.nodes] == ["Exp", "Add"]


def test_dequantized_weights_fold_whatever_their_size():
    """A DequantizeLinear of parameters is a float weight (a QDQ model's): folded past the cap,
    by the pass and by the decompose lowering, so it is not rebuilt every run; an Exp is not.
    The ONNX importer keeps it a node, for integer_products to read the int8 weight under it."""
    from kiln.passes.decompose import Decompose
    from onnx import helper, numpy_helper

    from kiln.frontend.onnx.importer import import_onnx

    text = """
    graph g(%x: f32[8]) {
      param %q: i8[8] = [1, -2, 3, -4, 5, -6, 7, -8]
      param %s: f32[] = 0.5
      param %a: f32[8] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
      %w: f32[8] = DequantizeLinear(%q, %s)
      %e: f32[8] = Exp(%a)
      %y: f32[8] = Add(%x, %w)
      %z: f32[8] = Add(%y, %e)
      return %z
    }"""
    with config.override(fold_elements=4):
        graph = run_passes(parse_graph(text), ["fold_constants"])
        nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]), helper.make_node("Add", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(np.arange(-4, 4, dtype=np.int8), "q"), numpy_helper.from_array(np.array(0.5, np.float32), "s")]
        onnx_graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [8])], [helper.make_tensor_value_info("y", 1, [8])], inits)
        imported = import_onnx(helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", 21)]))
        assert [n.op.name for n in imported.nodes] == ["DequantizeLinear", "Add"]
        eager = run_passes(imported.copy(), ["fold_dequantized_weights"])  # the eager target's lowering
        lowered = Decompose().run(imported)
    assert [n.op.name for n in graph.nodes] == ["Exp", "Add", "Add"]
    assert [n.op.name for n in lowered.nodes] == ["Add"] == [n.op.name for n in eager.nodes]
    np.testing.assert_array_equal(lowered.params[lowered.nodes[0].inputs[1]], np.arange(-4, 4) * 0.5)


def test_eliminate_dead_code(rewrites):
    rewrites(
        ["eliminate_dead_code"],
        """
        graph g(%x: f32[3]) {
          param %unused: f32[3] = [1.0, 2.0, 3.0]
          %dead: f32[3] = Exp(%x)
          %also_dead: f32[3] = Add(%dead, %unused)
          %y: f32[3] = Relu(%x)
          return %y
        }""",
        """
        graph g(%x: f32[3]) {
          %y: f32[3] = Relu(%x)
          return %y
        }""",
    )


def test_common_subexpressions_and_duplicate_constants_merge(rewrites):
    rewrites(
        ["eliminate_common_subexpressions", "eliminate_dead_code"],
        """
        graph g(%x: f32[2]) {
          param %one: f32[2] = [1.0, 1.0]
          param %same: f32[2] = [1.0, 1.0]
          %a: f32[2] = Add(%x, %one)
          %b: f32[2] = Add(%x, %same)
          %y: f32[2] = Mul(%a, %b)
          return %y
        }""",
        """
        graph g(%x: f32[2]) {
          param %one: f32[2] = [1.0, 1.0]
          %a: f32[2] = Add(%x, %one)
          %y: f32[2] = Mul(%a, %a)
          return %y
        }""",
    )


def test_noops_go_but_outputs_keep_their_names(rewrites):
    rewrites(
        ["remove_noops", "eliminate_dead_code"],
        """
        graph g(%x: f32[2,3]) {
          %a: f32[2,3] = Identity(%x)
          %b: f32[2,3] = Reshape(%a) {shape=[2, 3]}
          %c: f32[2,3] = Transpose(%b) {perm=[0, 1]}
          %d: f32[2,3] = Cast(%c) {to="f32"}
          %e: f32[2,3] = Dropout(%d) {ratio=0.5, training_mode=0, seed=0}
          %f: f32[2,3] = Slice(%e) {starts=[0, 0], ends=[2, 3], axes=[0, 1], steps=null}
          %y: f32[2,3] = Exp(%f)
          %z: f32[2,3] = Identity(%y)
          %same_as_input: f32[2,3] = Identity(%x)
          %reversed: f32[2,3] = Slice(%x) {starts=[-1], ends=[-10], axes=[1], steps=[-1]}
          return %z, %same_as_input, %reversed
        }""",
        """
        graph g(%x: f32[2,3]) {
          %z: f32[2,3] = Exp(%x)
          %same_as_input: f32[2,3] = Identity(%x)
          %reversed: f32[2,3] = Slice(%x) {starts=[-1], ends=[-10], axes=[1], steps=[-1]}
          return %z, %same_as_input, %reversed
        }""",
    )


def test_reshape_and_transpose_chains_fold(rewrites):
    rewrites(
        ["fold_reshape_chains", "fold_transpose_chains", "remove_noops", "eliminate_dead_code"],
        """
        graph g(%x: f32[2,3,4]) {
          %a: f32[6,4] = Reshape(%x) {shape=[6, 4]}
          %b: f32[24] = Reshape(%a) {shape=[24]}
          %c: f32[4,3,2] = Transpose(%x) {perm=[2, 1, 0]}
          %d: f32[2,3,4] = Transpose(%c) {perm=[2, 1, 0]}
          %e: f32[3,4,2] = Transpose(%x) {perm=[1, 2, 0]}
          %f: f32[4,2,3] = Transpose(%e) {perm=[1, 2, 0]}
          return %b, %d, %f
        }""",
        """
        graph g(%x: f32[2,3,4]) {
          %b: f32[24] = Reshape(%x) {shape=[24]}
          %d: f32[2,3,4] = Identity(%x)
          %f: f32[4,2,3] = Transpose(%x) {perm=[2, 0, 1]}
          return %b, %d, %f
        }""",
    )


def test_reshaped_transposed_and_cast_fills_stay_fills(rewrites):
    """A fill too large to fold keeps being a fill through layout changes (a light model's
    2048x1000 classifier weight, transposed for the GEMM, is no run-time transpose)."""
    rewrites(
        ["fold_fills"],
        """
        graph g(%x: f32[4,6]) {
          %w: f32[6,4] = ConstantOfShape() {dtype="f32", shape=[6, 4], value=0.5}
          %t: f32[4,6] = Transpose(%w) {perm=[1, 0]}
          %r: f32[2,12] = Reshape(%t) {shape=[2, 12]}
          %c: i32[2,12] = Cast(%r) {to="i32"}
          %y: f32[4,6] = Add(%x, %t)
          return %y, %r, %c
        }""",
        """
        graph g(%x: f32[4,6]) {
          %t: f32[4,6] = ConstantOfShape() {dtype="f32", shape=[4, 6], value=0.5}
          %r: f32[2,12] = ConstantOfShape() {dtype="f32", shape=[2, 12], value=0.5}
          %c: i32[2,12] = ConstantOfShape() {dtype="i32", shape=[2, 12], value=0}
          %y: f32[4,6] = Add(%x, %t)
          return %y, %r, %c
        }""",
    )


def test_small_constant_powers_become_multiplies(rewrites):
    """Pow by a constant 2, 3, -1 or 1 (a scalar, or a tensor of one value broadcast to x's
    shape) is multiplies, a Reciprocal, or x; other exponents, a variable exponent, and an
    exponent that broadcasts x to a larger shape stay Pow."""
    rewrites(
        ["expand_small_powers"],
        """
        graph g(%x: f32[2,3], %y: f32[2,3]) {
          param %two: f32[] = 2.0
          param %three: f32[1,3] = [3.0, 3.0, 3.0]
          param %minus_one: f32[] = -1.0
          param %one: f32[] = 1.0
          param %half: f32[] = 0.5
          param %wide: f32[4,1,1] = [2.0, 2.0, 2.0, 2.0]
          %a: f32[2,3] = Pow(%x, %two)
          %b: f32[2,3] = Pow(%x, %three)
          %c: f32[2,3] = Pow(%x, %minus_one)
          %d: f32[2,3] = Pow(%y, %one)
          %e: f32[2,3] = Pow(%x, %half)
          %f: f32[2,3] = Pow(%x, %y)
          %h: f32[4,2,3] = Pow(%x, %wide)
          %s: f32[2,3] = Add(%a, %b)
          %t: f32[2,3] = Add(%c, %d)
          return %s, %t, %e, %f, %h
        }""",
        """
        graph g(%x: f32[2,3], %y: f32[2,3]) {
          param %half: f32[] = 0.5
          param %wide: f32[4,1,1] = [2.0, 2.0, 2.0, 2.0]
          %a: f32[2,3] = Mul(%x, %x)
          %sq: f32[2,3] = Mul(%x, %x)
          %b: f32[2,3] = Mul(%sq, %x)
          %c: f32[2,3] = Reciprocal(%x)
          %d: f32[2,3] = Identity(%y)
          %e: f32[2,3] = Pow(%x, %half)
          %f: f32[2,3] = Pow(%x, %y)
          %h: f32[4,2,3] = Pow(%x, %wide)
          %s: f32[2,3] = Add(%a, %b)
          %t: f32[2,3] = Add(%c, %d)
          return %s, %t, %e, %f, %h
        }""",
    )


def test_taps_that_read_only_the_border_are_trimmed(rewrites):
    """A dilated conv over a small map: taps that read only zero padding for every output
    position go, with the pads they covered. Rate 6 over 4x4 leaves the centre tap, a 1x1 conv
    without pads; a large end pad drops the last tap row and keeps what the rest still reads;
    an ordinary padded 3x3 conv keeps every tap."""
    rewrites(
        ["trim_border_taps"],
        """
        graph g(%x: f32[1,1,4,4], %v: f32[1,1,5,2]) {
          param %w: f32[1,1,3,3] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
          param %u: f32[1,1,3,1] = [1.0, 2.0, 3.0]
          %a: f32[1,1,4,4] = Conv(%x, %w) {strides=[1, 1], pads=[6, 6, 6, 6], dilations=[6, 6], group=1}
          %b: f32[1,1,5,2] = Conv(%v, %u) {strides=[1, 1], pads=[0, 0, 8, 0], dilations=[4, 1], group=1}
          %c: f32[1,1,4,4] = Conv(%x, %w) {strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1}
          return %a, %b, %c
        }""",
        """
        graph g(%x: f32[1,1,4,4], %v: f32[1,1,5,2]) {
          param %w: f32[1,1,3,3] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
          param %wt: f32[1,1,1,1] = [5.0]
          param %ut: f32[1,1,2,1] = [1.0, 2.0]
          %a: f32[1,1,4,4] = Conv(%x, %wt) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[6, 6], group=1}
          %b: f32[1,1,5,2] = Conv(%v, %ut) {strides=[1, 1], pads=[0, 0, 4, 0], dilations=[4, 1], group=1}
          %c: f32[1,1,4,4] = Conv(%x, %w) {strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1}
          return %a, %b, %c
        }""",
    )


def test_a_gather_of_one_constant_index_is_a_slice(rewrites):
    """A scalar index drops the axis (Slice, then Reshape); an index of shape (1,) keeps it;
    a negative index counts from the end; indices of more than one element stay a Gather."""
    rewrites(
        ["gather_one_as_slice"],
        """
        graph g(%x: f32[3,2,4]) {
          param %one: i64[] = 1
          param %last: i64[1] = [-1]
          param %two: i64[2] = [0, 2]
          %a: f32[2,4] = Gather(%x, %one) {axis=0}
          %b: f32[3,2,1] = Gather(%x, %last) {axis=2}
          %d: f32[3,2,2] = Gather(%x, %two) {axis=2}
          return %a, %b, %d
        }""",
        """
        graph g(%x: f32[3,2,4]) {
          param %two: i64[2] = [0, 2]
          %s: f32[1,2,4] = Slice(%x) {starts=[1], ends=[2], axes=[0], steps=null}
          %a: f32[2,4] = Reshape(%s) {shape=[2, 4]}
          %b: f32[3,2,1] = Slice(%x) {starts=[3], ends=[4], axes=[2], steps=null}
          %d: f32[3,2,2] = Gather(%x, %two) {axis=2}
          return %a, %b, %d
        }""",
    )


def test_a_gather_of_an_index_out_of_range_stays_and_fails_as_it_would():
    graph = parse_graph(
        """
        graph g(%x: f32[3,4]) {
          param %far: i64[] = 3
          %a: f32[4] = Gather(%x, %far) {axis=0}
          return %a
        }"""
    )
    assert run_passes(graph, ["gather_one_as_slice"]).op_histogram() == {"Gather": 1}
