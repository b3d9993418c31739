"""The llvm backend's VNNI integer products: channels-last ConvInteger and MatMulInteger of
uint8 by int8, bit for bit the reference's int32 sums, alone and under a fused requantizing
tail (QDQ models through integer_products)."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.backends.llvm import LLVMBackend
from kiln.backends.llvm.codegen import PanelSpec, pack_panels
from kiln.backends.llvm.kernels_integer import available
from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType

needs_vnni = pytest.mark.skipif(not available(), reason="this CPU has no AVX-512 VNNI: ConvInteger decomposes to a float64 conv here, which the reference tests cover")


def _qdq_model(zx: int, pads: int, stride: int, seed: int = 0, depthwise: bool = False, activations=np.uint8, weight_zero: int = 0, weights=np.int8):
    """float x -> QuantizeLinear -> DequantizeLinear -> Conv (per-channel int8 weights) ->
    Relu -> QuantizeLinear -> DequantizeLinear, as onnxruntime's quantize_static writes it
    (``activations``: uint8, or int8 as its defaults make them); ``depthwise``: a 3x3
    depthwise conv of 32 channels (its weights' zero point ``weight_zero``), then a QDQ 1x1
    conv to 40; ``weights`` uint8: the first conv's, with zero points around 128, as
    onnxruntime's QUInt8 weights)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c, h = (32, 11) if depthwise else (5, 11)
    layers = [(32, 3, 32), (40, 1, 1)] if depthwise else [(40, 3, 1)]  # (output channels, kernel, group)
    inits = {"s0": np.array(0.03, np.float32), "z0": np.array(zx, activations)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["q0"])]
    channels, size = c, h
    for i, (m, k, group) in enumerate(layers):
        p = pads if k > 1 else 0
        inits.update({
            f"w{i}": rng.integers(-127, 128, (m, channels // group, k, k)).astype(np.int8), f"sw{i}": (rng.random(m) * 0.01 + 0.002).astype(np.float32),
            f"zw{i}": np.full(m, weight_zero if i == 0 else 0, np.int8), f"b{i}": rng.standard_normal(m).astype(np.float32), f"s{i + 1}": np.array(0.04, np.float32), f"z{i + 1}": np.array(0, activations),
        })
        if i == 0 and weights == np.uint8:
            inits.update({f"w{i}": rng.integers(0, 256, (m, channels // group, k, k)).astype(np.uint8), f"zw{i}": rng.integers(120, 136, m).astype(np.uint8)})
        nodes += [
            helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"]),
            helper.make_node("DequantizeLinear", [f"w{i}", f"sw{i}", f"zw{i}"], [f"wd{i}"], axis=0),
            helper.make_node("Conv", [f"d{i}", f"wd{i}", f"b{i}"], [f"c{i}"], pads=[p] * 4, strides=[stride] * 2, group=group),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
            helper.make_node("QuantizeLinear", [f"r{i}", f"s{i + 1}", f"z{i + 1}"], [f"q{i + 1}"]),
        ]
        channels, size = m, (size + 2 * p - k) // stride + 1
    last = len(layers)
    nodes.append(helper.make_node("DequantizeLinear", [f"q{last}", f"s{last}", f"z{last}"], ["y"]))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, h, h])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, channels, size, size])],
        [numpy_helper.from_array(a, name) for name, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), rng.standard_normal((2, c, h, h)).astype(np.float32)


@pytest.mark.parametrize("zx, pads, stride, activations", [(0, 1, 1, np.uint8), (128, 1, 2, np.uint8), (17, 0, 1, np.uint8), (-5, 1, 1, np.int8), (0, 0, 2, np.int8)])
def test_the_integer_form_agrees_with_the_float_model_within_one_output_step(zx, pads, stride, activations):
    """Sums exact in int32 against float sums that round: a requantized output next to a
    rounding boundary may move one step (0.04), no further, and few do."""
    model, x = _qdq_model(zx, pads, stride, activations=activations)
    want = kiln.compile(model).run({"x": x})["y"]
    integer = kiln.optimize(model, "O0", passes=["integer_products"])
    assert "ConvInteger" in [n.op.name for n in integer.nodes]
    got = kiln.compile(integer).run({"x": x})["y"]
    assert np.abs(got - want).max() <= 0.04 + 1e-6
    assert np.mean(got != want) < 0.01


def test_quad_panels_hold_four_k_rows_per_column_with_each_taps_channels_padded():
    w = np.arange(2 * 3 * 5, dtype=np.int8).reshape(2, 3, 5)  # 2 taps of 3 channels, 5 columns
    packed = pack_panels(w, PanelSpec(6, 5, 4, quads=3))
    assert packed.shape == (2, 2, 4, 4)  # (panels, K padded to 2 x 4 / 4, nr, 4)
    padded = np.zeros((2, 4, 8), np.int8)
    padded[:, :3, :5] = w
    rows = padded.reshape(8, 8)  # K rows (tap, channel), columns
    for panel in range(2):
        for quad in range(2):
            for j in range(4):
                np.testing.assert_array_equal(packed[panel, quad, j], rows[4 * quad : 4 * quad + 4, panel * 4 + j])


def test_quad_panels_with_sums_end_each_panel_with_its_columns_int32_sums():
    w = np.random.default_rng(2).integers(-128, 128, (2, 3, 5), dtype=np.int8)  # 2 taps of 3 channels, 5 columns
    plain = pack_panels(w, PanelSpec(6, 5, 4, quads=3))
    packed = pack_panels(w, PanelSpec(6, 5, 4, quads=3, sums=True))
    assert packed.shape == (2, 3, 4, 4)  # one more quad row a panel
    np.testing.assert_array_equal(packed[:, :2], plain)
    sums = np.ascontiguousarray(packed[:, 2]).view("<i4").reshape(8)  # (panels, nr) int32
    np.testing.assert_array_equal(sums, np.pad(w.reshape(6, 5).astype(np.int32).sum(axis=0), (0, 3)))


def _conv_integer(n, c, h, m, k, stride, pads, dilation=1, zero=7, seed=0, activations=np.uint8):
    rng = np.random.default_rng(seed)
    g = Graph("conv_integer")
    x = g.add_input("x", TensorType((n, h, h, c), DType.from_numpy(activations)))
    inputs = [x, g.add_param("w", rng.integers(-128, 128, (k, k, c, m), dtype=np.int8))]
    if zero is not None:
        inputs.append(g.add_param("z", np.array(zero, activations)))
    attrs = {"strides": [stride] * 2, "pads": [pads] * 4, "dilations": [dilation] * 2, "group": 1, "layout": "NHWC"}
    g.outputs = [g.add_node("ConvInteger", inputs, attrs, name="conv").outputs[0]]
    info = np.iinfo(activations)
    return g, rng.integers(info.min, info.max + 1, (n, h, h, c), dtype=activations)


@needs_vnni
@pytest.mark.parametrize(
    "n, c, h, m, k, stride, pads, dilation, zero",
    [
        (1, 64, 8, 64, 3, 1, 1, 1, 7),  # a ResNet 3x3
        (1, 3, 20, 40, 7, 2, 3, 1, 120),  # a stem: 3 channels padded to 4, a partial column block
        (2, 16, 9, 33, 1, 1, 0, 1, None),  # 1x1 read in place, two images, 33 columns
        (1, 32, 10, 16, 1, 2, 0, 1, 7),  # a strided 1x1 (a downsample)
        (1, 8, 12, 70, 3, 1, 2, 2, 255),  # dilated; the largest zero point
        (1, 256, 7, 96, 3, 1, 1, 1, 0),  # K of 2304: sums far past 16 bits
    ],
)
def test_the_vnni_kernel_gives_the_references_int32_sums(n, c, h, m, k, stride, pads, dilation, zero):
    graph, x = _conv_integer(n, c, h, m, k, stride, pads, dilation, zero)
    want = kiln.compile(graph).run({"x": x})
    got = kiln.compile(graph, target="llvm").run({"x": x})
    name = graph.outputs[0].name
    assert got[name].dtype == np.int32
    np.testing.assert_array_equal(got[name], want[name])


@needs_vnni
@pytest.mark.parametrize("c, h, m, k, stride, pads, zero", [(64, 8, 64, 3, 1, 1, -7), (3, 20, 40, 7, 2, 3, None), (16, 9, 33, 1, 1, 0, 5)])
def test_int8_activations_give_the_references_sums(c, h, m, k, stride, pads, zero):
    """Signed activations are copied 128 higher (their top bit flipped) and the zero point with
    them: the sums are the same."""
    graph, x = _conv_integer(2, c, h, m, k, stride, pads, zero=zero, activations=np.int8)
    name = graph.outputs[0].name
    np.testing.assert_array_equal(kiln.compile(graph, target="llvm").run({"x": x})[name], kiln.compile(graph).run({"x": x})[name])


@needs_vnni
def test_extreme_bytes_sum_without_saturating():
    """255 x -128 over K = 2304 is -75M: vpdpbusd adds its four products in 32 bits, no 16-bit step."""
    graph, _ = _conv_integer(1, 256, 5, 32, 3, 1, 1, zero=None)
    graph.params[list(graph.params)[0]][...] = -128
    x = np.full((1, 5, 5, 256), 255, np.uint8)
    got = kiln.compile(graph, target="llvm").run({"x": x})[graph.outputs[0].name]
    assert got[0, 2, 2, 0] == 255 * -128 * 9 * 256
    np.testing.assert_array_equal(got, kiln.compile(graph).run({"x": x})[graph.outputs[0].name])


@needs_vnni
def test_a_qdq_model_compiles_to_integer_convs_with_their_tails_fused():
    model, x = _qdq_model(zx=128, pads=1, stride=2)
    lowered = kiln.optimize(model, "O2", lowering=LLVMBackend.lowering, layout="auto")
    fused = [n for n in lowered.nodes if n.op.name == "Fused" and n.attrs["body"].nodes[0].op.name == "ConvInteger"]
    assert len(fused) == 1 and fused[0].outputs[0].type.dtype == DType.float32  # through the requantization to the last DequantizeLinear
    want = kiln.compile(model).run({"x": x})["y"]
    got = kiln.compile(model, target="llvm").run({"x": x})["y"]
    assert np.abs(got - want).max() <= 0.04 + 1e-6  # one output step (module docstring of integer_products)
    assert np.mean(got != want) < 0.01


@needs_vnni
def test_a_qdq_conv_by_uint8_weights_with_zero_points_is_one_integer_kernel():
    """The shift's product (each window's sum, a ones-kernel conv of the channel sums) is made
    before the integer conv and fuses into its tail."""
    model, x = _qdq_model(zx=128, pads=1, stride=2, weights=np.uint8)
    lowered = kiln.optimize(model, "O2", lowering=LLVMBackend.lowering, layout="auto")
    fused = [n for n in lowered.nodes if n.op.name == "Fused" and n.attrs["body"].nodes[0].op.name == "ConvInteger"]
    assert len(fused) == 1 and "Sub" in [n.op.name for n in fused[0].attrs["body"].nodes]
    want = kiln.compile(model).run({"x": x})["y"]
    got = kiln.compile(model, target="llvm").run({"x": x})["y"]
    assert np.abs(got - want).max() <= 0.04 + 1e-6
    assert np.mean(got != want) < 0.01


@pytest.mark.parametrize("weight_zero, anchor", [(0, "ConvInteger"), (1, "Conv")])
def test_a_depthwise_conv_takes_its_requantizing_tail_fused(monkeypatch, weight_zero, anchor):
    """A depthwise QDQ conv is a depthwise ConvInteger (bytes widened to float, whose sums are
    exact); with a weight zero point it stays a float conv, whose tail still ends in 8 bits (what
    the next, integer, conv reads), written from each row computed in scratch. Either way one
    kernel, whose output is the 1x1 conv's uint8 input."""
    from kiln.backends.llvm import kernels_conv

    taken = []
    original = kernels_conv.fused_conv
    monkeypatch.setattr(kernels_conv, "fused_conv", lambda ctx, body: taken.append((body.nodes[0].op.name, original(ctx, body))) or taken[-1][1])
    model, x = _qdq_model(zx=3, pads=1, stride=1, depthwise=True, weight_zero=weight_zero)
    lowered = kiln.optimize(model, "O2", lowering=LLVMBackend.lowering, layout="auto")
    first = next(n for n in lowered.nodes if n.op.name == "Fused" and n.attrs["body"].nodes[0].op.name.startswith("Conv"))
    conv = first.attrs["body"].nodes[0]
    assert conv.op.name == anchor and conv.attrs["group"] == 32 and conv.attrs["layout"] == "NHWC" and first.outputs[0].type.dtype == DType.uint8
    want = kiln.compile(model).run({"x": x})["y"]
    got = kiln.compile(model, target="llvm").run({"x": x})["y"]
    assert (anchor, True) in taken  # one kernel, not the group's body op by op
    np.testing.assert_allclose(got, want, atol=0.04 + 1e-6)  # float sums in another order: at most one step
    assert np.mean(got != want) < 0.01


@needs_vnni
@pytest.mark.parametrize(
    "shape, n, zero",
    [
        ((64, 784), 512, 3),  # an MLP layer: rows in 64-position rows
        ((3, 37, 20), 70, None),  # batched: 111 rows as 3 rows of 37 positions; K padded to 24
        ((128, 768), 3072, 128),  # a transformer's feed-forward: weights past 2 MB, split by column blocks
        ((5, 6), 33, 0),
    ],
)
def test_the_vnni_matmul_gives_the_references_int32_sums(shape, n, zero):
    rng = np.random.default_rng(1)
    g = Graph("matmul_integer")
    x = g.add_input("x", TensorType(shape, DType.uint8))
    inputs = [x, g.add_param("w", rng.integers(-128, 128, (shape[-1], n), dtype=np.int8))]
    if zero is not None:
        inputs.append(g.add_param("z", np.array(zero, np.uint8)))
    g.outputs = [g.add_node("MatMulInteger", inputs, name="mm").outputs[0]]
    feed = {"x": rng.integers(0, 256, shape, dtype=np.uint8)}
    name = g.outputs[0].name
    np.testing.assert_array_equal(kiln.compile(g, target="llvm").run(feed)[name], kiln.compile(g).run(feed)[name])


@needs_vnni
@pytest.mark.parametrize("threads, rows", [(2, (2, 8)), (1, (1, 16)), (3, (1, 16))])
def test_an_rnn_step_product_gives_each_thread_one_row_of_positions(threads, rows):
    """16 rows by 256 KB of weights (an LSTM step's): one row of 8 positions per thread on two,
    so the pool splits the rows; one row of 16 where they do not divide evenly. The sums are
    the reference's either way."""
    from kiln import config
    from kiln.backends.llvm.kernels_integer import _original

    rng = np.random.default_rng(3)
    g = Graph("step")
    x = g.add_input("x", TensorType((16, 256), DType.uint8))
    node = g.add_node("MatMulInteger", [x, g.add_param("w", rng.integers(-128, 128, (256, 1024), dtype=np.int8)), g.add_param("z", np.array(7, np.uint8))], name="mm")
    g.outputs = [node.outputs[0]]
    feed = {"x": rng.integers(0, 256, (16, 256), dtype=np.uint8)}
    with config.override(num_threads=threads, cache_dir="off"):
        assert _original(node).out == rows
        got = kiln.compile(g, target="llvm").run(feed)[node.outputs[0].name]
    np.testing.assert_array_equal(got, kiln.compile(g).run(feed)[node.outputs[0].name])


# weights with zero points: int8 less its shift by each row's sum (uint8 moved down by 128)
@needs_vnni
@pytest.mark.parametrize(
    "weights, w_zero, x_zero",
    [
        (np.uint8, 127, 3),  # quantize_dynamic's QUInt8 weights
        (np.uint8, "per column", None),
        (np.uint8, None, 200),  # no zero point: a shift of -128 everywhere
        (np.int8, -3, 128),
        (np.int8, "per column", 0),
    ],
)
def test_matmul_integer_by_weights_with_zero_points_gives_the_references_sums(weights, w_zero, x_zero):
    rng = np.random.default_rng(2)
    info = np.iinfo(weights)
    g = Graph("matmul_integer")
    x = g.add_input("x", TensorType((24, 40), DType.uint8))
    inputs = [x, g.add_param("w", rng.integers(info.min, info.max + 1, (40, 36), dtype=weights))]
    inputs.append(g.add_param("zx", np.array(x_zero, np.uint8)) if x_zero is not None else None)
    if w_zero is not None:
        zero = rng.integers(info.min, info.max + 1, 36) if w_zero == "per column" else w_zero
        inputs.append(g.add_param("zw", np.array(zero, weights)))
    g.outputs = [g.add_node("MatMulInteger", inputs, name="mm").outputs[0]]
    lowered = kiln.optimize(g, "O2", lowering=LLVMBackend.lowering)
    products = [n for n in lowered.nodes if n.op.name == "Fused" and n.attrs["body"].nodes[0].op.name == "MatMulInteger"]
    assert len(products) == 1 and len(products[0].attrs["body"].nodes[0].inputs) <= 3  # no weight zero point left
    feed = {"x": rng.integers(0, 256, (24, 40), dtype=np.uint8)}
    name = g.outputs[0].name
    np.testing.assert_array_equal(kiln.compile(g, target="llvm").run(feed)[name], kiln.compile(g).run(feed)[name])


def _qdq_mlp(seed: int = 0, weights=np.int8):
    """A quantize_static MLP: Gemm(DequantizeLinear(u8), DequantizeLinear(int8 (N, K) per row),
    DequantizeLinear(int32 bias)) {transB=1}, then Relu and QuantizeLinear, twice (``weights``
    uint8: per-row zero points around 128, as onnxruntime's QUInt8 weights)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = [48, 40, 10]
    inits = {"s0": np.array(0.05, np.float32), "z0": np.array(128, np.uint8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s0", "z0"], ["q0"])]
    for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
        sw = (rng.random(n) * 0.01 + 0.002).astype(np.float32)
        inits.update({
            f"w{i}": rng.integers(-127, 128, (n, k)).astype(np.int8), f"sw{i}": sw, f"zw{i}": np.zeros(n, np.int8),
            **({f"w{i}": rng.integers(0, 256, (n, k)).astype(np.uint8), f"zw{i}": rng.integers(120, 136, n).astype(np.uint8)} if weights == np.uint8 else {}),
            f"b{i}": rng.integers(-2000, 2000, n).astype(np.int32), f"sb{i}": (sw * inits[f"s{i}"]).astype(np.float32), f"zb{i}": np.zeros(n, np.int32),
            f"s{i + 1}": np.array(0.05, np.float32), f"z{i + 1}": np.array(0, np.uint8),
        })
        nodes += [
            helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"d{i}"]),
            helper.make_node("DequantizeLinear", [f"w{i}", f"sw{i}", f"zw{i}"], [f"wd{i}"], axis=0),
            helper.make_node("DequantizeLinear", [f"b{i}", f"sb{i}", f"zb{i}"], [f"bd{i}"], axis=0),
            helper.make_node("Gemm", [f"d{i}", f"wd{i}", f"bd{i}"], [f"g{i}"], transB=1),
            helper.make_node("Relu", [f"g{i}"], [f"r{i}"]),
            helper.make_node("QuantizeLinear", [f"r{i}", f"s{i + 1}", f"z{i + 1}"], [f"q{i + 1}"]),
        ]
    nodes.append(helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["y"]))
    graph = helper.make_graph(
        nodes, "qdq_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, sizes[0]])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, sizes[-1]])],
        [numpy_helper.from_array(a, name) for name, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), rng.standard_normal((16, sizes[0])).astype(np.float32) * 3


@needs_vnni
@pytest.mark.parametrize("weights", [np.int8, np.uint8])
def test_a_qdq_mlp_runs_its_gemms_as_integer_products_with_their_tails_fused(weights):
    model, x = _qdq_mlp(weights=weights)
    lowered = kiln.optimize(model, "O2", lowering=LLVMBackend.lowering)
    anchors = [n.attrs["body"].nodes[0].op.name for n in lowered.nodes if n.op.name == "Fused"]
    assert anchors.count("MatMulInteger") == 2 and "Gemm" not in anchors
    want = kiln.compile(model).run({"x": x})["y"]
    got = kiln.compile(model, target="llvm").run({"x": x})["y"]
    assert np.abs(got - want).max() <= 0.05 + 1e-6  # one output step
    assert np.mean(got != want) < 0.02


def _rescaled_step(tail: str):
    """An LSTM step's int8 product and its rescale, as onnxruntime's quantize_dynamic writes
    it: MatMulInteger -> Cast -> Mul by the scale -> Add (the input projection), then
    ``tail`` ("Relu" or "Gelu") or nothing."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMulInteger", ["x", "w", "zp"], ["p"]), helper.make_node("Cast", ["p"], ["f"], to=TensorProto.FLOAT), helper.make_node("Mul", ["f", "s"], ["m"]), helper.make_node("Add", ["m", "z"], ["a" if tail else "y"])]
    if tail:
        nodes.append(helper.make_node(tail, ["a"], ["y"]))
    graph = helper.make_graph(
        nodes, "step", [helper.make_tensor_value_info("x", TensorProto.UINT8, [16, 256]), helper.make_tensor_value_info("zp", TensorProto.UINT8, []), helper.make_tensor_value_info("z", TensorProto.FLOAT, [16, 100])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, 100])],
        [numpy_helper.from_array(rng.integers(-128, 128, (256, 100)).astype(np.int8), "w"), numpy_helper.from_array(np.array([0.0013], np.float32), "s")],
    )
    feeds = {"x": rng.integers(0, 256, (16, 256)).astype(np.uint8), "zp": np.array(131, np.uint8), "z": rng.standard_normal((16, 100)).astype(np.float32)}
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), feeds


@needs_vnni
@pytest.mark.parametrize("tail, in_registers", [("", True), ("Relu", True), ("Gelu", False)])
def test_a_products_tail_runs_on_its_sums_in_registers_where_every_op_has_a_vector_rule(monkeypatch, tail, in_registers):
    """The rescale (and a Relu) apply to each vector of sums as it leaves the registers, with
    no row buffer and no second loop; a Gelu (inline float math: scalar code) keeps the loop
    over the row buffer. Both give eager's values, with a partial last column block (100)."""
    from kiln.backends.llvm import kernels_integer

    def forbidden(*args):
        raise AssertionError("the other tail path ran")

    monkeypatch.setattr(kernels_integer._Tiles, "_tail" if in_registers else "_tail_in_registers", forbidden)
    model, feeds = _rescaled_step(tail)
    from kiln import config

    with config.override(cache_dir="off"):
        got = kiln.compile(model, target="llvm").run(feeds)["y"]
    want = kiln.compile(model).run(feeds)["y"]
    if tail == "Gelu":  # kiln's inline erf against numpy's
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:  # the same float32 operations in the same order
        np.testing.assert_array_equal(got, want)


@needs_vnni
def test_an_int8_artifact_loads_its_packed_quads_without_compiling(tmp_path, monkeypatch):
    import kiln.backends.llvm as llvm_backend

    model, x = _qdq_mlp()
    module = kiln.compile(model, target="llvm")
    path = tmp_path / "mlp_int8.kiln"
    module.save(path)
    monkeypatch.setattr(llvm_backend, "compile_object", lambda *args, **kwargs: pytest.fail("kiln.load compiled again"))
    loaded = kiln.load(path)
    assert any(p["quads"] for p in loaded.executable.layout["panels"])
    np.testing.assert_array_equal(loaded.run({"x": x})["y"], module.run({"x": x})["y"])


def _qoperator_model(activations=np.uint8):
    """QLinearConv (int8 weights per channel, int32 bias) -> QLinearMatMul after a reshape, as
    QOperator models write them; MatMulInteger and ConvInteger with zero weight zero points, as
    dynamic quantization does."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    zero = 3 if activations == np.uint8 else -3
    inits = {
        "xs": np.array(0.05, np.float32), "xz": np.array(zero, activations), "w": rng.integers(-127, 128, (16, 5, 3, 3)).astype(np.int8),
        "ws": (rng.random(16) * 0.01 + 0.005).astype(np.float32), "wz": np.zeros(16, np.int8), "ys": np.array(0.2, np.float32), "yz": np.array(zero, activations),
        "bias": rng.integers(-3000, 3000, 16).astype(np.int32), "shape": np.array([2, 16 * 36], np.int64),
        "m": rng.integers(-127, 128, (16 * 36, 10)).astype(np.int8), "ms": np.array(0.004, np.float32), "mz": np.array(0, np.int8),
        "os": np.array(0.3, np.float32), "oz": np.array(zero, activations), "mz2": np.zeros(10, np.int8),
    }
    nodes = [
        helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "bias"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Reshape", ["c", "shape"], ["flat"]),
        helper.make_node("QLinearMatMul", ["flat", "ys", "yz", "m", "ms", "mz", "os", "oz"], ["q"]),
        helper.make_node("MatMulInteger", ["flat", "m", "yz", "mz2"], ["sums"]),
        helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["ci"], pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    t = helper.np_dtype_to_tensor_dtype(np.dtype(activations))
    graph = helper.make_graph(
        nodes, "qoperator", [helper.make_tensor_value_info("x", t, [2, 5, 12, 12])],
        [helper.make_tensor_value_info(name, type_, shape) for name, type_, shape in [("q", t, [2, 10]), ("sums", TensorProto.INT32, [2, 10]), ("ci", TensorProto.INT32, [2, 16, 6, 6])]],
        [numpy_helper.from_array(a, name) for name, a in inits.items()],
    )
    info = np.iinfo(activations)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), rng.integers(info.min, info.max + 1, (2, 5, 12, 12), dtype=activations)


@needs_vnni
@pytest.mark.parametrize("activations", [np.uint8, np.int8])
def test_qoperator_nodes_run_on_the_vnni_kernels_bit_for_bit(activations):
    """QLinearConv, QLinearMatMul and MatMulInteger become the integer kernels' products with
    the reference's float64 requantization: the same integers, not one step off."""
    model, x = _qoperator_model(activations)
    lowered = kiln.optimize(model, "O0", lowering=LLVMBackend.lowering)
    ops = [n.op.name for n in lowered.nodes]
    assert ops.count("ConvInteger") == 2 and ops.count("MatMulInteger") == 2 and "Conv" not in ops and "MatMul" not in ops
    want = kiln.compile(model).run({"x": x})
    got = kiln.compile(model, target="llvm").run({"x": x})
    for name in ("q", "sums", "ci"):
        np.testing.assert_array_equal(got[name], want[name])


@needs_vnni
@pytest.mark.parametrize(
    "n, c, h, k, stride, pads, zero, activations",
    [
        (1, 32, 9, 3, 1, 1, 7, np.uint8),
        (2, 40, 8, 3, 2, 1, None, np.uint8),  # a partial channel block, two images
        (1, 16, 7, 5, 1, 2, -3, np.int8),
        (1, 144, 14, 3, 1, 1, 255, np.uint8),
    ],
)
def test_the_depthwise_integer_kernel_gives_the_references_sums(n, c, h, k, stride, pads, zero, activations):
    rng = np.random.default_rng(4)
    g = Graph("depthwise_integer")
    x = g.add_input("x", TensorType((n, h, h, c), DType.from_numpy(activations)))
    inputs = [x, g.add_param("w", rng.integers(-128, 128, (k, k, 1, c), dtype=np.int8))]
    if zero is not None:
        inputs.append(g.add_param("z", np.array(zero, activations)))
    attrs = {"strides": [stride] * 2, "pads": [pads] * 4, "dilations": [1, 1], "group": c, "layout": "NHWC"}
    g.outputs = [g.add_node("ConvInteger", inputs, attrs, name="dw").outputs[0]]
    info = np.iinfo(activations)
    feed = {"x": rng.integers(info.min, info.max + 1, (n, h, h, c), dtype=activations)}
    name = g.outputs[0].name
    np.testing.assert_array_equal(kiln.compile(g, target="llvm").run(feed)[name], kiln.compile(g).run(feed)[name])
