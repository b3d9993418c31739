"""Each op's numpy reference against onnxruntime, a second opinion next to the ONNX suite.

Table-driven: one row per (op, attributes, inputs). Inputs are seeded random arrays (or given
arrays for indices); every output of kiln eager must match onnxruntime at rtol 1e-4, atol 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import kiln

F = np.float32


def r(*shape, dtype=F, lo=-1.0, hi=1.0, seed=0):
    rng = np.random.default_rng(seed + len(shape) * 7 + sum(shape))
    return rng.uniform(lo, hi, shape).astype(dtype)


@dataclass
class Case:
    op: str
    inputs: list  # arrays, or None for an absent optional input
    attrs: dict = field(default_factory=dict)
    outputs: int = 1
    opset: int = 21
    const: tuple = ()  # input positions passed as initializers (shape-determining ones)
    id: str = ""


def conv_cases():
    x = r(2, 4, 9, 9)
    yield Case("Conv", [x, r(6, 4, 3, 3), r(6)], id="conv_bias")
    yield Case("Conv", [x, r(6, 4, 3, 3)], {"strides": [2, 2], "pads": [1, 1, 1, 1]}, id="conv_stride_pad")
    yield Case("Conv", [x, r(6, 4, 3, 3)], {"dilations": [2, 2], "pads": [2, 1, 0, 1]}, id="conv_dilated_asym_pads")
    yield Case("Conv", [x, r(6, 2, 3, 3)], {"group": 2}, id="conv_groups")
    yield Case("Conv", [x, r(8, 1, 3, 3)], {"group": 4, "pads": [1, 1, 1, 1]}, id="conv_depthwise")
    yield Case("Conv", [x, r(6, 4, 2, 2)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, id="conv_same_upper")
    yield Case("Conv", [x, r(6, 4, 2, 2)], {"auto_pad": "SAME_LOWER", "strides": [2, 2]}, id="conv_same_lower")
    yield Case("Conv", [r(2, 3, 11), r(4, 3, 3)], {"strides": [2]}, id="conv1d")
    yield Case("Conv", [r(1, 2, 5, 6, 7), r(3, 2, 2, 3, 2)], {"pads": [1, 0, 1, 0, 1, 1]}, id="conv3d")
    yield Case("ConvTranspose", [r(1, 4, 5, 5), r(4, 3, 3, 3), r(3)], id="convT")
    yield Case("ConvTranspose", [r(1, 4, 5, 5), r(4, 3, 3, 3)], {"strides": [2, 2], "output_padding": [1, 1], "pads": [1, 1, 1, 1]}, id="convT_stride")
    yield Case("ConvTranspose", [r(1, 4, 5, 5), r(4, 2, 3, 3)], {"group": 2, "dilations": [2, 2]}, id="convT_groups_dilated")
    yield Case("ConvTranspose", [r(1, 4, 5, 5), r(4, 3, 4, 4)], {"strides": [2, 2], "output_shape": [10, 10]}, id="convT_output_shape")
    yield Case("ConvTranspose", [r(1, 2, 7), r(2, 3, 3)], {"strides": [3]}, id="convT_1d")


def pool_cases():
    x = r(2, 3, 10, 9)
    yield Case("MaxPool", [x], {"kernel_shape": [3, 3], "strides": [2, 2]}, id="maxpool")
    yield Case("MaxPool", [x], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1]}, outputs=2, id="maxpool_ceil_indices")
    yield Case("MaxPool", [x], {"kernel_shape": [2, 2], "dilations": [2, 2]}, id="maxpool_dilated")
    yield Case("MaxPool", [x], {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}, id="maxpool_same")
    yield Case("AveragePool", [x], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, id="avgpool_exclude_pad")
    yield Case("AveragePool", [x], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, id="avgpool_include_pad")
    yield Case("AveragePool", [x], {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1}, id="avgpool_ceil")
    yield Case("LpPool", [x], {"kernel_shape": [2, 2], "p": 3}, id="lppool")
    yield Case("GlobalAveragePool", [x], id="gap")
    yield Case("GlobalMaxPool", [x], id="gmp")


def norm_cases():
    x = r(2, 4, 5, 6)
    yield Case("BatchNormalization", [x, r(4), r(4), r(4), r(4, lo=0.5, hi=2)], {"epsilon": 1e-3}, id="batchnorm")
    yield Case("InstanceNormalization", [x, r(4), r(4)], id="instancenorm")
    yield Case("LayerNormalization", [x, r(5, 6), r(5, 6)], {"axis": 2}, id="layernorm")
    yield Case("GroupNormalization", [x, r(4), r(4)], {"num_groups": 2}, id="groupnorm")
    yield Case("LRN", [x], {"size": 3, "alpha": 1e-3, "beta": 0.75, "bias": 2.0}, id="lrn")
    yield Case("Softmax", [x], {"axis": 1}, id="softmax")
    yield Case("LogSoftmax", [x], {"axis": -1}, id="logsoftmax")
    yield Case("Hardmax", [x], {"axis": 2}, id="hardmax")


def linalg_cases():
    yield Case("Gemm", [r(3, 5), r(4, 5), r(4)], {"transB": 1, "alpha": 0.5, "beta": 2.0}, id="gemm_transB")
    yield Case("Gemm", [r(5, 3), r(5, 4), r(3, 4)], {"transA": 1}, id="gemm_transA")
    yield Case("MatMul", [r(2, 1, 3, 4), r(5, 4, 6)], id="matmul_broadcast")
    yield Case("MatMul", [r(4), r(3, 4, 2)], id="matmul_vector")
    yield Case("Einsum", [r(2, 3, 4), r(2, 4, 5)], {"equation": "bij,bjk->bik"}, id="einsum_bmm")
    yield Case("Einsum", [r(3, 4)], {"equation": "ij->ji"}, id="einsum_transpose")


def reduce_cases():
    x = r(3, 4, 5, lo=0.1, hi=2)
    for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"):
        yield Case(op, [x, np.array([1, -1], np.int64)], {"keepdims": 0}, const=(1,), id=op)
    yield Case("ArgMax", [r(3, 4, 5)], {"axis": 1, "keepdims": 0}, id="argmax")
    yield Case("ArgMin", [r(3, 4, 5)], {"axis": -1, "select_last_index": 1}, id="argmin_last")
    yield Case("CumSum", [r(3, 4), np.array(1, np.int64)], {"exclusive": 1, "reverse": 1}, const=(1,), id="cumsum")
    yield Case("TopK", [r(3, 6), np.array([3], np.int64)], {"axis": 1, "largest": 0}, outputs=2, const=(1,), id="topk_smallest")


def shape_cases():
    x = r(2, 3, 4)
    yield Case("Transpose", [x], {"perm": [2, 0, 1]}, id="transpose")
    yield Case("Slice", [r(5, 6), np.array([4, 1], np.int64), np.array([-10, 5], np.int64), np.array([0, 1], np.int64), np.array([-2, 2], np.int64)], const=(1, 2, 3, 4), id="slice_negative_step")
    yield Case("Pad", [x, np.array([0, 1, 2, 0, 1, 1], np.int64)], {"mode": "reflect"}, const=(1,), id="pad_reflect")
    yield Case("Pad", [x, np.array([1, 0, 1, 1, 2, 0], np.int64), np.array(2.5, F)], const=(1,), id="pad_constant")
    yield Case("Pad", [x, np.array([0, 2, 1, 0, 0, 3], np.int64)], {"mode": "edge"}, const=(1,), id="pad_edge")
    yield Case("Tile", [x, np.array([2, 1, 3], np.int64)], const=(1,), id="tile")
    yield Case("Expand", [r(3, 1), np.array([2, 3, 4], np.int64)], const=(1,), id="expand")
    yield Case("Gather", [x, np.array([[0, -1], [1, 2]], np.int64)], {"axis": 2}, id="gather_negative")
    yield Case("GatherElements", [x, np.array([[[0, 1, 0, 1]] * 3] * 2, np.int64)], {"axis": 0}, id="gather_elements")
    yield Case("GatherND", [r(2, 3, 4), np.array([[[1], [2]], [[0], [1]]], np.int64)], {"batch_dims": 1}, id="gather_nd_batch")
    yield Case("ScatterElements", [r(3, 4), np.array([[1, 0, 2, 0]], np.int64), r(1, 4)], {"axis": 0, "reduction": "add"}, id="scatter_elements_add")
    yield Case("ScatterND", [r(4, 3), np.array([[1], [3]], np.int64), r(2, 3)], {"reduction": "mul"}, id="scatter_nd_mul")
    yield Case("Trilu", [r(4, 5), np.array(1, np.int64)], {"upper": 0}, const=(1,), id="trilu")
    yield Case("OneHot", [np.array([0, 3, -1], np.int64), np.array(4, np.int64), np.array([0.0, 2.0], F)], {"axis": 0}, const=(1,), id="onehot")
    yield Case("DepthToSpace", [r(1, 8, 2, 3)], {"blocksize": 2, "mode": "CRD"}, id="depth_to_space_crd")
    yield Case("SpaceToDepth", [r(1, 2, 4, 6)], {"blocksize": 2}, id="space_to_depth")
    yield Case("Split", [r(6, 4), np.array([1, 5], np.int64)], {"axis": 0}, outputs=2, const=(1,), id="split")
    yield Case("Where", [r(3, 4) > 0, r(3, 4), r(4)], id="where")


def resize_cases():
    x = r(1, 2, 4, 5)
    scales = np.array([1, 1, 1.5, 0.6], F)
    for mode, ctm in (("linear", "half_pixel"), ("linear", "align_corners"), ("cubic", "half_pixel"), ("nearest", "asymmetric"), ("linear", "pytorch_half_pixel")):
        yield Case("Resize", [x, None, scales], {"mode": mode, "coordinate_transformation_mode": ctm}, const=(2,), id=f"resize_{mode}_{ctm}")
    sizes = np.array([1, 2, 8, 3], np.int64)
    yield Case("Resize", [x, None, None, sizes], {"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, const=(3,), id="resize_sizes_nearest")
    yield Case("Resize", [x, None, None, sizes], {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, const=(3,), id="resize_cubic_exclude")


def rnn_cases():
    seq, batch, inp, hid = 4, 3, 5, 6
    x = r(seq, batch, inp)
    lens = np.array([4, 2, 3], np.int32)
    yield Case("LSTM", [x, r(2, 4 * hid, inp), r(2, 4 * hid, hid), r(2, 8 * hid), lens, r(2, batch, hid), r(2, batch, hid), r(2, 3 * hid)], {"hidden_size": hid, "direction": "bidirectional"}, outputs=3, id="lstm_bidirectional_peepholes_lens")
    yield Case("GRU", [x, r(1, 3 * hid, inp), r(1, 3 * hid, hid), r(1, 6 * hid)], {"hidden_size": hid, "linear_before_reset": 1}, outputs=2, id="gru_linear_before_reset")
    yield Case("GRU", [x, r(1, 3 * hid, inp), r(1, 3 * hid, hid), r(1, 6 * hid), lens], {"hidden_size": hid, "direction": "reverse"}, outputs=2, id="gru_reverse_lens")
    yield Case("RNN", [x, r(1, hid, inp), r(1, hid, hid), r(1, 2 * hid)], {"hidden_size": hid, "activations": ["Relu"]}, outputs=2, id="rnn_relu")
    # layout=1 (batch first): onnxruntime refuses it; the ONNX suite's test_lstm_batchwise covers it


def elementwise_cases():
    x = r(3, 4, lo=-3, hi=3)
    for op in ("Erf", "Sigmoid", "Tanh", "HardSwish", "Mish", "Softplus", "Softsign", "Round", "Sign", "Relu", "Exp", "Atan"):
        yield Case(op, [x], id=op)
    yield Case("Gelu", [x], {"approximate": "tanh"}, id="gelu_tanh")
    yield Case("Elu", [x], {"alpha": 0.7}, id="elu")
    yield Case("LeakyRelu", [x], {"alpha": 0.2}, id="leaky_relu")
    yield Case("Clip", [x, np.array(-1, F), np.array(0.5, F)], id="clip")
    yield Case("PRelu", [r(2, 3, 4), r(3, 1)], id="prelu")
    ints_a = np.array([7, -7, 7, -7, 0], np.int32)
    ints_b = np.array([2, 2, -2, -2, 3], np.int32)
    yield Case("Div", [ints_a, ints_b], id="div_int_truncates")
    yield Case("Mod", [ints_a, ints_b], id="mod_int_python")
    yield Case("Mod", [r(5, lo=-5, hi=5), r(5, lo=1, hi=2)], {"fmod": 1}, id="mod_fmod")
    yield Case("Pow", [r(4, lo=0.5, hi=2), np.array([2, -1, 0.5, 3], F)], id="pow")
    yield Case("Max", [r(3, 1), r(4), r(3, 4)], id="max_variadic")
    yield Case("Mean", [r(3, 4), r(4)], id="mean")
    yield Case("Cast", [x], {"to": 7}, id="cast_float_to_int64")


def loss_cases():
    scores = r(4, 5, 2)
    labels = np.array([[0, 4], [2, -1], [1, 1], [3, 0]], np.int64)
    yield Case("SoftmaxCrossEntropyLoss", [scores, labels, r(5, lo=0.1, hi=1)], {"ignore_index": -1}, outputs=2, id="sce_weighted_ignore")
    yield Case("SoftmaxCrossEntropyLoss", [scores, labels.clip(0)], {"reduction": "sum"}, id="sce_sum")
    yield Case("NegativeLogLikelihoodLoss", [scores, labels.clip(0)], {"reduction": "none"}, id="nll_none")


def newer_op_cases():
    grid = r(2, 3, 4, 2, lo=-1.2, hi=1.2)
    for mode, padding in (("linear", "zeros"), ("nearest", "border"), ("cubic", "reflection")):
        yield Case("GridSample", [r(2, 3, 5, 6), grid], {"mode": mode, "padding_mode": padding}, id=f"gridsample_{mode}_{padding}")
    yield Case("QuantizeLinear", [r(2, 4, lo=-3, hi=3), r(4, lo=0.01, hi=0.1), np.array([0, 10, -5, 3], np.int8)], id="quantize_per_axis_int8")
    yield Case("DequantizeLinear", [np.arange(-6, 6, dtype=np.int8).reshape(3, 4), np.array(0.05, F), np.array(2, np.int8)], id="dequantize_per_tensor")
    yield Case("RMSNormalization", [r(2, 3, 8), r(8)], {"epsilon": 1e-5}, opset=23, id="rmsnorm")
    yield Case("Attention", [r(2, 4, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 8)], {"is_causal": 1}, opset=23, id="attention_gqa_causal")


def quantized_cases():
    """The integer and quantized products of QOperator models: per-tensor and per-column or
    per-channel scales and zero points, a bias, strides, pads and groups."""
    rng = np.random.default_rng(11)

    def q(*shape, dtype=np.uint8):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)

    u8, i8 = np.uint8, np.int8
    yield Case("MatMulInteger", [q(3, 5), q(5, 4), np.array(3, u8), np.array([1, 200, 0, 77], u8)], id="matmulinteger_per_column_zero_point")
    yield Case("MatMulInteger", [q(2, 3, 6, dtype=i8), q(6, 5, dtype=i8)], id="matmulinteger_int8_batched")
    yield Case("QLinearMatMul", [q(4, 7), np.array(0.02, F), np.array(120, u8), q(7, 3), np.array(0.05, F), np.array(128, u8), np.array(0.4, F), np.array(100, u8)], id="qlinearmatmul_uint8")
    yield Case("QLinearMatMul", [q(2, 4, 7, dtype=i8), np.array(0.02, F), np.array(-3, i8), q(7, 3, dtype=i8), np.array(0.05, F), np.array(0, i8), np.array(0.3, F), np.array(5, i8)], id="qlinearmatmul_int8_batched")
    yield Case("ConvInteger", [q(1, 3, 7, 7), q(4, 3, 3, 3), np.array(5, u8), np.array(100, u8)], {"pads": [1, 1, 1, 1], "strides": [2, 2]}, id="convinteger_stride_pad")
    x, w = q(2, 4, 8, 8), q(6, 4, 3, 3, dtype=i8)
    params = [np.array(0.03, F), np.array(128, u8), w, rng.uniform(0.001, 0.01, 6).astype(F), np.zeros(6, i8), np.array(0.2, F), np.array(10, u8)]
    yield Case("QLinearConv", [x, *params, rng.integers(-2000, 2000, 6).astype(np.int32)], {"pads": [1, 0, 1, 2]}, const=(3, 4, 5, 8), id="qlinearconv_per_channel_bias")
    yield Case("QLinearConv", [x, *params[:2], q(6, 2, 3, 3, dtype=i8), np.array(0.004, F), np.array(0, i8), *params[5:]], {"group": 2, "strides": [2, 2]}, const=(3,), id="qlinearconv_groups")


def signal_cases():
    """DFT with the axis as an input (opset 20) or attribute (17), zero padding and truncation
    to dft_length, complex and real signals, forward, inverse and one-sided."""
    axis = lambda a: np.array(a, np.int64)  # noqa: E731
    length = lambda n: np.array(n, np.int64)  # noqa: E731
    yield Case("DFT", [r(2, 7, 3, 1), length(10), axis(1)], opset=20, const=(1, 2), id="dft_real_zero_padded")
    yield Case("DFT", [r(2, 9, 2), length(6), axis(-2)], {"inverse": 1}, opset=20, const=(1, 2), id="dft_inverse_truncated")
    yield Case("DFT", [r(3, 8, 1)], {"axis": 1, "onesided": 1}, opset=17, id="dft_onesided")
    yield Case("DFT", [r(2, 4, 6, 1), None, axis(2)], {"onesided": 1}, opset=20, const=(2,), id="dft_onesided_inner_axis")
    yield Case("DFT", [r(2, 4, 6, 2), None, axis(1)], opset=20, const=(2,), id="dft_complex")
    yield Case("STFT", [r(2, 64, 1), np.array(5, np.int64), r(16, lo=0, hi=1)], opset=17, const=(1,), id="stft_windowed")
    # (a power-of-two frame: onnxruntime's transform of 12 samples is off by 1.3e-5 here, kiln's by 1.7e-7)
    yield Case("STFT", [r(1, 40, 2), np.array(8, np.int64), None, np.array(16, np.int64)], {"onesided": 0}, opset=17, const=(1, 3), id="stft_complex_two_sided")
    mel = [np.array(8, np.int64), np.array(64, np.int64), np.array(16000, np.int64), np.array(100.0, F), np.array(6000.0, F)]
    yield Case("MelWeightMatrix", mel, opset=17, const=(0, 1, 2, 3, 4), id="mel_weight_matrix")


SIGNAL = list(signal_cases())


@pytest.mark.parametrize("case", SIGNAL, ids=[c.id for c in SIGNAL])
def test_transforms_compile_to_matrix_products(case):
    """The compiled targets run a DFT as one MatMul by its real matrix; it matches eager's FFT."""
    model, feeds, outs = build(case)
    want = kiln.compile(model).run(feeds)
    got = kiln.compile(model, target="llvm").run(feeds)
    for name in outs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=f"{case.id}: {name}")


CASES = [
    *signal_cases(),
    *newer_op_cases(),
    *quantized_cases(),
    *conv_cases(),
    *pool_cases(),
    *norm_cases(),
    *linalg_cases(),
    *reduce_cases(),
    *shape_cases(),
    *resize_cases(),
    *rnn_cases(),
    *elementwise_cases(),
    *loss_cases(),
]


def build(case: Case):
    names = [f"in{i}" if a is not None else "" for i, a in enumerate(case.inputs)]
    while names and names[-1] == "":
        names.pop()
    outs = [f"out{i}" for i in range(case.outputs)]
    node = helper.make_node(case.op, names, outs, **case.attrs)
    inputs, inits, feeds = [], [], {}
    for i, (name, a) in enumerate(zip(names, case.inputs)):
        if a is None:
            continue
        if i in case.const:
            inits.append(numpy_helper.from_array(a, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
            feeds[name] = a
    graph = helper.make_graph([node], case.id, inputs, [helper.make_empty_tensor_value_info(o) for o in outs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 10
    return model, feeds, outs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kiln_eager_matches_onnxruntime(case):
    model, feeds, outs = build(case)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    expected = session.run(outs, feeds)
    got = kiln.compile(model).run(feeds)
    for name, want in zip(outs, expected):
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=f"{case.id}: {name}")


QUANTIZED = list(quantized_cases())


@pytest.mark.parametrize("case", QUANTIZED, ids=[c.id for c in QUANTIZED])
def test_quantized_products_compile_to_the_same_integers(case):
    """The llvm target runs them decomposed (exact float64 MatMul/Conv of the shifted values,
    then the requantization): the same integers as eager, bit for bit."""
    model, feeds, outs = build(case)
    want = kiln.compile(model).run(feeds)
    got = kiln.compile(model, target="llvm").run(feeds)
    for name in outs:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), f"{case.id}: {name}"
