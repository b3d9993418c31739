"""integer_products: float convolutions and matrix products of dequantized 8-bit operands
compute in integers.

A QDQ model (onnxruntime's ``quantize_static``, a quantization-aware export) writes a quantized
conv as ``Conv(DequantizeLinear(xq), DequantizeLinear(wq), bias)``: float arithmetic on values
that are integers times scales. With ``x = (xq - zx) * sx`` (one scale and zero point) and
``w = wq * sw[m]`` (one scale per output channel or one for all, zero points 0)::

    Conv(x, w)[m] = sx * sw[m] * ConvInteger(xq, wq, zx)[m]

since ConvInteger subtracts ``zx`` and pads with it (a border of float zeros). Each such Conv
(group 1 or depthwise, 2-D, float32; ``xq`` 8-bit with constant scale and zero point; ``wq`` a constant int8
weight) becomes a channels-last ConvInteger between transposes, its int32 sums cast to float,
times the constant ``sx * sw``, plus the bias. The layout passes sink the transposes. A MatMul
(or Gemm, without transA) of such operands, the weight a constant (K, N) matrix (Gemm's
transposed one transposed now) with one scale per column or one for all, becomes
``MatMulInteger(xq, wq, zx)`` the same way, Gemm's alpha in the scale and beta * C the bias.
A matrix product's or a group-1 conv's weight may also be uint8 or have zero points
(onnxruntime's QUInt8): ``wq - zw`` is an int8 weight less a shift per output (uint8 moves down
by 128), and the product by the shift is each row's (or window's) sum of ``xq - zx`` times it,
in int32.

Fusion makes the tail (scale, bias, activation, the next QuantizeLinear) one kernel with the
integer product, which reads 8-bit activations and writes the next layer's (llvm:
``kernels_integer``). The integer sums are exact where the float ones round, so an output next
to a rounding boundary of the following QuantizeLinear can land one step away from the float
model's.

Preconditions: DequantizeLinear not yet folded or decomposed (the llvm backend runs this pass
first among its lowering passes). Postconditions: outputs unchanged up to float rounding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.nn import to_channels_first, to_channels_last, weight_to_spatial_first
from kiln.passes.autodiff import GradBuilder
from kiln.passes.base import Pass, register_pass
from kiln.passes.decompose import decompose_node, requantized, scale_ratio
from kiln.passes.rewrite import replace_node


def _dequantized(graph: Graph, value: Value, dtypes: tuple[DType, ...]) -> tuple[Value, np.ndarray, np.ndarray | None, int] | None:
    """(the 8-bit value, its scale, its zero point or None, the axis) where ``value`` is a
    DequantizeLinear of values of one of ``dtypes`` with constant scale and zero point, else None."""
    node = value.producer
    if node is None or node.op.name != "DequantizeLinear" or node.attrs["block_size"]:
        return None
    q, scale, zero = (list(node.inputs) + [None])[:3]
    if q.type.dtype not in dtypes or scale not in graph.params or (zero is not None and zero not in graph.params):
        return None
    return q, graph.params[scale], graph.params[zero] if zero is not None else None, node.attrs["axis"] % q.type.rank


def _operands(graph: Graph, x: Value, w: Value, weight_axis: int, shifts: bool) -> tuple | None:
    """(xq, x scale, x zero point param or None, the int8 weight, its scales along
    ``weight_axis``, one per output channel or column, its shift or None: ``_signed_weight``)
    where ``x`` and ``w`` dequantize 8-bit activations (one scale and zero point) and a
    constant weight: int8 with zero points 0, or (where ``shifts``) 8-bit with any constant
    zero points along ``weight_axis``; else None."""
    if x.type.dtype != DType.float32:
        return None
    xs = _dequantized(graph, x, (DType.uint8, DType.int8))
    ws = _dequantized(graph, w, (DType.int8, DType.uint8) if shifts else (DType.int8,))
    if xs is None or ws is None:
        return None
    xq, x_scale, x_zero, _ = xs
    wq, w_scale, w_zero, axis = ws
    outputs = w.type.shape[weight_axis]
    if x_scale.size != 1 or (x_zero is not None and x_zero.size != 1) or wq not in graph.params:
        return None
    per_output = lambda a: a.size == 1 or (a.size == outputs and axis == weight_axis)  # noqa: E731
    if not per_output(w_scale) or (w_zero is not None and not per_output(w_zero)):
        return None
    weight, shift = _signed_weight(graph.params[wq], w_zero, outputs)
    if shift is not None and not shifts:
        return None
    zero_param = x.producer.inputs[2] if len(x.producer.inputs) > 2 and x_zero is not None and x_zero.any() else None
    return xq, x_scale.reshape(()), zero_param, weight, np.broadcast_to(w_scale.reshape(-1), (outputs,)), shift


def _signed_weight(w: np.ndarray, zero: np.ndarray | None, outputs: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``w - zero`` (8-bit, zero points per output or one) as ``int8 weight - shift``: uint8
    weights move down by 128 (exactly, into int8) and their shift up by it. The shift, one per
    output as int32, is None where it is 0 (the kernels' case)."""
    shift = np.zeros(outputs, np.int64) if zero is None else np.broadcast_to(zero.astype(np.int64).reshape(-1), (outputs,))
    if w.dtype == np.uint8:
        w, shift = (w.astype(np.int16) - 128).astype(np.int8), shift - 128
    return w, (shift.astype(np.int32) if shift.any() else None)


def _shifted_sums(b: GradBuilder, xq: Value, weight: Value, zero: Value | None, shift: np.ndarray | None) -> Value:
    """MatMulInteger(xq, weight, zero) less ``shift`` times each row's sum of (xq - zero): the
    products by the weight less its shift, in int32 (exact). The row sums are a reduction of
    xq made first, so the correction fuses into the product's tail."""
    correction = None
    if shift is not None:
        rows = b.op("ReduceSum", b.op("Cast", xq, to="i32"), axes=[-1], keepdims=1)
        if zero is not None:
            k = b.graph.add_param(b.graph.fresh_name(f"{b.where}.k"), np.array(xq.type.shape[-1], np.int32))
            rows = b.op("Sub", rows, b.op("Mul", b.reshape(b.op("Cast", zero, to="i32"), []), k))
        correction = b.op("Mul", rows, b.graph.add_param(b.graph.fresh_name(f"{b.where}.shift"), shift))
    (sums,) = b.ops("MatMulInteger", [xq, weight, *([zero] if zero is not None else [])])
    return sums if correction is None else b.op("Sub", sums, correction)


def _one_or_depthwise(group: int, x: Value, w: Value) -> bool:
    """An ungrouped conv, or a depthwise one (a channel per group, in and out)."""
    return group == 1 or (group == x.type.shape[1] == w.type.shape[0] and w.type.shape[1] == 1)


def integer_form(graph: Graph, node: Node) -> tuple | None:
    """The operands of ``node``'s integer form (``_operands``), or None where it has none."""
    op = node.op.name
    if op == "Conv":
        x, w = node.inputs[:2]
        if node.attrs["layout"] != "NCHW" or x.type.rank != 4 or not _one_or_depthwise(node.attrs["group"], x, w):
            return None
        return _operands(graph, x, w, 0, shifts=node.attrs["group"] == 1 and _shifts_exact(w.type.shape))
    if op == "MatMul" and node.inputs[1].type.rank == 2 and node.inputs[0].type.rank >= 2:
        return _operands(graph, node.inputs[0], node.inputs[1], 1, shifts=True)
    if op == "Gemm" and not node.attrs["transA"]:
        return _operands(graph, node.inputs[0], node.inputs[1], 0 if node.attrs["transB"] else 1, shifts=True)
    return None


def _scale(graph: Graph, where: str, x_scale: np.ndarray, w_scale: np.ndarray, shape: list[int], factor: float = 1.0) -> Value:
    """The constant ``x scale * w scale`` (times ``factor``), in float64 then float32, as ``shape``."""
    scale = (x_scale.astype(np.float64) * w_scale.astype(np.float64) * factor).astype(np.float32).reshape(shape)
    return graph.add_param(graph.fresh_name(f"{where}.scale"), scale)


def _conv_sums(b: GradBuilder, node: Node, xq: Value, wq: np.ndarray, zero: Value | None, shift: np.ndarray | None = None) -> Value:
    """ConvInteger(xq, wq, zero) of ``node``'s strides, pads, dilations and group, channels-last
    between transposes (the weight transposed now): the int32 sums, NCHW; less ``shift`` (one
    per output channel, a group-1 conv's) times each window's sum of ``xq - zero``, as
    ``_shifted_sums`` does for a matrix."""
    graph, where = b.graph, b.where
    if shift is not None:  # channels-last too (a reshape: one channel), so the tail takes it
        windows = _window_sums(b, node, xq, zero, wq.shape)
        windows = b.reshape(windows, [windows.type.shape[0], *windows.type.shape[2:], 1])
    weight = graph.add_param(graph.fresh_name(f"{where}.weight_nhwc"), np.ascontiguousarray(wq.transpose(weight_to_spatial_first(4))))
    attrs = {k: node.attrs[k] for k in ("strides", "pads", "dilations")}
    operands = [b.op("Transpose", xq, perm=to_channels_last(4)), weight, *([zero] if zero is not None else [])]
    (sums,) = b.ops("ConvInteger", operands, group=node.attrs["group"], layout="NHWC", **attrs)
    if shift is not None:
        sums = b.op("Sub", sums, b.op("Mul", windows, graph.add_param(graph.fresh_name(f"{where}.shift"), shift)))
    return b.op("Transpose", sums, perm=to_channels_first(4))


def _window_sums(b: GradBuilder, node: Node, xq: Value, zero: Value | None, shape: tuple[int, ...]) -> Value:
    """Each output position's sum of ``xq - zero`` over its window and every channel, int32
    (N, 1, OH, OW): the channels summed, then a ones-kernel conv of the conv's geometry, in
    float32, exact (``_shifts_exact``: every sum below 2^24); pads add 0, as ConvInteger's
    zero-point border does."""
    graph = b.graph
    shifted = b.op("Cast", xq, to="f32")
    if zero is not None:
        shifted = b.op("Sub", shifted, b.reshape(b.op("Cast", zero, to="f32"), []))
    channels = b.op("ReduceSum", shifted, axes=[1], keepdims=1)
    ones = graph.add_param(graph.fresh_name(f"{b.where}.window"), np.ones((1, 1, *shape[2:]), np.float32))
    attrs = {k: node.attrs[k] for k in ("strides", "pads", "dilations")}
    return b.op("Cast", b.op("Conv", channels, ones, group=1, **attrs), to="i32")


def _shifts_exact(wq_shape: tuple[int, ...]) -> bool:
    """Whether a window's sum of 8-bit values less their zero point (each below 2^8 in size)
    stays exact in float32: fewer than 2^16 of them."""
    return int(np.prod(wq_shape[1:])) < 1 << 16


def rewrite(graph: Graph, node: Node, form: tuple) -> None:
    """Replace ``node`` by its integer form (``integer_form``)."""
    xq, x_scale, zero, wq, w_scale, shift = form
    where = node.name or node.op.name
    start = len(graph.nodes)
    b = GradBuilder(graph, where)
    if node.op.name == "Conv":
        m = wq.shape[0]
        y = b.op("Mul", b.op("Cast", _conv_sums(b, node, xq, wq, zero, shift), to="f32"), _scale(graph, where, x_scale, w_scale, [1, m, 1, 1]))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            y = b.op("Add", y, b.reshape(bias, [1, m, 1, 1]))
    else:  # MatMul, Gemm: y = x @ w (K, N)
        gemm = node.op.name == "Gemm"
        matrix = wq.T if gemm and node.attrs["transB"] else wq
        weight = graph.add_param(graph.fresh_name(f"{where}.weight_kn"), np.ascontiguousarray(matrix))
        sums = _shifted_sums(b, xq, weight, zero, shift)
        alpha = float(node.attrs["alpha"]) if gemm else 1.0
        y = b.op("Mul", b.op("Cast", sums, to="f32"), _scale(graph, where, x_scale, w_scale, [matrix.shape[1]], alpha))
        bias = node.inputs[2] if gemm and len(node.inputs) > 2 else None
        if bias is not None:
            beta = float(node.attrs["beta"])
            y = b.op("Add", y, bias if beta == 1.0 else b.op("Mul", bias, b.const(beta, bias)))
    replace_node(graph, node, [y], start)


# -- the integer nodes themselves: QOperator models (QLinearConv, QLinearMatMul) and dynamic
# quantization's ConvInteger/MatMulInteger, onto the same kernels
def _int8_weight(graph: Graph, w: Value, zero: Value | None, shifts: bool, outputs: int) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A constant 8-bit weight with constant zero points as ``_signed_weight`` gives it: the
    int8 weight and its shift (None where it is 0); None where the weight or its zero points
    are not constants, or it has a shift and ``shifts`` is False."""
    if w not in graph.params or zero is not None and zero not in graph.params:
        return None
    signed = _signed_weight(graph.params[w], graph.params[zero] if zero is not None else None, outputs)
    return signed if shifts or signed[1] is None else None


def _kept_zero_point(graph: Graph, zero: Value | None) -> Value | None | bool:
    """An activation zero point as the kernels take it: None where absent or a constant 0, the
    value where it is one scalar, False where it is several (the kernels take one)."""
    if zero is None or (zero in graph.params and not graph.params[zero].any()):
        return None
    return zero if zero.type.numel == 1 else False


def rewrite_integer_node(graph: Graph, node: Node) -> bool:
    """QLinearConv and ConvInteger (2-D, group 1 or depthwise) -> the channels-last ConvInteger; QLinearMatMul
    and MatMulInteger by a (K, N) matrix -> MatMulInteger without its weight zero point; each
    with a constant weight (a depthwise conv's int8 with zero points 0; the others' 8-bit with
    any constant zero points, ``_signed_weight``) and 8-bit activations with one zero point.
    The QLinear ops then requantize as their decomposition does (float64, the reference's
    rounding), so the result is theirs bit for bit. Returns whether it rewrote."""
    op = node.op.name
    if op not in ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger"):
        return False
    qlinear = op.startswith("QLinear")
    x, w = node.inputs[0], node.inputs[3 if qlinear else 1]
    x_zero = node.inputs[2] if len(node.inputs) > 2 else None
    w_zero = node.inputs[5 if qlinear else 3] if len(node.inputs) > (5 if qlinear else 3) else None
    conv = op.endswith("Conv") or op == "ConvInteger"
    if conv and (node.attrs.get("layout", "NCHW") != "NCHW" or x.type.rank != 4 or not _one_or_depthwise(node.attrs["group"], x, w)):
        return False
    if not conv and (w.type.rank != 2 or x.type.rank < 2 or (op == "MatMulInteger" and w_zero is None and w.type.dtype == DType.int8)):
        return False  # (a MatMulInteger by int8 without a weight zero point is the kernel's already)
    shifts = not conv or (node.attrs["group"] == 1 and _shifts_exact(w.type.shape))
    signed, zero = _int8_weight(graph, w, w_zero, shifts, w.type.shape[0] if conv else w.type.shape[-1]), _kept_zero_point(graph, x_zero)
    if signed is None or zero is False or x.type.dtype not in (DType.uint8, DType.int8):
        return False
    wq, shift = signed
    start = len(graph.nodes)
    b = GradBuilder(graph, node.name or op)
    if conv:
        sums = _conv_sums(b, node, x, wq, zero, shift)
    else:
        weight = w if shift is None and w.type.dtype == DType.int8 else graph.add_param(graph.fresh_name(f"{b.where}.weight_s8"), wq)
        sums = _shifted_sums(b, x, weight, zero, shift)
    y = sums
    if qlinear:
        _, x_scale, _, _, w_scale, _, y_scale, y_zero, *bias = node.inputs
        per = [1, wq.shape[0], 1, 1] if conv else [wq.shape[1]]
        acc = b.op("Cast", sums, to="f64")
        if bias and bias[0] is not None:
            acc = b.op("Add", acc, b.reshape(b.op("Cast", bias[0], to="f64"), per))
        y = requantized(b, acc, scale_ratio(b, x_scale, w_scale, y_scale, per), y_zero, y_zero.type.dtype)
    replace_node(graph, node, [y], start)
    return True


class IntegerProducts(Pass):
    """Conv, MatMul or Gemm of DequantizeLinear(8-bit) by DequantizeLinear(int8 weight) ->
    ConvInteger (channels-last) or MatMulInteger, then its float scale and bias (module
    docstring); the QOperator and integer nodes onto the same ops (``rewrite_integer_node``),
    and those with run-time weights decomposed, since the kernels pack weights at compile
    time. ``enabled()`` False leaves every node (a backend without integer kernels for this
    machine)."""

    name = "integer_products"

    def __init__(self, enabled: Callable[[], bool] = lambda: True):
        self.enabled = enabled

    def run(self, graph: Graph) -> Graph:
        if not self.enabled():
            return graph
        dequantized: list[Node] = []  # the DequantizeLinear nodes rewritten products read
        for node in list(graph.nodes):
            if rewrite_integer_node(graph, node):
                continue
            if node.op.name in ("ConvInteger", "MatMulInteger") and node.inputs[1] not in graph.params:
                decompose_node(graph, node)  # the integer kernels pack their weights at compile time
                continue
            form = integer_form(graph, node)
            if form is not None:
                dequantized += [v.producer for v in node.inputs[:2]]
                rewrite(graph, node, form)
        read = {id(v) for n in graph.nodes for v in n.inputs if v is not None} | {id(v) for v in graph.outputs}
        graph.remove_nodes(list({id(n): n for n in dequantized if id(n.outputs[0]) not in read}.values()))
        graph.remove_unread_params()
        return graph


register_pass(IntegerProducts())
