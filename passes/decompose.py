"""decompose: ops expressed through simpler ones, as ONNX function bodies do.

A backend without a kernel for an op lists ``Decompose(when=...)`` among its lowering passes:
each node ``when`` picks is replaced, in its place, by the nodes of its op's rule. Rules are
written with forward ops every backend runs (reductions, elementwise ops, MatMul, Gather), so a
decomposed graph also differentiates through the ordinary VJP rules. The registered pass
``decompose`` applies every rule.

Rules: the losses (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss), the normalizations
(training-mode BatchNormalization, Instance/Group/Layer/MeanVariance normalization),
ReduceLogSum/ReduceLogSumExp, LpPool, Quantize/DequantizeLinear, the integer and quantized
products (MatMulInteger, ConvInteger, QLinearMatMul, QLinearConv: exact float64 MatMul/Conv of
the shifted 8-bit values), Dropout (the seeded training mask becomes a constant, as
the reference draws the same mask every run) and Attention (``decompose_attention.py``).

Preconditions: none. Postconditions: no node ``when`` picks remains, except where a rule cannot
express that node (it says so by returning None before adding anything); outputs keep their names.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.nn import inverse_perm
from kiln.ir.ops.norm import dropout_mask
from kiln.passes.autodiff import GradBuilder
from kiln.passes.base import Pass, register_pass
from kiln.passes.rewrite import replace_node

Rule = Callable[[GradBuilder, Node], "Sequence[Value | None] | None"]
RULES: dict[str, Rule] = {}


def decomposition(*ops: str) -> Callable[[Rule], Rule]:
    """Register the rule for ``ops``: ``rule(builder, node)`` adds nodes through ``builder`` and
    returns one value per output of ``node`` (None for an output it does not make), or None,
    before adding anything, when it cannot express ``node``."""

    def wrap(rule: Rule) -> Rule:
        for op in ops:
            RULES[op] = rule
        return rule

    return wrap


class Decompose(Pass):
    """Replace each node ``when(node)`` picks (every node with a rule by default) by its rule's nodes."""

    name = "decompose"

    def __init__(self, when: Callable[[Node], bool] = lambda node: True):
        self.when = when

    def run(self, graph: Graph) -> Graph:
        from kiln.passes.canonicalize import fold_node, folds_at_any_size

        load_rules()
        for node in [n for n in graph.nodes if n.op.name in RULES and self.when(n)]:
            if folds_at_any_size(graph, node):
                fold_node(graph, node)  # a weight's DequantizeLinear: its rule's nodes would fold only up to KILN_FOLD_ELEMENTS
            else:
                decompose_node(graph, node)
        return graph


def decompose_node(graph: Graph, node: Node) -> list[Value | None] | None:
    """Replace ``node`` by its rule's nodes; returns the values that stand for its outputs
    (None when the rule cannot express it: the node stays)."""
    load_rules()
    start = len(graph.nodes)
    outputs = RULES[node.op.name](GradBuilder(graph, node.name or node.op.name), node)
    if outputs is None:
        return None
    outputs = list(outputs) + [None] * (len(node.outputs) - len(outputs))
    replace_node(graph, node, outputs, start)
    return outputs


def load_rules() -> None:
    from kiln.passes import decompose_attention  # noqa: F401


def padded_inputs(node: Node, count: int) -> list[Value | None]:
    return list(node.inputs) + [None] * (count - len(node.inputs))


# -- losses -----------------------------------------------------------------------------------
def negative_log_likelihood(b: GradBuilder, attrs, log_prob: Value, target: Value, weight: Value | None) -> Value:
    """ONNX NegativeLogLikelihoodLoss: -log_prob[n, target[n, ...], ...] weighted per class,
    with ``ignore_index`` entries weighing zero; ``mean`` divides by the total weight."""
    x_type = log_prob.type
    valid = None
    safe = target
    if attrs["ignore_index"] is not None:
        keep = b.op("Not", b.op("Equal", target, b.const(attrs["ignore_index"], target)))
        safe = b.op("Where", keep, target, b.const(0, target))
        valid = b.op("Cast", keep, to=x_type.dtype.short)
    index_shape = [x_type.shape[0], 1, *x_type.shape[2:]]
    picked = b.reshape(b.op("GatherElements", log_prob, b.reshape(safe, index_shape), axis=1), target.type.shape)
    w = valid
    if weight is not None:
        w = b.op("Gather", weight, safe, axis=0)
        w = w if valid is None else b.op("Mul", w, valid)
    loss = b.op("Neg", picked if w is None else b.op("Mul", picked, w))
    reduction = attrs["reduction"]
    if reduction == "none":
        return loss
    if reduction == "sum" or w is None:
        return b.op("ReduceSum" if reduction == "sum" else "ReduceMean", loss, axes=None, keepdims=0)
    return b.op("Div", b.op("ReduceSum", loss, axes=None, keepdims=0), b.op("ReduceSum", w, axes=None, keepdims=0))


@decomposition("NegativeLogLikelihoodLoss")
def _nll(b: GradBuilder, node: Node):
    log_prob, target, weight = padded_inputs(node, 3)
    return [negative_log_likelihood(b, node.attrs, log_prob, target, weight)]


@decomposition("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy(b: GradBuilder, node: Node):
    scores, labels, weight = padded_inputs(node, 3)
    log_prob = b.op("LogSoftmax", scores, axis=1)
    return [negative_log_likelihood(b, node.attrs, log_prob, labels, weight), log_prob]


# -- normalizations ---------------------------------------------------------------------------
def _per_channel(b: GradBuilder, v: Value, x: Value) -> Value:
    return b.reshape(v, [1, x.type.shape[1]] + [1] * (x.type.rank - 2))


@decomposition("BatchNormalization")
def batchnorm(b: GradBuilder, node: Node):
    """Training mode: normalized by the batch's statistics, and the running statistics moved
    toward them by ``momentum``. Inference mode is left to the backend's kernel."""
    if not node.attrs["training_mode"]:
        return None
    x, scale, bias, mean, var = node.inputs
    mu, centered, batch_var, inv_std = b.moments(x, [0, *range(2, x.type.rank)], node.attrs["epsilon"])
    y = b.op("Add", b.op("Mul", b.op("Mul", centered, inv_std), _per_channel(b, scale, x)), _per_channel(b, bias, x))
    if len(node.outputs) == 1:
        return [y]
    m = node.attrs["momentum"]
    new_mean = b.op("Add", b.scale(mean, m), b.scale(b.reshape(mu, mean.type.shape), 1 - m))
    new_var = b.op("Add", b.scale(var, m), b.scale(b.reshape(batch_var, var.type.shape), 1 - m))
    return [y, new_mean, new_var]


@decomposition("InstanceNormalization")
def _instance_norm(b: GradBuilder, node: Node):
    x, scale, bias = node.inputs
    _, centered, _, inv_std = b.moments(x, list(range(2, x.type.rank)), node.attrs["epsilon"])
    return [b.op("Add", b.op("Mul", b.op("Mul", centered, inv_std), _per_channel(b, scale, x)), _per_channel(b, bias, x))]


@decomposition("GroupNormalization")
def _group_norm(b: GradBuilder, node: Node):
    x, scale, bias = node.inputs
    n, groups = x.type.shape[0], node.attrs["num_groups"]
    grouped = b.reshape(x, [n, groups, x.type.numel // (n * groups)])
    _, centered, _, inv_std = b.moments(grouped, [2], node.attrs["epsilon"])
    y = b.reshape(b.op("Mul", centered, inv_std), x.type.shape)
    return [b.op("Add", b.op("Mul", y, _per_channel(b, scale, x)), _per_channel(b, bias, x))]


@decomposition("LayerNormalization")
def _layer_norm(b: GradBuilder, node: Node):
    x, scale, bias = padded_inputs(node, 3)
    rank = x.type.rank
    mean, centered, _, inv_std = b.moments(x, list(range(node.attrs["axis"] % rank, rank)), node.attrs["epsilon"])
    y = b.op("Mul", b.op("Mul", centered, inv_std), scale)
    y = y if bias is None else b.op("Add", y, bias)
    stats = [v if v.type.dtype == out.type.dtype else b.op("Cast", v, to=out.type.dtype.short) for v, out in zip((mean, inv_std), node.outputs[1:])]
    return [y, *stats]


@decomposition("MeanVarianceNormalization")
def _mean_variance_norm(b: GradBuilder, node: Node):
    (x,) = node.inputs
    _, centered, _, inv_std = b.moments(x, node.attrs["axes"], 1e-9)
    return [b.op("Mul", centered, inv_std)]


# -- reductions and pooling -------------------------------------------------------------------
@decomposition("ReduceLogSum")
def _reduce_log_sum(b: GradBuilder, node: Node):
    (x,) = node.inputs
    return [b.op("Log", b.op("ReduceSum", x, axes=node.attrs["axes"], keepdims=node.attrs["keepdims"]))]


@decomposition("ReduceLogSumExp")
def _reduce_log_sum_exp(b: GradBuilder, node: Node):
    """log(sum(exp(x - m))) + m with m the maximum (0 where it is infinite), as the reference."""
    (x,) = node.inputs
    axes = node.attrs["axes"]
    top = b.op("ReduceMax", x, axes=axes, keepdims=1)
    shift = b.op("Where", b.op("IsInf", top), b.const(0.0, top), top)
    total = b.op("ReduceSum", b.op("Exp", b.op("Sub", x, shift)), axes=axes, keepdims=1)
    return [b.reshape(b.op("Add", b.op("Log", total), shift), node.outputs[0].type.shape)]


@decomposition("LpPool")
def _lp_pool(b: GradBuilder, node: Node):
    """(sum of |x|^p over each window)^(1/p): a convolution of |x|^p by ones per channel, with
    the end padding that ceil_mode's partial windows need."""
    (x,) = node.inputs
    a = node.attrs
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    strides = a["strides"] or [1] * nd
    dilations = a["dilations"] or [1] * nd
    pads = list(a["pads"] or [0] * (2 * nd))
    n, c, *spatial = x.type.shape
    out = node.outputs[0].type.shape[2:]
    for i in range(nd):
        reach = (out[i] - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
        pads[nd + i] = max(pads[nd + i], reach - spatial[i] - pads[i])
    p = float(a["p"])
    powered = b.op("Abs", x) if p == 1 else b.op("Pow", b.op("Abs", x), b.const(p, x))
    ones = b.graph.add_param(b.graph.fresh_name(f"{b.where}.window"), np.ones([1, 1, *kernel], dtype=x.type.dtype.numpy))
    summed = b.op("Conv", b.reshape(powered, [n * c, 1, *spatial]), ones, strides=strides, pads=pads, dilations=dilations)
    summed = b.reshape(summed, node.outputs[0].type.shape)
    return [summed if p == 1 else b.op("Pow", summed, b.const(1.0 / p, x))]


@decomposition("GlobalLpPool")
def _global_lp_pool(b: GradBuilder, node: Node):
    """(sum of |x|^p over all spatial positions)^(1/p), per image and channel."""
    (x,) = node.inputs
    p = float(node.attrs["p"])
    powered = b.op("Abs", x) if p == 1 else b.op("Pow", b.op("Abs", x), b.const(p, x))
    summed = b.op("ReduceSum", powered, axes=list(range(2, x.type.rank)), keepdims=1)
    return [summed if p == 1 else b.op("Pow", summed, b.const(1.0 / p, x))]


@decomposition("Einsum")
def _einsum_contraction(b: GradBuilder, node: Node):
    """A one- or two-operand Einsum without diagonals as ReduceSum, Transpose, Reshape and one
    (batched) MatMul: labels only one operand has and the output lacks are summed first; then
    A is laid out (batch, m, k) and B (batch, k, n), with shared output labels as MatMul's
    batch dims (which may broadcast). None where a contracted or kept label's sizes differ."""
    from kiln.ir.ops.linalg import einsum_labels

    operands = list(node.inputs)
    labels, out = einsum_labels(node.attrs["equation"], [v.type.rank for v in operands])
    if len(operands) > 2 or any(len(set(d)) != len(d) for d in [*labels, out]):
        return None
    terms = []
    for i, (dims, v) in enumerate(zip(labels, operands)):
        others = set(out).union(*[set(d) for k, d in enumerate(labels) if k != i])
        alone = [axis for axis, label in enumerate(dims) if label not in others]
        if alone:
            v = b.op("ReduceSum", v, axes=alone, keepdims=0)
            dims = [label for label in dims if label in others]
        terms.append((dims, v))
    if len(terms) == 1:
        (dims, v), = terms
        return [_permuted(b, v, [dims.index(label) for label in out])]
    (da, a), (db, bm) = terms
    size = lambda dims, v, label: v.type.shape[dims.index(label)]  # noqa: E731
    batch = [label for label in out if label in da and label in db]
    contracted = [label for label in da if label in db and label not in out]
    rows = [label for label in out if label in da and label not in db]
    cols = [label for label in out if label in db and label not in da]
    if any(size(da, a, label) != size(db, bm, label) for label in contracted):
        return None
    k = math.prod(size(da, a, label) for label in contracted)
    m = math.prod(size(da, a, label) for label in rows)
    n = math.prod(size(db, bm, label) for label in cols)
    a = b.reshape(_permuted(b, a, [da.index(label) for label in [*batch, *rows, *contracted]]), [*(size(da, a, label) for label in batch), m, k])
    bm = b.reshape(_permuted(b, bm, [db.index(label) for label in [*batch, *contracted, *cols]]), [*(size(db, bm, label) for label in batch), k, n])
    product = b.op("MatMul", a, bm)
    batch_shape = list(product.type.shape[: len(batch)])
    product = b.reshape(product, [*batch_shape, *(size(da, terms[0][1], label) for label in rows), *(size(db, terms[1][1], label) for label in cols)])
    order = [*batch, *rows, *cols]
    return [_permuted(b, product, [order.index(label) for label in out])]


@decomposition("DFT")
def _dft(b: GradBuilder, node: Node):
    """One MatMul by the transform's real matrix (``dft_matrix``, made now in float64): the
    signal axis and the real/imaginary axis moved last, flattened part-major, multiplied, and
    moved back. O(n^2) per signal, which is what static, modest lengths (frames of an STFT)
    want from a GEMM kernel."""
    from kiln.ir.ops.signal import dft_matrix

    (x,) = node.inputs
    a = node.attrs
    rank, axis = x.type.rank, a["axis"] % x.type.rank
    size, parts = x.type.shape[axis], x.type.shape[-1]
    out = node.outputs[0].type.shape
    rest = [d for d in range(rank - 1) if d != axis]
    order = [*rest, rank - 1, axis]  # (..., parts, samples)
    lead = [x.type.shape[d] for d in rest]
    flat = b.reshape(_permuted(b, x, order), [*lead, parts * size])
    matrix = dft_matrix(size, parts, a["length"], bool(a["inverse"]), bool(a["onesided"]))
    w = b.graph.add_param(b.graph.fresh_name(f"{b.where}.dft"), matrix.astype(x.type.dtype.numpy))
    product = b.reshape(b.op("MatMul", flat, w), [*lead, out[-1], out[axis]])
    return [_permuted(b, product, inverse_perm(order))]


def _permuted(b: GradBuilder, v: Value, perm: list[int]) -> Value:
    return v if perm == list(range(len(perm))) else b.op("Transpose", v, perm=perm)


# -- linear quantization ---------------------------------------------------------------------
def _quant_param(b: GradBuilder, param: Value, x: Value, attrs) -> Value:
    """A scale or zero point laid out to broadcast against ``x``: a scalar, per ``axis``, or
    each of its blocks repeated ``block_size`` times along ``axis`` (cut to ``x``'s length)."""
    if param.type.numel == 1 and param.type.rank <= 1:
        return b.reshape(param, [])
    axis = attrs["axis"] % x.type.rank
    if not attrs["block_size"]:
        return b.reshape(param, [param.type.numel if i == axis else 1 for i in range(x.type.rank)])
    shape, size = list(param.type.shape), attrs["block_size"]
    split = shape[: axis + 1] + [1] + shape[axis + 1 :]
    spread = b.op("Expand", b.reshape(param, split), shape=shape[: axis + 1] + [size] + shape[axis + 1 :])
    whole = b.reshape(spread, shape[:axis] + [shape[axis] * size] + shape[axis + 1 :])
    if whole.type.shape[axis] == x.type.shape[axis]:
        return whole
    return b.op("Slice", whole, starts=[0], ends=[x.type.shape[axis]], axes=[axis])


def _as(b: GradBuilder, v: Value, dtype) -> Value:
    return v if v.type.dtype == dtype else b.op("Cast", v, to=dtype.short)


# the significand bits of each float: integers up to 2**bits are exact in it
EXACT_INTEGER_BITS = {DType.float16: 11, DType.float32: 24, DType.float64: 53}


@decomposition("QuantizeLinear")
def _quantize(b: GradBuilder, node: Node):
    x, scale, zero_point = padded_inputs(node, 3)
    return [quantized(b, x, scale, zero_point, node.outputs[0].type.dtype, node.attrs)]


def quantized(b: GradBuilder, x: Value, scale: Value, zero_point: Value | None, out: DType, attrs) -> Value:
    """round(x / scale) (half to even, divided in x's precision) + zero point, saturated. The
    sum and the clamp stay in x's float type where it holds every integer of twice the output's
    range (an 8-bit output from float32): a sum that rounds is far outside the range and
    saturates the same; else they run in float64."""
    info = np.iinfo(out.numpy)
    work = x.type.dtype if x.type.dtype.is_float else DType.float64
    q = b.op("Round", b.op("Div", _as(b, x, work), _as(b, _quant_param(b, scale, x, attrs), work)))
    if 2 * max(-int(info.min), int(info.max)) > 2 ** EXACT_INTEGER_BITS[work]:
        q = _as(b, q, DType.float64)
    if zero_point is not None:
        q = b.op("Add", q, _as(b, _quant_param(b, zero_point, x, attrs), q.type.dtype))
    saturated = b.op("Min", b.op("Max", q, b.const(float(info.min), q)), b.const(float(info.max), q))
    return b.op("Cast", saturated, to=out.short)


@decomposition("DynamicQuantizeLinear")
def _dynamic_quantize(b: GradBuilder, node: Node):
    """onnxruntime's rule (``ir.ops.quant.dynamic_quantized``) in float32 ops: the range
    [min(x, 0), max(x, 0)] over 255 steps (scale 1 where it is empty), the zero point that
    range's rounded image of 0, x quantized by them."""
    (x,) = node.inputs
    everything = {"axes": list(range(x.type.rank)), "keepdims": 0}
    zero = b.const(0.0, x)
    lo = b.op("Min", b.op("ReduceMin", x, **everything), zero)
    hi = b.op("Max", b.op("ReduceMax", x, **everything), zero)
    span = b.op("Sub", hi, lo)
    scale = b.op("Where", b.op("Equal", span, zero), b.const(1.0, x), b.op("Div", span, b.const(255.0, x)))
    point = b.op("Cast", b.op("Round", b.op("Clip", b.op("Sub", zero, b.op("Div", lo, scale)), zero, b.const(255.0, x))), to="u8")
    return [quantized(b, x, scale, point, DType.uint8, {"axis": 1, "block_size": 0}), scale, point]


@decomposition("DequantizeLinear")
def _dequantize(b: GradBuilder, node: Node):
    """(x - zero point) * scale, in float64 as the reference, then rounded to the output type;
    in float32 for 8- and 16-bit x with a float32 scale and output: the difference is exact
    there and the product rounds once either way, so the result is the same."""
    x, scale, zero_point = padded_inputs(node, 3)
    out = node.outputs[0].type.dtype
    narrow = x.type.dtype.itemsize <= 2 and scale.type.dtype is DType.float32 and out is DType.float32
    work = DType.float32 if narrow else DType.float64
    v = _as(b, x, work)
    if zero_point is not None:
        v = b.op("Sub", v, _as(b, _quant_param(b, zero_point, x, node.attrs), work))
    v = b.op("Mul", v, _as(b, _quant_param(b, scale, x, node.attrs), work))
    return [_as(b, v, out)]


# -- integer and quantized products -------------------------------------------------------------
# 8-bit values less their zero points, multiplied and summed in float64: exact (every sum of
# products stays far below 2**53), so the integer result is the reference's to the bit, and the
# float64 GEMM and conv kernels run it
def _shifted(b: GradBuilder, x: Value, zero_point: Value | None, per: Sequence[int] = ()) -> Value:
    """``x - zero point`` in float64; a zero point with several entries reshaped to ``per``."""
    v = _as(b, x, DType.float64)
    if zero_point is None:
        return v
    z = b.reshape(_as(b, zero_point, DType.float64), per if zero_point.type.numel > 1 else [])
    return b.op("Sub", v, z)


def requantized(b: GradBuilder, acc: Value, ratio: Value, zero_point: Value, out: DType) -> Value:
    """``acc * ratio + zero point`` in float64, rounded half to even, saturated, cast to ``out``."""
    d = b.op("Mul", acc, _as(b, ratio, DType.float64))
    d = b.op("Round", b.op("Add", d, _as(b, b.reshape(zero_point, []), DType.float64)))
    info = np.iinfo(out.numpy)
    return b.op("Cast", b.op("Min", b.op("Max", d, b.const(float(info.min), d)), b.const(float(info.max), d)), to=out.short)


def scale_ratio(b: GradBuilder, x_scale: Value, w_scale: Value, y_scale: Value, per: Sequence[int]) -> Value:
    """``x_scale * w_scale / y_scale`` in the scales' own precision (as the reference), the
    middle one per column or output channel when it has several entries."""
    w = b.reshape(w_scale, per if w_scale.type.numel > 1 else [])
    return b.op("Div", b.op("Mul", b.reshape(x_scale, []), w), b.reshape(y_scale, []))


@decomposition("MatMulInteger")
def _matmul_integer(b: GradBuilder, node: Node):
    a, bm, a_zp, b_zp = padded_inputs(node, 4)
    columns = [bm.type.shape[-1]]
    return [b.op("Cast", b.op("MatMul", _shifted(b, a, a_zp), _shifted(b, bm, b_zp, columns)), to="i32")]


@decomposition("QLinearMatMul")
def _qlinear_matmul(b: GradBuilder, node: Node):
    a, a_scale, a_zp, bm, b_scale, b_zp, y_scale, y_zp = node.inputs
    columns = [bm.type.shape[-1]]
    acc = b.op("MatMul", _shifted(b, a, a_zp), _shifted(b, bm, b_zp, columns))
    return [requantized(b, acc, scale_ratio(b, a_scale, b_scale, y_scale, columns), y_zp, y_zp.type.dtype)]


def _conv_attrs(node: Node) -> dict:
    return {k: node.attrs[k] for k in ("strides", "pads", "dilations", "group")}


@decomposition("ConvInteger")
def _conv_integer(b: GradBuilder, node: Node):
    x, w, x_zp, w_zp = padded_inputs(node, 4)
    rank, layout = w.type.rank, node.attrs["layout"]
    per_channel = [1] * (rank - 1) + [w.type.shape[-1]] if layout == "NHWC" else [w.type.shape[0]] + [1] * (rank - 1)
    conv = b.op("Conv", _shifted(b, x, x_zp), _shifted(b, w, w_zp, per_channel), **_conv_attrs(node), layout=layout)
    return [b.op("Cast", conv, to="i32")]


@decomposition("QLinearConv")
def _qlinear_conv(b: GradBuilder, node: Node):
    x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias = padded_inputs(node, 9)
    m, rank = w.type.shape[0], w.type.rank
    shifted_w = _shifted(b, w, w_zp, [m] + [1] * (rank - 1))
    acc = b.op("Conv", _shifted(b, x, x_zp), shifted_w, _as(b, bias, DType.float64) if bias is not None else None, **_conv_attrs(node))
    ratio = scale_ratio(b, x_scale, w_scale, y_scale, [1, m] + [1] * (rank - 2))
    return [requantized(b, acc, ratio, y_zp, y_zp.type.dtype)]


# -- Dropout ----------------------------------------------------------------------------------
@decomposition("Dropout")
def _dropout(b: GradBuilder, node: Node):
    """Identity outside training (or at ratio 0); in training, ``x * keep / (1 - ratio)`` with the
    mask numpy's MT19937 draws from ``seed``: the reference's mask, fixed at compile time."""
    (x,) = node.inputs[:1]
    a = node.attrs
    wants_mask = len(node.outputs) > 1
    if not a["training_mode"] or a["ratio"] == 0:
        mask = b.graph.add_node("ConstantOfShape", [], {"shape": list(x.type.shape), "value": 1.0, "dtype": "bool"}, name=f"{b.where}/mask").outputs[0] if wants_mask else None
        return [x, mask]
    keep = dropout_mask(a, x.type.shape)
    y = b.op("Mul", x, dropout_scale(b, a, x, keep))
    mask = b.graph.add_param(b.graph.fresh_name(f"{b.where}.mask"), keep) if wants_mask else None
    return [y, mask]


def dropout_scale(b: GradBuilder, attrs, x: Value, keep: np.ndarray | None = None) -> Value:
    """keep / (1 - ratio) per element of ``x`` (a constant): what training-mode Dropout
    multiplies by (``keep`` drawn here unless the caller has it)."""
    keep = dropout_mask(attrs, x.type.shape) if keep is None else keep
    scaled = (keep / (1.0 - attrs["ratio"])).astype(x.type.dtype.numpy)
    return b.graph.add_param(b.graph.fresh_name(f"{b.where}.scale"), scaled)


register_pass(Decompose())
