"""Gradient rules of matrix products, convolutions, pools, BatchNormalization and the losses,
written with forward ops: a convolution's input gradient is a ConvTranspose, its weight
gradient a convolution of the input by the output gradient, so every backend that runs the
forward ops runs the gradients."""

from __future__ import annotations

import math

import numpy as np

from kiln.errors import KilnError
from kiln.ir.ops.nn import _pool_geometry, _spatial_attrs
from kiln.passes.autodiff.rules_elementwise import vjp


def _swap_last(b, v):
    rank = v.type.rank
    return b.op("Transpose", v, perm=[*range(rank - 2), rank - 1, rank - 2])


@vjp("MatMul")
def _matmul(b, node, grads):
    g, (x, y) = grads[0], node.inputs
    if x.type.rank < 2 or y.type.rank < 2:
        raise KilnError(f"autodiff: MatMul {node.name!r} of a vector: only matrix operands have a gradient rule yet")
    gy = None
    if b.wants(1) and y.type.rank == 2:
        # a weight shared by every batch of x: one GEMM over all of x's rows, its transpose read
        # in place (a batched product per batch, then their sum, wrote and read each batch's
        # (K, N) and transposed x: a transformer's feed-forward weight 1.1 -> 0.5 ms)
        k, n = y.type.shape
        gy = b.op("Gemm", b.reshape(x, [x.type.numel // k, k]), b.reshape(g, [g.type.numel // n, n]), transA=1)
    elif b.wants(1):
        gy = b.unbroadcast(b.op("MatMul", _swap_last(b, x), g), y.type.shape)
    return [b.unbroadcast(b.op("MatMul", g, _swap_last(b, y)), x.type.shape) if b.wants(0) else None, gy]


@vjp("Gemm")
def _gemm(b, node, grads):
    """Y = alpha * op(A) op(B) + beta * C."""
    a = node.attrs
    g = grads[0]
    x, w = node.inputs[:2]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    ga = gb = gc = None
    if b.wants(0):  # d op(A) = g op(B)^T; A^T's gradient is its transpose
        ga = b.op("Gemm", g, w, alpha=a["alpha"], transA=0, transB=0 if a["transB"] else 1)
        ga = b.op("Transpose", ga, perm=[1, 0]) if a["transA"] else ga
    if b.wants(1):  # d op(B) = op(A)^T g
        if a["transB"]:
            gb = b.op("Gemm", g, x, alpha=a["alpha"], transA=1, transB=1 if a["transA"] else 0)
        else:
            gb = b.op("Gemm", x, g, alpha=a["alpha"], transA=0 if a["transA"] else 1, transB=0)
    if c is not None and b.wants(2):
        gc = b.scale(b.unbroadcast(g, c.type.shape), a["beta"])
    return [ga, gb, gc]


def _channels_first(node):
    if node.attrs.get("layout", "NCHW") != "NCHW":
        raise KilnError(f"autodiff: {node.op.name} {node.name!r} is channels-last; differentiate before the layout passes")


def _to_channel_major(b, v):
    """(N, C, *S) -> (C, N, *S)."""
    return b.op("Transpose", v, perm=[1, 0, *range(2, v.type.rank)])


def _conv_weight_grad(b, x, g, kernel, strides, dilations, pads, groups):
    """dW of a convolution: the input correlated with the output gradient, per group.

    ``x`` (N, C, *S) and ``g`` (N, M, *O) become (C, N, *S) and (M, N, *O): a convolution of
    the first by the second with stride and dilation swapped gives (C, M, *K'), K' >= K."""
    nd = len(kernel)
    c, m = x.type.shape[1], g.type.shape[1]
    flipped_pads = _flipped_weight_grad_pads(x, g, kernel, strides, dilations, pads, groups)
    if flipped_pads is not None:
        return _flipped_weight_grad(b, x, g, dilations, flipped_pads)
    xs = _to_channel_major(b, x)
    gs = _to_channel_major(b, g)
    parts = []
    for k in range(groups):
        xg = xs if groups == 1 else b.op("Slice", xs, starts=[k * c // groups], ends=[(k + 1) * c // groups], axes=[0])
        gg = gs if groups == 1 else b.op("Slice", gs, starts=[k * m // groups], ends=[(k + 1) * m // groups], axes=[0])
        full = b.op("Conv", xg, gg, strides=list(dilations), dilations=list(strides), pads=list(pads))
        cut = b.op("Slice", full, starts=[0] * nd, ends=list(kernel), axes=list(range(2, 2 + nd)))
        parts.append(b.op("Transpose", cut, perm=[1, 0, *range(2, 2 + nd)]))  # (M/g, C/g, *K)
    return parts[0] if groups == 1 else b.op("Concat", *parts, axis=0)


def _flipped_weight_grad_pads(x, g, kernel, strides, dilations, pads, groups) -> list[int] | None:
    """The pads of ``_flipped_weight_grad``'s conv, or None where it does not apply: a stride
    above 1, groups, a pad past the dilated kernel's reach, or a weight no larger than the two
    inputs its flips copy (where the plain form's final transpose costs less)."""
    nd = len(kernel)
    reach = [d * (k - 1) for d, k in zip(dilations, kernel)]
    flipped = [reach[i] - pads[nd + i] for i in range(nd)] + [reach[i] - pads[i] for i in range(nd)]
    weight = x.type.shape[1] * g.type.shape[1] * math.prod(kernel)
    if groups != 1 or any(s != 1 for s in strides) or min(flipped) < 0 or weight <= x.type.numel + g.type.numel:
        return None
    return flipped


def _flipped_weight_grad(b, x, g, dilations, pads):
    """dW (M, C, *K) with no transpose of it: correlating x with g gives the taps in (C, M)
    order, and correlating g with x gives them flipped, so the conv takes both flipped:
    g's channel-major planes (M, N, *O) reversed along every spatial axis as the images, x's
    (C, N, *S) reversed as the kernels, strided by the dilation, padded by ``d (K - 1)`` less
    the opposite pad. Where the weight is the large side (a ResNet's 512x512x3x3 layer on
    2x2 maps: 9.4 MB against two 64 KB maps) this saves a transpose of every weight gradient
    (1.3 ms each at layer 4, batch 8, 64 pixels). ``pads``: ``_flipped_weight_grad_pads``'s."""
    spatial = list(range(2, x.type.rank))
    gf, xf = (b.flip(_to_channel_major(b, v), spatial) for v in (g, x))
    return b.op("Conv", gf, xf, strides=list(dilations), pads=pads)


def _windows_extent(out, kernel, strides, dilations) -> list[int]:
    """Per spatial dim, the padded input extent that ``out`` windows cover."""
    return [(o - 1) * s + (k - 1) * d + 1 for o, k, s, d in zip(out, kernel, strides, dilations)]


def _restoring_padding(spatial, full, pads) -> list[int]:
    """The ConvTranspose output padding that brings a window-gradient back to ``spatial``
    (the input rows that no window reached, beyond the cropped ``pads``)."""
    nd = len(spatial)
    return [spatial[i] - (full[i] - pads[i] - pads[i + nd]) for i in range(nd)]


@vjp("Conv")
def _conv(b, node, grads):
    _channels_first(node)
    g = grads[0]
    x, w = node.inputs[:2]
    nd = x.type.rank - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    kernel = w.type.shape[2:]
    groups = node.attrs["group"]
    gx = gw = gb = None
    if b.wants(0):  # the transposed convolution, output padding restoring the input's size
        spatial, out = x.type.shape[2:], g.type.shape[2:]
        opad = _restoring_padding(spatial, _windows_extent(out, kernel, strides, dilations), pads)
        gx = b.op("ConvTranspose", g, w, strides=strides, dilations=dilations, pads=pads, group=groups, output_padding=opad)
    if b.wants(1):
        gw = _conv_weight_grad(b, x, g, kernel, strides, dilations, pads, groups)
    if len(node.inputs) > 2 and node.inputs[2] is not None and b.wants(2):
        gb = b.op("ReduceSum", g, axes=[0, *range(2, 2 + nd)], keepdims=0)
    return [gx, gw, gb]


@vjp("ConvTranspose")
def _conv_transpose(b, node, grads):
    """The adjoint of a convolution: its input gradient is that convolution."""
    _channels_first(node)
    g = grads[0]
    x, w = node.inputs[:2]
    nd = x.type.rank - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    groups = node.attrs["group"]
    kernel = w.type.shape[2:]
    gx = gw = gb = None
    if b.wants(0):
        gx = b.op("Conv", g, w, strides=strides, dilations=dilations, pads=pads, group=groups)
    if b.wants(1):  # W (C, M/g, *K): the output gradient correlated with the input, per group
        gw = _conv_weight_grad(b, g, x, kernel, strides, dilations, pads, groups)
    if len(node.inputs) > 2 and node.inputs[2] is not None and b.wants(2):
        gb = b.op("ReduceSum", g, axes=[0, *range(2, 2 + nd)], keepdims=0)
    return [gx, gw, gb]


@vjp("MaxPool")
def _max_pool(b, node, grads):
    """Each window's first maximum gets the window's gradient, built from ops every backend
    runs: per kernel tap, a strided slice of the (-inf padded) input compared with the pooled
    output marks the windows whose first maximum sits there; the masked gradients of all taps
    go back to their positions in one depthwise transposed convolution with one-hot kernels."""
    _channels_first(node)
    x, y, g = node.inputs[0], node.outputs[0], grads[0]
    kernel, strides, dilations, pads, out = _pool_geometry(node.attrs, x.type)
    nd = len(kernel)
    n, c, *spatial = x.type.shape
    full = _windows_extent(out, kernel, strides, dilations)
    ends = [max(pads[i + nd], full[i] - pads[i] - spatial[i]) for i in range(nd)]  # ceil_mode windows
    padded = b.op("Pad", x, b.const(float("-inf"), x), pads=[0, 0, *pads[:nd], 0, 0, *ends], mode="constant")
    found, masked = None, []
    for tap in np.ndindex(*kernel):
        starts = [tap[i] * dilations[i] for i in range(nd)]
        window = b.op("Slice", padded, starts=starts, ends=[starts[i] + full[i] - (kernel[i] - 1) * dilations[i] for i in range(nd)], axes=list(range(2, 2 + nd)), steps=list(strides))
        hit = b.op("Equal", window, y)
        first = hit if found is None else b.op("And", hit, b.op("Not", found))
        found = hit if found is None else b.op("Or", found, hit)
        masked.append(b.reshape(b.op("Where", first, g, b.const(0.0, g)), [n, c, 1, *out]))
    taps = len(masked)
    stacked = b.reshape(b.op("Concat", *masked, axis=2) if taps > 1 else masked[0], [n, c * taps, *out])
    one_hot = np.zeros((c, taps, 1, *kernel), dtype=x.type.dtype.numpy)
    for t, tap in enumerate(np.ndindex(*kernel)):
        one_hot[(slice(None), t, 0, *tap)] = 1
    weight = b.graph.add_param(b.graph.fresh_name(f"{b.where}.taps"), one_hot.reshape(c * taps, 1, *kernel))
    opad = _restoring_padding(spatial, full, [*pads[:nd], *ends])
    return [b.op("ConvTranspose", stacked, weight, strides=strides, dilations=dilations, pads=[*pads[:nd], *ends], group=c, output_padding=opad)]


@vjp("AveragePool")
def _average_pool(b, node, grads):
    """A transposed depthwise convolution with a constant kernel (equal divisors only)."""
    _channels_first(node)
    x = node.inputs[0]
    a = node.attrs
    nd = x.type.rank - 2
    kernel = a["kernel_shape"]
    strides, dilations, pads = _spatial_attrs(a, nd)
    if a["ceil_mode"] or (any(pads) and not a["count_include_pad"]):
        raise KilnError(f"autodiff: AveragePool {node.name!r} with ceil_mode or uncounted padding has no gradient rule yet")
    c = x.type.shape[1]
    weight = b.const(1.0 / math.prod(kernel), x, (c, 1, *kernel))
    spatial, out = x.type.shape[2:], grads[0].type.shape[2:]
    opad = _restoring_padding(spatial, _windows_extent(out, kernel, strides, dilations), pads)
    return [b.op("ConvTranspose", grads[0], weight, strides=strides, dilations=dilations, pads=pads, group=c, output_padding=opad)]


@vjp("BatchNormalization")
def _batch_norm(b, node, grads):
    x, scale, bias, mean, var = node.inputs
    g = grads[0]
    rank = x.type.rank
    axes = [0, *range(2, rank)]
    channel = [1, x.type.shape[1]] + [1] * (rank - 2)
    if node.attrs["training_mode"]:  # batch statistics: the mean and variance depend on x
        _, centered, _, inv_std = b.moments(x, axes, node.attrs["epsilon"])
    else:
        centered = b.op("Sub", x, b.reshape(mean, channel))
        inv_std = b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.reshape(var, channel), b.const(node.attrs["epsilon"], x))))
    x_hat = b.op("Mul", centered, inv_std)
    gx = gs = gb = None
    if b.wants(0):
        g_hat = b.op("Mul", g, b.reshape(scale, channel))
        if node.attrs["training_mode"]:
            gx = b.normalized_grad(g_hat, x_hat, inv_std, axes)
            gx = _running_stats_grad(b, node, grads, gx, centered, channel)
        else:
            gx = b.op("Mul", g_hat, inv_std)
    if b.wants(1):
        gs = b.op("ReduceSum", b.op("Mul", g, x_hat), axes=axes, keepdims=0)
    if b.wants(2):
        gb = b.op("ReduceSum", g, axes=axes, keepdims=0)
    return [gx, gs, gb, None, None]


@vjp("LayerNormalization")
def _layer_norm(b, node, grads):
    if any(g is not None for g in grads[1:]):
        raise KilnError(f"autodiff: the Mean/InvStdDev outputs of {node.name!r} have no gradient rule yet")
    x, scale = node.inputs[:2]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    g = grads[0]
    rank = x.type.rank
    axes = list(range(node.attrs["axis"] % rank, rank))
    _, centered, _, inv_std = b.moments(x, axes, node.attrs["epsilon"])
    x_hat = b.op("Mul", centered, inv_std)
    gx = gs = gb = None
    if b.wants(0):
        gx = b.normalized_grad(b.op("Mul", g, scale), x_hat, inv_std, axes)
    if b.wants(1):
        gs = b.unbroadcast(b.op("Mul", g, x_hat), scale.type.shape)
    if bias is not None and b.wants(2):
        gb = b.unbroadcast(g, bias.type.shape)
    return [gx, gs, gb]


@vjp("GroupNormalization", "InstanceNormalization")
def _group_norm(b, node, grads):
    """Normalized per (sample, group) over the group's channels and positions, then a
    per-channel affine: the LayerNorm gradient on the (N, groups, rest) view."""
    x, scale, bias = node.inputs
    g = grads[0]
    n, c = x.type.shape[:2]
    groups = node.attrs.get("num_groups", c)
    rank = x.type.rank
    channel = [1, c] + [1] * (rank - 2)
    flat = [n, groups, x.type.numel // (n * groups)]
    _, centered, _, inv_std = b.moments(b.reshape(x, flat), [2], node.attrs["epsilon"])
    x_hat = b.op("Mul", centered, inv_std)
    gx = gs = gb = None
    if b.wants(0):
        g_hat = b.reshape(b.op("Mul", g, b.reshape(scale, channel)), flat)
        gx = b.reshape(b.normalized_grad(g_hat, x_hat, inv_std, [2]), x.type.shape)
    spatial = [0, *range(2, rank)]
    if b.wants(1):
        gs = b.op("ReduceSum", b.op("Mul", g, b.reshape(x_hat, x.type.shape)), axes=spatial, keepdims=0)
    if b.wants(2):
        gb = b.op("ReduceSum", g, axes=spatial, keepdims=0)
    return [gx, gs, gb]


def _running_stats_grad(b, node, grads, gx, centered, channel):
    """What flows into x from the running statistics' outputs (momentum-weighted batch mean
    and variance), when anything reads them."""
    x = node.inputs[0]
    count = x.type.numel // x.type.shape[1]
    share = 1.0 - node.attrs["momentum"]
    g_mean, g_var = (list(grads) + [None, None])[1:3]
    if g_mean is not None:  # d mean / dx = 1 / count
        gx = b.op("Add", gx, b.op("Expand", b.scale(b.reshape(g_mean, channel), share / count), shape=list(x.type.shape)))
    if g_var is not None:  # d var / dx = 2 (x - mean) / count
        gx = b.op("Add", gx, b.op("Mul", b.scale(b.reshape(g_var, channel), 2.0 * share / count), centered))
    return gx


def _loss_weights(b, node, labels, classes, like):
    """Per-element weights of a classification loss (class weights, ignore_index) and their
    one-hot form (N, C, ...)."""
    a = node.attrs
    weight = node.inputs[2] if len(node.inputs) > 2 else None
    index = b.op("Cast", labels, to="i64")
    valid = None
    if a["ignore_index"] is not None:
        valid = b.op("Not", b.op("Equal", index, b.const(a["ignore_index"], index)))
        index = b.op("Where", valid, index, b.const(0, index))
    per = b.op("Gather", weight, index, axis=0) if weight is not None else b.op("Expand", b.const(1.0, like), shape=list(labels.type.shape))
    if valid is not None:
        per = b.op("Where", valid, per, b.const(0.0, like))
    off_on = b.op("Concat", b.const(0.0, like, (1,)), b.const(1.0, like, (1,)), axis=0)
    return per, b.op("OneHot", index, off_on, depth=classes, axis=1)


def _reduced_loss_grad(b, node, g, per):
    """The cotangent of each element's loss, from the reduced loss's."""
    reduction = node.attrs["reduction"]
    if reduction == "none":
        return b.op("Mul", g, per)
    spread = b.op("Mul", b.op("Expand", g, shape=list(per.type.shape)), per)
    if reduction == "mean":
        spread = b.op("Div", spread, b.op("ReduceSum", per, keepdims=0))
    return spread


def _per_class(b, v):
    """(N, ...) -> (N, 1, ...) to broadcast against (N, C, ...)."""
    shape = list(v.type.shape)
    return b.reshape(v, [shape[0], 1, *shape[1:]])


@vjp("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy(b, node, grads):
    scores, labels = node.inputs[:2]
    if grads[1:] and any(g is not None for g in grads[1:]):
        raise KilnError(f"autodiff: the log_prob output of {node.name!r} has no gradient rule yet")
    per, hot = _loss_weights(b, node, labels, scores.type.shape[1], scores)
    coefficient = _per_class(b, _reduced_loss_grad(b, node, grads[0], per))
    probabilities = b.op("Softmax", scores, axis=1)
    return [b.op("Mul", b.op("Sub", probabilities, hot), coefficient), None, None]


@vjp("NegativeLogLikelihoodLoss")
def _nll(b, node, grads):
    log_prob, labels = node.inputs[:2]
    per, hot = _loss_weights(b, node, labels, log_prob.type.shape[1], log_prob)
    coefficient = _per_class(b, _reduced_loss_grad(b, node, grads[0], per))
    return [b.op("Neg", b.op("Mul", hot, coefficient)), None, None]
