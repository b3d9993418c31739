"""Data-movement ops: every shape-determining operand is a static attribute here.

The ONNX importer turns Reshape's ``shape`` input, Slice's ``starts``... into these attributes
(Flatten, Squeeze and Unsqueeze become Reshape; DepthToSpace and SpaceToDepth become
Reshape/Transpose/Reshape), so every value in the IR has a static type.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.dtypes import DType, INTS
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.ops.rules import broadcast_shapes, check_dtype, fail, ints, norm_axes, norm_axis, present, same_dtype
from kiln.ir.types import TensorType

INDEX = frozenset({DType.int32, DType.int64})


# -- Reshape / Transpose / Expand / Tile -----------------------------------------------------
def _reshape_infer(attrs, types):
    x = present(types, 0, "data")
    shape = ints(attrs["shape"], "shape")
    if any(d < 0 for d in shape):
        raise fail(f"shape {shape} must be fully resolved (no -1 or 0 placeholders in the IR)")
    if math.prod(shape) != x.numel:
        raise fail(f"cannot reshape {x} ({x.numel} elements) to {shape}")
    return [x.with_shape(shape)]


register(OpDef("Reshape", OpKind.INJECTIVE, _reshape_infer, lambda a, x: x.reshape(a["shape"]), {"shape": REQUIRED}))


def _transpose_infer(attrs, types):
    x = present(types, 0, "data")
    perm = ints(attrs["perm"], "perm")
    if sorted(perm) != list(range(x.rank)):
        raise fail(f"perm {perm} is not a permutation of {x.rank} axes")
    return [x.with_shape([x.shape[p] for p in perm])]


register(
    OpDef("Transpose", OpKind.INJECTIVE, _transpose_infer, lambda a, x: np.transpose(x, a["perm"]), {"perm": REQUIRED})
)


def _expand_infer(attrs, types):
    x = present(types, 0, "input")
    return [x.with_shape(broadcast_shapes(x.shape, ints(attrs["shape"], "shape")))]


register(
    OpDef(
        "Expand",
        OpKind.INJECTIVE,
        _expand_infer,
        lambda a, x: np.array(np.broadcast_to(x, broadcast_shapes(x.shape, a["shape"]))),
        {"shape": REQUIRED},
    )
)


def _tile_infer(attrs, types):
    x = present(types, 0, "input")
    reps = ints(attrs["repeats"], "repeats")
    if len(reps) != x.rank or any(r < 0 for r in reps):
        raise fail(f"repeats {reps} must be {x.rank} non-negative integers")
    return [x.with_shape([d * r for d, r in zip(x.shape, reps)])]


register(OpDef("Tile", OpKind.INJECTIVE, _tile_infer, lambda a, x: np.tile(x, a["repeats"]), {"repeats": REQUIRED}))


# -- Concat / Split / Slice ------------------------------------------------------------------
def _concat_infer(attrs, types):
    if not types:
        raise fail("needs at least one input")
    dtype = same_dtype(types)
    rank = types[0].rank
    axis = norm_axis(attrs["axis"], rank)
    for t in types:
        if t.rank != rank or any(d != e for i, (d, e) in enumerate(zip(t.shape, types[0].shape)) if i != axis):
            raise fail(f"inputs {', '.join(map(str, types))} differ off axis {axis}")
    shape = list(types[0].shape)
    shape[axis] = sum(t.shape[axis] for t in types)
    return [TensorType(tuple(shape), dtype)]


register(
    OpDef(
        "Concat",
        OpKind.INJECTIVE,
        _concat_infer,
        lambda a, *xs: np.concatenate(xs, axis=a["axis"]),
        {"axis": REQUIRED},
        num_inputs=(1, None),
    )
)


def _split_infer(attrs, types):
    x = present(types, 0, "input")
    axis = norm_axis(attrs["axis"], x.rank)
    sizes = ints(attrs["split"], "split")
    if sum(sizes) != x.shape[axis] or any(s < 0 for s in sizes):
        raise fail(f"split {sizes} does not add up to dimension {x.shape[axis]} of axis {axis}")
    out = []
    for s in sizes:
        shape = list(x.shape)
        shape[axis] = s
        out.append(x.with_shape(shape))
    return out


def _split(a, x):
    bounds = np.cumsum(a["split"])[:-1]
    return tuple(np.split(x, bounds, axis=a["axis"]))


register(
    OpDef(
        "Split",
        OpKind.INJECTIVE,
        _split_infer,
        _split,
        {"axis": 0, "split": REQUIRED},
        num_outputs=(1, None),
    )
)


def _slices(attrs, shape: tuple[int, ...]) -> tuple[slice, ...]:
    starts, ends = ints(attrs["starts"], "starts"), ints(attrs["ends"], "ends")
    axes = ints(attrs["axes"], "axes") if attrs["axes"] is not None else list(range(len(starts)))
    steps = ints(attrs["steps"], "steps") if attrs["steps"] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise fail("starts, ends, axes and steps must have one entry per sliced axis")
    axes = norm_axes(axes, len(shape))
    out = [slice(None)] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise fail("slice step 0")
        out[axis] = slice(start, end, step)
    return tuple(out)


def _slice_infer(attrs, types):
    x = present(types, 0, "data")
    sl = _slices(attrs, x.shape)
    return [x.with_shape([len(range(d)[s]) for d, s in zip(x.shape, sl)])]


register(
    OpDef(
        "Slice",
        OpKind.INJECTIVE,
        _slice_infer,
        lambda a, x: np.array(x[_slices(a, x.shape)]),
        {"starts": REQUIRED, "ends": REQUIRED, "axes": None, "steps": None},
    )
)


# -- Pad ------------------------------------------------------------------------------------
def _pad_infer(attrs, types):
    x = present(types, 0, "data")
    pads = ints(attrs["pads"], "pads")
    if len(pads) != 2 * x.rank:
        raise fail(f"pads {pads} needs {2 * x.rank} entries for rank {x.rank}")
    if attrs["mode"] not in ("constant", "reflect", "edge", "wrap"):
        raise fail(f"unknown pad mode {attrs['mode']!r}")
    shape = [d + pads[i] + pads[i + x.rank] for i, d in enumerate(x.shape)]
    if any(d < 0 for d in shape):
        raise fail(f"pads {pads} remove more than the data holds")
    if len(types) > 1 and types[1] is not None:
        same_dtype([x, types[1]])
    return [x.with_shape(shape)]


def _pad(a, x, value=None):
    rank = x.ndim
    pads = a["pads"]
    # negative pads crop: slice first, then pad the non-negative part
    crop = tuple(slice(max(-pads[i], 0), x.shape[i] - max(-pads[i + rank], 0)) for i in range(rank))
    x = x[crop]
    width = [(max(pads[i], 0), max(pads[i + rank], 0)) for i in range(rank)]
    if a["mode"] == "constant":
        fill = value.reshape(()).item() if value is not None and value.size else 0
        return np.pad(x, width, mode="constant", constant_values=fill)
    return np.pad(x, width, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[a["mode"]])


register(
    OpDef("Pad", OpKind.INJECTIVE, _pad_infer, _pad, {"pads": REQUIRED, "mode": "constant"}, num_inputs=(1, 2))
)


# -- gathers and scatters --------------------------------------------------------------------
def _gather_infer(attrs, types):
    data, idx = present(types, 0, "data"), present(types, 1, "indices")
    check_dtype(idx, INDEX, "indices")
    axis = norm_axis(attrs["axis"], data.rank)
    return [data.with_shape(data.shape[:axis] + idx.shape + data.shape[axis + 1 :])]


def _fix_index(idx: np.ndarray, dim: int) -> np.ndarray:
    idx = idx.astype(np.int64)
    if np.any((idx < -dim) | (idx >= dim)):
        raise IndexError(f"index out of range for dimension {dim}")
    return np.where(idx < 0, idx + dim, idx)


register(
    OpDef(
        "Gather",
        OpKind.INJECTIVE,
        _gather_infer,
        lambda a, x, i: np.take(x, _fix_index(i, x.shape[a["axis"]]), axis=a["axis"]),
        {"axis": 0},
        num_inputs=(2, 2),
    )
)


def _gather_elements_infer(attrs, types):
    data, idx = present(types, 0, "data"), present(types, 1, "indices")
    check_dtype(idx, INDEX, "indices")
    norm_axis(attrs["axis"], data.rank)
    if idx.rank != data.rank:
        raise fail(f"indices {idx} must have the rank of data {data}")
    return [data.with_shape(idx.shape)]


register(
    OpDef(
        "GatherElements",
        OpKind.INJECTIVE,
        _gather_elements_infer,
        lambda a, x, i: np.take_along_axis(x, _fix_index(i, x.shape[a["axis"]]), axis=a["axis"]),
        {"axis": 0},
        num_inputs=(2, 2),
    )
)


def _gather_nd_infer(attrs, types):
    data, idx = present(types, 0, "data"), present(types, 1, "indices")
    check_dtype(idx, INDEX, "indices")
    b = attrs["batch_dims"]
    k = idx.shape[-1]
    if b + k > data.rank or idx.shape[:b] != data.shape[:b]:
        raise fail(f"indices {idx} do not fit data {data} with batch_dims={b}")
    return [data.with_shape(idx.shape[:-1] + data.shape[b + k :])]


def _gather_nd(a, x, idx):
    b = a["batch_dims"]
    batch = x.shape[:b]
    nb = int(np.prod(batch)) if b else 1
    xs = x.reshape((nb,) + x.shape[b:])
    ids = idx.reshape((nb,) + idx.shape[b:]).astype(np.int64)
    k = idx.shape[-1]
    out = []
    for n in range(nb):
        flat = ids[n].reshape(-1, k)
        fixed = [_fix_index(flat[:, j], xs.shape[1 + j]) for j in range(k)]
        out.append(xs[n][tuple(fixed)].reshape(ids[n].shape[:-1] + xs.shape[1 + k :]))
    return np.stack(out).reshape(idx.shape[:-1] + x.shape[b + k :])


register(OpDef("GatherND", OpKind.INJECTIVE, _gather_nd_infer, _gather_nd, {"batch_dims": 0}, num_inputs=(2, 2)))

_REDUCERS = {
    "none": None,
    "add": np.add,
    "mul": np.multiply,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter_elements_infer(attrs, types):
    data, idx, upd = (present(types, i, n) for i, n in enumerate(("data", "indices", "updates")))
    check_dtype(idx, INDEX, "indices")
    norm_axis(attrs["axis"], data.rank)
    if upd.shape != idx.shape or idx.rank != data.rank:
        raise fail(f"updates {upd} and indices {idx} must match, with the rank of data {data}")
    if attrs["reduction"] not in _REDUCERS:
        raise fail(f"unknown reduction {attrs['reduction']!r}")
    same_dtype([data, upd])
    return [data]


def _scatter_elements(a, x, idx, upd):
    axis = a["axis"] % x.ndim
    out = x.copy()
    idx = _fix_index(idx, x.shape[axis])
    full = list(np.indices(idx.shape, sparse=False))
    full[axis] = idx
    target = tuple(f.reshape(-1) for f in full)
    reduce = _REDUCERS[a["reduction"]]
    if reduce is None:
        out[target] = upd.reshape(-1)
    else:
        reduce.at(out, target, upd.reshape(-1))
    return out


register(
    OpDef(
        "ScatterElements",
        OpKind.OPAQUE,
        _scatter_elements_infer,
        _scatter_elements,
        {"axis": 0, "reduction": "none"},
        num_inputs=(3, 3),
    )
)


def _scatter_nd_infer(attrs, types):
    data, idx, upd = (present(types, i, n) for i, n in enumerate(("data", "indices", "updates")))
    check_dtype(idx, INDEX, "indices")
    k = idx.shape[-1]
    if upd.shape != idx.shape[:-1] + data.shape[k:]:
        raise fail(f"updates {upd} must have shape indices[:-1] + data[{k}:]")
    if attrs["reduction"] not in _REDUCERS:
        raise fail(f"unknown reduction {attrs['reduction']!r}")
    same_dtype([data, upd])
    return [data]


def _scatter_nd(a, x, idx, upd):
    out = x.copy()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    target = tuple(_fix_index(flat[:, j], x.shape[j]) for j in range(k))
    values = upd.reshape((-1,) + x.shape[k:])
    reduce = _REDUCERS[a["reduction"]]
    if reduce is None:
        out[target] = values
    else:
        reduce.at(out, target, values)
    return out


register(
    OpDef("ScatterND", OpKind.OPAQUE, _scatter_nd_infer, _scatter_nd, {"reduction": "none"}, num_inputs=(3, 3))
)


# -- constants, OneHot, Trilu ----------------------------------------------------------------
def _const_of_shape_infer(attrs, types):
    return [TensorType(tuple(ints(attrs["shape"], "shape")), DType.parse(attrs["dtype"]))]


register(
    OpDef(
        "ConstantOfShape",
        OpKind.INJECTIVE,
        _const_of_shape_infer,
        lambda a: np.full(a["shape"], a["value"], dtype=DType.parse(a["dtype"]).numpy),
        {"shape": REQUIRED, "value": 0.0, "dtype": "f32"},
        num_inputs=(0, 0),
    )
)


def _one_hot_infer(attrs, types):
    idx, values = present(types, 0, "indices"), present(types, 1, "values")
    check_dtype(idx, INTS | {DType.float32, DType.float64}, "indices")
    if values.numel != 2:
        raise fail(f"values must hold [off, on], got {values}")
    axis = norm_axis(attrs["axis"], idx.rank + 1)
    shape = list(idx.shape)
    shape.insert(axis, int(attrs["depth"]))
    return [values.with_shape(shape)]


def _one_hot(a, idx, values):
    depth = a["depth"]
    i = idx.astype(np.int64)
    i = np.where(i < 0, i + depth, i)
    axis = a["axis"] % (idx.ndim + 1)
    hot = np.expand_dims(i, axis) == np.arange(depth).reshape([-1 if d == axis else 1 for d in range(idx.ndim + 1)])
    off, on = values.reshape(-1)
    return np.where(hot, on, off).astype(values.dtype)


register(OpDef("OneHot", OpKind.INJECTIVE, _one_hot_infer, _one_hot, {"depth": REQUIRED, "axis": -1}, num_inputs=(2, 2)))


def _trilu_infer(attrs, types):
    x = present(types, 0, "input")
    if x.rank < 2:
        raise fail(f"needs rank >= 2, got {x}")
    return [x]


def _trilu(a, x):
    return np.triu(x, a["k"]) if a["upper"] else np.tril(x, a["k"])


register(OpDef("Trilu", OpKind.INJECTIVE, _trilu_infer, _trilu, {"upper": 1, "k": 0}))



def _reverse_sequence_infer(attrs, types):
    x, lens = present(types, 0, "input"), present(types, 1, "sequence_lens")
    check_dtype(lens, INDEX, "sequence_lens")
    batch, time = norm_axis(attrs["batch_axis"], x.rank), norm_axis(attrs["time_axis"], x.rank)
    if batch == time or lens.shape != (x.shape[batch],):
        raise fail(f"sequence_lens {lens} must have one entry per batch row of {x} (batch_axis {batch}, time_axis {time})")
    return [x]


def _reverse_sequence(a, x, lens):
    out = x.copy()
    batch, time = a["batch_axis"] % x.ndim, a["time_axis"] % x.ndim
    for b, n in enumerate(lens.astype(np.int64)):
        index = [slice(None)] * x.ndim
        index[batch] = b
        index[time] = slice(0, int(n))
        src = x[tuple(index)]
        out[tuple(index)] = np.flip(src, axis=time - (1 if batch < time else 0))
    return out


register(
    OpDef(
        "ReverseSequence",
        OpKind.INJECTIVE,
        _reverse_sequence_infer,
        _reverse_sequence,
        {"batch_axis": 1, "time_axis": 0},
        num_inputs=(2, 2),
    )
)
