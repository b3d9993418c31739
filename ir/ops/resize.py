"""Resize (and ONNX Upsample): separable nearest, linear and cubic interpolation, N-d.

The importer resolves ``scales``/``sizes``/``axes``/``keep_aspect_ratio_policy`` into two
full-rank attributes: ``sizes`` (the output shape) and ``scales`` (output/input per axis, the
value the coordinate transform divides by). Each axis is an (out, in) weight matrix.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.ir.dtypes import ALL
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


def _cubic(t: np.ndarray, a: float) -> np.ndarray:
    t = np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _weights(attrs, x: np.ndarray, n_in: int, scale: float) -> np.ndarray:
    """(out, in) interpolation matrix for linear/cubic, with antialias and exclude_outside."""
    linear = attrs["mode"] == "linear"
    radius = 1 if linear else 2
    s = min(scale, 1.0) if attrs["antialias"] else 1.0
    base = np.floor(x)
    start = math.floor(-radius / s) + 1
    taps = np.arange(start, 2 - start)
    pos = base[:, None] + taps[None, :]
    t = (pos - x[:, None]) * s
    w = np.clip(1 - np.abs(t), 0, 1) if linear else _cubic(t, attrs["cubic_coeff_a"])
    inside = (pos >= 0) & (pos <= n_in - 1)
    if attrs["exclude_outside"]:
        w = np.where(inside, w, 0.0)
    w = w / np.where(w.sum(axis=1, keepdims=True) == 0, 1, w.sum(axis=1, keepdims=True))
    matrix = np.zeros((len(x), n_in))
    idx = np.clip(pos, 0, n_in - 1).astype(np.int64)
    rows = np.repeat(np.arange(len(x)), taps.size)
    np.add.at(matrix, (rows, idx.reshape(-1)), w.reshape(-1))
    return matrix


def _resize(attrs, x: np.ndarray, *unused) -> np.ndarray:
    out = x.astype(np.float64) if attrs["mode"] != "nearest" else x
    sizes = attrs["sizes"]
    crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    outside_masks = []
    for axis, (n_in, n_out) in enumerate(zip(x.shape, sizes)):
        if n_in == n_out and attrs["scales"][axis] == 1 and not crop:
            continue
        coords = _source_coords(attrs, axis, n_in, n_out)
        if attrs["mode"] == "nearest":
            out = np.take(out, _nearest_index(attrs, coords, n_in), axis=axis)
        else:
            w = _weights(attrs, coords, n_in, attrs["scales"][axis])
            out = np.moveaxis(np.tensordot(w, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
        if crop:
            bad = (coords < 0) | (coords > n_in - 1)
            outside_masks.append((axis, bad))
    if crop and outside_masks:
        out = np.array(out, dtype=np.float64)
        for axis, bad in outside_masks:
            index = [slice(None)] * out.ndim
            index[axis] = bad
            out[tuple(index)] = attrs["extrapolation_value"]
    if x.dtype.kind in "iu" and attrs["mode"] != "nearest":
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
