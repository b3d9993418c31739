"""ONNX export: the checker accepts it, onnxruntime runs it to kiln's outputs, and importing it
gives back an equal graph, for ops whose ONNX form takes attributes as inputs too."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kiln
import kiln.nn as nn
from kiln.frontend.dsl import functional as F
from kiln.frontend.onnx import import_onnx
from kiln.frontend.onnx.export import graph_to_onnx
from kiln.ir.graph import graphs_equal

RNG = np.random.default_rng(11)


def arr(*shape):
    return RNG.normal(size=shape).astype(np.float32)


CASES = {
    "slice_steps": (lambda x: x[::-2, 1:3], [arr(5, 4)]),
    "pad_and_tile": (lambda x: F.tile(F.pad(x, [0, 1, 1, 0], value=2.0), repeats=[2, 1]), [arr(3, 4)]),
    "resize_scales": (lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), [arr(1, 2, 4, 6)]),
    "resize_sizes": (lambda x: F.interpolate(x, size=(3, 9)), [arr(1, 2, 4, 6)]),
    "reductions": (lambda x: F.sum(x, 1) + F.reduce_l2(x, axes=[1], keepdims=0) + F.max(x, 1), [arr(3, 4)]),
    "split_concat": (lambda x: F.concat(list(reversed(F.split(x, [1, 3], axis=1))), axis=1), [arr(2, 4)]),
    "topk_cumsum_trilu": (lambda x: F.cumsum(F.topk(x, k=2)[0], axis=1) + F.trilu(x, k=1)[:, :2], [arr(4, 4)]),
    "one_hot": (lambda i: F.one_hot(i, kiln.Tensor(np.array([0.0, 1.0], np.float32)), depth=5), [np.array([0, 3, 4])]),
    "constant_of_shape_cast": (lambda x: F.astype(x, np.int32) + F.constant_of_shape(shape=[3], value=2, dtype="i32"), [arr(3) * 4]),
    "empty_reshape": (lambda x: F.reshape(x[0:0], 0, 4), [arr(3, 4)]),
    "dropout_eval": (lambda x: F.dropout(x, 0.4), [arr(8)]),
    "dft": (lambda x: F.dft(x, axis=1, length=8, onesided=1), [arr(2, 6, 1)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_runs_in_onnxruntime_and_imports_back_equal(name):
    fn, inputs = CASES[name]
    names = [f"in{i}" for i in range(len(inputs))]
    graph = kiln.trace(fn, inputs, input_names=names)
    want = kiln.compile(graph).run(dict(zip(names, inputs)))["output"]
    proto = graph_to_onnx(graph)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, dict(zip(names, inputs)))[0], want, rtol=1e-5, atol=1e-6)
    back = import_onnx(proto)
    assert graphs_equal(back, graph), f"{back}\n!=\n{graph}"
    assert not [i for i in proto.graph.initializer if i.name not in {n for node in proto.graph.node for n in node.input}]


def test_optimized_graphs_export_their_fused_bodies():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2), nn.Softmax())
    model.eval()
    x = arr(1, 3, 4, 4)
    fused = kiln.optimize(kiln.trace(model, [x]), "O2")
    assert "Fused" in fused.op_histogram()
    proto = graph_to_onnx(fused)
    assert "Fused" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], model(kiln.Tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_export_onnx_traces_a_module_and_writes_the_file(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    path = tmp_path / "m.onnx"
    kiln.export_onnx(model, path, [arr(4, 3)])
    loaded = onnx.load(path)
    assert [i.name for i in loaded.graph.input] == ["x"] and [o.name for o in loaded.graph.output] == ["output"]
    assert {i.name for i in loaded.graph.initializer} == {"0.weight", "0.bias"}
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(kiln.KilnError, match="needs example_inputs"):
        kiln.export_onnx(model, path)


def test_export_of_an_op_onnx_cannot_express_names_the_node():
    x = arr(1, 1, 2, 2)
    graph = kiln.trace(lambda t: F.op("MaxUnpool", t, kiln.Tensor(np.array([[[[0, 1], [2, 3]]]])), output_shape=[1, 1, 2, 2], unpooled_shape=[1, 1, 2, 2]), [x])
    with pytest.raises(kiln.KilnError, match="MaxUnpool.*has no ONNX export"):
        graph_to_onnx(graph)
