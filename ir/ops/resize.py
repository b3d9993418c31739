"""Resize (and ONNX Upsample): separable nearest, linear and cubic interpolation, N-d; and
GridSample, which interpolates at arbitrary normalized coordinates.

The importer resolves ``scales``/``sizes``/``axes``/``keep_aspect_ratio_policy`` into two
full-rank attributes: ``sizes`` (the output shape) and ``scales`` (output/input per axis, the
value the coordinate transform divides by). Each axis is an (out, in) weight matrix.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.dtypes import ALL, DType
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.ops.rules import check_dtype, fail, ints, present
from kiln.ir.types import TensorType

MODES = ("nearest", "linear", "cubic")
TRANSFORMS = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_crop_and_resize",
)
NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _resize_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, ALL)
    sizes = ints(attrs["sizes"], "sizes")
    if len(sizes) != x.rank or len(attrs["scales"]) != x.rank:
        raise fail(f"sizes {sizes} and scales {attrs['scales']} need {x.rank} entries")
    for key, allowed in (("mode", MODES), ("coordinate_transformation_mode", TRANSFORMS), ("nearest_mode", NEAREST)):
        if attrs[key] not in allowed:
            raise fail(f"{key}={attrs[key]!r} is not one of {allowed}")
    return [TensorType(tuple(sizes), x.dtype)]


def _source_coords(attrs, axis: int, n_in: int, n_out: int) -> np.ndarray:
    scale = attrs["scales"][axis]
    i = np.arange(n_out, dtype=np.float64)
    mode = attrs["coordinate_transformation_mode"]
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        center = n_in / 2
        return center * (1 - adjustment) + (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if n_out > 1 else np.zeros(n_out)
    if mode == "align_corners":
        # the unrounded output length (n_in * scale), as ONNX's reference divides by
        return i * (n_in - 1) / (n_in * scale - 1) if n_out > 1 else np.zeros(n_out)
    if mode == "asymmetric":
        return i / scale
    rank = len(attrs["sizes"])
    roi = attrs["roi"] or [0.0] * rank + [1.0] * rank
    start, end = roi[axis], roi[axis + rank]
    if n_out > 1:
        return start * (n_in - 1) + i * (end - start) * (n_in - 1) / (n_out - 1)
    return np.full(n_out, 0.5 * (start + end) * (n_in - 1))


def _nearest_index(attrs, x: np.ndarray, n_in: int) -> np.ndarray:
    mode = attrs["nearest_mode"]
    if mode == "floor":
        idx = np.floor(x)
    elif mode == "ceil":
        idx = np.ceil(x)
    else:
        frac = x - np.floor(x)
        half = np.isclose(frac, 0.5)
        idx = np.where(half, np.floor(x) if mode == "round_prefer_floor" else np.ceil(x), np.round(x))
    return np.clip(idx, 0, n_in - 1).astype(np.int64)


def cubic_kernel(t: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a``."""
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _weights(attrs, x: np.ndarray, n_in: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Taps of linear/cubic interpolation (with antialias and exclude_outside): (out, T)
    input indices (clamped to the edge) and their normalized weights."""
    linear = attrs["mode"] == "linear"
    radius = 1 if linear else 2
    s = min(scale, 1.0) if attrs["antialias"] else 1.0
    base = np.floor(x)
    start = math.floor(-radius / s) + 1
    taps = np.arange(start, 2 - start)
    pos = base[:, None] + taps[None, :]
    t = (pos - x[:, None]) * s
    w = np.clip(1 - np.abs(t), 0, 1) if linear else cubic_kernel(t, attrs["cubic_coeff_a"])
    inside = (pos >= 0) & (pos <= n_in - 1)
    if attrs["exclude_outside"]:
        w = np.where(inside, w, 0.0)
    w = w / np.where(w.sum(axis=1, keepdims=True) == 0, 1, w.sum(axis=1, keepdims=True))
    return np.clip(pos, 0, n_in - 1).astype(np.int64), w


def resized_axes(attrs, shape) -> list[int]:
    """The axes Resize changes (all of them under tf_crop_and_resize)."""
    crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    return [a for a, (n_in, n_out) in enumerate(zip(shape, attrs["sizes"])) if crop or n_in != n_out or attrs["scales"][a] != 1]


def axis_taps(attrs, axis: int, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How Resize fills one axis: out[o] = sum_t weights[o, t] * in[indices[o, t]], and the
    rows that fall outside the input (tf_crop_and_resize writes extrapolation_value there).
    Backends embed these tables; the eager reference applies them with numpy."""
    coords = _source_coords(attrs, axis, n_in, n_out)
    if attrs["mode"] == "nearest":
        indices, weights = _nearest_index(attrs, coords, n_in)[:, None], np.ones((n_out, 1))
    else:
        indices, weights = _weights(attrs, coords, n_in, attrs["scales"][axis])
    return indices, weights, (coords < 0) | (coords > n_in - 1)


def _resize(attrs, x: np.ndarray, *unused) -> np.ndarray:
    nearest = attrs["mode"] == "nearest"
    out = x if nearest else x.astype(np.float64)
    crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    outside_masks = []
    for axis in resized_axes(attrs, x.shape):
        indices, weights, outside = axis_taps(attrs, axis, x.shape[axis], attrs["sizes"][axis])
        if nearest:
            out = np.take(out, indices[:, 0], axis=axis)
        else:
            moved = np.moveaxis(out, axis, 0)
            shape = (-1,) + (1,) * (moved.ndim - 1)
            acc = sum(weights[:, t].reshape(shape) * moved[indices[:, t]] for t in range(indices.shape[1]))
            out = np.moveaxis(acc, 0, axis)
        if crop:
            outside_masks.append((axis, outside))
    if outside_masks:
        out = np.array(out, dtype=np.float64)
        for axis, bad in outside_masks:
            index = [slice(None)] * out.ndim
            index[axis] = bad
            out[tuple(index)] = attrs["extrapolation_value"]
    if x.dtype.kind in "iu" and not nearest:
        out = np.rint(out)
    return np.asarray(out).astype(x.dtype)


register(
    OpDef(
        "Resize",
        OpKind.INJECTIVE,
        _resize_infer,
        _resize,
        {
            "sizes": REQUIRED,
            "scales": REQUIRED,
            "roi": None,
            "mode": "nearest",
            "coordinate_transformation_mode": "half_pixel",
            "cubic_coeff_a": -0.75,
            "exclude_outside": 0,
            "extrapolation_value": 0.0,
            "nearest_mode": "round_prefer_floor",
            "antialias": 0,
        },
    )
)


# -- GridSample --------------------------------------------------------------------------------
GRID_MODES = ("linear", "nearest", "cubic")
PADDING_MODES = ("zeros", "border", "reflection")


def _grid_sample_infer(attrs, types):
    x, grid = present(types, 0, "X"), present(types, 1, "grid")
    check_dtype(x, ALL - {DType.bool})
    nd = x.rank - 2
    if nd < 1 or grid.rank != x.rank or grid.shape[0] != x.shape[0] or grid.shape[-1] != nd:
        raise fail(f"grid {grid} must be (N, *out, {nd}) for X {x}")
    if attrs["mode"] not in GRID_MODES or attrs["padding_mode"] not in PADDING_MODES:
        raise fail(f"mode {attrs['mode']!r} / padding_mode {attrs['padding_mode']!r} is not supported")
    return [x.with_shape([*x.shape[:2], *grid.shape[1:-1]])]


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold ``x`` back into [lo, hi] by mirroring at the borders."""
    span = hi - lo
    if span <= 0:
        return np.full_like(x, lo)
    below, above = x < lo, x > hi
    d = np.where(below, lo - x, x - hi)
    n = np.floor(d / span)
    r = d - n * span
    even = n % 2 == 0
    return np.where(below, np.where(even, lo + r, hi - r), np.where(above, np.where(even, hi - r, lo + r), x))


def _grid_sample(a, x, grid):
    spatial = x.shape[2:]
    nd = len(spatial)
    align = bool(a["align_corners"])
    padding = a["padding_mode"]
    mode = a["mode"]
    coords, lows, highs = [], [], []
    for i, length in enumerate(spatial):
        g = grid[..., nd - 1 - i].astype(np.float64)  # the grid lists x (last dim) first
        c = (g + 1) / 2 * (length - 1) if align else ((g + 1) * length - 1) / 2
        lo, hi = (0.0, length - 1.0) if align else (-0.5, length - 0.5)
        if mode == "nearest":
            c = np.rint(c)
        outside = (c < lo) | (c > hi)
        if padding == "border":
            c = np.where(outside, np.clip(c, 0, length - 1), c)
        elif padding == "reflection":
            c = np.where(outside, _reflect(c, lo, hi), c)
        coords.append(c)
        lows.append(lo)
        highs.append(hi)

    if mode == "nearest":
        taps = [(c.astype(np.int64)[None], np.ones((1,) + c.shape)) for c in coords]
    else:
        offsets = np.arange(0, 2) if mode == "linear" else np.arange(-1, 3)
        taps = []
        for c in coords:
            base = np.floor(c)
            pos = base[None] + offsets.reshape((-1,) + (1,) * c.ndim)
            t = pos - c[None]
            w = np.clip(1 - np.abs(t), 0, 1) if mode == "linear" else cubic_kernel(t, -0.75)
            taps.append((pos.astype(np.int64), w))

    n = x.shape[0]
    batch = np.arange(n).reshape((n,) + (1,) * (grid.ndim - 2))
    out = np.zeros((n, *grid.shape[1:-1], x.shape[1]))
    for combo in np.ndindex(*[len(p) for p, _ in taps]):
        weight = np.ones(grid.shape[:-1])
        index, valid = [], np.ones(grid.shape[:-1], dtype=bool)
        for i, k in enumerate(combo):
            pos, w = taps[i][0][k], taps[i][1][k]
            weight = weight * w
            length = spatial[i]
            if padding == "zeros":
                valid &= (pos >= 0) & (pos < length)
                pos = np.clip(pos, 0, length - 1)
            elif padding == "border":
                pos = np.clip(pos, 0, length - 1)
            else:
                pos = np.trunc(_reflect(pos.astype(np.float64), lows[i], highs[i])).astype(np.int64)
                pos = np.clip(pos, 0, length - 1)
            index.append(pos)
        # X[n, :, i0, i1, ...] gathered per output location: (N, *out, C)
        picked = np.moveaxis(x, 1, -1)[(batch, *index)].astype(np.float64)
        out += np.where(valid[..., None], picked, 0.0) * weight[..., None]
    out = np.moveaxis(out, -1, 1)
    if x.dtype.kind in "iu":
        out = np.rint(out)
    return out.astype(x.dtype)


register(
    OpDef(
        "GridSample",
        OpKind.OPAQUE,
        _grid_sample_infer,
        _grid_sample,
        {"mode": "linear", "padding_mode": "zeros", "align_corners": 0},
        num_inputs=(2, 2),
    )
)
