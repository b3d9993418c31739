"""onnxruntime's quantized contrib ops (com.microsoft) import as their float ops between
DequantizeLinear and QuantizeLinear: the same integers as onnxruntime, to one step where its
fixed-point arithmetic rounds differently."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln

U8 = TensorProto.UINT8


def _model(op: str, inputs: dict, consts: dict, out_shape, out_type=U8, **attrs):
    """A one-node com.microsoft model: ``inputs`` fed (name -> array), ``consts`` initializers."""
    names = list(inputs) + list(consts)
    order = attrs.pop("order", names)
    node = helper.make_node(op, order, ["y"], domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs.items()],
        [helper.make_tensor_value_info("y", out_type, out_shape)], [numpy_helper.from_array(a, n) for n, a in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("com.microsoft", 1)])


def _scalars(prefix: str, scale: float, zero: int, dtype=np.uint8) -> dict:
    return {f"{prefix}_scale": np.array(scale, np.float32), f"{prefix}_zero": np.array(zero, dtype)}


rng = np.random.default_rng(0)
A = rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
B = rng.integers(0, 256, (1, 3, 1, 4), dtype=np.uint8)

CASES = {
    "QLinearAdd": lambda: _model("QLinearAdd", {"a": A, "b": B}, {**_scalars("a", 0.02, 100), **_scalars("b", 0.03, 20), **_scalars("c", 0.05, 128)}, A.shape,
                                 order=["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "c_scale", "c_zero"]),
    "QLinearMul": lambda: _model("QLinearMul", {"a": A, "b": B}, {**_scalars("a", 0.02, 100), **_scalars("b", 0.03, 20), **_scalars("c", 0.05, 128)}, A.shape,
                                 order=["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "c_scale", "c_zero"]),
    "QLinearSigmoid": lambda: _model("QLinearSigmoid", {"x": A}, {**_scalars("x", 0.05, 128), **_scalars("y", 1 / 256, 0)}, A.shape),
    "QLinearLeakyRelu": lambda: _model("QLinearLeakyRelu", {"x": A}, {**_scalars("x", 0.05, 128), **_scalars("y", 0.04, 50)}, A.shape, alpha=0.2),
    "QLinearGlobalAveragePool": lambda: _model("QLinearGlobalAveragePool", {"x": A}, {**_scalars("x", 0.05, 128), **_scalars("y", 0.01, 120)}, (2, 3, 1, 1)),
    "QLinearAveragePool": lambda: _model("QLinearAveragePool", {"x": A}, {**_scalars("x", 0.05, 128), **_scalars("y", 0.02, 110)}, (2, 3, 2, 2), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "QLinearConcat": lambda: _model("QLinearConcat", {"a": A, "b": A[:, :2]}, {**_scalars("y", 0.05, 128), **_scalars("a", 0.02, 100), **_scalars("b", 0.03, 20)}, (2, 5, 4, 4),
                                    order=["y_scale", "y_zero", "a", "a_scale", "a_zero", "b", "b_scale", "b_zero"], axis=1),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_contrib_quantized_ops_agree_with_onnxruntime(op):
    model = CASES[op]()
    feeds = {i.name: {"a": A, "b": B if op != "QLinearConcat" else A[:, :2], "x": A}[i.name] for i in model.graph.input}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = kiln.compile(model).run(feeds)["y"]
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1


def test_qgemm_with_an_int32_bias_and_per_column_weights_agrees_with_onnxruntime():
    a = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    consts = {
        **_scalars("a", 0.03, 120), "b": rng.integers(-127, 128, (5, 6), dtype=np.int8), "b_scale": (rng.random(5) * 0.02 + 0.01).astype(np.float32),
        "b_zero": np.zeros(5, np.int8), "c": rng.integers(-500, 500, 5).astype(np.int32), **_scalars("y", 0.1, 128),
    }
    model = _model("QGemm", {"a": a}, consts, (4, 5), order=["a", "a_scale", "a_zero", "b", "b_scale", "b_zero", "c", "y_scale", "y_zero"], transB=1)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"a": a})[0]
    got = kiln.compile(model).run({"a": a})["y"]
    assert np.abs(got.astype(np.int32) - want.astype(np.int32)).max() <= 1
    llvm = kiln.compile(model, target="llvm").run({"a": a})["y"]
    assert np.abs(llvm.astype(np.int32) - got.astype(np.int32)).max() <= 1
