"""onnxruntime's quantized contrib ops (domain ``com.microsoft``), as QOperator models and the
ONNX model zoo's int8 models use them beside QLinearConv and QLinearMatMul: each is its float
op between DequantizeLinear and QuantizeLinear, as onnxruntime defines them. The llvm
backend's ``integer_products`` lowering then finds QGemm's product in integer form; the
elementwise ops and pools fuse into the integer products' tails.
"""

from __future__ import annotations

from kiln.frontend.onnx.convert_elementwise import passthrough
from kiln.frontend.onnx.convert_nn import _pool_attrs
from kiln.frontend.onnx.importer import MICROSOFT, NodeContext, converter
from kiln.ir.graph import Value


def _dequantized(ctx: NodeContext, first: int, axis: int = 1) -> Value:
    """DequantizeLinear of inputs (first, first + 1, first + 2): value, scale, zero point."""
    return ctx.emit("DequantizeLinear", [ctx.input(first), ctx.input(first + 1), ctx.input(first + 2)], {"axis": axis})[0]


def _quantized(ctx: NodeContext, y: Value, scale: int) -> Value:
    """QuantizeLinear of ``y`` by inputs ``scale`` and ``scale + 1`` (uint8 without a zero point)."""
    return ctx.emit("QuantizeLinear", [y, ctx.input(scale), ctx.input(scale + 1)], {})[0]


@converter("QuantizeLinear", "DequantizeLinear", domain=MICROSOFT)
def _quantize(ctx: NodeContext):
    """The contrib domain's older spelling of the standard ops (per tensor, or per ``axis``)."""
    return ctx.emit(ctx.node.op_type, ctx.inputs(), {"axis": ctx.attr("axis", 1)})


@converter("QLinearAdd", "QLinearMul", domain=MICROSOFT)
def _binary(ctx: NodeContext):
    """(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point): broadcasting."""
    op = ctx.node.op_type.removeprefix("QLinear")
    return [_quantized(ctx, ctx.emit(op, [_dequantized(ctx, 0), _dequantized(ctx, 3)])[0], 6)]


@converter("QLinearSigmoid", "QLinearLeakyRelu", domain=MICROSOFT)
def _unary(ctx: NodeContext):
    """(X, X_scale, X_zero_point, Y_scale, Y_zero_point); LeakyRelu's ``alpha`` (0.01)."""
    op = ctx.node.op_type.removeprefix("QLinear")
    attrs = {"alpha": ctx.attr("alpha", 0.01)} if op == "LeakyRelu" else {}
    return [_quantized(ctx, ctx.emit(op, [_dequantized(ctx, 0)], attrs)[0], 3)]


@converter("QLinearGlobalAveragePool", domain=MICROSOFT)
def _global_average_pool(ctx: NodeContext):
    """(X, x_scale, x_zero_point, y_scale, y_zero_point); ``channels_last`` data average over
    the axes between the first and the last."""
    x = _dequantized(ctx, 0)
    if ctx.attr("channels_last", 0):
        y = ctx.emit("ReduceMean", [x], {"axes": list(range(1, x.type.rank - 1)), "keepdims": 1})[0]
    else:
        y = ctx.emit("GlobalAveragePool", [x])[0]
    return [_quantized(ctx, y, 3)]


@converter("QLinearAveragePool", domain=MICROSOFT)
def _average_pool(ctx: NodeContext):
    """(X, x_scale, x_zero_point, y_scale, y_zero_point) with AveragePool's attributes."""
    if ctx.attr("channels_last", 0):
        raise ctx.error("channels_last=1 is not supported (onnxruntime's NHWC rewrite writes it; export the model without it)")
    attrs = _pool_attrs(ctx)
    attrs["count_include_pad"] = ctx.attr("count_include_pad", 0)
    return [_quantized(ctx, ctx.emit("AveragePool", [_dequantized(ctx, 0)], attrs)[0], 3)]


@converter("QLinearConcat", domain=MICROSOFT)
def _concat(ctx: NodeContext):
    """(Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input), ``axis``."""
    parts = [_dequantized(ctx, first) for first in range(2, ctx.num_inputs, 3)]
    y = ctx.emit("Concat", parts, {"axis": ctx.attr("axis")})[0]
    return [_quantized(ctx, y, 0)]


@converter("QGemm", domain=MICROSOFT)
def _qgemm(ctx: NodeContext):
    """(A, a_scale, a_zero_point, B, b_scale, b_zero_point, C, y_scale, y_zero_point):
    alpha * A' B' + C', where C is int32 of scale alpha * a_scale * b_scale (zero point 0); the
    output is quantized by y_scale when given, else float. B's scale may be one per column."""
    trans_b = ctx.attr("transB", 0)
    a = _dequantized(ctx, 0)
    b = _dequantized(ctx, 3, axis=0 if trans_b else 1)
    alpha = float(ctx.attr("alpha", 1.0))
    inputs = [a, b]
    if ctx.has_input(6):  # C as float: C * a_scale * b_scale, then times alpha as beta
        scale = ctx.emit("Mul", [ctx.input(1), ctx.input(4)])[0]
        inputs.append(ctx.emit("Mul", [ctx.emit("Cast", [ctx.input(6)], {"to": "f32"})[0], scale])[0])
    attrs = {"alpha": alpha, "beta": alpha, "transA": ctx.attr("transA", 0), "transB": trans_b}
    y = ctx.emit("Gemm", inputs, attrs)[0]
    return [_quantized(ctx, y, 7) if ctx.has_input(7) else y]


@converter("DynamicQuantizeLSTM", domain=MICROSOFT)
def _dynamic_quantize_lstm(ctx: NodeContext):
    """LSTM's inputs and attributes with 8-bit, transposed W and R and their scales and zero
    points (inputs 8-11): what onnxruntime's ``quantize_dynamic`` makes of an LSTM. It stays one
    node (kiln's op of the same name): each product quantizes its operand as it runs."""
    return passthrough(ctx)
