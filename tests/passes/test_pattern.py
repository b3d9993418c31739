"""The pattern API: captures, repeated variables, predicates, optional inputs, private matches."""

from __future__ import annotations

import numpy as np

from kiln.ir import parse_graph, print_graph
from kiln.passes.pattern import Const, Match, Maybe, Op, Var, apply_rewrite

SWISH = Op("Mul", Var("x"), Op("Sigmoid", Var("x"), name="sig"))


def to_swish(m: Match, emit):
    x = m.value("x")
    return emit.op("Mul", [x, emit.op("Sigmoid", [x])])  # same ops, new nodes: proves the replacement


def test_a_repeated_variable_must_bind_the_same_value():
    g = parse_graph(
        """
        graph g(%x: f32[3], %z: f32[3]) {
          %s1: f32[3] = Sigmoid(%x)
          %same: f32[3] = Mul(%x, %s1)
          %s2: f32[3] = Sigmoid(%x)
          %other: f32[3] = Mul(%z, %s2)
          return %same, %other
        }"""
    )
    seen = []
    apply_rewrite(g, SWISH, lambda m, emit: seen.append(m.value("x").name))
    assert seen == ["x"]


def test_predicates_captures_and_optional_inputs():
    g = parse_graph(
        """
        graph g(%x: f32[1,2,4,4]) {
          param %w: f32[3,2,1,1] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
          param %b: f32[3] = [0.5, 0.5, 0.5]
          %a: f32[1,3,4,4] = Conv(%x, %w) {dilations=[1, 1], group=1, pads=[0, 0, 0, 0], strides=[1, 1]}
          %c: f32[1,3,4,4] = Conv(%x, %w, %b) {dilations=[1, 1], group=1, pads=[0, 0, 0, 0], strides=[1, 1]}
          %y: f32[1,3,4,4] = Add(%a, %c)
          return %y
        }"""
    )
    found = []
    pattern = Op("Conv", Var("x"), Const("w"), Maybe(Const("b")), name="conv", where=lambda m: m.node("conv").attrs["group"] == 1)
    apply_rewrite(g, pattern, lambda m, emit: found.append((m.array("w").shape, m.array("b"))))
    assert found[0][0] == (3, 2, 1, 1) and found[0][1] is None
    np.testing.assert_array_equal(found[1][1], [0.5, 0.5, 0.5])


def test_matches_whose_inside_is_read_elsewhere_are_skipped():
    text = """
    graph g(%x: f32[3]) {
      %s: f32[3] = Sigmoid(%x)
      %m: f32[3] = Mul(%x, %s)
      %y: f32[3] = Add(%m, %s)
      return %y
    }"""
    g = parse_graph(text)
    assert apply_rewrite(g, SWISH, to_swish) == 0
    assert print_graph(g) == print_graph(parse_graph(text))


def test_a_rewrite_replaces_the_root_and_dead_nodes_go():
    g = parse_graph(
        """
        graph g(%x: f32[3]) {
          %s: f32[3] = Sigmoid(%x)
          %m: f32[3] = Mul(%x, %s)
          %y: f32[3] = Exp(%m)
          return %y
        }"""
    )
    assert apply_rewrite(g, Op("Exp", SWISH), lambda m, emit: emit.op("Relu", [m.value("x")])) == 1
    assert [n.op.name for n in g.nodes] == ["Relu"] and g.outputs[0].name == "y"
