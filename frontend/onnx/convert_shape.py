"""Converters for shape and data-movement ops: shape-determining inputs become attributes
(ctx.const), Flatten/Squeeze/Unsqueeze become Reshape, DepthToSpace/SpaceToDepth become
Reshape-Transpose-Reshape, Shape/Size/Range fold to constants."""

from __future__ import annotations

import math

import numpy as np

from kiln import config
from kiln.errors import ElementCapError
from kiln.frontend.onnx.convert_elementwise import passthrough
from kiln.frontend.onnx.importer import NodeContext, converter


@converter("Reshape")
def _reshape(ctx: NodeContext):
    x = ctx.type(0)
    spec = ctx.const_ints(1, "shape") if ctx.opset >= 5 else list(ctx.attr("shape"))
    allow_zero = ctx.attr("allowzero", 0)
    shape = []
    for i, d in enumerate(spec):
        if d == 0 and not allow_zero:
            if i >= x.rank:
                raise ctx.error(f"shape {spec} copies dim {i} (0) but the input {x} has rank {x.rank}")
            d = x.shape[i]
        shape.append(d)
    if shape.count(-1) > 1:
        raise ctx.error(f"shape {spec} has more than one -1")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.numel % known:
            raise ctx.error(f"cannot reshape {x} to {spec}")
        shape[shape.index(-1)] = x.numel // known
    return [ctx.reshape(ctx.input(0), shape)]


@converter("Flatten")
def _flatten(ctx: NodeContext):
    x = ctx.type(0)
    axis = ctx.attr("axis", 1)
    axis = axis + x.rank if axis < 0 else axis
    rows = math.prod(x.shape[:axis])
    return [ctx.reshape(ctx.input(0), [rows, math.prod(x.shape[axis:])])]


def _axes(ctx: NodeContext, what: str) -> list[int] | None:
    return ctx.const_ints(1, what) if ctx.opset >= 13 else ctx.attr("axes")


@converter("Squeeze")
def _squeeze(ctx: NodeContext):
    x = ctx.type(0)
    axes = _axes(ctx, "axes")
    if axes is None:
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = [a % x.rank for a in axes]
    for a in axes:
        if x.shape[a] != 1:
            raise ctx.error(f"cannot squeeze axis {a} of {x}: it is not 1")
    return [ctx.reshape(ctx.input(0), [d for i, d in enumerate(x.shape) if i not in axes])]


@converter("Unsqueeze")
def _unsqueeze(ctx: NodeContext):
    x = ctx.type(0)
    axes = _axes(ctx, "axes")
    rank = x.rank + len(axes)
    axes = sorted(a % rank for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [ctx.reshape(ctx.input(0), shape)]


@converter("Transpose")
def _transpose(ctx: NodeContext):
    x = ctx.input(0)
    perm = ctx.attr("perm", list(range(x.type.rank))[::-1])
    if list(perm) == list(range(x.type.rank)):
        return [x]
    return ctx.emit("Transpose", [x], {"perm": list(perm)})


@converter("Concat")
def _concat(ctx: NodeContext):
    return ctx.emit("Concat", [v for v in ctx.inputs() if v is not None], {"axis": ctx.attr("axis")})


@converter("Split")
def _split(ctx: NodeContext):
    x = ctx.type(0)
    axis = ctx.attr("axis", 0) % x.rank
    n = len(ctx.node.output)
    sizes = ctx.const_ints(1, "split") if ctx.opset >= 13 else ctx.attr("split")
    if sizes is None:
        parts = ctx.attr("num_outputs", n)
        chunk = math.ceil(x.shape[axis] / parts)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(parts)]
    return ctx.emit("Split", [ctx.input(0)], {"axis": axis, "split": list(sizes)}, num_outputs=len(sizes))


@converter("Slice")
def _slice(ctx: NodeContext):
    if ctx.opset < 10:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    else:
        starts, ends = ctx.const_ints(1, "starts"), ctx.const_ints(2, "ends")
        axes, steps = ctx.const_ints(3, "axes"), ctx.const_ints(4, "steps")
    attrs = {"starts": list(starts), "ends": list(ends), "axes": axes, "steps": steps}
    return ctx.emit("Slice", [ctx.input(0)], attrs)


@converter("Expand")
def _expand(ctx: NodeContext):
    return ctx.emit("Expand", [ctx.input(0)], {"shape": ctx.const_ints(1, "shape")})


@converter("Tile")
def _tile(ctx: NodeContext):
    return ctx.emit("Tile", [ctx.input(0)], {"repeats": ctx.const_ints(1, "repeats")})


@converter("Pad")
def _pad(ctx: NodeContext):
    x = ctx.input(0)
    rank = x.type.rank
    mode = ctx.attr("mode", "constant")
    if ctx.opset < 11:
        pads = list(ctx.attr("pads"))
        value = ctx.constant(ctx.attr("value", 0.0), x.type.dtype.numpy)
    else:
        pads = ctx.const_ints(1, "pads")
        value = ctx.input(2)
        axes = ctx.const_ints(3, "axes")
        if axes is not None:
            full = [0] * (2 * rank)
            for j, a in enumerate(axes):
                full[a % rank] = pads[j]
                full[a % rank + rank] = pads[j + len(axes)]
            pads = full
    inputs = [x, value] if mode == "constant" and value is not None else [x]
    return ctx.emit("Pad", inputs, {"pads": pads, "mode": mode})


@converter("Gather", "GatherElements", "GatherND", "ScatterElements", "ScatterND")
def _gathers(ctx: NodeContext):
    return passthrough(ctx)


@converter("ReverseSequence")
def _reverse_sequence(ctx: NodeContext):
    return passthrough(ctx)


@converter("CenterCropPad")
def _center_crop_pad(ctx: NodeContext):
    x = ctx.input(0)
    rank = x.type.rank
    target = ctx.const_ints(1, "shape")
    axes = [a % rank for a in (ctx.attr("axes") or range(rank))]
    starts, ends, crop_axes = [], [], []
    pads = [0] * (2 * rank)
    for axis, size in zip(axes, target):
        have = x.type.shape[axis]
        if have > size:
            start = (have - size) // 2
            starts.append(start)
            ends.append(start + size)
            crop_axes.append(axis)
        elif have < size:
            pads[axis] = (size - have) // 2
            pads[axis + rank] = size - have - pads[axis]
    if crop_axes:
        x = ctx.emit("Slice", [x], {"starts": starts, "ends": ends, "axes": crop_axes, "steps": None})[0]
    if any(pads):
        x = ctx.emit("Pad", [x], {"pads": pads, "mode": "constant"})[0]
    return [x]


@converter("Scatter")
def _scatter(ctx: NodeContext):
    return passthrough(ctx, "ScatterElements")


@converter("OneHot")
def _one_hot(ctx: NodeContext):
    depth = ctx.const(1, "depth")
    return ctx.emit("OneHot", [ctx.input(0), ctx.input(2)], {"depth": int(depth.reshape(())), "axis": ctx.attr("axis", -1)})


@converter("Trilu")
def _trilu(ctx: NodeContext):
    k = ctx.const_ints(1, "k")
    return ctx.emit("Trilu", [ctx.input(0)], {"upper": ctx.attr("upper", 1), "k": k[0] if k else 0})


# -- values known from types -----------------------------------------------------------------


@converter("Shape")
def _shape(ctx: NodeContext):
    shape = list(ctx.type(0).shape)
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    return [ctx.constant(np.array(shape[slice(start, end)], dtype=np.int64))]


@converter("Size")
def _size(ctx: NodeContext):
    return [ctx.constant(np.array(ctx.type(0).numel, dtype=np.int64))]


@converter("Range")
def _range(ctx: NodeContext):
    start, limit, delta = (ctx.const(i, what) for i, what in enumerate(("start", "limit", "delta")))
    start, limit, delta = (v.reshape(()) for v in (start, limit, delta))
    count = max(int(np.ceil((limit - start) / delta)), 0)
    cap = config.flags().max_elements
    if count > cap:
        raise ElementCapError(f"node {ctx.name!r} (Range): {count} elements is over the cap of {cap}")
    values = start + np.arange(count, dtype=start.dtype) * delta
    return [ctx.constant(values.astype(start.dtype))]


# -- DepthToSpace / SpaceToDepth --------------------------------------------------------------


@converter("DepthToSpace")
def _depth_to_space(ctx: NodeContext):
    n, c, h, w = ctx.type(0).shape
    b = ctx.attr("blocksize")
    if ctx.attr("mode", "DCR") == "DCR":
        split, perm = [n, b, b, c // (b * b), h, w], [0, 3, 4, 1, 5, 2]
    else:
        split, perm = [n, c // (b * b), b, b, h, w], [0, 1, 4, 2, 5, 3]
    t = ctx.emit("Transpose", [ctx.reshape(ctx.input(0), split)], {"perm": perm})[0]
    return [ctx.reshape(t, [n, c // (b * b), h * b, w * b])]


@converter("SpaceToDepth")
def _space_to_depth(ctx: NodeContext):
    n, c, h, w = ctx.type(0).shape
    b = ctx.attr("blocksize")
    t = ctx.reshape(ctx.input(0), [n, c, h // b, b, w // b, b])
    perm = [0, 3, 5, 1, 2, 4] if ctx.attr("mode", "DCR") == "DCR" else [0, 1, 3, 5, 2, 4]
    t = ctx.emit("Transpose", [t], {"perm": perm})[0]
    return [ctx.reshape(t, [n, c * b * b, h // b, w // b])]


# -- Resize / Upsample ----------------------------------------------------------------------------


def _resize_sizes(ctx: NodeContext, scales, sizes, axes) -> tuple[list[int], list[float]]:
    shape = ctx.type(0).shape
    rank = len(shape)
    axes = [a % rank for a in axes] if axes else list(range(rank))
    full_scales = [1.0] * rank
    full_sizes = list(shape)
    if sizes is not None and len(sizes):
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch")
        ratios = [sizes[j] / shape[a] for j, a in enumerate(axes)]
        if policy in ("not_larger", "not_smaller"):
            r = min(ratios) if policy == "not_larger" else max(ratios)
            for a in axes:
                full_scales[a] = r
                full_sizes[a] = int(math.floor(shape[a] * r + 0.5))
        else:
            for j, a in enumerate(axes):
                full_scales[a] = ratios[j]
                full_sizes[a] = int(sizes[j])
    elif scales is not None and len(scales):
        for j, a in enumerate(axes):
            full_scales[a] = float(scales[j])
            full_sizes[a] = int(math.floor(shape[a] * float(scales[j])))
    else:
        raise ctx.error("needs scales or sizes")
    return full_sizes, full_scales


@converter("Resize")
def _resize(ctx: NodeContext):
    if ctx.opset < 11:
        scales = ctx.const(1, "scales")
        sizes_, scales_ = _resize_sizes(ctx, scales.reshape(-1).tolist(), None, None)
        mode = ctx.attr("mode", "nearest")
        attrs = {
            "sizes": sizes_,
            "scales": scales_,
            "mode": mode,
            "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor",
        }
        return ctx.emit("Resize", [ctx.input(0)], attrs)
    roi = ctx.const(1, "roi")
    scales = ctx.const(2, "scales")
    sizes = ctx.const_ints(3, "sizes")
    axes = ctx.attr("axes")
    sizes_, scales_ = _resize_sizes(ctx, scales.reshape(-1).tolist() if scales is not None else None, sizes, axes)
    rank = ctx.type(0).rank
    roi_full = None
    if roi is not None and roi.size:
        roi = roi.reshape(-1).astype(float).tolist()
        if axes:
            roi_full = [0.0] * rank + [1.0] * rank
            for j, a in enumerate(axes):
                roi_full[a % rank] = roi[j]
                roi_full[a % rank + rank] = roi[j + len(axes)]
        else:
            roi_full = roi
    attrs = {"sizes": sizes_, "scales": scales_, "roi": roi_full}
    for key in (
        "mode",
        "coordinate_transformation_mode",
        "cubic_coeff_a",
        "exclude_outside",
        "extrapolation_value",
        "nearest_mode",
        "antialias",
    ):
        value = ctx.attr(key)
        if value is not None:
            attrs[key] = value
    return ctx.emit("Resize", [ctx.input(0)], attrs)


@converter("Upsample")
def _upsample(ctx: NodeContext):
    scales = ctx.attr("scales") if ctx.opset < 9 else ctx.const(1, "scales").reshape(-1).tolist()
    sizes_, scales_ = _resize_sizes(ctx, scales, None, None)
    mode = ctx.attr("mode", "nearest")
    attrs = {
        "sizes": sizes_,
        "scales": scales_,
        "mode": "linear" if mode in ("linear", "bilinear") else mode,
        "coordinate_transformation_mode": "asymmetric",
        "nearest_mode": "floor",
    }
    return ctx.emit("Resize", [ctx.input(0)], attrs)


@converter("GridSample")
def _grid_sample(ctx: NodeContext):
    mode = ctx.attr("mode", "linear" if ctx.opset >= 20 else "bilinear")
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    attrs = {"mode": mode, "padding_mode": ctx.attr("padding_mode", "zeros"), "align_corners": ctx.attr("align_corners", 0)}
    return ctx.emit("GridSample", ctx.inputs(), attrs)
