"""TE lowerings of quantization, gathers and scatters, TopK, Einsum, ReverseSequence and the
classification losses (NLL, softmax cross-entropy: what training graphs end in)."""

from __future__ import annotations

import itertools
import math

from tvm import te, topi
from tvm import tirx as tir

from kiln.backends.tvm.lower import lowering
from kiln.backends.tvm.scalar import dtype_of, tvm_dtype
from kiln.backends.tvm.te_tensor import reduce, shape_of, wrap_index


# -- quantization ----------------------------------------------------------------------------
def _quant_param(p: te.Tensor | None, index, attrs):
    """``p`` (a scalar, per-axis or blocked) read at an element index of the quantized tensor."""
    if p is None:
        return None
    shape = shape_of(p)
    if math.prod(shape) == 1 and len(shape) <= 1:
        return p[(0,) * len(shape)]
    axis = attrs["axis"] % len(index)
    if attrs["block_size"]:
        return p[tuple(v // attrs["block_size"] if k == axis else v for k, v in enumerate(index))]
    return p[index[axis]]


@lowering("QuantizeLinear")
def quantize(ctx, node, ins):
    x, scale, zp = (list(ins) + [None])[:3]
    out = tvm_dtype(node.outputs[0].type.dtype)
    work = dtype_of(x) if dtype_of(x).startswith("float") else "float64"
    lo, hi = tir.min_value(out), tir.max_value(out)

    def body(*i):
        q = tir.nearbyint(x[i].astype(work) / _quant_param(scale, i, node.attrs).astype(work)).astype("float64")
        if zp is not None:
            q = q + _quant_param(zp, i, node.attrs).astype("float64")
        return tir.max(tir.min(q, hi.astype("float64")), lo.astype("float64")).astype(out)

    return te.compute(x.shape, body, name="quantize")


@lowering("DequantizeLinear")
def dequantize(ctx, node, ins):
    x, scale, zp = (list(ins) + [None])[:3]
    out = tvm_dtype(node.outputs[0].type.dtype)

    def body(*i):
        v = x[i].astype("float64")
        if zp is not None:
            v = v - _quant_param(zp, i, node.attrs).astype("float64")
        return (v * _quant_param(scale, i, node.attrs).astype("float64")).astype(out)

    return te.compute(x.shape, body, name="dequantize")


@lowering("BitCast")
def bitcast(ctx, node, ins):
    x = ins[0]
    out = tvm_dtype(node.outputs[0].type.dtype)
    if dtype_of(x) == "bool":  # a one-byte bool is 0 or 1
        return te.compute(x.shape, lambda *i: x[i].astype(out), name="bitcast")
    if out == "bool":
        return te.compute(x.shape, lambda *i: x[i] != tir.const(0, dtype_of(x)), name="bitcast")
    return te.compute(x.shape, lambda *i: tir.reinterpret(out, x[i]), name="bitcast")


# -- gathers, scatters, selection ------------------------------------------------------------
@lowering("GatherND")
def gather_nd(ctx, node, ins):
    x, idx = ins
    b = node.attrs["batch_dims"]
    k = shape_of(idx)[-1]
    dims = shape_of(x)
    lead = len(shape_of(idx)) - 1  # output: idx.shape[:-1] + x.shape[b + k:]

    def body(*o):
        where = [wrap_index(idx[(*o[:lead], j)], dims[b + j]) for j in range(k)]
        return x[(*o[:b], *where, *o[lead:])]

    return te.compute(node.outputs[0].type.shape, body, name="gather_nd")


@lowering("ScatterElements")
def scatter_elements(ctx, node, ins):
    x, idx, upd = ins
    reduction = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}[node.attrs["reduction"]]
    axis = node.attrs["axis"] % len(x.shape)
    dim = shape_of(x)[axis]
    fixed = te.compute(idx.shape, lambda *i: wrap_index(idx[i], dim), name="fixed")
    return topi.scatter_elements(x, fixed, upd, axis, reduction)


@lowering("ScatterND")
def scatter_nd(ctx, node, ins):
    x, idx, upd = ins
    mode = {"none": "update", "add": "add", "mul": "mul", "max": "max", "min": "min"}[node.attrs["reduction"]]
    k = shape_of(idx)[-1]
    dims = shape_of(x)
    # topi wants the index tuple on the first axis: (K, ...) instead of (..., K)
    moved = te.compute([k, *shape_of(idx)[:-1]], lambda j, *i: wrap_index(idx[(*i, j)], _dim_at(dims, j, k)), name="moved")
    return topi.scatter_nd(x, moved, upd, mode)


def _dim_at(dims, j, k):
    """``dims[j]`` for a loop variable ``j`` < ``k``."""
    value = tir.const(dims[0], "int64")
    for n in range(1, k):
        value = tir.Select(j == n, tir.const(dims[n], "int64"), value)
    return value


@lowering("TopK")
def top_k(ctx, node, ins):
    a = node.attrs
    x = ins[0]
    axis = a["axis"] % len(x.shape)
    unsigned64 = dtype_of(x) == "uint64"
    if unsigned64:  # topi sorts no uint64: flipping the top bit maps its order onto int64's
        top = tir.const(1 << 63, "uint64")
        x = te.compute(x.shape, lambda *i: tir.bitwise_xor(x[i], top).astype("int64"), name="as_signed")
    values, indices = topi.topk(x, k=int(a["k"]), axis=axis, ret_type="both", is_ascend=not a["largest"], dtype="int64")
    if unsigned64:
        values = te.compute(values.shape, lambda *i: tir.bitwise_xor(values[i].astype("uint64"), top), name="as_unsigned")
    return [values, indices]


top_k.accepts = lambda node: bool(node.attrs["sorted"])


DET_TERMS_UP_TO = 4  # Det's order up to which the Leibniz sum (24 products at 4) is lowered


@lowering("Det")
def det(ctx, node, ins):
    """Small matrices' determinants as the Leibniz sum over permutations, in float64 (as the
    reference computes): TE has no sequential loop for an elimination short of an extern."""
    x = ins[0]
    n = int(x.shape[-1])
    dtype = dtype_of(x)

    def body(*i):
        total = tir.const(0.0, "float64")
        for order in itertools.permutations(range(n)):
            flips = sum(1 for a in range(n) for b in range(a + 1, n) if order[a] > order[b])
            term = tir.const(-1.0 if flips % 2 else 1.0, "float64")
            for row, col in enumerate(order):
                term = term * x[(*i, row, col)].astype("float64")
            total = total + term
        return total.astype(dtype)

    return te.compute(x.shape[:-2], body, name="det")


det.accepts = lambda node: node.inputs[0].type.shape[-1] <= DET_TERMS_UP_TO


@lowering("Einsum")
def einsum(ctx, node, ins):
    return topi.einsum(node.attrs["equation"].replace(" ", ""), *ins)


@lowering("ReverseSequence")
def reverse_sequence(ctx, node, ins):
    x, lens = ins
    batch = node.attrs["batch_axis"] % len(x.shape)
    time = node.attrs["time_axis"] % len(x.shape)

    def body(*i):
        n = lens[i[batch]].astype("int64")
        t = i[time].astype("int64")
        src = tir.Select(t < n, n - 1 - t, t)
        return x[tuple(src.astype(dtype_of(i[time])) if k == time else v for k, v in enumerate(i))]

    return te.compute(x.shape, body, name="reverse_sequence")


# -- losses ----------------------------------------------------------------------------------
def _nll(node, log_prob, target, weight):
    """The NLL loss of ``log_prob`` (N, C, ...) at ``target`` (N, ...), per element or reduced."""
    a = node.attrs
    ignore = a["ignore_index"]
    dtype = dtype_of(log_prob)

    def picked(*i):  # (loss, weight) of one target element
        t = target[i].astype("int64")
        valid = tir.const(True) if ignore is None else t != tir.const(ignore, "int64")
        safe = tir.Select(valid, t, tir.const(0, "int64"))
        w = weight[safe] if weight is not None else tir.const(1.0, dtype)
        w = tir.Select(valid, w, tir.const(0.0, dtype))
        return w, -log_prob[(i[0], safe, *i[1:])] * w

    losses = te.compute(target.shape, lambda *i: picked(*i)[1], name="nll")
    if a["reduction"] == "none":
        return losses
    axes = list(range(len(target.shape)))
    total = reduce(losses, axes, te.sum, keepdims=False, name="loss_sum")
    if a["reduction"] == "sum":
        return total
    weights = te.compute(target.shape, lambda *i: picked(*i)[0], name="weights")
    count = reduce(weights, axes, te.sum, keepdims=False, name="weight_sum")
    return te.compute((), lambda: total[()] / count[()], name="loss_mean")


@lowering("NegativeLogLikelihoodLoss")
def nll_loss(ctx, node, ins):
    x, target, weight = (list(ins) + [None])[:3]
    return _nll(node, x, target, weight)


@lowering("SoftmaxCrossEntropyLoss")
def softmax_cross_entropy(ctx, node, ins):
    x, labels, weight = (list(ins) + [None])[:3]
    peak = reduce(x, [1], te.max, name="peak")
    at = lambda t, i: t[(i[0], 0, *i[2:])]  # noqa: E731
    total = reduce(te.compute(x.shape, lambda *i: tir.exp(x[i] - at(peak, i)), name="exp"), [1], te.sum, name="total")
    log_prob = te.compute(x.shape, lambda *i: x[i] - at(peak, i) - tir.log(at(total, i)), name="log_prob")
    loss = _nll(node, log_prob, labels, weight)
    return [loss, log_prob][: len(node.outputs)]
