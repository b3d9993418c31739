"""Converters of the signal ops: DFT, and STFT and MelWeightMatrix written through kiln's ops
(frames gathered by constant indices and windowed, then a DFT; the mel filter bank computed
now, as ONNX's reference computes it). Lengths, steps and the filter bank's inputs must be
known when compiling."""

from __future__ import annotations

import numpy as np

from kiln.frontend.onnx.importer import NodeContext, converter, dtype_from_onnx


@converter("DFT")
def _dft(ctx: NodeContext):
    """Opset 17 names the axis by attribute, 20 by input (default -2); ``dft_length`` must be
    known when compiling. Its default: the signal's length, or for an inverse one-sided
    transform 2 * (bins - 1)."""
    x = ctx.type(0)
    if ctx.opset >= 20:
        given = ctx.const_ints(2, "axis")
        axis = given[0] if given else -2
    else:
        axis = ctx.attr("axis", 1)
    if not -x.rank <= axis < x.rank:
        raise ctx.error(f"axis {axis} is outside input {x}")
    inverse, onesided = ctx.attr("inverse", 0), ctx.attr("onesided", 0)
    length = ctx.const_ints(1, "dft_length")
    if length is not None:
        length = length[0]
    elif inverse and onesided:
        length = 2 * (x.shape[axis] - 1)
    else:
        length = x.shape[axis]
    return ctx.emit("DFT", [ctx.input(0)], {"axis": axis % x.rank, "length": length, "inverse": inverse, "onesided": onesided})


@converter("STFT")
def _stft(ctx: NodeContext):
    """Frames of ``frame_length`` samples every ``frame_step`` along axis 1 of the (batch,
    samples, 1 or 2) signal, gathered as (batch, frames, frame_length, 1 or 2), times the window
    when given, then a DFT along the frame axis (one-sided by default)."""
    x = ctx.type(0)
    step = ctx.const_ints(1, "frame_step")[0]
    window = ctx.input(2)
    given = ctx.const_ints(3, "frame_length")
    length = given[0] if given else window.type.shape[0] if window is not None else x.shape[-2]
    frames = 1 + (x.shape[1] - length) // step if step > 0 else 0
    if x.rank != 3 or frames < 1 or length < 1:
        raise ctx.error(f"signal {x} has no frame of {length} samples every {step}")
    if window is not None and window.type.shape != (length,):
        raise ctx.error(f"window {window.type} must hold frame_length = {length} values")
    starts = np.arange(frames, dtype=np.int64)[:, None] * step + np.arange(length, dtype=np.int64)[None, :]
    framed = ctx.emit("Gather", [ctx.input(0), ctx.constant(starts)], {"axis": 1})[0]
    if window is not None:
        framed = ctx.emit("Mul", [framed, ctx.reshape(window, [1, 1, length, 1])])[0]
    return ctx.emit("DFT", [framed], {"axis": 2, "length": length, "inverse": 0, "onesided": ctx.attr("onesided", 1)})


@converter("MelWeightMatrix")
def _mel_weight_matrix(ctx: NodeContext):
    """The (dft_length // 2 + 1, num_mel_bins) triangular filter bank, a constant: ONNX's
    reference algorithm on the inputs' own dtypes, so the bins round as its do."""
    mels, dft_length, rate, low, high = (ctx.const(i, what) for i, what in enumerate(("num_mel_bins", "dft_length", "sample_rate", "lower_edge_hertz", "upper_edge_hertz")))
    mels, dft_length, rate = int(mels), int(dft_length), int(rate)
    if mels < 1 or dft_length < 1 or rate < 1:
        raise ctx.error(f"num_mel_bins {mels}, dft_length {dft_length} and sample_rate {rate} must be positive")
    bins = np.arange(0, mels + 2)
    low_mel = 2595 * np.log1p(low / 700) / np.log(10)
    high_mel = 2595 * np.log1p(high / 700) / np.log(10)
    bins = bins * ((high_mel - low_mel) / bins.shape[0]) + low_mel
    bins = ((dft_length + 1) * (700 * np.expm1(bins / 2595 * np.log(10)))) // rate
    bins = bins.astype(int)
    if bins.min() < 0 or bins.max() > dft_length // 2:
        raise ctx.error(f"the mel edges {float(low)}..{float(high)} Hz fall outside the {dft_length // 2 + 1} spectrogram bins")
    weights = np.zeros((dft_length // 2 + 1, mels))
    for i in range(mels):
        left, centre, right = bins[i], bins[i + 1], bins[i + 2]
        if centre == left:
            weights[centre, i] = 1
        else:
            weights[left : centre + 1, i] = (np.arange(left, centre + 1) - left) / (centre - left)
        if right > centre:
            weights[centre:right, i] = (right - np.arange(centre, right)) / (right - centre)
    dtype = dtype_from_onnx(ctx.attr("output_datatype", 1), f"node {ctx.name!r}").numpy
    return [ctx.constant(weights.astype(dtype))]
