"""The text form prints and parses back to an equal graph; parse errors say where."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kiln
from kiln.errors import GraphError
from kiln.ir import DType, Graph, TensorType, graphs_equal, parse_graph, print_graph, verify

SMALL_MLP = """
graph mlp(%x: f32[2,4]) {
  param %w: f32[4,3] = [0.5, -1.0, 2.0, 0.25, 0.0, 1.5, -0.5, 1.0, 3.0, 2.0, -2.0, 0.125]
  param %b: f32[3] = [0.1, 0.2, 0.3]
  %h: f32[2,3] = Gemm(%x, %w, %b) {alpha=1.0, beta=1.0, transA=0, transB=0} @"fc1"
  %y: f32[2,3] = Relu(%h)
  %s: f32[2,1] = ReduceSum(%y) {axes=[1], keepdims=1}
  return %y, %s
}
"""


def test_hand_written_graph_parses_runs_and_prints_back():
    graph = parse_graph(SMALL_MLP)
    verify(graph)
    assert [n.op.name for n in graph.nodes] == ["Gemm", "Relu", "ReduceSum"]
    assert graph.nodes[0].name == "fc1"
    again = parse_graph(print_graph(graph))
    assert graphs_equal(graph, again)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = kiln.compile(graph).run({"x": x})
    w = graph.params[graph.param("w")]
    expected = np.maximum(x @ w + np.array([0.1, 0.2, 0.3], np.float32), 0)
    np.testing.assert_allclose(out["y"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["s"], expected.sum(axis=1, keepdims=True), rtol=1e-6)


def test_large_parameters_print_by_hash_and_bind_by_name():
    g = Graph("big")
    x = g.add_input("x", TensorType((1, 64), DType.float32))
    w = g.add_param("w", np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    g.outputs.append(g.add_node("MatMul", [x, w]).outputs[0])
    text = print_graph(g)
    assert "dense<sha256:" in text
    with pytest.raises(GraphError, match="stored by hash"):
        parse_graph(text)
    with pytest.raises(GraphError, match="does not match its hash"):
        parse_graph(text, params={"w": np.zeros((64, 64), np.float32)})
    assert graphs_equal(g, parse_graph(text, params={"w": g.params[w]}))


def test_imported_resnet_round_trips(light_model):
    graph = kiln.driver.to_graph(light_model("light_resnet50"))
    params = {v.name: a for v, a in graph.params.items()}
    assert graphs_equal(graph, parse_graph(print_graph(graph), params))


@pytest.mark.parametrize(
    "text, message",
    [
        ("graph g(%x: f32[2]) {\n  %y: f32[2] = Relu(%z)\n  return %y\n}", "line 2.*%z is used before it is defined"),
        ("graph g(%x: f32[2]) {\n  %y: f32[3] = Relu(%x)\n  return %y\n}", "line 2.*declared f32\\[3\\] but Relu infers f32\\[2\\]"),
        ("graph g(%x: f32[2]) {\n  %y: f32[2] = Frobnicate(%x)\n  return %y\n}", "unknown op 'Frobnicate'"),
        ("graph g(%x: q9[2]) {\n  return %x\n}", "unknown dtype 'q9'"),
        ("graph g(%x: f32[2]) {\n  %y: f32[2] = Relu(%x) {alpha=}\n  return %y\n}", "line 2.*expected a value"),
    ],
)
def test_parse_errors_name_the_line(text, message):
    with pytest.raises((GraphError, ValueError), match=message):
        parse_graph(text)


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=60, deadline=None)
@given(
    name=names,
    alpha=floats,
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=4),
    data=st.lists(floats, min_size=3, max_size=3),
)
def test_any_names_attributes_and_small_params_round_trip(name, alpha, shape, data):
    g = Graph("g")
    x = g.add_input(name, TensorType(tuple(shape), DType.float32))
    p = g.add_param(name + "_p", np.array(data, np.float32))
    y = g.add_node("LeakyRelu", [x], {"alpha": float(alpha)}, name=name).outputs[0]
    z = g.add_node("Identity", [p]).outputs[0]
    g.outputs += [y, z]
    assert graphs_equal(g, parse_graph(print_graph(g)))
