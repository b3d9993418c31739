"""Convolutions and pooling over N spatial dims (NCHW-style layouts: batch, channel, spatial...).

Attributes are explicit: the importer resolves ``auto_pad`` and ConvTranspose's
``output_shape`` into ``pads``, so shape rules here never guess. Conv, ConvTranspose, MaxPool
and AveragePool also take ``layout="NHWC"`` (channels last; made by the layout pass, never by the importer).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kiln.ir.dtypes import DType, FLOATS
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, register
from kiln.ir.ops.rules import check_dtype, fail, ints, present, same_dtype
from kiln.ir.types import TensorType


def _spatial_attrs(attrs, nd: int) -> tuple[list[int], list[int], list[int]]:
    strides = ints(attrs["strides"] or [1] * nd, "strides")
    dilations = ints(attrs["dilations"] or [1] * nd, "dilations")
    pads = ints(attrs["pads"] or [0] * (2 * nd), "pads")
    if len(strides) != nd or len(dilations) != nd or len(pads) != 2 * nd:
        raise fail(f"strides/dilations need {nd} entries and pads {2 * nd}")
    if any(s < 1 for s in strides) or any(d < 1 for d in dilations) or any(p < 0 for p in pads):
        raise fail("strides and dilations must be >= 1 and pads >= 0")
    return strides, dilations, pads


def window_output_shape(
    spatial: tuple[int, ...], kernel, strides, dilations, pads, ceil_mode: bool = False
) -> list[int]:
    """Output extent of a sliding window along each spatial dim (pooling and conv)."""
    nd = len(spatial)
    out = []
    for i in range(nd):
        eff = (kernel[i] - 1) * dilations[i] + 1
        span = spatial[i] + pads[i] + pads[i + nd] - eff
        if span < 0:
            raise fail(f"window of extent {eff} does not fit spatial dim {spatial[i]} with pads {pads}")
        n = (math.ceil if ceil_mode else math.floor)(span / strides[i]) + 1
        if ceil_mode and (n - 1) * strides[i] >= spatial[i] + pads[i]:
            n -= 1  # the last window would start in the end padding: drop it
        out.append(n)
    return out


def _windows(x: np.ndarray, kernel, strides, dilations, pads, out_shape, fill) -> np.ndarray:
    """(N, C, *out, *kernel) view of ``x`` padded with ``fill`` (beyond pads too, for ceil_mode)."""
    nd = len(kernel)
    width = [(0, 0), (0, 0)]
    for i in range(nd):
        eff = (kernel[i] - 1) * dilations[i] + 1
        need = (out_shape[i] - 1) * strides[i] + eff
        have = x.shape[2 + i] + pads[i] + pads[i + nd]
        width.append((pads[i], pads[i + nd] + max(0, need - have)))
    xp = np.pad(x, width, constant_values=fill)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None))
    index += tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out_shape, strides))
    index += tuple(slice(None, None, d) for d in dilations)
    return win[index]


# -- channels-last variants ----------------------------------------------------------------------
LAYOUTS = ("NCHW", "NHWC")


def to_channels_first(rank: int) -> list[int]:
    """The Transpose perm from (N, *spatial, C) to (N, C, *spatial)."""
    return [0, rank - 1, *range(1, rank - 1)]


def to_channels_last(rank: int) -> list[int]:
    """The Transpose perm from (N, C, *spatial) to (N, *spatial, C)."""
    return [0, *range(2, rank), 1]


def weight_to_spatial_first(rank: int) -> list[int]:
    """The Transpose perm from (M, C/g, *kernel) to (*kernel, C/g, M), the NHWC conv weight."""
    return [*range(2, rank), 1, 0]


def conv_weight_to_first(rank: int) -> list[int]:
    return inverse_perm(weight_to_spatial_first(rank))


def transposed_weight_to_last(rank: int) -> list[int]:
    """The Transpose perm from (C, M/g, *kernel) to (C, *kernel, M/g), the NHWC ConvTranspose weight."""
    return [0, *range(2, rank), 1]


def transposed_weight_to_first(rank: int) -> list[int]:
    return inverse_perm(transposed_weight_to_last(rank))


def inverse_perm(perm: list[int]) -> list[int]:
    """The permutation that undoes ``perm`` (a Transpose by it after one by ``perm`` is the identity)."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _permuted(t, perm):
    return t.with_shape([t.shape[p] for p in perm])


def channels_last(infer, eager, weight_to_first=None):
    """``infer``/``eager`` of an NCHW op extended with the ``layout`` attribute: with "NHWC" the
    data are channels-last (and a convolution's weight is in the order ``weight_to_first(rank)``
    takes back to the NCHW op's), and the op means the NCHW op on the transposed operands,
    transposed back."""

    def layout_infer(attrs, types):
        if attrs["layout"] not in LAYOUTS:
            raise fail(f"layout {attrs['layout']!r} is not one of {LAYOUTS}")
        if attrs["layout"] == "NCHW":
            return infer(attrs, types)
        x = present(types, 0, "X")
        ins = list(types)
        ins[0] = _permuted(x, to_channels_first(x.rank))
        if weight_to_first is not None:
            w = present(types, 1, "W")
            ins[1] = _permuted(w, weight_to_first(w.rank))
        outs = infer(attrs, ins)
        return [_permuted(outs[0], to_channels_last(outs[0].rank)), *outs[1:]]

    def layout_eager(attrs, x, *rest):
        if attrs["layout"] == "NCHW":
            return eager(attrs, x, *rest)
        rest = list(rest)
        if weight_to_first is not None:
            rest[0] = rest[0].transpose(weight_to_first(rest[0].ndim))
        outs = eager(attrs, x.transpose(to_channels_first(x.ndim)), *rest)
        outs = (outs,) if isinstance(outs, np.ndarray) else tuple(outs)
        return (np.ascontiguousarray(outs[0].transpose(to_channels_last(outs[0].ndim))), *outs[1:])

    return layout_infer, layout_eager


# -- Conv ------------------------------------------------------------------------------------
CONV_ATTRS = {"strides": None, "pads": None, "dilations": None, "group": 1}


def _conv_infer(attrs, types):
    x, w = present(types, 0, "X"), present(types, 1, "W")
    check_dtype(x, FLOATS, "X")
    same_dtype([x, w])
    nd = x.rank - 2
    if nd < 1 or w.rank != x.rank:
        raise fail(f"X {x} and W {w} must both have rank >= 3 and equal ranks")
    g = attrs["group"]
    if x.shape[1] != w.shape[1] * g or w.shape[0] % g:
        raise fail(f"X has {x.shape[1]} channels; W {w} with group={g} expects {w.shape[1] * g}")
    if len(types) > 2 and types[2] is not None and types[2].shape != (w.shape[0],):
        raise fail(f"bias {types[2]} must have shape ({w.shape[0]},)")
    strides, dilations, pads = _spatial_attrs(attrs, nd)
    out = window_output_shape(x.shape[2:], w.shape[2:], strides, dilations, pads)
    return [x.with_shape([x.shape[0], w.shape[0], *out])]


def _conv(a, x, w, b=None):
    nd = x.ndim - 2
    strides, dilations, pads = _spatial_attrs(a, nd)
    kernel = w.shape[2:]
    out_shape = window_output_shape(x.shape[2:], kernel, strides, dilations, pads)
    n, c = x.shape[:2]
    m, g = w.shape[0], a["group"]
    win = _windows(x, kernel, strides, dilations, pads, out_shape, 0)  # (N, C, *O, *K)
    win = win.reshape(n, g, c // g, *out_shape, *kernel)
    perm = [0, 1, *range(3, 3 + nd), 2, *range(3 + nd, 3 + 2 * nd)]
    kk = (c // g) * math.prod(kernel)
    cols = win.transpose(perm).reshape(n, g, math.prod(out_shape), kk)
    wg = w.reshape(g, m // g, kk)
    y = np.matmul(cols, wg.transpose(0, 2, 1))  # (N, G, P, M/G)
    y = y.transpose(0, 1, 3, 2).reshape(n, m, *out_shape)
    if b is not None:
        y = y + b.reshape((1, m) + (1,) * nd)
    return y.astype(x.dtype)


register(OpDef("Conv", OpKind.HEAVY, *channels_last(_conv_infer, _conv, conv_weight_to_first), {**CONV_ATTRS, "layout": "NCHW"}, num_inputs=(2, 3)))


def is_depthwise(node) -> bool:
    """A 2-D Conv with one input and one output channel per group (either layout)."""
    if node.op.name != "Conv" or node.inputs[0].type.rank != 4:
        return False
    x, w = node.inputs[0].type, node.inputs[1].type
    nhwc = node.attrs["layout"] == "NHWC"
    channels, filters, per_group = (x.shape[-1], w.shape[-1], w.shape[2]) if nhwc else (x.shape[1], w.shape[0], w.shape[1])
    return node.attrs["group"] == channels == filters and per_group == 1


# -- ConvTranspose ---------------------------------------------------------------------------
def _conv_t_infer(attrs, types):
    x, w = present(types, 0, "X"), present(types, 1, "W")
    check_dtype(x, FLOATS, "X")
    same_dtype([x, w])
    nd = x.rank - 2
    g = attrs["group"]
    if nd < 1 or w.rank != x.rank or w.shape[0] != x.shape[1]:
        raise fail(f"W {w} must have rank {x.rank} and {x.shape[1]} input channels")
    strides, dilations, pads = _spatial_attrs(attrs, nd)
    opad = ints(attrs["output_padding"] or [0] * nd, "output_padding")
    out = [
        strides[i] * (x.shape[2 + i] - 1) + opad[i] + (w.shape[2 + i] - 1) * dilations[i] + 1 - pads[i] - pads[i + nd]
        for i in range(nd)
    ]
    if any(o < 0 for o in out):
        raise fail(f"output shape {out} is negative")
    return [x.with_shape([x.shape[0], w.shape[1] * g, *out])]


def _conv_transpose(a, x, w, b=None):
    nd = x.ndim - 2
    strides, dilations, pads = _spatial_attrs(a, nd)
    opad = a["output_padding"] or [0] * nd
    n, c, *ins = x.shape
    g = a["group"]
    mg, kernel = w.shape[1], w.shape[2:]
    # columns: (N, G, M/G, *K, *I) = W_g^T @ X_g
    xg = x.reshape(n, g, c // g, math.prod(ins))
    wg = w.reshape(g, c // g, mg * math.prod(kernel))
    cols = np.matmul(wg.transpose(0, 2, 1)[None], xg).reshape(n, g, mg, *kernel, *ins)
    full = [strides[i] * (ins[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 + opad[i] for i in range(nd)]
    y = np.zeros((n, g, mg, *full), dtype=np.float64 if x.dtype == np.float64 else np.float32)
    for k in np.ndindex(*kernel):
        dst = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + (ins[i] - 1) * strides[i] + 1, strides[i]) for i in range(nd))
        y[(slice(None),) * 3 + dst] += cols[(slice(None),) * 3 + k]
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None),) * 3 + crop].reshape(n, g * mg, *[full[i] - pads[i] - pads[i + nd] for i in range(nd)])
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nd)
    return y.astype(x.dtype)


register(
    OpDef(
        "ConvTranspose",
        OpKind.HEAVY,
        *channels_last(_conv_t_infer, _conv_transpose, transposed_weight_to_first),
        {**CONV_ATTRS, "output_padding": None, "layout": "NCHW"},
        num_inputs=(2, 3),
    )
)


# -- pooling ---------------------------------------------------------------------------------
POOL_ATTRS = {"kernel_shape": REQUIRED, "strides": None, "pads": None, "dilations": None, "ceil_mode": 0}


def _pool_geometry(attrs, x: TensorType | np.ndarray):
    shape = x.shape
    nd = len(shape) - 2
    if nd < 1:
        raise fail(f"pooling needs rank >= 3, got shape {shape}")
    kernel = ints(attrs["kernel_shape"], "kernel_shape")
    if len(kernel) != nd:
        raise fail(f"kernel_shape {kernel} needs {nd} entries")
    strides, dilations, pads = _spatial_attrs(attrs, nd)
    out = window_output_shape(tuple(shape[2:]), kernel, strides, dilations, pads, bool(attrs["ceil_mode"]))
    return kernel, strides, dilations, pads, out


def _max_pool_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS | {DType.int8, DType.uint8})
    *_, out = _pool_geometry(attrs, x)
    shape = [*x.shape[:2], *out]
    return [x.with_shape(shape), TensorType(tuple(shape), DType.int64)]


def _max_pool(a, x):
    kernel, strides, dilations, pads, out = _pool_geometry(a, x)
    nd = len(kernel)
    low = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    win = _windows(x, kernel, strides, dilations, pads, out, low)
    flat = win.reshape(*win.shape[: 2 + nd], -1)
    arg = np.argmax(flat, axis=-1)
    y = np.take_along_axis(flat, arg[..., None], -1)[..., 0]
    # indices into the flattened (N, C, *spatial) input, row-major or column-major spatial
    spatial = x.shape[2:]
    pos = [np.arange(o).reshape([-1 if j == i else 1 for j in range(nd)]) * strides[i] - pads[i] for i, o in enumerate(out)]
    kpos = np.unravel_index(arg, kernel)
    coords = [pos[i] + kpos[i] * dilations[i] for i in range(nd)]
    if a["storage_order"]:
        spatial_index = sum(coords[i] * math.prod(spatial[:i]) for i in range(nd))
    else:
        spatial_index = sum(coords[i] * math.prod(spatial[i + 1 :]) for i in range(nd))
    nc = np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *([1] * nd))
    indices = nc * math.prod(spatial) + spatial_index
    return y.astype(x.dtype), indices.astype(np.int64)


register(
    OpDef(
        "MaxPool",
        OpKind.HEAVY,
        *channels_last(_max_pool_infer, _max_pool),
        {**POOL_ATTRS, "storage_order": 0, "layout": "NCHW"},
        num_outputs=(1, 2),
    )
)


def _avg_pool_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS)
    *_, out = _pool_geometry(attrs, x)
    return [x.with_shape([*x.shape[:2], *out])]


def _avg_pool(a, x):
    kernel, strides, dilations, pads, out = _pool_geometry(a, x)
    nd = len(kernel)
    win = _windows(x.astype(np.float64), kernel, strides, dilations, pads, out, 0.0)
    total = win.sum(axis=tuple(range(-nd, 0)))
    # the divisor counts real elements, plus explicit padding when count_include_pad
    ones = np.ones((1, 1, *x.shape[2:]))
    if a["count_include_pad"]:
        ones = np.pad(ones, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)], constant_values=1.0)
        counts = _windows(ones, kernel, strides, dilations, [0] * (2 * nd), out, 0.0)
    else:
        counts = _windows(ones, kernel, strides, dilations, pads, out, 0.0)
    count = counts.sum(axis=tuple(range(-nd, 0)))
    return (total / np.maximum(count, 1)).astype(x.dtype)


register(
    OpDef(
        "AveragePool",
        OpKind.HEAVY,
        *channels_last(_avg_pool_infer, _avg_pool),
        {**POOL_ATTRS, "count_include_pad": 0, "layout": "NCHW"},
    )
)


def _lp_pool(a, x):
    kernel, strides, dilations, pads, out = _pool_geometry(a, x)
    nd = len(kernel)
    p = a["p"]
    win = _windows(np.abs(x.astype(np.float64)), kernel, strides, dilations, pads, out, 0.0)
    return (np.sum(win**p, axis=tuple(range(-nd, 0))) ** (1.0 / p)).astype(x.dtype)


register(OpDef("LpPool", OpKind.HEAVY, _avg_pool_infer, _lp_pool, {**POOL_ATTRS, "p": 2}))


def _global_infer(attrs, types):
    x = present(types, 0, "X")
    check_dtype(x, FLOATS)
    if x.rank < 3:
        raise fail(f"needs rank >= 3, got {x}")
    return [x.with_shape([*x.shape[:2], *([1] * (x.rank - 2))])]


def _global(fn):
    def eager(a, x):
        axes = tuple(range(2, x.ndim))
        return np.asarray(fn(a, x.astype(np.float64), axes), dtype=x.dtype)

    return eager


register(
    OpDef(
        "GlobalAveragePool",
        OpKind.REDUCTION,
        _global_infer,
        _global(lambda a, x, ax: x.mean(axis=ax, keepdims=True)),
    )
)
register(
    OpDef("GlobalMaxPool", OpKind.REDUCTION, _global_infer, _global(lambda a, x, ax: x.max(axis=ax, keepdims=True)))
)
register(
    OpDef(
        "GlobalLpPool",
        OpKind.REDUCTION,
        _global_infer,
        _global(lambda a, x, ax: (np.abs(x) ** a["p"]).sum(axis=ax, keepdims=True) ** (1.0 / a["p"])),
        {"p": 2},
    )
)


# -- MaxUnpool / Col2Im: scatter windows back into an image ----------------------------------
def _max_unpool_infer(attrs, types):
    x, idx = present(types, 0, "X"), present(types, 1, "I")
    check_dtype(x, FLOATS)
    check_dtype(idx, {DType.int64}, "I")
    if idx.shape != x.shape:
        raise fail(f"indices {idx} must have the shape of X {x}")
    return [x.with_shape([*x.shape[:2], *ints(attrs["output_shape"], "output_shape")[-(x.rank - 2):]])]


def _max_unpool(a, x, idx):
    # indices address the unpooled shape the pooling geometry gives; a larger output_shape
    # pads that image at the end of each spatial axis
    unpooled = [*x.shape[:2], *a["unpooled_shape"]]
    out = np.zeros(math.prod(unpooled), dtype=x.dtype)
    out[idx.reshape(-1)] = x.reshape(-1)
    shape = [*x.shape[:2], *a["output_shape"][-(x.ndim - 2) :]]
    pad = [(0, max(0, s - u)) for s, u in zip(shape, unpooled)]
    return np.pad(out.reshape(unpooled), pad)[tuple(slice(0, s) for s in shape)]


register(
    OpDef(
        "MaxUnpool",
        OpKind.OPAQUE,
        _max_unpool_infer,
        _max_unpool,
        {"output_shape": REQUIRED, "unpooled_shape": REQUIRED},
        num_inputs=(2, 2),
        doc="Scatter X at MaxPool's flat indices I into zeros of `unpooled_shape`, padded to `output_shape`.",
    )
)


def _col2im_geometry(attrs, cols_shape):
    image, block = ints(attrs["image_shape"], "image_shape"), ints(attrs["block_shape"], "block_shape")
    nd = len(image)
    strides, dilations, pads = _spatial_attrs(attrs, nd)
    blocks = window_output_shape(tuple(image), block, strides, dilations, pads)
    c, rem = divmod(cols_shape[1], math.prod(block))
    if rem or cols_shape[2] != math.prod(blocks):
        raise fail(f"input {list(cols_shape)} does not hold C x {block} columns for {blocks} blocks")
    return image, block, strides, dilations, pads, blocks, c


def _col2im_infer(attrs, types):
    x = present(types, 0, "input")
    check_dtype(x, FLOATS)
    if x.rank != 3:
        raise fail(f"input {x} must be (N, C*prod(block), L)")
    image, *_, c = _col2im_geometry(attrs, x.shape)
    return [x.with_shape([x.shape[0], c, *image])]


def _col2im(a, x):
    image, block, strides, dilations, pads, blocks, c = _col2im_geometry(a, x.shape)
    nd = len(image)
    n = x.shape[0]
    cols = x.astype(np.float64).reshape(n, c, *block, *blocks)
    padded = np.zeros((n, c, *[image[i] + pads[i] + pads[i + nd] for i in range(nd)]))
    for k in np.ndindex(*block):
        dst = tuple(slice(k[i] * dilations[i], k[i] * dilations[i] + (blocks[i] - 1) * strides[i] + 1, strides[i]) for i in range(nd))
        padded[(slice(None), slice(None)) + dst] += cols[(slice(None), slice(None)) + k]
    crop = tuple(slice(pads[i], pads[i] + image[i]) for i in range(nd))
    return padded[(slice(None), slice(None)) + crop].astype(x.dtype)


register(
    OpDef(
        "Col2Im",
        OpKind.OPAQUE,
        _col2im_infer,
        _col2im,
        {"image_shape": REQUIRED, "block_shape": REQUIRED, "strides": None, "pads": None, "dilations": None},
    )
)
