"""TE lowerings of reductions, the softmax family and the data-movement ops."""

from __future__ import annotations

import numpy as np
from tvm import te, topi
from tvm import tirx as tir

from kiln.backends.tvm.lower import lowering
from kiln.backends.tvm.scalar import dtype_of, tvm_dtype
from kiln.ir.ops.resize import axis_taps, resized_axes
from kiln.ir.ops.shape import _slices


def shape_of(x: te.Tensor) -> list[int]:
    return [int(d) for d in x.shape]


def lowest(dtype: str):
    return tir.min_value(dtype)


def wide(expr):
    """A float16 term as float32, where sums of it accumulate (numpy sums float16 in float and
    rounds once); anything else as it is."""
    return expr.astype("float32") if dtype_of(expr) == "float16" else expr


def rounded(t: te.Tensor, dtype: str, name: str) -> te.Tensor:
    """``t`` rounded to ``dtype`` (a float16 sum kept in float32 until here)."""
    return t if dtype_of(t) == dtype else te.compute(t.shape, lambda *i: t(*i).astype(dtype), name=name)


def reduce(x: te.Tensor, axes, combine, value=lambda v: v, keepdims: bool = True, name: str = "reduce") -> te.Tensor:
    """``combine`` (te.sum, te.max...) of ``value(x)`` over ``axes`` (a float16 sum in float32,
    rounded once)."""
    if combine is te.sum and dtype_of(x) == "float16":
        narrow = value
        return rounded(_reduce(x, axes, combine, lambda v: wide(narrow(v)), keepdims, name + "_wide"), "float16", name)
    return _reduce(x, axes, combine, value, keepdims, name)


def _reduce(x: te.Tensor, axes, combine, value, keepdims: bool, name: str) -> te.Tensor:
    shape = shape_of(x)
    axes = sorted(a % len(shape) for a in axes)
    rs = [te.reduce_axis((0, shape[a]), f"r{a}") for a in axes]
    out_shape = [1 if i in axes else d for i, d in enumerate(shape)] if keepdims else [d for i, d in enumerate(shape) if i not in axes]

    def body(*index):
        kept = iter(index[i] for i in range(len(shape)) if i not in axes) if keepdims else iter(index)
        reduced = iter(rs)
        full = [next(reduced) if i in axes else next(kept) for i in range(len(shape))]
        return combine(value(x(*full)), axis=rs)

    if any(shape[a] == 0 for a in axes):  # an empty reduction is its identity (TIR would skip the init)
        dtype = dtype_of(value(x(*[0] * len(shape))))
        return te.compute(out_shape, lambda *i: _identity(combine, dtype), name=name)
    return te.compute(out_shape, body, name=name)


def _identity(combine, dtype: str):
    floating = dtype.startswith("float")
    if combine is te.max:
        return tir.const(float("-inf"), dtype) if floating else tir.min_value(dtype)
    if combine is te.min:
        return tir.const(float("inf"), dtype) if floating else tir.max_value(dtype)
    return tir.const(0 if combine is te.sum else 1, dtype)


def _axes(attrs, rank: int) -> list[int]:
    return list(range(rank)) if attrs["axes"] is None else [a % rank for a in attrs["axes"]]


def _scale(x: te.Tensor, factor: float) -> te.Tensor:
    return te.compute(x.shape, lambda *i: x(*i) * tir.const(factor, dtype_of(x)), name="scale")


def _map(x: te.Tensor, fn, name: str = "map") -> te.Tensor:
    return te.compute(x.shape, lambda *i: fn(x(*i)), name=name)


# -- reductions ------------------------------------------------------------------------------
@lowering("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
def reduction(ctx, node, ins):
    x = ins[0]
    a, op = node.attrs, node.op.name
    axes = _axes(a, len(x.shape))
    keep = bool(a["keepdims"])
    if op in ("ReduceMax", "ReduceMin"):
        combine = te.max if op == "ReduceMax" else te.min
        if dtype_of(x) == "bool":  # any / all, through uint8
            wide = reduce(x, axes, combine, lambda v: v.astype("uint8"), keep)
            return _map(wide, lambda v: v.astype("bool"))
        return reduce(x, axes, combine, keepdims=keep)
    if op == "ReduceProd":
        prod = te.comm_reducer(lambda p, q: p * q, lambda t: tir.const(1, t), name="prod")
        return reduce(x, axes, prod, keepdims=keep)
    if op == "ReduceL1":
        return reduce(x, axes, te.sum, tir.abs if dtype_of(x) not in ("bool",) and not dtype_of(x).startswith("uint") else (lambda v: v), keep)
    if op in ("ReduceL2", "ReduceSumSquare"):
        total = reduce(x, axes, te.sum, lambda v: v * v, keep)
        return total if op == "ReduceSumSquare" else _map(total, lambda v: tir.sqrt(v.astype("float64")).astype(dtype_of(v)) if not dtype_of(v).startswith("float") else tir.sqrt(v))
    if op == "ReduceLogSumExp":
        peak = reduce(x, axes, te.max, keepdims=True)
        shape = shape_of(x)
        total = reduce(te.compute(x.shape, lambda *i: tir.exp(x(*i) - peak(*[0 if a in axes else v for a, v in enumerate(i)]))), axes, te.sum, keepdims=True)
        out = te.compute(total.shape, lambda *i: tir.log(total(*i)) + peak(*i), name="logsumexp")
        if keep:
            return out
        kept = [d for k, d in enumerate(shape) if k not in axes]
        return te.compute(kept, lambda *i: out(*_reinsert(i, axes, len(shape))), name="squeeze")
    total = reduce(x, axes, te.sum, keepdims=keep)
    if op == "ReduceSum":
        return total
    if op == "ReduceLogSum":
        return _map(total, tir.log)
    count = int(np.prod([shape_of(x)[k] for k in axes]))  # ReduceMean
    if dtype_of(x).startswith("float"):
        return _scale(total, 1.0 / max(count, 1))
    return _map(total, lambda v: tir.truncdiv(v, tir.const(count, dtype_of(v))))


def _reinsert(index, axes, rank):
    it = iter(index)
    return [0 if k in axes else next(it) for k in range(rank)]


@lowering("ArgMax", "ArgMin")
def arg_reduction(ctx, node, ins):
    a = node.attrs
    out = topi.argmax if node.op.name == "ArgMax" else topi.argmin
    result = out(ins[0], axis=a["axis"] % len(ins[0].shape), keepdims=bool(a["keepdims"]), select_last_index=bool(a["select_last_index"]))
    return topi.cast(result, "int64")


@lowering("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx, node, ins):
    x = ins[0]
    axis = node.attrs["axis"] % len(x.shape)
    peak = reduce(x, [axis], te.max, name="peak")
    at = lambda t, i: t(*[0 if k == axis else v for k, v in enumerate(i)])  # noqa: E731
    if node.op.name == "Hardmax":  # 1 at the first maximum along the axis
        first = reduce(
            te.compute(x.shape, lambda *i: tir.Select(x(*i) == at(peak, i), i[axis], shape_of(x)[axis]), name="where_peak"),
            [axis], te.min, name="first",
        )  # fmt: skip
        return te.compute(x.shape, lambda *i: tir.Select(i[axis] == at(first, i), tir.const(1, dtype_of(x)), tir.const(0, dtype_of(x))), name="hardmax")
    exp = te.compute(x.shape, lambda *i: tir.exp(x(*i) - at(peak, i)), name="exp")
    total = reduce(exp, [axis], te.sum, name="total")
    if node.op.name == "Softmax":
        return te.compute(x.shape, lambda *i: exp(*i) / at(total, i), name="softmax")
    return te.compute(x.shape, lambda *i: x(*i) - at(peak, i) - tir.log(at(total, i)), name="log_softmax")


@lowering("CumSum", "CumProd")
def cumulative(ctx, node, ins):
    a = node.attrs
    x = ins[0]
    axis = a["axis"] % len(x.shape)
    n = shape_of(x)[axis]
    r = te.reduce_axis((0, n), "r")
    identity = 0 if node.op.name == "CumSum" else 1
    combine = te.sum if node.op.name == "CumSum" else te.comm_reducer(lambda p, q: p * q, lambda t: tir.const(1, t), name="prod")

    def body(*i):
        j = i[axis]
        taken = (r > j if a["exclusive"] else r >= j) if a["reverse"] else (r < j if a["exclusive"] else r <= j)
        src = [r if k == axis else v for k, v in enumerate(i)]
        return combine(tir.if_then_else(taken, x(*src), tir.const(identity, dtype_of(x))), axis=r)

    return te.compute(x.shape, body, name="cumulative")


# -- data movement ---------------------------------------------------------------------------
@lowering("Reshape")
def reshape(ctx, node, ins):
    return topi.reshape(ins[0], node.outputs[0].type.shape)


@lowering("Transpose")
def transpose(ctx, node, ins):
    return topi.transpose(ins[0], node.attrs["perm"])


@lowering("Expand")
def expand(ctx, node, ins):
    from kiln.backends.tvm.lower import broadcast_read

    return te.compute(node.outputs[0].type.shape, lambda *i: broadcast_read(ins[0], i), name="expand")


@lowering("Tile")
def tile(ctx, node, ins):
    x = ins[0]
    shape = shape_of(x)
    return te.compute(node.outputs[0].type.shape, lambda *i: x(*[tir.floormod(v, d) for v, d in zip(i, shape)]), name="tile")


@lowering("Concat")
def concat(ctx, node, ins):
    return topi.concatenate([x for x in ins if x is not None], node.attrs["axis"] % len(ins[0].shape))


@lowering("Split")
def split(ctx, node, ins):
    x = ins[0]
    axis = node.attrs["axis"] % len(x.shape)
    starts = np.cumsum([0, *node.attrs["split"]])
    return [_window_along(x, axis, int(start), int(size)) for start, size in zip(starts, node.attrs["split"])]


def _window_along(x: te.Tensor, axis: int, start: int, size: int) -> te.Tensor:
    return te.compute(_with(shape_of(x), axis, size), lambda *i: x(*_shift(i, axis, start)), name="split")


def _with(shape, axis, size):
    shape = list(shape)
    shape[axis] = size
    return shape


def _shift(index, axis, by):
    return [v + by if k == axis else v for k, v in enumerate(index)]


@lowering("Slice")
def slice_(ctx, node, ins):
    x = ins[0]
    shape = shape_of(x)
    ranges = [range(d)[s] for d, s in zip(shape, _slices(node.attrs, tuple(shape)))]
    return te.compute([len(r) for r in ranges], lambda *i: x(*[r.start + v * r.step for r, v in zip(ranges, i)]), name="slice")


@lowering("Pad")
def pad(ctx, node, ins):
    x, value = ins[0], (ins[1] if len(ins) > 1 else None)
    shape = shape_of(x)
    rank = len(shape)
    before = node.attrs["pads"][:rank]
    mode = node.attrs["mode"]

    def source(k, o):
        i = o - before[k]
        n = shape[k]
        if mode == "edge":
            return tir.max(tir.min(i, n - 1), 0)
        if mode == "wrap":
            return tir.floormod(i, n)
        if mode == "reflect" and n > 1:  # period 2(n-1): fold the index back into [0, n)
            m = tir.floormod(i, 2 * (n - 1))
            return tir.Select(m < n, m, 2 * (n - 1) - m)
        return tir.max(tir.min(i, n - 1), 0) if mode == "reflect" else i

    def body(*o):
        src = [source(k, v) for k, v in enumerate(o)]
        if mode != "constant":
            return x(*src)
        inside = tir.all(*[tir.And(s >= 0, s < n) for s, n in zip(src, shape)]) if rank else tir.const(True)
        fill = value(*([0] * len(value.shape))) if value is not None and int(np.prod(shape_of(value))) else tir.const(0, dtype_of(x))
        return tir.if_then_else(inside, x(*src), fill)

    return te.compute(node.outputs[0].type.shape, body, name="pad")


def wrap_index(i, dim):
    """A possibly negative index into a dim of ``dim``, as int64 (negative counts from the end)."""
    i = i.astype("int64")
    return tir.Select(i < 0, i + dim, i)


@lowering("Gather")
def gather(ctx, node, ins):
    x, idx = ins
    axis = node.attrs["axis"] % len(x.shape)
    k = len(idx.shape)
    dim = shape_of(x)[axis]

    def body(*o):
        where = wrap_index(idx(*o[axis : axis + k]), dim)
        return x(*o[:axis], where, *o[axis + k :])

    return te.compute(node.outputs[0].type.shape, body, name="gather")


@lowering("GatherElements")
def gather_elements(ctx, node, ins):
    x, idx = ins
    axis = node.attrs["axis"] % len(x.shape)
    dim = shape_of(x)[axis]
    return te.compute(idx.shape, lambda *o: x(*[wrap_index(idx(*o), dim) if k == axis else v for k, v in enumerate(o)]), name="gather_elements")


@lowering("ConstantOfShape")
def constant_of_shape(ctx, node, ins):
    t = node.outputs[0].type
    value = node.attrs["value"]
    dtype = tvm_dtype(t.dtype)
    value = bool(value) if dtype == "bool" else (float(value) if dtype.startswith("float") else int(value))
    return te.compute(t.shape, lambda *i: tir.const(value, dtype), name="constant")


@lowering("Trilu")
def trilu(ctx, node, ins):
    x = ins[0]
    k = node.attrs["k"]
    upper = node.attrs["upper"]

    def body(*i):
        row, col = i[-2], i[-1]
        keep = col - row >= k if upper else col - row <= k
        return tir.Select(keep, x(*i), tir.const(0, dtype_of(x)))

    return te.compute(x.shape, body, name="trilu")


@lowering("OneHot")
def one_hot(ctx, node, ins):
    idx, values = ins
    depth = int(node.attrs["depth"])
    out = node.outputs[0].type.shape
    axis = node.attrs["axis"] % len(out)

    def body(*o):
        i = idx(*(o[:axis] + o[axis + 1 :]))
        i = i.astype("int64") if dtype_of(i).startswith("int") or dtype_of(i).startswith("uint") else tir.floor(i).astype("int64")
        i = tir.Select(i < 0, i + depth, i)
        return tir.Select(i == o[axis], values(1), values(0))

    return te.compute(out, body, name="one_hot")


@lowering("Dropout")
def dropout(ctx, node, ins):
    x = ins[0]
    y = te.compute(x.shape, lambda *i: x(*i), name="copy")
    if len(node.outputs) == 1:
        return y
    return [y, te.compute(x.shape, lambda *i: tir.const(True), name="mask")]


dropout.accepts = lambda node: not node.attrs["training_mode"] or node.attrs["ratio"] == 0


@lowering("Resize")
def resize(ctx, node, ins):
    """Separable: one pass per resized axis, each output element a weighted sum of the taps the
    op set's ``axis_taps`` computes at compile time (nearest: a gather of one tap)."""
    a = node.attrs
    x = ins[0]
    dtype = dtype_of(x)
    shape = shape_of(x)
    masks = []
    for axis in resized_axes(a, shape):
        n_out = a["sizes"][axis]
        indices, weights, outside = axis_taps(a, axis, shape[axis], n_out)
        indices = ctx.constant(np.asarray(indices, dtype=np.int64).reshape(n_out, -1), "taps")
        shape = _with(shape, axis, n_out)
        if a["mode"] == "nearest":
            x = _resize_nearest(x, shape, axis, indices)
        else:
            wide = "float64" if dtype in ("float64", "int64", "int32", "uint32", "uint64") else "float32"
            x = _resize_weighted(x, shape, axis, indices, ctx.constant(np.asarray(weights, dtype=wide).reshape(n_out, -1), "weights"))
        if a["coordinate_transformation_mode"] == "tf_crop_and_resize":
            masks.append((axis, ctx.constant(np.asarray(outside, dtype=bool).reshape(n_out), "outside")))
    if masks:
        fill = tir.const(a["extrapolation_value"], dtype_of(x))
        x = _where_outside(x, masks, fill)
    if dtype_of(x) != dtype:  # integers interpolated in floating point: round back
        x = _round_to(x, dtype)
    return x


def _resize_nearest(x, shape, axis, table):
    return te.compute(shape, lambda *o: x(*[table[o[axis], 0] if k == axis else v for k, v in enumerate(o)]), name="nearest")


def _resize_weighted(x, shape, axis, taps, weights):
    r = te.reduce_axis((0, int(weights.shape[1])), "t")

    def body(*o):
        read = x(*[taps[o[axis], r] if k == axis else v for k, v in enumerate(o)])
        return te.sum(read.astype(dtype_of(weights)) * weights[o[axis], r], axis=r)

    return te.compute(shape, body, name=f"linear{axis}")


def _where_outside(x, masks, fill):
    return te.compute(x.shape, lambda *o: tir.Select(tir.any(*[m[o[k]] for k, m in masks]) if len(masks) > 1 else masks[0][1][o[masks[0][0]]], fill, x(*o)), name="extrapolate")


def _round_to(x, dtype):
    return te.compute(x.shape, lambda *o: tir.nearbyint(x(*o)).astype(dtype), name="round")
