"""Dynamic quantization, as onnxruntime's ``quantize_dynamic`` writes it: DynamicQuantizeLinear
(kiln's op, one kernel on llvm) agrees with onnxruntime bit for bit on every target, and
DynamicQuantizeLSTM (com.microsoft: an LSTM of 8-bit products) on eager and unrolled on llvm
agrees with onnxruntime on one thread (on several, onnxruntime quantizes each thread's batch
rows apart).

One step agrees to float rounding. Over several steps, a state element that lands next to a
rounding boundary of its quantization can go one step either way: the three compute the gates
in different precisions (float64, float32, onnxruntime's approximations), and the step moves the
rows it feeds by up to ~0.01 from there on."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.ir.ops.rnn import dynamic_quantized

BATCH, INPUT, HIDDEN = 5, 12, 16


def _dynamic_quantize_model(shape):
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "y_scale", "y_zero_point"])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in (("y", TensorProto.UINT8), ("y_scale", TensorProto.FLOAT), ("y_zero_point", TensorProto.UINT8))]
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(shape):
    rng = np.random.default_rng(7)
    yield "normal", rng.standard_normal(shape).astype(np.float32)
    yield "positive", (rng.random(shape) + 0.5).astype(np.float32)  # the range is [0, max]
    yield "negative", -(rng.random(shape) + 0.5).astype(np.float32)  # zero point 255
    yield "zeros", np.zeros(shape, np.float32)  # an empty range: onnxruntime's scale is 1


# (3, 5): one short vector; (64, 784): the range's four chains, the quantization over the pool
@pytest.mark.parametrize("shape", [(3, 5), (2, 67), (64, 784)])
@pytest.mark.parametrize("target", ["eager", "llvm", "tvm-llvm"])
def test_dynamic_quantize_linear_is_onnxruntimes_to_the_bit(shape, target):
    model = _dynamic_quantize_model(shape)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    compiled = kiln.compile(model, target=target)
    for what, x in _inputs(shape):
        want = dict(zip(("y", "y_scale", "y_zero_point"), session.run(None, {"x": x})))
        got = compiled.run({"x": x})
        for name, expected in want.items():
            assert got[name].dtype == expected.dtype and np.array_equal(got[name], expected), f"{what} {name}"


def test_dynamic_quantize_linear_is_one_kernel_on_llvm():
    graph = kiln.compile(_dynamic_quantize_model((4, 4)), target="llvm").graph
    assert [n.op.name for n in graph.nodes] == ["DynamicQuantizeLinear"]


def _model(direction: str, per_column: bool, lens: bool, weights=np.int8, SEQ=7):
    dirs = 2 if direction == "bidirectional" else 1
    rng = np.random.default_rng(1)
    info = np.iinfo(weights)
    scale_shape = (dirs, 4 * HIDDEN) if per_column else (dirs,)
    consts = {
        "W": rng.integers(info.min, info.max + 1, (dirs, INPUT, 4 * HIDDEN), dtype=weights),
        "R": rng.integers(info.min, info.max + 1, (dirs, HIDDEN, 4 * HIDDEN), dtype=weights),
        "B": (rng.standard_normal((dirs, 8 * HIDDEN)) * 0.1).astype(np.float32),
        "W_scale": (rng.random(scale_shape) * 0.01 + 0.002).astype(np.float32),
        "W_zero": np.full(scale_shape, 0 if weights == np.int8 else 128, weights),
        "R_scale": (rng.random(scale_shape) * 0.01 + 0.002).astype(np.float32),
        "R_zero": np.full(scale_shape, 0 if weights == np.int8 else 128, weights),
    }
    inputs = ["X", "W", "R", "B", "lens" if lens else "", "h0", "c0", "", "W_scale", "W_zero", "R_scale", "R_zero"]
    node = helper.make_node("DynamicQuantizeLSTM", inputs, ["Y", "Y_h", "Y_c"], domain="com.microsoft", hidden_size=HIDDEN, direction=direction)
    fed = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [SEQ, BATCH, INPUT])]
    fed += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [dirs, BATCH, HIDDEN]) for n in ("h0", "c0")]
    if lens:
        fed.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")]
    graph = helper.make_graph([node], "qlstm", fed, outs, [numpy_helper.from_array(a, n) for n, a in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    feeds = {
        "X": rng.standard_normal((SEQ, BATCH, INPUT)).astype(np.float32),
        "h0": (rng.standard_normal((dirs, BATCH, HIDDEN)) * 0.3).astype(np.float32),
        "c0": (rng.standard_normal((dirs, BATCH, HIDDEN)) * 0.3).astype(np.float32),
        **({"lens": np.array([7, 3, 5, 7, 1], np.int32).clip(max=SEQ)} if lens else {}),
    }
    return model, feeds


def _onnxruntime(model, feeds) -> dict:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(("Y", "Y_h", "Y_c"), session.run(None, feeds)))


CASES = [("forward", False, False), ("reverse", True, False), ("bidirectional", False, True), ("bidirectional", True, True), ("reverse", False, True)]


@pytest.mark.parametrize("direction,per_column,lens", CASES)
def test_one_step_agrees_with_onnxruntime_to_rounding(direction, per_column, lens):
    model, feeds = _model(direction, per_column, lens, SEQ=1)
    want = _onnxruntime(model, feeds)
    for target in ("eager", "llvm"):
        got = kiln.compile(model, target=target).run(feeds)
        for name, expected in want.items():
            np.testing.assert_allclose(got[name], expected, atol=1e-6, err_msg=f"{target} {name}")


@pytest.mark.parametrize("extra", ["input_forget", "clip", "peepholes"])
def test_lstms_attributes_and_peepholes_agree_with_onnxruntime(extra):
    model, feeds = _model("bidirectional", False, True, SEQ=1)
    node = model.graph.node[0]
    if extra == "peepholes":
        node.input[7] = "P"
        model.graph.initializer.append(numpy_helper.from_array((np.random.default_rng(5).standard_normal((2, 3 * HIDDEN)) * 0.3).astype(np.float32), "P"))
    else:
        node.attribute.append(helper.make_attribute(extra, 1 if extra == "input_forget" else 0.5))
    want = _onnxruntime(model, feeds)
    for target in ("eager", "llvm"):
        got = kiln.compile(model, target=target).run(feeds)
        for name, expected in want.items():
            np.testing.assert_allclose(got[name], expected, atol=1e-6, err_msg=f"{target} {name}")


@pytest.mark.parametrize("direction,per_column,lens", CASES)
def test_a_sequence_agrees_with_onnxruntime_but_for_single_quantization_steps(direction, per_column, lens):
    model, feeds = _model(direction, per_column, lens)
    want = _onnxruntime(model, feeds)
    for target in ("eager", "llvm"):
        got = kiln.compile(model, target=target).run(feeds)
        for name, expected in want.items():
            assert np.abs(got[name] - expected).max() < 0.02, f"{target} {name}"
        moved = np.abs(got["Y"] - want["Y"]) > 2e-6  # the rows after a step that went the other way
        assert moved.mean() < 0.25, f"{target}: {moved.mean():.1%} of Y moved"


def test_uint8_weights_with_a_zero_point_agree_with_onnxruntime():
    model, feeds = _model("forward", False, False, weights=np.uint8, SEQ=1)
    want = _onnxruntime(model, feeds)
    for target in ("eager", "llvm"):
        np.testing.assert_allclose(kiln.compile(model, target=target).run(feeds)["Y"], want["Y"], atol=1e-6)


def test_the_quantized_lstm_differs_from_its_float_twin():
    """The products are quantized: a float LSTM of the dequantized weights is measurably off
    (so the agreement above is not the float math agreeing with itself)."""
    model, feeds = _model("forward", False, False)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = (consts["W"].astype(np.float32) * consts["W_scale"][:, None, None]).transpose(0, 2, 1)
    r = (consts["R"].astype(np.float32) * consts["R_scale"][:, None, None]).transpose(0, 2, 1)
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "h0", "c0"], ["Y"], hidden_size=HIDDEN)
    graph = helper.make_graph([node], "lstm", list(model.graph.input), [model.graph.output[0]],
                              [numpy_helper.from_array(a, n) for n, a in (("W", w), ("R", r), ("B", consts["B"]))])
    float_twin = kiln.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).run(feeds)["Y"]
    quantized = kiln.compile(model).run(feeds)["Y"]
    assert np.abs(float_twin - quantized).max() > 1e-3


def test_dynamic_quantization_takes_zero_into_the_range_and_survives_an_empty_one():
    q, scale, zero = dynamic_quantized(np.array([0.5, 1.5, 2.0], np.float32))  # 63.75, 191.25, 255 steps
    assert zero == 0 and scale == np.float32(2.0 / 255) and q.tolist() == [64, 191, 255]
    q, scale, zero = dynamic_quantized(np.zeros(4, np.float32))
    assert scale == 1 and zero == 0 and not q.any()


def test_exports_in_onnxruntimes_domain_and_runs_there_the_same():
    model, feeds = _model("bidirectional", True, True)
    exported = kiln.frontend.onnx.export.graph_to_onnx(kiln.driver.to_graph(model))
    assert [(n.domain, n.op_type) for n in exported.graph.node] == [("com.microsoft", "DynamicQuantizeLSTM")]
    again, first = _onnxruntime(exported, feeds), _onnxruntime(model, feeds)
    for name in first:
        np.testing.assert_array_equal(again[name], first[name])


def test_macs_count_both_products():
    model, _ = _model("bidirectional", False, False)
    (node,) = kiln.driver.to_graph(model).nodes
    assert kiln.ir.cost.node_macs(node) == 7 * BATCH * 2 * 4 * HIDDEN * (INPUT + HIDDEN)


def test_tvm_llvm_agrees_with_onnxruntime_on_one_step():
    model, feeds = _model("bidirectional", True, True, SEQ=1)
    want = _onnxruntime(model, feeds)
    got = kiln.compile(model, target="tvm-llvm").run(feeds)
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, atol=1e-6, err_msg=name)


def test_the_zoo_lstm_through_quantize_dynamic_runs_on_llvm(tmp_path):
    """The file onnxruntime's own tool writes (DynamicQuantizeLSTM, DynamicQuantizeLinear and
    MatMulInteger for the head) compiles, and llvm follows eager but for single steps."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from kiln.models import zoo

    shape = (4, 6, 8)
    path = tmp_path / "lstm.onnx"
    kiln.export_onnx(zoo.build("lstm_classifier", input_size=8, hidden_size=16, num_layers=2), path, [np.zeros(shape, np.float32)], input_names=["input"])
    quantized = tmp_path / "lstm.int8.onnx"
    quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
    graph = kiln.driver.to_graph(str(quantized))
    assert sum(n.op.name == "DynamicQuantizeLSTM" for n in graph.nodes) == 2
    feeds = {"input": np.random.default_rng(3).standard_normal(shape).astype(np.float32)}
    eager = kiln.compile(str(quantized), target="eager").run(feeds)
    llvm = kiln.compile(str(quantized), target="llvm").run(feeds)
    (name,) = eager
    assert np.abs(llvm[name] - eager[name]).max() < 0.02
