"""Gradient rules of data movement, reductions and the softmax family."""

from __future__ import annotations

import math

import numpy as np

from kiln.errors import KilnError
from kiln.ir.ops.nn import inverse_perm
from kiln.ir.ops.resize import axis_taps, resized_axes
from kiln.ir.ops.shape import _slices
from kiln.passes.autodiff.rules_elementwise import vjp


@vjp("Reshape")
def _reshape(b, node, grads):
    return [b.reshape(grads[0], node.inputs[0].type.shape)]


@vjp("Transpose")
def _transpose(b, node, grads):
    return [b.op("Transpose", grads[0], perm=inverse_perm(list(node.attrs["perm"])))]


@vjp("Expand")
def _expand(b, node, grads):
    return [b.unbroadcast(grads[0], node.inputs[0].type.shape)]


@vjp("Concat")
def _concat(b, node, grads):
    axis = node.attrs["axis"] % node.outputs[0].type.rank
    out, start = [], 0
    for i, x in enumerate(node.inputs):
        size = x.type.shape[axis]
        out.append(b.op("Slice", grads[0], starts=[start], ends=[start + size], axes=[axis]) if b.wants(i) else None)
        start += size
    return out


@vjp("Split")
def _split(b, node, grads):
    parts = [g if g is not None else b.zeros_like(v) for g, v in zip(grads, node.outputs)]
    return [b.op("Concat", *parts, axis=node.attrs["axis"]) if len(parts) > 1 else parts[0]]


@vjp("Slice")
def _slice(b, node, grads):
    """Unit-step axes: zeros padded around the cotangent. Strided axes: each row added back at
    the row it was taken from."""
    x = node.inputs[0]
    shape = x.type.shape
    taken = [range(dim)[s] for dim, s in zip(shape, _slices(node.attrs, shape))]
    if any(len(r) == 0 for r in taken):
        return [b.zeros_like(x)]
    g = grads[0]
    before, after = [], []
    for axis, (dim, r) in enumerate(zip(shape, taken)):
        if r.step == 1:
            before.append(r.start)
            after.append(dim - (r.start + len(r)))
        else:
            g = _scatter_add(b, g, b.graph.add_param(b.graph.fresh_name(f"{b.where}.rows"), np.array(r, dtype=np.int64)), axis, dim)
            before.append(0)
            after.append(0)
    return [b.op("Pad", g, pads=before + after, mode="constant") if any(before + after) else g]


@vjp("Pad")
def _pad(b, node, grads):
    """Constant padding: the cotangent's middle. Reflect, edge and wrap: each padded row came
    from one row of the input, so the rows are added back where they came from, axis by axis."""
    x = node.inputs[0]
    rank = x.type.rank
    pads = node.attrs["pads"]
    mode = node.attrs["mode"]
    if mode == "constant":
        starts = [pads[i] for i in range(rank)]
        ends = [pads[i] + x.type.shape[i] for i in range(rank)]
        if any(p < 0 for p in pads):
            raise KilnError(f"autodiff: Pad {node.name!r} with negative pads has no gradient rule yet")
        return [b.op("Slice", grads[0], starts=starts, ends=ends, axes=list(range(rank))), None]
    if any(p < 0 for p in pads):
        raise KilnError(f"autodiff: {mode} Pad {node.name!r} with negative pads has no gradient rule yet")
    g = grads[0]
    for axis, dim in enumerate(x.type.shape):
        if pads[axis] or pads[axis + rank]:
            source = np.pad(np.arange(dim, dtype=np.int64), (pads[axis], pads[axis + rank]), mode=mode)
            g = _scatter_add(b, g, b.graph.add_param(b.graph.fresh_name(f"{b.where}.rows"), source), axis, dim)
    return [g, None]


@vjp("Gather")
def _gather(b, node, grads):
    x, idx = node.inputs
    axis = node.attrs["axis"] % x.type.rank
    return [_scatter_add(b, grads[0], idx, axis, x.type.shape[axis]), None]


def _scatter_add(b, g, idx, axis: int, dim: int):
    """The rows of ``g`` (laid out as ``idx``'s dims at ``axis``) added into zeros that have
    ``dim`` rows on ``axis``, each at the row ``idx`` names (negative: from the end): the
    gradient of a Gather. ScatterND on the gathered axis moved to the front."""
    k = idx.type.rank
    rest = [d for i, d in enumerate(g.type.shape) if not axis <= i < axis + k]
    shape = [*rest[:axis], dim, *rest[axis:]]
    zeros = b.zeros(shape, g)
    perm_x = None
    if axis:  # move the gathered axis (and the index dims in g) to the front
        perm_x = [axis, *[i for i in range(len(shape)) if i != axis]]
        g = b.op("Transpose", g, perm=[*range(axis, axis + k), *range(axis), *range(axis + k, g.type.rank)])
        zeros = b.op("Transpose", zeros, perm=perm_x)
    wrapped = b.op("Where", b.op("Less", idx, b.const(0, idx)), b.op("Add", idx, b.const(dim, idx)), idx)
    index = b.reshape(b.op("Cast", wrapped, to="i64"), [*idx.type.shape, 1])
    scattered = b.op("ScatterND", zeros, index, g, reduction="add")
    if perm_x is not None:
        scattered = b.op("Transpose", scattered, perm=[perm_x.index(i) for i in range(len(perm_x))])
    return scattered


def _reduced_axes(node):
    rank = node.inputs[0].type.rank
    axes = node.attrs["axes"]
    return list(range(rank)) if axes is None else sorted(a % rank for a in axes)


def _spread(b, g, node, axes):
    """``g`` (the reduced output's cotangent) broadcast back over the input's shape."""
    x = node.inputs[0]
    kept = [1 if i in axes else d for i, d in enumerate(x.type.shape)]
    return b.op("Expand", b.reshape(g, kept), shape=list(x.type.shape))


@vjp("ReduceSum", "ReduceMean")
def _reduce_sum(b, node, grads):
    axes = _reduced_axes(node)
    g = _spread(b, grads[0], node, axes)
    if node.op.name == "ReduceMean":
        g = b.scale(g, 1.0 / max(1, math.prod(node.inputs[0].type.shape[a] for a in axes)))
    return [g]


@vjp("ReduceSumSquare")
def _reduce_sum_square(b, node, grads):
    x = node.inputs[0]
    return [b.op("Mul", _spread(b, grads[0], node, _reduced_axes(node)), b.scale(x, 2.0))]


@vjp("ReduceMax", "ReduceMin")
def _reduce_max(b, node, grads):
    """To the elements equal to the extreme (shared equally among ties)."""
    axes = _reduced_axes(node)
    x = node.inputs[0]
    extreme = _spread(b, node.outputs[0], node, axes)
    hit = b.op("Cast", b.op("Equal", x, extreme), to=x.type.dtype.short)
    count = b.op("ReduceSum", hit, axes=axes, keepdims=1)
    share = b.op("Div", hit, count)
    return [b.op("Mul", _spread(b, grads[0], node, axes), share)]


@vjp("GlobalAveragePool")
def _global_average(b, node, grads):
    x = node.inputs[0]
    count = math.prod(x.type.shape[2:])
    return [b.scale(b.op("Expand", grads[0], shape=list(x.type.shape)), 1.0 / count)]


@vjp("Softmax")
def _softmax(b, node, grads):
    y, g = node.outputs[0], grads[0]
    axis = node.attrs["axis"]
    dot = b.op("ReduceSum", b.op("Mul", g, y), axes=[axis], keepdims=1)
    return [b.op("Mul", y, b.op("Sub", g, dot))]


@vjp("LogSoftmax")
def _log_softmax(b, node, grads):
    y, g = node.outputs[0], grads[0]
    total = b.op("ReduceSum", g, axes=[node.attrs["axis"]], keepdims=1)
    return [b.op("Sub", g, b.op("Mul", b.op("Exp", y), total))]


@vjp("Resize")
def _resize(b, node, grads):
    """Resize is linear and separable: per resized axis out = M @ in with M (out, in) built from
    the op's tap tables, so the gradient applies M^T along each axis in reverse order (rows that
    tf_crop_and_resize fills with the extrapolation value pass nothing back)."""
    x = node.inputs[0]
    a = node.attrs
    shape = list(x.type.shape)
    steps = []  # (axis, n_in, matrix, kept rows) in forward order
    for axis in resized_axes(a, shape):
        n_in, n_out = shape[axis], a["sizes"][axis]
        indices, weights, outside = axis_taps(a, axis, n_in, n_out)
        matrix = np.zeros((n_out, n_in))
        np.add.at(matrix, (np.repeat(np.arange(n_out), indices.shape[1]), indices.reshape(-1)), np.asarray(weights, dtype=np.float64).reshape(-1))
        if a["coordinate_transformation_mode"] == "tf_crop_and_resize":
            matrix[np.asarray(outside, dtype=bool).reshape(-1)] = 0.0
        steps.append((axis, matrix))
        shape[axis] = n_out
    g = grads[0]
    rank = x.type.rank
    for axis, matrix in reversed(steps):
        perm = [*[i for i in range(rank) if i != axis], axis]
        moved = b.op("Transpose", g, perm=perm) if axis != rank - 1 else g
        m = b.graph.add_param(b.graph.fresh_name(f"{b.where}.taps{axis}"), matrix.astype(x.type.dtype.numpy))
        back = b.op("MatMul", moved, m)
        g = b.op("Transpose", back, perm=[perm.index(i) for i in range(rank)]) if axis != rank - 1 else back
    return [g] + [None] * (len(node.inputs) - 1)
