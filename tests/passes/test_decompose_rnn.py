"""decompose_rnn: recurrent nodes unrolled into GEMMs and gate math compute what the op does."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir.evaluate import evaluate
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.ir.dtypes import DType
from kiln.passes import get_pass

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_graph(op: str, direction="forward", layout=0, bias=True, initial=False, extra=None, peepholes=False, lens=False, seq=4, batch=3, width=5, hidden=6):
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    g = Graph()
    x_shape = (batch, seq, width) if layout else (seq, batch, width)
    x = g.add_input("x", TensorType(x_shape, DType.float32))
    gates = GATES[op]
    w = g.add_param("w", rng.uniform(-0.5, 0.5, (dirs, gates * hidden, width)).astype(np.float32))
    r = g.add_param("r", rng.uniform(-0.5, 0.5, (dirs, gates * hidden, hidden)).astype(np.float32))
    inputs = [x, w, r]
    inputs.append(g.add_param("b", rng.uniform(-0.5, 0.5, (dirs, 2 * gates * hidden)).astype(np.float32)) if bias else None)
    if lens:  # a run-time input: each batch row's length
        inputs.append(g.add_input("lens", TensorType((batch,), DType.int32)))
    if peepholes:
        inputs += [None] * (7 - len(inputs)) + [g.add_param("p", rng.uniform(-0.5, 0.5, (dirs, 3 * hidden)).astype(np.float32))]
    if initial:
        state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
        inputs += [None] * (5 - len(inputs)) + [g.add_param("h0", rng.normal(size=state_shape).astype(np.float32))]
        if op == "LSTM":
            inputs.append(g.add_param("c0", rng.normal(size=state_shape).astype(np.float32)))
    attrs = {"hidden_size": hidden, "direction": direction, "layout": layout, **(extra or {})}
    node = g.add_node(op, inputs, attrs, name="rnn", output_names=["y", "y_h", "y_c"][: 3 if op == "LSTM" else 2])
    g.outputs = list(node.outputs)
    return g


VARIANTS = [
    dict(op="LSTM"), dict(op="LSTM", direction="bidirectional", initial=True), dict(op="LSTM", layout=1, bias=False),
    dict(op="LSTM", direction="reverse", layout=1, initial=True, seq=1),
    dict(op="LSTM", direction="bidirectional", peepholes=True),
    dict(op="GRU", extra={"linear_before_reset": 1}), dict(op="GRU", direction="bidirectional", initial=True),
    dict(op="GRU", layout=1, direction="reverse"), dict(op="RNN"), dict(op="RNN", direction="bidirectional", layout=1, initial=True),
    dict(op="LSTM", direction="bidirectional", lens=True, peepholes=True), dict(op="GRU", direction="reverse", lens=True, initial=True),
    dict(op="RNN", direction="bidirectional", lens=True, layout=1),
    dict(op="LSTM", extra={"clip": 0.5, "input_forget": 1}), dict(op="GRU", extra={"clip": 0.3}),
    dict(op="LSTM", direction="bidirectional", extra={"activations": ["HardSigmoid", "Affine", "ScaledTanh", "Sigmoid", "LeakyRelu", "Softsign"], "activation_alpha": [0.3, 0.5, 1.5], "activation_beta": [0.4, 0.1, 0.7]}),
    dict(op="GRU", extra={"activations": ["Relu", "Elu"]}), dict(op="RNN", extra={"activations": ["ThresholdedRelu"], "activation_alpha": [0.2]}),
    dict(op="RNN", extra={"activations": ["Softplus"]}),
]


def _feeds(graph: Graph) -> list[np.ndarray]:
    """x, and lengths (one row full, one empty, one part) when the graph takes them."""
    x = graph.inputs[0]
    feeds = [np.random.default_rng(1).normal(size=x.type.shape).astype(np.float32)]
    if len(graph.inputs) > 1:
        seq = x.type.shape[1] if graph.nodes[0].attrs["layout"] else x.type.shape[0]
        feeds.append(np.array([seq, 0, seq - 2], dtype=np.int32))
    return feeds


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_unrolled_graph_computes_the_recurrent_op(variant):
    graph = recurrent_graph(**variant)
    feeds = _feeds(graph)
    want = evaluate(graph, feeds)
    unrolled = get_pass("decompose_rnn")(graph)
    assert not {"LSTM", "GRU", "RNN"} & set(unrolled.op_histogram())
    assert [v.name for v in unrolled.outputs] == [v.name for v in graph.outputs]
    for got, expected in zip(evaluate(unrolled, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_llvm_runs_recurrent_models_through_the_lowering():
    graph = recurrent_graph("LSTM", direction="bidirectional", initial=True)
    x = np.random.default_rng(2).normal(size=graph.inputs[0].type.shape).astype(np.float32)
    want = evaluate(graph, [x])
    got = kiln.compile(graph, target="llvm").run({"x": x})
    for name, expected in zip(["y", "y_h", "y_c"], want):
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5)


def test_llvm_masks_rows_past_their_length():
    graph = recurrent_graph("GRU", direction="bidirectional", lens=True, initial=True)
    feeds = _feeds(graph)
    want = evaluate(graph, feeds)
    got = kiln.compile(graph, target="llvm").run({"x": feeds[0], "lens": feeds[1]})
    for name, expected in zip(["y", "y_h"], want):
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-5)


def test_an_unknown_activation_is_named():
    graph = recurrent_graph("RNN", extra={"activations": ["Swish"]})
    with pytest.raises(kiln.KilnError, match=r"node 'rnn': unknown recurrent activation 'Swish'"):
        get_pass("decompose_rnn")(graph)
