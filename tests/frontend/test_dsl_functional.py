"""Each DSL function against the IR op it lowers to: same values as the op's reference, and
the traced graph holds that op with the attributes the function promises."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError
from kiln.frontend.dsl import functional as F
from kiln.ir.graph import Value, infer_types
from kiln.ir.opdef import OpKind, all_ops, get_op
from kiln.ir.types import TensorType

RNG = np.random.default_rng(3)


def arr(*shape, dtype=np.float32):
    return RNG.normal(size=shape).astype(dtype)


X4 = arr(2, 3, 8, 8)
W = arr(4, 3, 3, 3)
B = arr(4)

# (id, function call on tensors, inputs, op, attributes the node must carry)
CASES = [
    ("relu", lambda x: F.relu(x), [arr(3, 4)], "Relu", {}),
    ("leaky_relu", lambda x: F.leaky_relu(x, 0.2), [arr(3, 4)], "LeakyRelu", {"alpha": float(np.float32(0.2))}),
    ("gelu_tanh", lambda x: F.gelu(x, "tanh"), [arr(5)], "Gelu", {"approximate": "tanh"}),
    ("softmax", lambda x: F.softmax(x, 0), [arr(3, 4)], "Softmax", {"axis": 0}),
    ("log_softmax", lambda x: F.log_softmax(x), [arr(3, 4)], "LogSoftmax", {"axis": -1}),
    ("clip", lambda x: F.clip(x, -0.5, 0.5), [arr(6)], "Clip", {}),
    ("matmul", lambda a, b: F.matmul(a, b), [arr(2, 3, 4), arr(4, 5)], "MatMul", {}),
    ("linear_2d", lambda x, w, b: F.linear(x, w, b), [arr(2, 4), arr(3, 4), arr(3)], "Gemm", {"transB": 1}),
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [X4, W, B], "Conv",
     {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1}),
    ("conv2d_same_dilated", lambda x, w: F.conv2d(x, w, padding="same", dilation=2), [X4, W], "Conv",
     {"pads": [2, 2, 2, 2], "dilations": [2, 2]}),
    ("conv2d_groups", lambda x, w: F.conv2d(x, w, groups=3), [arr(1, 6, 5, 5), arr(3, 2, 3, 3)], "Conv", {"group": 3}),
    ("conv_transpose2d", lambda x, w: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1), [X4, arr(3, 2, 3, 3)],
     "ConvTranspose", {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1), [X4], "MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("max_pool2d_ceil", lambda x: F.max_pool2d(x, 3, 2, ceil_mode=True), [X4], "MaxPool", {"ceil_mode": 1}),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 2, padding=1, count_include_pad=False), [X4], "AveragePool",
     {"kernel_shape": [2, 2], "strides": [2, 2], "count_include_pad": 0}),
    ("adaptive_avg_pool2d_1", lambda x: F.adaptive_avg_pool2d(x, 1), [X4], "GlobalAveragePool", {}),
    ("adaptive_avg_pool2d_4", lambda x: F.adaptive_avg_pool2d(x, (4, 2)), [X4], "AveragePool", {"kernel_shape": [2, 4]}),
    ("batch_norm", lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, eps=1e-3), [X4, arr(3), arr(3), arr(3), np.abs(arr(3)) + 0.5],
     "BatchNormalization", {"epsilon": float(np.float32(1e-3)), "training_mode": 0}),
    ("layer_norm", lambda x, s, b: F.layer_norm(x, (8, 8), s, b), [X4, arr(8, 8), arr(8, 8)], "LayerNormalization", {"axis": -2}),
    ("group_norm", lambda x, s, b: F.group_norm(x, 3, s, b), [X4, arr(3), arr(3)], "GroupNormalization", {"num_groups": 3}),
    ("dropout_train", lambda x: F.dropout(x, 0.3, training=True, seed=11), [arr(50)], "Dropout",
     {"ratio": float(np.float32(0.3)), "training_mode": 1, "seed": 11}),
    ("interpolate_nearest", lambda x: F.interpolate(x, scale_factor=2), [X4], "Resize",
     {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", "sizes": [2, 3, 16, 16]}),
    ("interpolate_bilinear", lambda x: F.interpolate(x, size=(5, 11), mode="bilinear"), [X4], "Resize",
     {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel", "sizes": [2, 3, 5, 11]}),
    ("interpolate_align_corners", lambda x: F.interpolate(x, size=(5, 11), mode="bilinear", align_corners=True), [X4], "Resize",
     {"coordinate_transformation_mode": "align_corners"}),
    ("embedding", lambda i, w: F.embedding(i, w), [np.array([[0, 4], [2, 2]]), arr(5, 3)], "Gather", {"axis": 0}),
    ("reshape", lambda x: F.reshape(x, 2, -1), [X4], "Reshape", {"shape": [2, 192]}),
    ("flatten", lambda x: F.flatten(x, 1, 2), [X4], "Reshape", {"shape": [2, 24, 8]}),
    ("permute", lambda x: F.permute(x, 0, 2, 3, 1), [X4], "Transpose", {"perm": [0, 2, 3, 1]}),
    ("transpose", lambda x: F.transpose(x, 1, -1), [X4], "Transpose", {"perm": [0, 3, 2, 1]}),
    ("unsqueeze", lambda x: F.unsqueeze(x, -1), [arr(3, 4)], "Reshape", {"shape": [3, 4, 1]}),
    ("squeeze", lambda x: F.squeeze(x, 1), [arr(3, 1, 4)], "Reshape", {"shape": [3, 4]}),
    ("expand", lambda x: F.expand(x, 2, 3, 4), [arr(3, 1)], "Expand", {"shape": [2, 3, 4]}),
    ("concat", lambda a, b: F.concat([a, b], axis=1), [arr(2, 3), arr(2, 5)], "Concat", {"axis": 1}),
    ("split", lambda x: F.split(x, 2, axis=1)[1], [arr(3, 5)], "Split", {"axis": 1, "split": [2, 2, 1]}),
    ("pad_reflect", lambda x: F.pad(x, [1, 2, 0, 1], mode="reflect"), [arr(4, 5)], "Pad", {"pads": [1, 2, 0, 1], "mode": "reflect"}),
    ("astype", lambda x: F.astype(x, np.int32), [arr(5) * 5], "Cast", {"to": "i32"}),
    ("where", lambda c, a, b: F.where(c, a, b), [arr(4) > 0, arr(4), arr(4)], "Where", {}),
    ("sum_axis", lambda x: F.sum(x, axis=1, keepdims=True), [arr(3, 4)], "ReduceSum", {"axes": [1], "keepdims": 1}),
    ("mean_all", lambda x: F.mean(x), [arr(3, 4)], "ReduceMean", {"axes": None, "keepdims": 0}),
    ("max_axes", lambda x: F.max(x, (0, 2)), [arr(3, 4, 2)], "ReduceMax", {"axes": [0, 2]}),
    ("argmax", lambda x: F.argmax(x, 1), [arr(3, 4)], "ArgMax", {"axis": 1, "keepdims": 0}),
    ("cross_entropy", lambda x, y: F.cross_entropy(x, y), [arr(4, 5), np.array([0, 4, 2, 1])], "SoftmaxCrossEntropyLoss",
     {"reduction": "mean"}),
    ("quantize_linear", lambda x, s, z: F.quantize_linear(x, s, z), [arr(2, 3) * 50, np.float32(0.5), np.int8(3)], "QuantizeLinear", {}),
    ("dequantize_linear", lambda x, s: F.dequantize_linear(x, s), [np.arange(-3, 3, dtype=np.int8), np.float32(0.25)], "DequantizeLinear", {}),
    ("op_by_name", lambda x: F.op("HardSigmoid", x, alpha=0.5), [arr(6)], "HardSigmoid", {"alpha": 0.5}),
]


def _reference(fn, inputs):
    """The function traced, and its graph run node by node by each op's reference."""
    names = [f"in{i}" for i in range(len(inputs))]
    graph = kiln.trace(lambda *ts: fn(*ts), inputs, input_names=names)
    return graph, kiln.compile(graph, target="eager").run(dict(zip(names, inputs)))["output"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_function_lowers_to_its_op(case):
    _, fn, inputs, op, attrs = case
    eager = fn(*[kiln.Tensor(a) for a in inputs]).numpy()
    graph, traced = _reference(fn, inputs)
    matching = [n for n in graph.nodes if n.op.name == op]
    assert matching, f"no {op} node in\n{graph}"
    node = matching[0]
    for key, value in attrs.items():
        assert node.attrs[key] == value, f"{op}.{key}: {node.attrs[key]!r} != {value!r}"
    # eager DSL == the graph run by the op references (one implementation behind both)
    np.testing.assert_array_equal(eager, traced)
    # and the op's own reference on the same operands (for single-node lowerings)
    if len(graph.nodes) == 1:
        env = {**dict(zip(graph.inputs, inputs)), **graph.params}
        outs = node.op.run_eager(node.attrs, [env[v] if v is not None else None for v in node.inputs])
        np.testing.assert_array_equal(eager, outs[node.outputs.index(graph.outputs[0])])


def _probe_dtype(op, arity: int):
    for dtype in (np.float32, np.bool_, np.int32, np.uint32):
        t = TensorType.of(np.zeros((2, 3), dtype))
        try:
            infer_types(op, op.complete_attrs({}), [Value(f"v{i}", t) for i in range(arity)], op.name)
            return dtype
        except KilnError:
            continue
    return None


ELEMENTWISE = [
    name for name, op in sorted(all_ops().items())
    if op.kind is OpKind.ELEMENTWISE and op.deterministic and op.num_inputs[0] <= 2
    and "to" not in op.attrs  # Cast/BitCast need a target type: covered by the astype case
    and name not in ("QuantizeLinear", "DequantizeLinear")  # mixed operand types: cases in CASES
]


def test_every_op_has_a_function():
    missing = [name for name in all_ops() if name != "Fused" and name not in F.OP_FUNCTIONS]
    assert not missing
    assert F.reduce_mean is F.OP_FUNCTIONS["ReduceMean"] and F.lstm is F.OP_FUNCTIONS["LSTM"]
    assert F.isnan is F.OP_FUNCTIONS["IsNaN"] and F.scatter_nd is F.OP_FUNCTIONS["ScatterND"]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_generated_elementwise_function_matches_its_op(name):
    op = get_op(name)
    arity = max(op.num_inputs[0], 1)
    dtype = _probe_dtype(op, arity)
    assert dtype is not None, f"{name}: no dtype among f32/bool/i32/u32 accepted"
    rng = np.random.default_rng(0)
    inputs = [(rng.uniform(0.1, 0.9, (2, 3)) * (4 if dtype != np.float32 else 1)).astype(dtype) for _ in range(arity)]
    got = F.OP_FUNCTIONS[name](*[kiln.Tensor(a) for a in inputs])
    got = got[0] if isinstance(got, tuple) else got
    with np.errstate(all="ignore"):
        want = op.run_eager(op.complete_attrs({}), inputs)[0]
    np.testing.assert_array_equal(got.numpy(), want)
